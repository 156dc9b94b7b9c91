"""Reading torch.distributed.checkpoint (DCP) folders without running code from them.

DCP's own ``FileSystemReader.read_metadata`` calls ``pickle.load`` on ``.metadata`` and its
``DefaultLoadPlanner.load_bytes`` calls ``torch.load(weights_only=False)`` on every non-tensor item
(optimizer hyperparameters), so a planted file runs arbitrary code. Here:

- ``.metadata`` goes through :class:`MetadataUnpickler`, which resolves only DCP's metadata classes
  (dataclasses and enums of ``torch.distributed.checkpoint.metadata``, ``_StorageInfo``),
  ``torch.Size``, torch dtypes / layouts and a few inert builtins (checked on torch 2.11 and 2.13);
  anything else raises ``pickle.UnpicklingError`` naming the global.
- the metadata's storage entries must name plain files inside the folder (no ``/``, no ``..``) and
  carry no stream transforms (we never write them);
- non-tensor items load with ``torch.load(weights_only=True)`` (:class:`SafeLoadPlanner`);
  tensor items already do in DCP's reader.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import pickle
from pathlib import Path
from typing import Any

import torch

from training.errors import CheckpointError

METADATA = ".metadata"
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
_STORAGE_INFO = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.metadata", "_StorageInfo"),
}
_INERT = {
    ("builtins", n)
    for n in ("set", "frozenset", "tuple", "list", "dict", "int", "float", "bool", "str", "bytes", "complex", "slice")
} | {
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that can only build DCP metadata: a global outside the allowlist is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _INERT or (module, name) in _STORAGE_INFO:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        if module in _METADATA_MODULES:
            import importlib

            value = getattr(importlib.import_module(module), name, None)
            is_data = isinstance(value, type) and (dataclasses.is_dataclass(value) or issubclass(value, enum.Enum))
            if is_data and value.__module__ == module:
                return value
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def read_metadata(folder: Path):
    """The folder's DCP ``Metadata``, unpickled with the allowlist and checked to reference only its own files."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(folder) / METADATA
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except Exception as e:  # UnpicklingError, EOF, a refused global: all mean "do not use this folder"
        raise CheckpointError(
            f"checkpoint file {path} is unreadable or not plain DCP metadata ({type(e).__name__}: {str(e)[:200]})"
        ) from e
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"checkpoint file {path} does not hold DCP metadata (found {type(metadata).__name__})")
    for index, info in metadata.storage_data.items():
        rel = getattr(info, "relative_path", None)
        if (
            not isinstance(rel, str)
            or "/" in rel
            or "\\" in rel
            or rel in ("", ".", "..")
            or not (path.parent / rel).is_file()
        ):
            raise CheckpointError(
                f"checkpoint file {path} points {getattr(index, 'fqn', index)!r} at {rel!r}, "
                "which is not a file of this checkpoint folder"
            )
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(
                f"checkpoint file {path} asks for stream transforms {info.transform_descriptors!r} "
                "(this framework never writes them)"
            )
    return metadata


def safe_reader(folder: Path):
    """A ``FileSystemReader`` for ``folder`` whose metadata comes from :func:`read_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        current_file = None  # the shard file being read: failures name it

        def _slice_file(self, file, sinfo):
            self.current_file = sinfo.relative_path
            return super()._slice_file(file, sinfo)

        def read_data(self, plan, planner):
            try:
                return super().read_data(plan, planner)
            except CheckpointError:
                raise
            except Exception as e:
                where = Path(folder) / (self.current_file or "?")
                raise CheckpointError(
                    f"checkpoint file {where} is unreadable or not plain tensor data "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
                ) from e

        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = read_metadata(Path(folder))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(folder))


def safe_planner():
    """A ``DefaultLoadPlanner`` whose non-tensor items load with ``weights_only=True``."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except Exception as e:
                raise CheckpointError(
                    f"checkpoint item {read_item.dest_index.fqn!r} is not plain data "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                ) from e
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner()


def dcp_load(state: dict[str, Any], folder: Path, no_dist: bool) -> None:
    """``dcp.load`` through the safe reader and planner; any failure names the folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=safe_reader(folder), planner=safe_planner(), no_dist=no_dist)
    except CheckpointException as e:  # a BaseException: unwrap the first rank's failure
        inner = next(iter(e.failures.values()))[0] if e.failures else e
        if isinstance(inner, CheckpointError):
            raise inner from None
        raise CheckpointError(
            f"checkpoint {folder} could not be loaded ({type(inner).__name__}: {str(inner)[:300]})"
        ) from None
    except CheckpointError:
        raise
    except Exception as e:
        message = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {folder} could not be loaded ({type(e).__name__}: {message})") from e
