"""Training-time datasets: packed rows of a preprocessed prefix, and a weighted blend of several.

A row is read from the memory-mapped token / mask / image stores following a pack plan (which
samples form each row), its page images are decoded and run through the reference Qwen2.5-VL
processing (``preprocess_image``: the only resize), and the row becomes a ``PackedBatch``. Rows are
a pure function of (prefix, plan, row index), so any worker can build any row and a resumed run
sees exactly the rows it would have seen.
"""

from __future__ import annotations

import io
import os
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from megatron_vlm.data.batch import Document, PackedBatch, build_packed_batch
from megatron_vlm.data.image_processing import (PATCH_DIM, PATCH_SIZE, _patchify, _to_rgb_pil, preprocess_image,
                                                smart_resize)
from megatron_vlm.data.indexed import IndexedSamples
from megatron_vlm.data.packing import PackPlan, pack_best_fit_decreasing, pad_multiple_for


def plan_path(prefix: str) -> str:
    """Where ``preprocess_data.py --pack`` saves the plan of a prefix."""
    return f"{prefix}.pack.npz"


class ImageDecodeError(RuntimeError):
    """An image of the store that does not decode to what the tokens were made for."""


def image_levels(image: Image.Image) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``preprocess_image`` stopped before its normalization lookup: uint8 levels [P, 1176] of the
    resized image, patchified the same way (``batch.normalize_levels`` finishes the job)."""
    rgb = _to_rgb_pil(image)
    new_h, new_w = smart_resize(rgb.height, rgb.width)
    levels = np.asarray(rgb.resize((new_w, new_h), resample=Image.Resampling.BICUBIC), dtype=np.uint8)
    return _patchify(levels), (1, new_h // PATCH_SIZE, new_w // PATCH_SIZE)


def decode_image(data: bytes, expected_grid: Sequence[int], where: str,
                 levels: bool = False) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Encoded bytes -> (patches [P, 1176] float32, or uint8 levels, grid). The grid must equal
    the stored one, or the row's ``<|image_pad|>`` count would not match its pixels."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            patches, grid = image_levels(image) if levels else preprocess_image(image)
    except Exception as err:
        raise ImageDecodeError(f"{where}: cannot decode the stored image ({type(err).__name__}: {err})") from None
    if tuple(grid) != tuple(int(x) for x in expected_grid):
        raise ImageDecodeError(f"{where}: decodes to grid {grid} but the tokens were made for "
                               f"{tuple(int(x) for x in expected_grid)}")
    return patches, grid


class PackedRowDataset(torch.utils.data.Dataset):
    """Rows of one preprocessed prefix as ``PackedBatch``es.

    ``plan``: a ``PackPlan``, a path to one, or None: the prefix's saved plan when it suits
    (same ``max_seq_len``, padding multiple divisible by the one needed), else a fresh
    best-fit-decreasing plan (``seed``). ``cp_size`` (and ``tp_size`` with ``sequence_parallel``)
    pad every document for the context-parallel split.

    ``pixels``: how a row carries its images. ``"float32"``: ``pixel_values`` as the reference
    processing gives them (2.4 GB for a 128K row of 50 pages). ``"bfloat16"``: half of that, and the
    same result for a bf16 model (its patch embedding casts to bf16 first). ``"levels"``: uint8
    ``pixel_levels`` (a quarter; the lookup to float32 runs in ``batch.to(device)``, exact) -- the
    choice for loader worker processes, which hand rows over through shared memory.
    """

    PIXEL_FORMATS = ("float32", "bfloat16", "levels")

    def __init__(self, prefix: str, plan: Union[PackPlan, str, None] = None, max_seq_len: Optional[int] = None,
                 cp_size: int = 1, tp_size: int = 1, sequence_parallel: bool = False, seed: int = 0,
                 pixels: str = "float32"):
        if pixels not in self.PIXEL_FORMATS:
            raise ValueError(f"pixels must be one of {self.PIXEL_FORMATS}, got {pixels!r}")
        self.prefix = prefix
        self.pixels = pixels
        self.samples = IndexedSamples(prefix)
        self.pad_multiple = pad_multiple_for(cp_size, tp_size, sequence_parallel)
        lengths = self.samples.lengths
        max_seq_len = max_seq_len or int(self.samples.meta.get("max_seq_len", 0)) or int(lengths.max())
        if isinstance(plan, str):
            plan = PackPlan.load(plan)
        elif plan is None and os.path.isfile(plan_path(prefix)):
            saved = PackPlan.load(plan_path(prefix))
            if saved.max_seq_len == max_seq_len and saved.pad_multiple % self.pad_multiple == 0:
                plan = saved
        if plan is None:
            plan = pack_best_fit_decreasing(lengths, max_seq_len, self.pad_multiple, seed)
        if plan.pad_multiple % self.pad_multiple:
            raise ValueError(f"the pack plan pads documents to multiples of {plan.pad_multiple}, but this run needs "
                             f"{self.pad_multiple} (CP={cp_size}): re-pack with --cp-size {cp_size}")
        plan.validate(lengths)
        self.plan = plan
        self.max_seq_len = plan.max_seq_len
        self._ids: Optional[list[str]] = None

    def __len__(self) -> int:
        return len(self.plan)

    def sample_ids(self) -> list[str]:
        if self._ids is None:
            self._ids = [r["id"] for r in self.samples.records()]
        return self._ids

    def document(self, i: int, with_pixels: bool = True) -> Document:
        """Sample ``i``; with its images decoded and processed unless ``with_pixels`` is False
        (the grids are always there)."""
        s = self.samples
        refs = s.image_indices(i).tolist()
        grids = np.asarray([s.image_info(j)[:3] for j in refs], dtype=np.int64).reshape(-1, 3)
        pixels = None
        if with_pixels:
            parts = [self._pixels(i, j, grid) for j, grid in zip(refs, grids)]
            pixels = np.concatenate(parts) if parts else np.zeros((0, PATCH_DIM), np.float32)
        return Document(input_ids=s.tokens(i), answer_mask=s.loss_mask(i), pixel_values=pixels,
                        image_grid_thw=grids, sample_id=self.sample_ids()[i])

    def _pixels(self, i: int, j: int, grid: np.ndarray, levels: bool = False) -> np.ndarray:
        return decode_image(self.samples.image_bytes(j), grid, f"{self.prefix} sample {i} image {j}", levels)[0]

    def __getitem__(self, row: int) -> PackedBatch:
        samples = [int(i) for i in self.plan.row(int(row))]
        docs = [self.document(i, with_pixels=False) for i in samples]
        # One buffer for the row's pixels, filled page by page: a 128K row holds ~2.4 GB of float32
        # patches, and concatenating per document and then per row would copy them twice.
        patches = sum(int(d.image_grid_thw.prod(1).sum()) for d in docs)
        levels = self.pixels == "levels"
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "levels": torch.uint8}[self.pixels]
        pixels = torch.empty((patches, PATCH_DIM), dtype=dtype) if patches else None
        start = 0
        for i, doc in zip(samples, docs):
            for j, grid in zip(self.samples.image_indices(i).tolist(), doc.image_grid_thw):
                page = self._pixels(i, j, grid, levels)
                pixels[start:start + len(page)] = torch.from_numpy(page)
                start += len(page)
        batch = build_packed_batch(docs, self.pad_multiple, row_index=int(row), pixel_values=pixels)
        if levels:
            batch.pixel_levels, batch.pixel_values = batch.pixel_values, None
        return batch


def blend_indices(sizes: Sequence[int], weights: Sequence[float], total: int) -> np.ndarray:
    """Which dataset each of ``total`` blended positions reads: greedily the one furthest behind its
    weight's share (Megatron's blending rule), so every prefix of the order is close to the weights."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) != len(sizes) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"need one non-negative weight per dataset (some positive), got {list(weights)}")
    w = w / w.sum()
    counts = np.zeros(len(w))
    out = np.empty(total, dtype=np.int64)
    for i in range(total):
        d = int(np.argmax(w * (i + 1) - counts))
        out[i] = d
        counts[d] += 1
    return out


