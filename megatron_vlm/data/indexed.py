"""The on-disk training set: megatron-core indexed datasets (``.bin``/``.idx``) for tokens, answer
masks and page images, plus small JSON side files.

One *prefix* ``P`` is these files:

- ``P.tokens.{bin,idx}``      int32, one sequence (and one document) per sample: the token ids;
- ``P.loss_mask.{bin,idx}``   uint8, aligned with the tokens: 1 on answer tokens and their ``<|im_end|>``;
- ``P.image_refs.{bin,idx}``  int64, one sequence per sample: indices into the image store, in token order;
- ``P.images.{bin,idx}``      uint8, one sequence per distinct image: the file's encoded bytes (JPEG/PNG
  as the pool wrote them; decoded and resized only at training time, by the reference processing);
- ``P.image_info.{bin,idx}``  int32, one sequence ``[t, grid_h, grid_w, height, width]`` per image;
- ``P.image_sha256.npy``      uint8 [images, 32]: content hashes (merging shards de-duplicates by them);
- ``P.samples.jsonl``         per sample: id, task, source file:line, tokens, answer tokens, images;
- ``P.report.json``           every dropped or truncated sample with its file:line and reason;
- ``P.meta.json``             format, counts, tokenizer and settings; written last: the completion mark.

Images are stored once per prefix even when several samples use them (the three VQA tasks draw
on the same documents). Everything is written under temporary names and renamed at the end, so
a killed run leaves no prefix that looks complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from megatron_vlm.common.storage import atomic_write_bytes, atomic_write_json

FORMAT = "megatron-vlm-indexed-v1"
TOKENS, LOSS_MASK, IMAGE_REFS, IMAGES, IMAGE_INFO = "tokens", "loss_mask", "image_refs", "images", "image_info"
DATASETS = {TOKENS: np.int32, LOSS_MASK: np.uint8, IMAGE_REFS: np.int64, IMAGES: np.uint8, IMAGE_INFO: np.int32}
SIDE_FILES = ("image_sha256.npy", "samples.jsonl", "report.json")
TMP = ".tmp"


def _indexed():
    """megatron-core's indexed dataset module (imported late: importing megatron.core takes seconds)."""
    from megatron.core.datasets import indexed_dataset

    return indexed_dataset


def dataset_prefix(prefix: str, name: str) -> str:
    return f"{prefix}.{name}"


def prefix_files(prefix: str) -> list[str]:
    """Every file of a complete prefix (meta last)."""
    files = [f"{prefix}.{name}.{ext}" for name in DATASETS for ext in ("bin", "idx")]
    return files + [f"{prefix}.{name}" for name in SIDE_FILES] + [f"{prefix}.meta.json"]


def is_complete(prefix: str) -> bool:
    return os.path.isfile(f"{prefix}.meta.json")


def read_meta(prefix: str) -> dict:
    path = f"{prefix}.meta.json"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {prefix} is not a finished preprocessed dataset "
                                "(run tools/preprocess_data.py, or finish/merge its shards)")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def sha256_bytes(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass
class SampleRecord:
    """What a prefix remembers about each sample besides its tokens (``P.samples.jsonl``)."""

    id: str
    task: str
    source: str  # file:line in the mixture
    num_tokens: int
    num_loss_tokens: int
    num_images: int
    truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "task": self.task, "source": self.source, "num_tokens": self.num_tokens,
               "num_loss_tokens": self.num_loss_tokens, "num_images": self.num_images}
        if self.truncated:
            out["truncated"] = True
        return out


