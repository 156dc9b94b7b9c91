"""Errors the training package raises for the user to act on (the CLI prints them without a traceback)."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and what is wrong with it."""


class IncompleteCheckpointError(CheckpointError):
    """A sharded checkpoint whose save never finished (no manifest): it was never a checkpoint, so resume ignores it."""


class NonFiniteLossError(RuntimeError):
    """Raised by ``trainer.nonfinite=abort``; names the step and the last good checkpoint."""


class NonFiniteOutputError(RuntimeError):
    """The model produces NaN/inf logits (e.g. after non-finite steps were skipped): no sample can be drawn."""
