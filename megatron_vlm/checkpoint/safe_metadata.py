"""Checkpoint metadata read without running code from the file.

torch's distributed checkpoint (which Megatron's ``torch_dist`` format and our training checkpoints
use) stores its ``.metadata`` as a pickle and reads it with plain ``pickle.load``: a planted file
would run arbitrary code on every rank that resumes or converts. Here the same file is read with an
unpickler that only constructs the handful of plain data classes checkpoint metadata is made of,
and a directory whose metadata asks for anything else is refused before torch reads it.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

METADATA_FILE = ".metadata"

_ALLOWED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.distributed.checkpoint.planner": frozenset({
        "SavePlan", "LoadPlan", "WriteItem", "ReadItem", "WriteItemType", "LoadItemType", "TensorWriteData"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"PosixPath", "PurePosixPath", "Path", "WindowsPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset", "slice", "tuple", "list", "dict", "bytes", "bytearray"}),
}


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint's metadata asks to construct something that is not checkpoint metadata."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):  # torch.float32 ...
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.source}: refusing to load this checkpoint: its metadata asks for {module}.{name}, which "
            "checkpoint metadata never contains (the file may have been tampered with); nothing from it was run. "
            "Re-create the checkpoint from a trusted source")


def read_metadata(path: str) -> Metadata:
    """A DCP ``.metadata`` file, unpickled with the allowlist above."""
    with open(path, "rb") as f:
        metadata = _MetadataUnpickler(f, path).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path}: not torch distributed-checkpoint metadata ({type(metadata).__name__})")
    return metadata


def check_directory(directory: str) -> None:
    """Refuse a DCP directory whose metadata would construct anything beyond plain metadata."""
    path = os.path.join(directory, METADATA_FILE)
    if os.path.isfile(path):
        read_metadata(path)


class SafeFileSystemReader(FileSystemReader):
    """torch's FileSystemReader with the metadata read through the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}"
        metadata = read_metadata(os.path.join(str(self.path), name))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
