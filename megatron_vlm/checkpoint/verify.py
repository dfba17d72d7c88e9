"""Run an HF checkpoint and its Megatron conversion on the same fixed inputs; compare logits.

The two models run one after the other (the HF one is freed first), so a check needs the memory
of one model, not two.
"""

from __future__ import annotations

import gc
from typing import Callable, Optional

import torch

from megatron_vlm.config import Qwen25VLConfig
from megatron_vlm.testing import Sample, make_sample

DEFAULT_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.5, torch.float16: 0.1}


def fixed_inputs(cfg: Qwen25VLConfig) -> dict[str, Sample]:
    """A text-only sequence and a text + one image sequence, the same on every run. Their random
    text never contains the config's special ids (``testing.make_sample``), whatever the vocabulary."""
    g = torch.Generator().manual_seed(1234)
    return {"text": make_sample(cfg, [48], g), "image": make_sample(cfg, [12, (1, 8, 12), 20], g)}


@torch.no_grad()
def hf_logits(hf_dir: str, samples: dict[str, Sample], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, torch_dtype=dtype).eval()
    out = {}
    for name, s in samples.items():
        pixels = None if s.pixel_values is None else s.pixel_values.to(dtype)
        out[name] = model(input_ids=s.input_ids[None], pixel_values=pixels,
                          image_grid_thw=s.image_grid_thw).logits[0].float()
    del model
    gc.collect()
    return out


@torch.no_grad()
def megatron_logits(model, cfg: Qwen25VLConfig, samples: dict[str, Sample], dtype: torch.dtype
                    ) -> dict[str, torch.Tensor]:
    from megatron_vlm.data.rope_index import mrope_positions
    from megatron_vlm.models.qwen2_5_vl import gather_logits

    model.eval()
    out = {}
    for name, s in samples.items():
        positions = mrope_positions(s.input_ids, s.image_grid_thw, image_token_id=cfg.image_token_id,
                                    video_token_id=cfg.video_token_id,
                                    vision_start_token_id=cfg.vision_start_token_id,
                                    spatial_merge_size=cfg.vision.spatial_merge_size,
                                    tokens_per_second=cfg.vision.tokens_per_second)[:, None, :]
        pixels = None if s.pixel_values is None else s.pixel_values.to(dtype)
        logits = model(s.input_ids[None], positions, pixels, s.image_grid_thw)
        out[name] = gather_logits(logits)[0].float()
    return out


def verify(hf_dir: str, megatron_dir: str, dtype: torch.dtype = torch.float32,
           log: Callable[[str], None] = print) -> float:
    """Max abs logit difference over the fixed inputs."""
    from megatron_vlm.checkpoint.convert import load_model_dir

    hf_cfg = Qwen25VLConfig.from_hf_dir(hf_dir)
    samples = fixed_inputs(hf_cfg)
    reference = hf_logits(hf_dir, samples, dtype)
    model, cfg = load_model_dir(megatron_dir, dtype)
    if cfg.language.rope_theta != hf_cfg.language.rope_theta:
        log(f"note: {megatron_dir} has rope_theta {cfg.language.rope_theta:g}, {hf_dir} has "
            f"{hf_cfg.language.rope_theta:g}; comparing the weights at the HF value")
        model.set_rope_theta(hf_cfg.language.rope_theta)
    ours = megatron_logits(model, cfg, samples, dtype)
    worst = 0.0
    for name in samples:
        diff = (ours[name] - reference[name]).abs().max().item()
        log(f"{name:>6}: {tuple(ours[name].shape)} logits, max abs diff {diff:.3e}")
        worst = max(worst, diff)
    return worst


def default_tolerance(dtype: torch.dtype, override: Optional[float]) -> float:
    return override if override is not None else DEFAULT_TOLERANCE[dtype]
