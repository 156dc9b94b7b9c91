"""The error data preparation raises for the user to act on; the message names the file (and line)."""

from __future__ import annotations


class DataError(ValueError):
    """A data source or a cached token shard cannot be used. The CLI prints it as one line (exit 2)."""


class SourceUnavailable(DataError, RuntimeError):
    """A hub dataset or tokenizer cannot be reached (offline, unknown name); a RuntimeError as before."""
