"""The packed training batch the model consumes: one row of documents back to back.

``build_packed_batch`` turns documents (token ids + answer mask on input positions + their images'
pixels) into a ``PackedBatch``: next-token labels shifted inside each document, a loss mask on the
targets that are answer tokens, 3-D mRoPE positions restarting per document, and ``cu_seqlens``.
With ``pad_multiple`` > 1 each document is padded at its end (context parallelism needs lengths
divisible by 2·CP); ``cu_seqlens`` then gives the padded layout and ``cu_seqlens_unpadded`` the real
document lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_vlm.data.image_processing import _LUT, PATCH_DIM
from megatron_vlm.data.rope_index import packed_mrope_positions
from megatron_vlm.parallel.context_parallel import pad_row_for_context_parallel

PAD_TOKEN_ID = 151643  # <|endoftext|>


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, T] int64
    labels: torch.Tensor  # [1, T] next-token targets inside each document (0 where unsupervised)
    loss_mask: torch.Tensor  # [1, T] float: 1 where labels[t] is an assistant answer (or end) token
    position_ids: torch.Tensor  # [3, 1, T] mRoPE positions, restarting per document
    cu_seqlens: torch.Tensor  # [N+1] int32 document borders in this row's layout (padded when padded)
    max_seqlen: int
    pixel_values: Optional[torch.Tensor]  # [P, 1176] float, images in token order
    image_grid_thw: Optional[torch.Tensor]  # [n, 3] int64
    num_loss_tokens: int
    cu_seqlens_unpadded: Optional[torch.Tensor] = None  # [N+1] int32 real document lengths (None: = cu_seqlens)
    row_index: int = -1  # which row of the dataset (for logs and resume checks)
    sample_ids: tuple = field(default_factory=tuple)  # the documents' sample ids
    # uint8 [P, 1176]: the resized images' pixel levels, patchified, in place of pixel_values (a
    # quarter of the bytes between loader processes); .to(device) turns them into pixel_values there.
    pixel_levels: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[-1])

    @property
    def num_documents(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        """A copy on ``device``; pixel levels become pixel_values there (an exact lookup)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=non_blocking)
        if moved["pixel_levels"] is not None:
            moved["pixel_values"] = normalize_levels(moved.pop("pixel_levels"))
            moved["pixel_levels"] = None
        return replace(self, **moved)

    def pin_memory(self) -> "PackedBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.pin_memory()
        return replace(self, **moved)


_CHANNEL_COLUMNS = PATCH_DIM // 3  # a patch row is [channel][frame][row][col]: 392 columns per channel


def normalize_levels(levels: torch.Tensor) -> torch.Tensor:
    """uint8 patch levels [P, 1176] -> the float32 pixel values ``preprocess_image`` gives: the
    same per-channel 256-entry table, looked up on the levels' device."""
    table = torch.from_numpy(_LUT).to(levels.device)  # [256, 3] float32
    out = torch.empty(levels.shape, dtype=torch.float32, device=levels.device)
    for c in range(3):
        cols = slice(c * _CHANNEL_COLUMNS, (c + 1) * _CHANNEL_COLUMNS)
        block = levels[:, cols]
        out[:, cols] = table[:, c].index_select(0, block.reshape(-1).to(torch.int32)).view(block.shape)
    return out


@dataclass
class Document:
    """One sample of a row: ``answer_mask`` marks input tokens the model must produce."""

    input_ids: np.ndarray  # [S] int
    answer_mask: np.ndarray  # [S] 0/1
    pixel_values: Optional[np.ndarray] = None  # [P, 1176] float32, its images in token order
    image_grid_thw: Optional[np.ndarray] = None  # [n, 3]
    sample_id: str = ""


def build_packed_batch(documents: Sequence[Document], pad_multiple: int = 1, row_index: int = -1,
                       pad_token_id: int = PAD_TOKEN_ID, pixel_values: Optional[torch.Tensor] = None) -> PackedBatch:
    """Assemble one row. Targets never cross a document border: each document's last token has
    label 0 and loss mask 0. ``pixel_values``: the row's pixels when the caller assembled them
    already (in token order), else the documents' are concatenated."""
    if not documents:
        raise ValueError("a packed row needs at least one document")
    lengths = [len(d.input_ids) for d in documents]
    if min(lengths) == 0:
        raise ValueError("empty document in a packed row")
    ids = torch.from_numpy(np.concatenate([np.asarray(d.input_ids, dtype=np.int64) for d in documents]))
    answers = torch.from_numpy(np.concatenate([np.asarray(d.answer_mask, dtype=np.float32) for d in documents]))
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    last = cu[1:].long() - 1
    mask = torch.roll(answers, -1)
    mask[last] = 0.0
    labels = torch.roll(ids, -1)
    labels[mask == 0] = 0
    grids = [np.asarray(d.image_grid_thw).reshape(-1, 3) for d in documents if d.image_grid_thw is not None]
    grid = torch.from_numpy(np.concatenate(grids).astype(np.int64)) if grids else None
    if grid is not None and not len(grid):
        grid = None
    if pixel_values is None:
        pixels = [d.pixel_values for d in documents if d.pixel_values is not None and len(d.pixel_values)]
        pixel_values = torch.from_numpy(np.concatenate(pixels)) if pixels else None
    expected = 0 if grid is None else int(grid.prod(1).sum())
    if (0 if pixel_values is None else pixel_values.shape[0]) != expected:
        raise ValueError(f"the row's images need {expected} patches (sum of t*h*w over image_grid_thw), "
                         f"got {0 if pixel_values is None else pixel_values.shape[0]}")
    positions = packed_mrope_positions(ids, cu, grid)
    unpadded = None
    if pad_multiple > 1:
        if pad_multiple % 2:
            raise ValueError(f"pad multiple {pad_multiple} must be even (2 x CP [x TP])")
        # pad_row_for_context_parallel pads to 2 x its cp_size
        padded = pad_row_for_context_parallel(ids, positions, labels, mask, cu, pad_multiple // 2, pad_token_id)
        unpadded = cu
        ids, positions, labels, mask, cu = (padded.input_ids, padded.position_ids, padded.labels,
                                            padded.loss_mask, padded.cu_seqlens)
        labels = torch.where(mask > 0, labels, torch.zeros_like(labels))
    max_seqlen = int((cu[1:] - cu[:-1]).max())
    return PackedBatch(input_ids=ids[None], labels=labels[None], loss_mask=mask[None],
                       position_ids=positions[:, None, :], cu_seqlens=cu, max_seqlen=max_seqlen,
                       pixel_values=pixel_values, image_grid_thw=grid, num_loss_tokens=int(mask.sum()),
                       cu_seqlens_unpadded=unpadded, row_index=row_index,
                       sample_ids=tuple(d.sample_id for d in documents))


__all__ = ["Document", "PackedBatch", "build_packed_batch", "normalize_levels"]
