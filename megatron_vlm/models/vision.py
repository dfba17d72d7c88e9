"""The Qwen2.5-VL vision encoder (ViT + 2x2 patch merger) in plain PyTorch.

The encoder is *replicated* across tensor-parallel ranks, not sharded: at ~0.7B parameters it is
small next to the language model, and sharding it would add two collectives per block for little
memory. Every TP rank runs the whole encoder on the same images; keeping its gradients equal
across the TP group is the trainer's job.

Parameter and submodule names are identical to the ``visual.`` tower of Hugging Face's
``Qwen2_5_VLForConditionalGeneration``, so checkpoint conversion is a plain prefix rename.

Token order. Pixel patches arrive grouped by 2x2 merge block (the HF processor's layout). The
encoder permutes those merge blocks into *window order* (each window of
``window_size // patch_size // spatial_merge_size`` merged tokens square is contiguous), runs window
attention in most blocks and per-frame full attention in ``fullatt_block_indexes``, merges 2x2
patches, and permutes back, so the output is in the original merged-token order.

Everything that depends only on ``grid_thw`` (window permutation, ``cu_seqlens``, their max
lengths, rotary positions) lives in a :class:`VisionPlan` built by :func:`vision_plan` on the host,
so a data loader can precompute it and the forward then runs without device-to-host syncs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_vlm.config import VisionConfig
from megatron_vlm.models.attention import varlen_attention
from megatron_vlm.models.norms import RMSNorm

_ROPE_THETA = 10000.0


# ---------------------------------------------------------------------------------------- plan
@dataclass
class VisionPlan:
    """Index tensors and lengths for one batch of images, derived from ``grid_thw`` alone.

    ``window_index[j]`` is the original merged-token index placed at windowed position ``j``;
    ``reverse_index`` is its inverse. ``cu_window_seqlens`` (one segment per window) and
    ``cu_seqlens`` (one segment per frame: a video's frames attend separately, as in HF) count
    patches and are int32 starting at 0. ``rotary_pos`` holds each patch's (row, col) in the patch
    grid, already in windowed order. Max lengths are Python ints so attention needs no sync.
    """

    window_index: torch.Tensor  # [N_patches / merge_unit] int64
    reverse_index: torch.Tensor  # [N_patches / merge_unit] int64
    cu_window_seqlens: torch.Tensor  # [n_windows + 1] int32
    cu_seqlens: torch.Tensor  # [n_frames + 1] int32
    max_window_seqlen: int
    max_seqlen: int
    rotary_pos: torch.Tensor  # [N_patches, 2] int64
    num_patches: int

    _TENSORS = ("window_index", "reverse_index", "cu_window_seqlens", "cu_seqlens", "rotary_pos")

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> "VisionPlan":
        moved = {k: getattr(self, k).to(device, non_blocking=non_blocking) for k in self._TENSORS}
        return dataclasses.replace(self, **moved)

    def pin_memory(self) -> "VisionPlan":
        """Called by ``DataLoader(pin_memory=True)`` so plans can be copied with non_blocking."""
        return dataclasses.replace(self, **{k: getattr(self, k).pin_memory() for k in self._TENSORS})


def vision_plan(grid_thw: Union[torch.Tensor, Sequence[Sequence[int]]], config: VisionConfig) -> VisionPlan:
    """Build the :class:`VisionPlan` for images/videos of patch grids ``grid_thw`` ([n, 3]: t, h, w).

    Runs on the CPU (a GPU ``grid_thw`` is copied to the host once). Vectorized over all merged
    tokens: each token gets a global window id, and a stable sort by that id yields the window
    order, because within a window the original row-major order is already the in-window order.
    """
    grid = torch.as_tensor(grid_thw).to(device="cpu", dtype=torch.long).reshape(-1, 3)
    m = config.spatial_merge_size
    unit = m * m
    win = config.window_size // m // config.patch_size  # window side, in merged tokens
    if grid.shape[0] == 0:
        raise ValueError("grid_thw is empty: there are no images to encode")
    if win < 1:
        raise ValueError(f"window_size {config.window_size} is smaller than one merged token "
                         f"({m} x {config.patch_size} px)")
    if bool((grid <= 0).any()) or bool((grid[:, 1:] % m).any()):
        raise ValueError(f"grid_thw rows must be positive with h, w divisible by spatial_merge_size={m}; "
                         f"got {grid.tolist()}")

    t, h, w = grid.unbind(1)
    frame_h = (h // m).repeat_interleave(t)  # merged-grid size of every frame, frames of an image adjacent
    frame_w = (w // m).repeat_interleave(t)
    frame_tokens = frame_h * frame_w
    tok_frame = torch.repeat_interleave(torch.arange(frame_tokens.numel()), frame_tokens)
    n_tokens = tok_frame.numel()
    local = torch.arange(n_tokens) - (frame_tokens.cumsum(0) - frame_tokens)[tok_frame]
    tok_w = frame_w[tok_frame]
    row, col = local // tok_w, local % tok_w

    wins_w = (frame_w + win - 1) // win  # partial windows at the right/bottom edge are kept
    wins = (frame_h + win - 1) // win * wins_w
    win_id = (wins.cumsum(0) - wins)[tok_frame] + (row // win) * wins_w[tok_frame] + col // win
    window_index = torch.sort(win_id, stable=True).indices
    reverse_index = torch.empty_like(window_index)
    reverse_index[window_index] = torch.arange(n_tokens)

    win_len = torch.bincount(win_id, minlength=int(wins.sum())) * unit  # no window is empty
    cu_window = F.pad(win_len.cumsum(0), (1, 0)).to(torch.int32)
    cu_full = F.pad((frame_tokens * unit).cumsum(0), (1, 0)).to(torch.int32)

    # Patch (row, col) for rotary: merged position * m + offset inside the m x m block.
    sub = torch.arange(unit)
    pos_r = row[window_index, None] * m + sub // m
    pos_c = col[window_index, None] * m + sub % m
    rotary_pos = torch.stack((pos_r, pos_c), dim=-1).reshape(-1, 2)

    return VisionPlan(
        window_index=window_index,
        reverse_index=reverse_index,
        cu_window_seqlens=cu_window,
        cu_seqlens=cu_full,
        max_window_seqlen=int(win_len.max()),
        max_seqlen=int(frame_tokens.max()) * unit,
        rotary_pos=rotary_pos,
        num_patches=n_tokens * unit,
    )


# -------------------------------------------------------------------------------------- layers
def _inv_freq(dim: int) -> torch.Tensor:
    return 1.0 / (_ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


class VisionRotaryEmbedding(nn.Module):
    """2-D rotary frequencies: half the rotary channels encode the row, half the column."""

    inv_freq: torch.Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("inv_freq", _inv_freq(dim), persistent=False)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # ``model.bfloat16()`` would round the frequencies; keep them fp32 (and recomputed, so
        # they are also valid after ``to_empty`` from the meta device).
        super()._apply(fn, recurse)
        self.inv_freq = _inv_freq(self.dim).to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """[N, 2] integer (row, col) -> [N, dim] fp32 angles."""
        return (positions.to(torch.float32)[..., None] * self.inv_freq).flatten(1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary in fp32 (as HF does), cast back to the input dtype."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class VisionPatchEmbed(nn.Module):
    """Patchify projection. The weight is a Conv3d's (HF layout), but since stride == kernel it is
    applied as one matmul over flattened patches: equal numbers, and far faster than cuDNN's
    Conv3d for this shape."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return F.linear(pixel_values.to(weight.dtype), weight.reshape(weight.shape[0], -1))


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        out = varlen_attention(q, k, v.contiguous(), cu_seqlens, max_seqlen, causal=False,
                               softmax_scale=self.head_dim**-0.5)
        return self.proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    """SwiGLU MLP with biases (the Qwen2.5-VL ViT, unlike Qwen2-VL's, is gated)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"vision hidden_act {config.hidden_act!r} is not supported (only 'silu')")
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm2 = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens, max_seqlen, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Concatenates each 2x2 block of patch features and projects them to the LM width."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.merged_size = config.hidden_size * config.merge_unit
        self.ln_q = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_size, self.merged_size),
            nn.GELU(),
            nn.Linear(self.merged_size, config.out_hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.merged_size))


# --------------------------------------------------------------------------------------- model
class Qwen25VisionModel(nn.Module):
    """Qwen2.5-VL ViT: ``[N_patches, patch_dim]`` pixels -> ``[N_patches / 4, out_hidden_size]``."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if config.hidden_size % config.num_heads:
            raise ValueError(f"vision hidden_size {config.hidden_size} not divisible by num_heads {config.num_heads}")
        self.config = config
        self.patch_embed = VisionPatchEmbed(config)
        self.rotary_pos_emb = VisionRotaryEmbedding(config.head_dim // 2)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)
        self.fullatt_block_indexes = frozenset(config.fullatt_block_indexes)
        self.recompute: bool = False  # activation checkpointing of every block while training

    def forward(self, pixel_values: torch.Tensor, grid_thw: Optional[torch.Tensor] = None,
                plan: Optional[VisionPlan] = None) -> torch.Tensor:
        """Encode patches. Pass a precomputed ``plan`` (already on the device) to avoid host syncs;
        otherwise it is built here from ``grid_thw``."""
        if plan is None:
            if grid_thw is None:
                raise ValueError("pass grid_thw or a precomputed plan")
            plan = vision_plan(grid_thw, self.config).to(pixel_values.device)
        expected = (plan.num_patches, self.config.patch_dim)
        if tuple(pixel_values.shape) != expected:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}, but grid_thw implies {expected}")

        unit = self.config.merge_unit
        x = self.patch_embed(pixel_values)
        x = x.view(-1, unit, x.shape[-1])[plan.window_index].reshape(plan.num_patches, -1)
        angles = self.rotary_pos_emb(plan.rotary_pos)
        emb = torch.cat((angles, angles), dim=-1).unsqueeze(1)  # [N, 1, head_dim]: broadcast over heads
        cos, sin = emb.cos(), emb.sin()

        use_recompute = self.recompute and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if i in self.fullatt_block_indexes:
                cu, max_len = plan.cu_seqlens, plan.max_seqlen
            else:
                cu, max_len = plan.cu_window_seqlens, plan.max_window_seqlen
            if use_recompute:
                x = checkpoint(block, x, cu, max_len, cos, sin, use_reentrant=False)
            else:
                x = block(x, cu, max_len, cos, sin)

        return self.merger(x)[plan.reverse_index]