class BlendedRowDataset(torch.utils.data.Dataset):
    """Several packed datasets mixed by weight. Position ``i`` takes the next row of the dataset the
    blend picks; each dataset's rows go in a seeded order, reshuffled each time it wraps around."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], weights: Sequence[float],
                 size: Optional[int] = None, seed: int = 0):
        self.datasets = list(datasets)
        sizes = [len(d) for d in self.datasets]
        if min(sizes, default=0) == 0:
            raise ValueError(f"every blended dataset needs rows, got sizes {sizes}")
        self.size = int(size) if size is not None else int(sum(sizes))
        self.seed = seed
        self.dataset_index = blend_indices(sizes, weights, self.size)
        self.draw = np.zeros(self.size, dtype=np.int64)  # k-th draw from its dataset
        for d in range(len(sizes)):
            where = np.flatnonzero(self.dataset_index == d)
            self.draw[where] = np.arange(len(where))
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.size

    def locate(self, i: int) -> tuple[int, int]:
        """(dataset, row) of blended position ``i``."""
        d, k = int(self.dataset_index[i]), int(self.draw[i])
        n = len(self.datasets[d])
        epoch = k // n
        key = (d, epoch)
        if key not in self._orders:
            self._orders[key] = np.random.default_rng([self.seed, d, epoch]).permutation(n)
        return d, int(self._orders[key][k % n])

    def __getitem__(self, i: int) -> PackedBatch:
        d, row = self.locate(int(i))
        batch = self.datasets[d][row]
        batch.row_index = int(i)
        return batch


def build_dataset(prefixes: Sequence[str], weights: Optional[Sequence[float]] = None, size: Optional[int] = None,
                  seed: int = 0, **kwargs) -> torch.utils.data.Dataset:
    """One prefix -> its ``PackedRowDataset``; several -> their weighted blend (weights default to
    row counts, i.e. every row once)."""
    datasets = [PackedRowDataset(p, seed=seed, **kwargs) for p in prefixes]
    if len(datasets) == 1 and weights is None and size is None:
        return datasets[0]
    return BlendedRowDataset(datasets, weights if weights is not None else [len(d) for d in datasets], size, seed)


__all__ = ["BlendedRowDataset", "ImageDecodeError", "PackedRowDataset", "blend_indices", "build_dataset",
           "decode_image", "plan_path"]
