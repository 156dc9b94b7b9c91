"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), resumable at any world size.

Layout of one DCP checkpoint (a folder beside the single-file ``step_XXXXXXXX.pt`` ones)::

    checkpoints/step_00000020/              *.distcp shards and .metadata (written last by DCP)
    checkpoints/step_00000020/extra.pt      step, sampler, RNG, schedule, config (rank 0, weights-only)
    checkpoints/step_00000020/manifest.json SHA-256 of every other file; written last: marks the save complete

Loading goes through training/checkpoint/load.py (verified, allowlist unpickler, weights-only items).

Model and optimizer state go through ``torch.distributed.checkpoint.state_dict`` (fully-qualified
parameter names, DDP/FSDP2 aware), so DCP reshards on load: a checkpoint saved by 2 processes loads
into 1 (or 4) and the reverse. Expert-parallel banks are local slices on each rank; they are saved
as DTensors sharded over the ep mesh dimension so that they reshard the same way.

``python -m training.checkpoint.sharded consolidate CKPT OUT.safetensors`` writes a sharded checkpoint's
model weights as one safetensors file (no process group needed).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from training.checkpoint import faults, integrity
from training.checkpoint import files as ckpt
from training.checkpoint.load import EXTRA, load_checkpoint
from training.checkpoint.safe_pickle import METADATA, dcp_load, read_metadata
from training.errors import CheckpointError

# DCP warns on every single-process save/load (also from the background thread of an async save);
# for us one process is a supported mode, not a mistake.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def is_complete(path: Path) -> bool:
    return (path / integrity.MANIFEST).is_file()


# ----------------------------------------------------------------------------- state dicts
def _expert_fqns(model: nn.Module, parallel) -> set[str]:
    expert_ids = {id(p) for p in parallel.expert_params}
    return {name for name, p in model.named_parameters() if id(p) in expert_ids}


def _map_expert_tensors(model_sd: dict, optim_sd: dict, fqns: set[str], fn) -> None:
    """Apply ``fn`` to every expert bank's weight and its per-parameter optimizer tensors (not ``step``).

    The optimizer's inner dicts are replaced, never edited: they may be the optimizer's live state.
    """
    for fqn in fqns:
        model_sd[fqn] = fn(model_sd[fqn])
        if fqn in optim_sd["state"]:
            optim_sd["state"][fqn] = {
                key: fn(value) if isinstance(value, torch.Tensor) and value.dim() > 0 else value
                for key, value in optim_sd["state"][fqn].items()
            }


def _as_ep_dtensor(local: torch.Tensor, parallel):
    from torch.distributed.tensor import DTensor, Replicate, Shard

    return DTensor.from_local(local, parallel.mesh, [Replicate(), Shard(0)], run_check=False)


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, parallel) -> dict[str, Any]:
    """{"model": …, "optim": …} for DCP: FQN-keyed, FSDP shards as DTensors, ep slices wrapped as DTensors."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    _map_expert_tensors(model_sd, optim_sd, _expert_fqns(model, parallel), lambda t: _as_ep_dtensor(t, parallel))
    return {"model": model_sd, "optim": optim_sd}


def apply_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], parallel) -> None:
    """Load what :func:`sharded_state` produced (after DCP filled it) back into model and optimizer."""
    from torch.distributed.checkpoint.state_dict import set_state_dict
    from torch.distributed.tensor import DTensor

    model_sd, optim_sd = state["model"], state["optim"]
    # back to the plain local slices the expert parameters are
    _map_expert_tensors(
        model_sd, optim_sd, _expert_fqns(model, parallel), lambda t: t.to_local() if isinstance(t, DTensor) else t
    )
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


def load_model_and_optimizer(
    state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, parallel
) -> None:
    """Weights and optimizer state from any checkpoint (``load_checkpoint``'s result) into this run's layout."""
    if "sharded" in state:  # a DCP folder, resharded to this run's world size
        load_dcp(state["sharded"], model, optimizer, parallel)
    elif parallel.enabled:  # a single-file checkpoint continued by several processes
        load_full_state(model, optimizer, state, parallel)
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], parallel) -> None:
    """Load a single-file (``.pt``) checkpoint into a possibly sharded model: 1 → N processes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model_sd = dict(state["model"])
    optim_sd = optimizer_state_by_name(state["optimizer"], model, optimizer)
    if parallel.ep > 1:
        ep_rank = parallel.mesh["ep"].get_local_rank()
        _map_expert_tensors(
            model_sd, optim_sd, _expert_fqns(model, parallel), lambda t: _ep_slice(t, parallel.ep, ep_rank)
        )
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_sd,
        optim_state_dict=optim_sd,
        options=StateDictOptions(full_state_dict=True),
    )


def _ep_slice(full: torch.Tensor, ep: int, ep_rank: int) -> torch.Tensor:
    per_rank = full.shape[0] // ep
    return full[ep_rank * per_rank : (ep_rank + 1) * per_rank]


