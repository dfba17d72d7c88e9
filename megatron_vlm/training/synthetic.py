"""Synthetic packed rows for smoke tests and benchmarks: a deterministic function of the row index.

Each document is "pages" (random images) + a prompt naming a few tokens + an answer that repeats
them, so the answer is learnable and a short run's loss visibly falls. Row ``i`` depends only on
``(seed, i)``, which makes data-parallel sharding and exact resume trivial.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_vlm.config import Qwen25VLConfig
from megatron_vlm.data.batch import PackedBatch
from megatron_vlm.data.rope_index import packed_mrope_positions

IM_END = 151645


def synthetic_row(cfg: Qwen25VLConfig, index: int, seed: int, max_seq_len: int, image_grid: tuple = (1, 4, 4),
                  answer_len: int = 6, vocab: int = 512) -> PackedBatch:
    """Pack documents of one image + prompt + answer until the row is full."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    merge = cfg.vision.merge_unit
    image_tokens = image_grid[0] * image_grid[1] * image_grid[2] // merge
    ids, supervised, grids, lengths = [], [], [], []
    while True:
        prompt = torch.randint(10, vocab, (int(torch.randint(8, 24, (1,), generator=g)),), generator=g)
        answer = prompt[:answer_len]
        doc = torch.cat([torch.tensor([cfg.vision_start_token_id] + [cfg.image_token_id] * image_tokens
                                      + [cfg.vision_end_token_id]), prompt, answer, torch.tensor([IM_END])])
        if sum(lengths) + len(doc) > max_seq_len:
            break
        mask = torch.zeros(len(doc))
        mask[-(answer_len + 1):] = 1.0  # the answer and its end token are supervised
        ids.append(doc)
        supervised.append(mask)
        grids.append(list(image_grid))
        lengths.append(len(doc))
    if not ids:
        raise ValueError(f"max_seq_len {max_seq_len} cannot hold one synthetic document")
    input_ids = torch.cat(ids)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    # next-token targets inside each document; the last token of a document predicts nothing
    labels = torch.roll(input_ids, -1)
    target_mask = torch.roll(torch.cat(supervised), -1)
    target_mask[cu[1:].long() - 1] = 0.0
    grid = torch.tensor(grids, dtype=torch.long)
    pixels = torch.randn(int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum()), cfg.vision.patch_dim, generator=g)
    positions = packed_mrope_positions(input_ids, cu, grid)
    return PackedBatch(
        input_ids=input_ids[None], labels=labels[None], loss_mask=target_mask[None],
        position_ids=positions[:, None, :], cu_seqlens=cu, max_seqlen=max(lengths),
        pixel_values=pixels, image_grid_thw=grid, num_loss_tokens=int(target_mask.sum()))


@dataclass
class SyntheticSource:
    """Rows for one data-parallel rank: global rows dp_rank, dp_rank + dp_size, ..."""

    cfg: Qwen25VLConfig
    seed: int
    max_seq_len: int
    dp_rank: int = 0
    dp_size: int = 1
    consumed_rows: int = 0  # global rows consumed by all DP ranks together

    def next_rows(self, count: int) -> list[PackedBatch]:
        """This rank's ``count`` rows of the next global batch of ``count * dp_size`` rows."""
        start = self.consumed_rows
        rows = [synthetic_row(self.cfg, start + i * self.dp_size + self.dp_rank, self.seed, self.max_seq_len)
                for i in range(count)]
        self.consumed_rows += count * self.dp_size
        return rows

    def state_dict(self) -> dict:
        return {"consumed_rows": self.consumed_rows}

    def load_state_dict(self, state: Optional[dict]) -> None:
        self.consumed_rows = int((state or {}).get("consumed_rows", 0))