class IndexedWriter:
    """Writes one prefix, sample by sample, de-duplicating images by content."""

    def __init__(self, prefix: str):
        folder = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(folder, exist_ok=True)
        self.prefix = prefix
        self._tmp = prefix + TMP
        idx = _indexed()
        self._builders = {name: idx.IndexedDatasetBuilder(idx.get_bin_path(dataset_prefix(self._tmp, name)),
                                                          dtype=dtype)
                          for name, dtype in DATASETS.items()}
        self._image_index: dict[bytes, int] = {}
        self._path_index: dict[str, int] = {}
        self._sha: list[bytes] = []
        self._samples = open(f"{self._tmp}.samples.jsonl", "w", encoding="utf-8")
        self.num_samples = 0
        self.num_tokens = 0
        self.num_loss_tokens = 0
        self.tasks: dict[str, int] = {}

    # ------------------------------------------------------------------ images
    def _add_image(self, data: bytes, info: Sequence[int], sha: Optional[bytes] = None) -> int:
        sha = sha or sha256_bytes(data)
        index = self._image_index.get(sha)
        if index is None:
            index = len(self._sha)
            self._image_index[sha] = index
            self._sha.append(sha)
            self._builders[IMAGES].add_item(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            self._builders[IMAGES].end_document()
            self._builders[IMAGE_INFO].add_item(torch.tensor(list(info), dtype=torch.int32))
            self._builders[IMAGE_INFO].end_document()
        return index

    def add_image_file(self, path: str, info: Sequence[int], sha: Optional[bytes] = None) -> int:
        """Index of the image at ``path`` in the store; its bytes are read only the first time its
        path (or, with ``sha`` from a worker that already hashed it, its content) is seen."""
        key = os.path.realpath(path)
        index = self._path_index.get(key)
        if index is None:
            index = self._image_index.get(sha) if sha is not None else None
            if index is None:
                with open(path, "rb") as f:
                    data = f.read()
                if sha is not None and sha256_bytes(data) != sha:
                    raise RuntimeError(f"{path} changed while it was being preprocessed")
                index = self._add_image(data, info, sha)
            self._path_index[key] = index
        return index

    # ------------------------------------------------------------------ samples
    def add_sample(self, input_ids: np.ndarray, loss_mask: np.ndarray, image_indices: Sequence[int],
                   record: SampleRecord) -> None:
        if input_ids.shape != loss_mask.shape:
            raise ValueError(f"{record.source}: tokens {input_ids.shape} and loss mask {loss_mask.shape} differ")
        self._builders[TOKENS].add_item(torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int32)))
        self._builders[TOKENS].end_document()
        self._builders[LOSS_MASK].add_item(torch.from_numpy(np.ascontiguousarray(loss_mask, dtype=np.uint8)))
        self._builders[LOSS_MASK].end_document()
        self._builders[IMAGE_REFS].add_item(torch.tensor(list(image_indices), dtype=torch.int64))
        self._builders[IMAGE_REFS].end_document()
        self._samples.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
        self.num_samples += 1
        self.num_tokens += int(input_ids.shape[0])
        self.num_loss_tokens += int(loss_mask.sum())
        self.tasks[record.task] = self.tasks.get(record.task, 0) + 1

    def finalize(self, meta: dict, report: dict) -> dict:
        """Close, write the index files and side files, rename everything into place (meta last)."""
        idx = _indexed()
        for name, builder in self._builders.items():
            builder.finalize(idx.get_idx_path(dataset_prefix(self._tmp, name)))
        self._samples.close()
        sha = np.frombuffer(b"".join(self._sha), dtype=np.uint8).reshape(len(self._sha), 32)
        buffer = io.BytesIO()
        np.save(buffer, sha)
        atomic_write_bytes(f"{self._tmp}.image_sha256.npy", buffer.getvalue())
        atomic_write_json(f"{self._tmp}.report.json", report)
        for name in DATASETS:
            for ext in ("bin", "idx"):
                os.replace(f"{self._tmp}.{name}.{ext}", f"{self.prefix}.{name}.{ext}")
        for name in ("image_sha256.npy", "samples.jsonl", "report.json"):
            os.replace(f"{self._tmp}.{name}", f"{self.prefix}.{name}")
        full = {"format": FORMAT, "num_samples": self.num_samples, "num_tokens": self.num_tokens,
                "num_loss_tokens": self.num_loss_tokens, "num_images": len(self._sha),
                "tasks": dict(sorted(self.tasks.items())), **meta}
        atomic_write_json(f"{self.prefix}.meta.json", full)
        return full

    def abort(self) -> None:
        self._samples.close()
        for builder in self._builders.values():
            builder.data_file.close()


class _EmptyBin:
    """Stands in for an ``IndexedDataset`` whose ``.bin`` is empty (no images in a part, or only
    zero-length sequences), which megatron-core cannot memory-map."""

    def __init__(self, path_prefix: str):
        idx = _indexed()
        self.index = idx._IndexReader(idx.get_idx_path(path_prefix), False)
        self.sequence_lengths = self.index.sequence_lengths

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return np.zeros(0, dtype=self.index.dtype)


def _open_indexed(path_prefix: str):
    idx = _indexed()
    if os.path.getsize(idx.get_bin_path(path_prefix)) == 0:
        return _EmptyBin(path_prefix)
    return idx.IndexedDataset(path_prefix)


