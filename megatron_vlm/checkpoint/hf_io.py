"""Reading and writing Hugging Face safetensors checkpoints one tensor at a time.

Reading opens each shard lazily (``safe_open`` memory-maps it), so converting a 7B model never
holds more than the model being filled plus one layer's tensors. Writing fills shards up to a size
limit and writes ``model.safetensors.index.json`` when there is more than one, atomically.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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


def write_hf_checkpoint(tensors: Iterable[tuple[str, torch.Tensor]], directory: str,
                        max_shard_bytes: int = 5 * 1024**3, dtype: torch.dtype | None = None) -> list[str]:
    """Write (name, tensor) pairs as safetensors shards; returns the names written, in order."""
    os.makedirs(directory, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    files: list[str] = []
    weight_map: dict[str, str] = {}
    order: list[str] = []

    def flush() -> None:
        nonlocal shard_bytes
        if not shards[-1]:
            return
        tmp_name = f"model-{len(files) + 1:05d}.safetensors"
        tmp_path = os.path.join(directory, tmp_name + ".tmp")
        save_file(shards[-1], tmp_path, metadata={"format": "pt"})
        files.append(tmp_name)
        for n in shards[-1]:
            weight_map[n] = tmp_name
        shards[-1] = {}
        shard_bytes = 0

    for name, tensor in tensors:
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            flush()
        # A copy: split views (q/k/v of one fused tensor) share storage, which safetensors refuses.
        shards[-1][name] = tensor.contiguous().clone()
        shard_bytes += size
        order.append(name)
    flush()

    total = len(files)
    final_names = {f: (SINGLE_FILE if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors")
                   for i, f in enumerate(files)}
    for tmp_name, final in final_names.items():
        os.replace(os.path.join(directory, tmp_name + ".tmp"), os.path.join(directory, final))
    if total > 1:
        total_size = sum(os.path.getsize(os.path.join(directory, f)) for f in final_names.values())
        index = {"metadata": {"total_size": total_size},
                 "weight_map": {n: final_names[f] for n, f in weight_map.items()}}
        tmp = os.path.join(directory, INDEX_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(index, f, indent=2)
        os.replace(tmp, os.path.join(directory, INDEX_FILE))
    return order


def non_weight_files(directory: str) -> Iterator[str]:
    """Tokenizer, processor, chat template, generation config...: everything but weights/config."""
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and name != "config.json" and not name.endswith(WEIGHT_SUFFIXES):
            yield name
