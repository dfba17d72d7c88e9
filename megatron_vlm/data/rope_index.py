"""3-D mRoPE position ids for Qwen2.5-VL, per sample and vectorized.

Reproduces ``Qwen2_5_VLModel.get_rope_index`` of transformers 4.57.3 for one sample, and extends
it to packed rows (several documents in one row, positions restarting at 0 per document), which
the reference cannot express: it treats a row as one document.

How the positions are built (no Python loop over tokens):

* A *vision block* is the run of ``t*h*w/merge^2`` pad tokens of one image or video. Inside a
  block, token ``j`` gets ``start + (t_pos, h, w)`` on the (temporal, height, width) axes, where
  ``start`` is where the next text token would have been and ``(t, h, w)`` is its cell in the
  merged grid. ``t_pos`` is 0 for images and ``t * second_per_grid_t * tokens_per_second``
  (truncated to an integer) for videos.
* Text tokens count up by one on all three axes. After a block, text resumes at the block's
  largest position + 1, i.e. ``start + extent`` with ``extent = max(t_pos, h, w) + 1``.
* Hence a text token at index ``i`` sits at ``i - sum(length - extent)`` over the blocks that end
  before ``i`` -- one cumulative sum. A document restart subtracts the value at the document's
  first token, which is valid because the shifts are pure translations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

IMAGE_PAD_TOKEN_ID = 151655
VIDEO_PAD_TOKEN_ID = 151656
VISION_START_TOKEN_ID = 151652
SPATIAL_MERGE_SIZE = 2
TOKENS_PER_SECOND = 2

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[int]]
FloatArrayLike = Union[torch.Tensor, np.ndarray, Sequence[float]]


@dataclass
class _Blocks:
    """Vision blocks of one kind (images or videos) in a row, and the per-token offsets inside them."""

    starts: torch.Tensor  # [K] index of the first pad token of each block
    lengths: torch.Tensor  # [K] number of pad tokens of each block
    extents: torch.Tensor  # [K] largest in-block offset + 1: how far text jumps past the block
    token_index: torch.Tensor  # [n] row index of every pad token
    token_block: torch.Tensor  # [n] block id of every pad token
    offsets: torch.Tensor  # [3, n] (t, h, w) offset of every pad token from its block start


def _as_long_1d(values: ArrayLike, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    return tensor.to(torch.long)


def _as_grid(grid_thw: Optional[ArrayLike], device: torch.device) -> torch.Tensor:
    if grid_thw is None:
        return torch.zeros((0, 3), dtype=torch.long, device=device)
    grid = torch.as_tensor(np.asarray(grid_thw) if not isinstance(grid_thw, torch.Tensor) else grid_thw)
    return grid.to(device=device, dtype=torch.long).reshape(-1, 3)


def _locate_blocks(
    input_ids: torch.Tensor,
    pad_token_id: int,
    grid_thw: torch.Tensor,
    seconds_per_grid: Optional[torch.Tensor],
    merge_size: int,
    tokens_per_second: Union[int, float],
    kind: str,
) -> _Blocks:
    """Match the pad tokens of one kind to their grids (in order) and compute in-block offsets.

    ``seconds_per_grid`` is None for images (the reference uses 0 there: no temporal offset).
    """
    device = input_ids.device
    token_index = torch.nonzero(input_ids == pad_token_id).flatten()
    grid_t, grid_h, grid_w = grid_thw.unbind(1)
    if bool((grid_thw <= 0).any()):
        raise ValueError(f"{kind} grid_thw entries must be positive, got {grid_thw.tolist()}")
    if bool(((grid_h % merge_size != 0) | (grid_w % merge_size != 0)).any()):
        raise ValueError(f"{kind} grid h and w must be multiples of spatial_merge_size={merge_size}")
    cells_h, cells_w = grid_h // merge_size, grid_w // merge_size
    lengths = grid_t * cells_h * cells_w
    expected = int(lengths.sum())
    if token_index.numel() != expected:
        raise ValueError(
            f"found {token_index.numel()} {kind} pad tokens (id {pad_token_id}) but the {len(grid_thw)} "
            f"{kind} grid(s) need sum(t*h*w)/{merge_size}^2 = {expected}"
        )

    first = torch.cumsum(lengths, 0) - lengths  # index into token_index of each block's first token
    starts = token_index[first]
    last = token_index[first + lengths - 1]
    if bool((last - starts != lengths - 1).any()):
        bad = int(torch.nonzero(last - starts != lengths - 1)[0])
        raise ValueError(
            f"{kind} {bad}: its {int(lengths[bad])} pad tokens starting at index {int(starts[bad])} are not contiguous"
        )

    num_blocks = len(grid_thw)
    token_block = torch.repeat_interleave(torch.arange(num_blocks, device=device), lengths)
    local = torch.arange(token_index.numel(), device=device) - first[token_block]
    plane = (cells_h * cells_w)[token_block]
    row_len = cells_w[token_block]
    frame = local // plane
    h_off = (local % plane) // row_len
    w_off = local % row_len
    if seconds_per_grid is None:
        t_off = torch.zeros_like(frame)
    else:
        # Same dtype flow as the reference: (long frame * per-grid seconds) * tokens_per_second,
        # then truncated to long.
        t_off = (frame * seconds_per_grid[token_block] * tokens_per_second).long()
    offsets = torch.stack([t_off, h_off, w_off])

    extents = torch.zeros(num_blocks, dtype=torch.long, device=device)
    extents = extents.scatter_reduce(0, token_block, offsets.amax(0), reduce="amax", include_self=True) + 1
    return _Blocks(starts, lengths, extents, token_index, token_block, offsets)


def _seconds_per_grid(
    second_per_grid_ts: Optional[FloatArrayLike],
    num_videos: int,
    device: torch.device,
    truncate: bool,
) -> torch.Tensor:
    if second_per_grid_ts is None:
        seconds = torch.ones(num_videos, device=device)  # the reference's default of 1.0
    else:
        seconds = torch.as_tensor(
            np.asarray(second_per_grid_ts) if not isinstance(second_per_grid_ts, torch.Tensor) else second_per_grid_ts
        ).to(device).reshape(-1)
        if len(seconds) < num_videos:
            raise ValueError(f"second_per_grid_ts has {len(seconds)} entries for {num_videos} videos")
        seconds = seconds[:num_videos]
        if not seconds.is_floating_point():
            seconds = seconds.to(torch.get_default_dtype())
    # transformers 4.57.3 casts each second_per_grid_t to the dtype of the long frame range before
    # multiplying, so fractional values are truncated (0.5 -> 0, 1.5 -> 1).
    return seconds.long() if truncate else seconds


def packed_mrope_positions(
    input_ids: ArrayLike,
    cu_seqlens: ArrayLike,
    image_grid_thw: Optional[ArrayLike] = None,
    video_grid_thw: Optional[ArrayLike] = None,
    second_per_grid_ts: Optional[FloatArrayLike] = None,
    *,
    image_token_id: int = IMAGE_PAD_TOKEN_ID,
    video_token_id: int = VIDEO_PAD_TOKEN_ID,
    vision_start_token_id: Optional[int] = VISION_START_TOKEN_ID,
    spatial_merge_size: int = SPATIAL_MERGE_SIZE,
    tokens_per_second: Union[int, float] = TOKENS_PER_SECOND,
    truncate_second_per_grid: bool = True,
) -> torch.Tensor:
    """mRoPE positions [3, T] of a packed row; each document ``cu_seqlens[d]:cu_seqlens[d+1]`` restarts at 0.

    ``image_grid_thw`` / ``video_grid_thw`` list all images / videos of the row in token order; a
    document consumes the ones whose pad tokens it contains. Every document gets what the
    reference ``get_rope_index`` computes for it alone.

    ``vision_start_token_id``: when set, each vision block must directly follow this token inside
    its document -- the reference only recognises blocks introduced that way, so anything else
    would silently differ from it. ``truncate_second_per_grid=False`` keeps fractional
    ``second_per_grid_ts`` as floats (the original Qwen2.5-VL code) instead of truncating them the
    way transformers 4.57.3 does.
    """
    ids = _as_long_1d(input_ids, "input_ids")
    device = ids.device
    num_tokens = ids.numel()
    cu = _as_long_1d(cu_seqlens, "cu_seqlens").to(device)
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != num_tokens or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to len(input_ids)={num_tokens}, got {cu.tolist()}")

    image_grid = _as_grid(image_grid_thw, device)
    video_grid = _as_grid(video_grid_thw, device)
    blocks = [
        _locate_blocks(ids, image_token_id, image_grid, None, spatial_merge_size, tokens_per_second, "image"),
        _locate_blocks(
            ids,
            video_token_id,
            video_grid,
            _seconds_per_grid(second_per_grid_ts, len(video_grid), device, truncate_second_per_grid),
            spatial_merge_size,
            tokens_per_second,
            "video",
        ),
    ]

    positions_arange = torch.arange(num_tokens, device=device)
    doc_of_token = torch.searchsorted(cu[1:], positions_arange, right=True)
    for kind, b in zip(("image", "video"), blocks):
        if b.starts.numel() == 0:
            continue
        ends = b.starts + b.lengths - 1
        doc = doc_of_token[b.starts]
        if bool((doc != doc_of_token[ends]).any()):
            raise ValueError(f"an {kind} block crosses a document boundary")
        if vision_start_token_id is not None:
            prev = b.starts - 1
            ok = (prev >= cu[doc]) & (ids[prev.clamp(min=0)] == vision_start_token_id)
            if not bool(ok.all()):
                bad = int(b.starts[~ok][0])
                raise ValueError(
                    f"{kind} pad tokens at index {bad} are not preceded by <|vision_start|> "
                    f"(id {vision_start_token_id}) in the same document"
                )

    # Text positions: index minus the tokens each earlier block "saved" (length - extent).
    shift = torch.zeros(num_tokens + 1, dtype=torch.long, device=device)
    for b in blocks:
        shift.index_add_(0, b.starts + b.lengths, b.lengths - b.extents)
    base = positions_arange - torch.cumsum(shift, 0)[:num_tokens]
    # Restart each document at 0 (padding base by one so empty trailing documents index safely).
    doc_origin = torch.cat([base, base.new_zeros(1)])[cu[:-1]]
    base = base - doc_origin[doc_of_token]

    positions = base.unsqueeze(0).repeat(3, 1)
    for b in blocks:
        if b.token_index.numel():
            positions[:, b.token_index] = base[b.starts][b.token_block] + b.offsets
    return positions


def mrope_positions(
    input_ids: ArrayLike,
    image_grid_thw: Optional[ArrayLike] = None,
    video_grid_thw: Optional[ArrayLike] = None,
    second_per_grid_ts: Optional[FloatArrayLike] = None,
    *,
    image_token_id: int = IMAGE_PAD_TOKEN_ID,
    video_token_id: int = VIDEO_PAD_TOKEN_ID,
    vision_start_token_id: Optional[int] = VISION_START_TOKEN_ID,
    spatial_merge_size: int = SPATIAL_MERGE_SIZE,
    tokens_per_second: Union[int, float] = TOKENS_PER_SECOND,
    truncate_second_per_grid: bool = True,
) -> torch.Tensor:
    """mRoPE positions [3, S] (long) of one sample, as the reference ``get_rope_index`` computes them.

    See :func:`packed_mrope_positions` for the keyword arguments.
    """
    ids = _as_long_1d(input_ids, "input_ids")
    return packed_mrope_positions(
        ids,
        torch.tensor([0, ids.numel()], device=ids.device),
        image_grid_thw,
        video_grid_thw,
        second_per_grid_ts,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        vision_start_token_id=vision_start_token_id,
        spatial_merge_size=spatial_merge_size,
        tokens_per_second=tokens_per_second,
        truncate_second_per_grid=truncate_second_per_grid,
    )


__all__ = [
    "IMAGE_PAD_TOKEN_ID",
    "SPATIAL_MERGE_SIZE",
    "TOKENS_PER_SECOND",
    "VIDEO_PAD_TOKEN_ID",
    "VISION_START_TOKEN_ID",
    "mrope_positions",
    "packed_mrope_positions",
]