def optimizer_state_by_name(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` (parameters numbered in param-group order) → FQN-keyed form."""
    names = {id(p): n for n, p in model.named_parameters()}
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {"state": {ordered[i]: s for i, s in state["state"].items()}, "param_groups": []}
    for group in state["param_groups"]:
        by_name["param_groups"].append({**group, "params": [ordered[i] for i in group["params"]]})
    return by_name


# ----------------------------------------------------------------------------- save / load
class DCPWriter:
    """Saves DCP checkpoints, optionally asynchronously; ``latest`` and pruning happen once a save is durable."""

    def __init__(self, parallel, async_save: bool):
        import torch.distributed as dist

        self.parallel, self.async_save = parallel, async_save
        self.pending: tuple[Any, Path] | None = None
        # Async saves coordinate from a background thread: give them their own gloo group so they
        # never interleave with the training collectives.
        self.group = dist.new_group(backend="gloo") if (async_save and parallel.enabled) else None

    def save(self, path: Path, model, optimizer, extra: dict[str, Any], on_durable) -> None:
        import torch.distributed.checkpoint as dcp

        self.wait()
        run_dir = path.parent.parent
        if self.parallel.is_main:
            try:
                ckpt.checkpoint_folder(run_dir)
                if path.exists():  # a stale partial folder from a crash at this very step
                    ckpt.remove_checkpoint(path)
                path.mkdir(parents=True)
                ckpt._atomic_write(path / EXTRA, lambda f: torch.save(extra, f))
            except OSError as e:
                raise ckpt.write_failed(path / EXTRA, e, run_dir) from e
            faults.point("dcp:after_extra")
        self.parallel.barrier()
        state = sharded_state(model, optimizer, self.parallel)
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(path), process_group=self.group)
            self.pending = (future, path, extra["step"], on_durable)
        else:
            self._guard(path, lambda: dcp.save(state, checkpoint_id=str(path), no_dist=_single_process()))
            self._seal(path, extra["step"])
            on_durable(path)

    def _guard(self, path: Path, fn) -> None:
        """Run a DCP save step; an OSError inside (disk full, permissions) → a CheckpointError naming the folder."""
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            fn()
        except CheckpointException as e:  # a BaseException wrapping each rank's failure
            inner = next(iter(e.failures.values()))[0] if e.failures else e
            if isinstance(inner, OSError):
                raise ckpt.write_failed(path, inner, path.parent.parent) from None
            raise
        except OSError as e:
            raise ckpt.write_failed(path, e, path.parent.parent) from e

    def _seal(self, path: Path, step: int) -> None:
        """Rank 0: write ``manifest.json`` (checksums of every file) last; only then is the folder a checkpoint."""
        self.parallel.barrier()
        if self.parallel.is_main:
            faults.point("dcp:before_manifest")
            try:
                manifest = integrity.manifest_of(path, step, ckpt.FORMAT_VERSION)
                ckpt._atomic_write(path / integrity.MANIFEST, lambda f: f.write(manifest))
            except OSError as e:
                raise ckpt.write_failed(path / integrity.MANIFEST, e, path.parent.parent) from e

    def wait(self) -> None:
        """Block until a pending asynchronous save has finished, then seal it and mark it durable."""
        if self.pending is None:
            return
        future, path, step, on_durable = self.pending
        self.pending = None
        self._guard(path, future.result)
        self._seal(path, step)
        on_durable(path)


def _single_process() -> bool:
    """No process group: DCP reads and writes every shard itself."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


def load_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, parallel) -> None:
    """Fill model and optimizer from a (verified) DCP checkpoint, resharding to this run's world size."""
    state = sharded_state(model, optimizer, parallel)
    dcp_load(state, path, no_dist=_single_process())
    apply_state(model, optimizer, state, parallel)


def consolidate(path: str | Path, out: str | Path) -> Path:
    """A DCP checkpoint's model weights → one safetensors file, read through the verified, code-free loader."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path, out = Path(path), Path(out)
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is not a sharded checkpoint folder (expected a checkpoints/step_XXXXXXXX folder "
            f"with {METADATA}, {EXTRA} and {integrity.MANIFEST})"
        )
    load_checkpoint(path)  # verifies every file's checksum and the metadata's allowlist before any tensor is read
    metadata = read_metadata(path)
    model_sd = {
        fqn[len("model.") :]: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for fqn, md in metadata.state_dict_metadata.items()
        if fqn.startswith("model.") and isinstance(md, TensorStorageMetadata) and not fqn.endswith("_extra_state")
    }
    dcp_load({"model": model_sd}, path, no_dist=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt.export_safetensors(model_sd, out)
    return out


def main(argv: list[str] | None = None) -> None:
    from training.tool_args import parse, tool_parser

    parser = tool_parser("python -m training.checkpoint.sharded", __doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consolidate", help="write a sharded checkpoint's model weights as one safetensors file")
    c.add_argument("checkpoint", help="a checkpoints/step_XXXXXXXX folder")
    c.add_argument("out", help="output .safetensors path")
    args = parse(parser, argv)
    try:
        out = consolidate(args.checkpoint, args.out)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main(sys.argv[1:])
