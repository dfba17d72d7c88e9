"""Reading and writing Hugging Face safetensors checkpoints one tensor at a time.

Reading opens each shard lazily (``safe_open`` memory-maps it), so converting a 7B model never
holds more than the model being filled plus one layer's tensors. Writing streams tensors into shards
of a size limit (one tensor copy alive at a time) and writes ``model.safetensors.index.json`` when
there is more than one; every file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


class HFCheckpointReader:
    """Names and lazy loads of the tensors of an HF checkpoint directory (single or sharded)."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        single_path = os.path.join(directory, SINGLE_FILE)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_path} has no 'weight_map'")
            self.file_of = dict(weight_map)
        elif os.path.isfile(single_path):
            with safe_open(single_path, framework="pt") as f:
                self.file_of = {name: SINGLE_FILE for name in f.keys()}
        else:
            found = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
            hint = (" (found PyTorch .bin weights: re-save them as safetensors with transformers' "
                    "save_pretrained(safe_serialization=True); pickle checkpoints are not loaded)"
                    if any(n.endswith(".bin") for n in found) else "")
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}{hint}")
        missing = sorted({f for f in self.file_of.values() if not os.path.isfile(os.path.join(directory, f))})
        if missing:
            raise FileNotFoundError(f"{directory}: shard files listed in the index are missing: {missing}")
        self._handles: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self.file_of)

    def load(self, name: str) -> torch.Tensor:
        file = self.file_of[name]
        handle = self._handles.get(file)
        if handle is None:
            handle = safe_open(os.path.join(self.directory, file), framework="pt")
            self._handles[file] = handle
        return handle.get_tensor(name)

    def dtype(self) -> torch.dtype:
        """The dtype most floating tensors have (what the checkpoint was saved in)."""
        name = next(n for n in self.file_of if n.endswith("embed_tokens.weight"))
        return self.load(name).dtype


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _write_safetensors(path: str, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                       tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Stream tensors into one safetensors file whose header is known in advance.

    ``safetensors.save_file`` wants every tensor of a file in memory at once (and refuses views
    that share storage, as q/k/v split from one fused tensor do); writing the format directly
    keeps at most one tensor's copy alive.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for (name, dtype, shape), (got_name, tensor) in zip(entries, tensors):
            if got_name != name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"tensor stream changed between passes at {name} / {got_name}")
            f.write(memoryview(tensor.contiguous().view(torch.uint8).reshape(-1).numpy()))
        f.flush()
        os.fsync(f.fileno())


def write_hf_checkpoint(tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]], directory: str,
                        max_shard_bytes: int = 5 * 1024**3, dtype: torch.dtype | None = None) -> list[str]:
    """Write (name, tensor) pairs as safetensors shards (+ index when more than one).

    ``tensors`` is called twice and must yield the same sequence each time: once to plan the shards
    from names, dtypes and shapes, once to write. Files appear under their final names only when
    complete. Returns the names written, in order.
    """
    os.makedirs(directory, exist_ok=True)

    def converted() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors():
            tensor = tensor.detach()
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            yield name, tensor

    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    shard_bytes = 0
    for name, tensor in converted():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((name, tensor.dtype, tuple(tensor.shape)))
        shard_bytes += size

    total = len(shards)
    files = [SINGLE_FILE] if total == 1 else [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    stream = converted()
    for file, entries in zip(files, shards):
        tmp = os.path.join(directory, file + ".tmp")
        _write_safetensors(tmp, entries, (next(stream) for _ in entries))
        os.replace(tmp, os.path.join(directory, file))
    if total > 1:
        total_size = sum(os.path.getsize(os.path.join(directory, f)) for f in files)
        index = {"metadata": {"total_size": total_size},
                 "weight_map": {name: file for file, entries in zip(files, shards) for name, _, _ in entries}}
        tmp = os.path.join(directory, INDEX_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(index, f, indent=2)
        os.replace(tmp, os.path.join(directory, INDEX_FILE))
    return [name for entries in shards for name, _, _ in entries]


def non_weight_files(directory: str) -> Iterator[str]:
    """Tokenizer, processor, chat template, generation config...: everything but weights/config."""
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and name != "config.json" and not name.endswith(WEIGHT_SUFFIXES):
            yield name
