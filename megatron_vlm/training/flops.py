"""Model FLOPs of a Qwen2.5-VL training step, from what a packed row really computes.

Attention is counted per packed document (causal: 2·s²·H per layer forward for a document of s
tokens, i.e. Σ sᵢ², not seq_len²) and per ViT window / image (non-causal: 4·w²·h). Matmuls count
2 FLOPs per multiply-add. Training = 3 x forward (backward is twice the forward); activation
recompute is *not* counted, as MFU conventionally excludes it.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from megatron_vlm.config import Qwen25VLConfig


def lm_forward_flops(cfg: Qwen25VLConfig, doc_lengths: Sequence[int], logit_tokens: int) -> float:
    lm = cfg.language
    h, f, kv = lm.hidden_size, lm.ffn_hidden_size, lm.num_kv_heads * lm.head_dim
    tokens = sum(doc_lengths)
    dense = 2 * (h * (h + 2 * kv) + h * h + 3 * h * f) * tokens
    attention = 2 * h * sum(s * s for s in doc_lengths)  # causal QK^T + AV
    return lm.num_layers * (dense + attention) + 2 * h * lm.vocab_size * logit_tokens


def _window_sizes(grid_h: int, grid_w: int, cfg: Qwen25VLConfig) -> list[int]:
    """Patches per ViT attention window of one frame (merged grid cut into window-sized tiles)."""
    vis = cfg.vision
    merge = vis.spatial_merge_size
    side = vis.window_size // (vis.patch_size * merge)  # window side in merged tokens
    hm, wm = grid_h // merge, grid_w // merge
    sizes = []
    for top in range(0, hm, side):
        for left in range(0, wm, side):
            sizes.append(min(side, hm - top) * min(side, wm - left) * merge * merge)
    return sizes


def vision_forward_flops(cfg: Qwen25VLConfig, image_grids: Iterable[Sequence[int]]) -> float:
    vis, lm_h = cfg.vision, cfg.language.hidden_size
    h, f = vis.hidden_size, vis.intermediate_size
    full_blocks = len(vis.fullatt_block_indexes)
    window_blocks = vis.depth - full_blocks
    total = 0.0
    for t, gh, gw in image_grids:
        patches = t * gh * gw
        dense = 2 * (3 * h * h + h * h + 3 * h * f) * patches * vis.depth
        window_sq = t * sum(w * w for w in _window_sizes(gh, gw, cfg))
        frame_sq = t * (gh * gw) ** 2
        attention = 4 * h * (window_blocks * window_sq + full_blocks * frame_sq)
        merged = patches // vis.merge_unit
        merger = 2 * (4 * h * 4 * h + 4 * h * lm_h) * merged
        embed = 2 * vis.patch_dim * h * patches
        total += dense + attention + merger + embed
    return total


def training_step_flops(cfg: Qwen25VLConfig, doc_lengths: Sequence[int], image_grids: Iterable[Sequence[int]],
                        logit_tokens: int, train_vision: bool = True) -> float:
    """Forward + backward FLOPs of one row (frozen vision: its backward is skipped, forward kept)."""
    lm = 3 * lm_forward_flops(cfg, doc_lengths, logit_tokens)
    vision = vision_forward_flops(cfg, image_grids)
    return lm + (3 if train_vision else 1) * vision


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H20": 148e12, "A100": 312e12}


def peak_flops(device_name: str) -> float:
    """Dense bf16 peak of a known GPU from its name (0 when unknown: MFU is then not reported)."""
    upper = device_name.upper()
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in upper:
            return PEAK_BF16_FLOPS[key]
    return 0.0