class IndexedSamples:
    """Read side of a prefix: memory-mapped, picklable (DataLoader workers re-open the maps)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.meta = read_meta(prefix)
        self._sets = {name: _open_indexed(dataset_prefix(prefix, name)) for name in DATASETS}
        for name, dtype in DATASETS.items():
            if self._sets[name].index.dtype != dtype:
                raise ValueError(f"{prefix}.{name}.idx holds {self._sets[name].index.dtype}, expected {dtype}")
        n = len(self._sets[TOKENS])
        if len(self._sets[LOSS_MASK]) != n or len(self._sets[IMAGE_REFS]) != n or n != self.meta["num_samples"]:
            raise ValueError(f"{prefix}: tokens, loss mask and image refs disagree on the number of samples")
        if len(self._sets[IMAGES]) != len(self._sets[IMAGE_INFO]):
            raise ValueError(f"{prefix}: image store and image info disagree on the number of images")

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def __len__(self) -> int:
        return len(self._sets[TOKENS])

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per sample, from the index alone (the packer needs nothing else)."""
        return np.asarray(self._sets[TOKENS].sequence_lengths, dtype=np.int64)

    @property
    def num_images(self) -> int:
        return len(self._sets[IMAGES])

    def tokens(self, i: int) -> np.ndarray:
        return self._sets[TOKENS][i]

    def loss_mask(self, i: int) -> np.ndarray:
        return self._sets[LOSS_MASK][i]

    def image_indices(self, i: int) -> np.ndarray:
        return self._sets[IMAGE_REFS][i]

    def image_bytes(self, j: int) -> bytes:
        return self._sets[IMAGES][j].tobytes()

    def image_info(self, j: int) -> np.ndarray:
        """[t, grid_h, grid_w, height, width] of image ``j``."""
        return self._sets[IMAGE_INFO][j]

    def image_sha256(self) -> np.ndarray:
        return np.load(f"{self.prefix}.image_sha256.npy")

    def records(self) -> Iterable[dict]:
        with open(f"{self.prefix}.samples.jsonl", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def _append_index(builder, path_prefix: str) -> None:
    """``IndexedDatasetBuilder.add_index`` without its ``gc.collect()`` per call (0.3 s each with a
    tokenizer in memory; a merge appends hundreds of parts)."""
    idx = _indexed()
    index = idx._IndexReader(idx.get_idx_path(path_prefix), multimodal=False)
    if index.dtype != builder.dtype:
        raise ValueError(f"{path_prefix}: dtype {index.dtype}, expected {builder.dtype}")
    offset = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(index.sequence_lengths.tolist())
    builder.document_indices.extend((offset + index.document_indices)[1:].tolist())
    del index
    with open(idx.get_bin_path(path_prefix), "rb") as f:
        shutil.copyfileobj(f, builder.data_file)


def merge_prefixes(inputs: Sequence[str], output: str, meta: Optional[dict] = None) -> dict:
    """Concatenate finished prefixes (in order) into ``output``; images are de-duplicated by content,
    first appearance first, so merging the parts of a run gives the same files however the run was
    split into shards."""
    if not inputs:
        raise ValueError("nothing to merge")
    metas = [read_meta(p) for p in inputs]
    writer = IndexedWriter(output)
    try:
        for name in (TOKENS, LOSS_MASK):  # plain concatenation
            for prefix in inputs:
                _append_index(writer._builders[name], dataset_prefix(prefix, name))
        reports: dict[str, Any] = {"dropped": [], "truncated": []}
        for prefix in inputs:
            part = IndexedSamples(prefix)
            shas = part.image_sha256()
            remap = np.empty(part.num_images, dtype=np.int64)
            for j in range(part.num_images):
                sha = shas[j].tobytes()
                if sha in writer._image_index:
                    remap[j] = writer._image_index[sha]
                else:
                    remap[j] = writer._add_image(part.image_bytes(j), part.image_info(j).tolist(), sha)
            for i in range(len(part)):
                refs = remap[part.image_indices(i)]
                writer._builders[IMAGE_REFS].add_item(torch.from_numpy(refs))
                writer._builders[IMAGE_REFS].end_document()
            with open(f"{prefix}.samples.jsonl", encoding="utf-8") as f:
                for line in f:
                    writer._samples.write(line)
            with open(f"{prefix}.report.json") as f:
                report = json.load(f)
            for key in reports:
                reports[key].extend(report.get(key, []))
            del part
        writer.num_samples = sum(m["num_samples"] for m in metas)
        writer.num_tokens = sum(m["num_tokens"] for m in metas)
        writer.num_loss_tokens = sum(m["num_loss_tokens"] for m in metas)
        for m in metas:
            for task, count in m.get("tasks", {}).items():
                writer.tasks[task] = writer.tasks.get(task, 0) + count
        return writer.finalize({**(meta or {}), **summarize_report(reports)}, reports)
    except BaseException:
        writer.abort()
        raise


def summarize_report(report: dict) -> dict:
    """Counts of dropped samples by reason, and of truncated samples."""
    reasons: dict[str, int] = {}
    for item in report.get("dropped", []):
        reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
    return {"dropped": {"total": len(report.get("dropped", [])), "by_reason": dict(sorted(reasons.items()))},
            "truncated": len(report.get("truncated", []))}


def remove_prefix(prefix: str) -> None:
    for path in prefix_files(prefix):
        if os.path.exists(path):
            os.remove(path)


__all__ = ["FORMAT", "IndexedSamples", "IndexedWriter", "SampleRecord", "is_complete", "merge_prefixes",
           "prefix_files", "read_meta", "remove_prefix", "sha256_bytes", "summarize_report"]
