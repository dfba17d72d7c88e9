"""The packed training batch the model consumes: one row of documents back to back."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, T] int64
    labels: torch.Tensor  # [1, T] next-token targets inside each document (0 where unsupervised)
    loss_mask: torch.Tensor  # [1, T] float: 1 where labels[t] is an assistant answer (or end) token
    position_ids: torch.Tensor  # [3, 1, T] mRoPE positions, restarting per document
    cu_seqlens: torch.Tensor  # [N+1] int32 document borders
    max_seqlen: int
    pixel_values: Optional[torch.Tensor]  # [P, 1176] float, images in token order
    image_grid_thw: Optional[torch.Tensor]  # [n, 3] int64
    num_loss_tokens: int

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=non_blocking)
        return replace(self, **moved)

    def pin_memory(self) -> "PackedBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.pin_memory()
        return replace(self, **moved)
