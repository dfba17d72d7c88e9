"""Model configuration as dataclasses, read from and written to Hugging Face ``config.json``.

Qwen2.5-VL configs exist in two key layouts: before transformers 4.52 the language-model keys sit at
the top level (``hidden_size``, ``num_hidden_layers``, ...); from 4.52 on they live in
``text_config``. Both are read; both are written (``text_config`` plus a top-level mirror) so the
exported directory loads in old and new transformers. ``tie_word_embeddings`` is taken from
``text_config`` when it is there (transformers ties by ``get_text_config().tie_word_embeddings``,
whatever the top-level copy says; checked on 4.57), else from the top level (the pre-4.52 layout).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

IMAGE_PAD_TOKEN_ID = 151655
VIDEO_PAD_TOKEN_ID = 151656
VISION_START_TOKEN_ID = 151652
VISION_END_TOKEN_ID = 151653


class ConfigError(ValueError):
    """A config that is not a Qwen2.5-VL config, or one whose values do not fit together."""


@dataclass
class VisionConfig:
    """The ViT: 2x14x14 patches, 2-D rotary, window attention with a few full-attention blocks."""

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 3584  # the LM width the patch merger projects to
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    window_size: int = 112  # pixels
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: int = 2
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass
class LanguageConfig:
    """The decoder: GQA attention with qkv bias, SwiGLU MLP, RMSNorm, mRoPE."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    num_layers: int = 28
    num_attention_heads: int = 28
    num_kv_heads: int = 4
    ffn_hidden_size: int = 18944
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)  # temporal, height, width (in frequency pairs)
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class Qwen25VLConfig:
    language: LanguageConfig = field(default_factory=LanguageConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = IMAGE_PAD_TOKEN_ID
    video_token_id: int = VIDEO_PAD_TOKEN_ID
    vision_start_token_id: int = VISION_START_TOKEN_ID
    vision_end_token_id: int = VISION_END_TOKEN_ID

    def validate(self) -> "Qwen25VLConfig":
        lm, vis = self.language, self.vision
        if lm.hidden_size % lm.num_attention_heads:
            raise ConfigError(f"hidden_size {lm.hidden_size} is not divisible by "
                              f"num_attention_heads {lm.num_attention_heads}")
        if lm.num_attention_heads % lm.num_kv_heads:
            raise ConfigError(f"num_attention_heads {lm.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {lm.num_kv_heads}")
        if 2 * sum(lm.mrope_section) != lm.head_dim:
            raise ConfigError(f"mrope_section {list(lm.mrope_section)} covers {2 * sum(lm.mrope_section)} "
                              f"rotary dims but head_dim is {lm.head_dim}")
        if vis.hidden_size % vis.num_heads:
            raise ConfigError(f"vision hidden_size {vis.hidden_size} not divisible by num_heads {vis.num_heads}")
        if vis.out_hidden_size != lm.hidden_size:
            raise ConfigError(f"vision out_hidden_size {vis.out_hidden_size} != LM hidden_size {lm.hidden_size}")
        bad = [i for i in vis.fullatt_block_indexes if not 0 <= i < vis.depth]
        if bad:
            raise ConfigError(f"fullatt_block_indexes {bad} outside 0..{vis.depth - 1}")
        return self

    def with_rope_theta(self, rope_theta: Optional[float]) -> "Qwen25VLConfig":
        """A copy with another rope base (the LongPT recipe moves 1e6 -> 4e6)."""
        out = copy.deepcopy(self)
        if rope_theta is not None:
            out.language.rope_theta = float(rope_theta)
        return out

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "Qwen25VLConfig":
        model_type = hf.get("model_type")
        if model_type != "qwen2_5_vl":
            raise ConfigError(f"not a Qwen2.5-VL config: model_type is {model_type!r}, expected 'qwen2_5_vl'")
        text = hf.get("text_config") or hf  # >= 4.52 nests the LM keys; older configs keep them on top
        vis = hf.get("vision_config")
        if not isinstance(vis, dict):
            raise ConfigError("Qwen2.5-VL config has no vision_config")
        try:
            rope_scaling = text.get("rope_scaling") or hf.get("rope_scaling") or {}
            section = tuple(rope_scaling.get("mrope_section", (16, 24, 24)))
            # transformers ties by text_config's flag; the top-level copy may disagree with it.
            tie_source = text if "tie_word_embeddings" in text else hf
            language = LanguageConfig(
                vocab_size=int(text["vocab_size"]),
                hidden_size=int(text["hidden_size"]),
                num_layers=int(text["num_hidden_layers"]),
                num_attention_heads=int(text["num_attention_heads"]),
                num_kv_heads=int(text.get("num_key_value_heads", text["num_attention_heads"])),
                ffn_hidden_size=int(text["intermediate_size"]),
                rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
                rope_theta=float(text.get("rope_theta", 1e6)),
                mrope_section=section,
                max_position_embeddings=int(text.get("max_position_embeddings", 128000)),
                tie_word_embeddings=bool(tie_source.get("tie_word_embeddings", False)),
                hidden_act=text.get("hidden_act", "silu"),
            )
            vision = VisionConfig(
                depth=int(vis["depth"]),
                hidden_size=int(vis["hidden_size"]),
                num_heads=int(vis["num_heads"]),
                intermediate_size=int(vis["intermediate_size"]),
                out_hidden_size=int(vis.get("out_hidden_size", language.hidden_size)),
                patch_size=int(vis.get("patch_size", 14)),
                temporal_patch_size=int(vis.get("temporal_patch_size", 2)),
                spatial_merge_size=int(vis.get("spatial_merge_size", 2)),
                in_channels=int(vis.get("in_channels", vis.get("in_chans", 3))),
                window_size=int(vis.get("window_size", 112)),
                fullatt_block_indexes=tuple(int(i) for i in vis.get("fullatt_block_indexes", ())),
                tokens_per_second=int(vis.get("tokens_per_second", 2)),
                hidden_act=vis.get("hidden_act", "silu"),
            )
        except KeyError as err:
            raise ConfigError(f"Qwen2.5-VL config is missing key {err}") from None
        if language.hidden_act != "silu" or vision.hidden_act != "silu":
            raise ConfigError(f"only SiLU-gated MLPs are supported, got {language.hidden_act}/{vision.hidden_act}")
        return cls(
            language=language,
            vision=vision,
            image_token_id=int(hf.get("image_token_id", IMAGE_PAD_TOKEN_ID)),
            video_token_id=int(hf.get("video_token_id", VIDEO_PAD_TOKEN_ID)),
            vision_start_token_id=int(hf.get("vision_start_token_id", VISION_START_TOKEN_ID)),
            vision_end_token_id=int(hf.get("vision_end_token_id", VISION_END_TOKEN_ID)),
        ).validate()

    @classmethod
    def from_hf_dir(cls, path: str) -> "Qwen25VLConfig":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"{cfg_path} not found: pass a Hugging Face Qwen2.5-VL checkpoint directory")
        with open(cfg_path) as f:
            try:
                hf = json.load(f)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{cfg_path} is not valid JSON: {err}") from None
        return cls.from_hf_dict(hf)

    def to_hf_dict(self, base: Optional[dict[str, Any]] = None, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        """An HF config dict. ``base`` (the source checkpoint's config) keeps keys we do not model."""
        lm, vis = self.language, self.vision
        text = {
            "model_type": "qwen2_5_vl_text",
            "vocab_size": lm.vocab_size,
            "hidden_size": lm.hidden_size,
            "num_hidden_layers": lm.num_layers,
            "num_attention_heads": lm.num_attention_heads,
            "num_key_value_heads": lm.num_kv_heads,
            "intermediate_size": lm.ffn_hidden_size,
            "rms_norm_eps": lm.rms_norm_eps,
            "rope_theta": lm.rope_theta,
            "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": list(lm.mrope_section)},
            "max_position_embeddings": lm.max_position_embeddings,
            "hidden_act": lm.hidden_act,
            "tie_word_embeddings": lm.tie_word_embeddings,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
        }
        out = copy.deepcopy(base) if base else {}
        old_text = out.get("text_config") if isinstance(out.get("text_config"), dict) else {}
        out["text_config"] = {**old_text, **text}
        for key, value in text.items():  # pre-4.52 readers look at the top level
            if key != "model_type":
                out[key] = copy.deepcopy(value)
        old_vis = out.get("vision_config") if isinstance(out.get("vision_config"), dict) else {}
        vis_dict = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(vis).items()}
        vis_dict.pop("rms_norm_eps")
        vis_dict["in_chans"] = vis.in_channels
        out["vision_config"] = {**old_vis, **vis_dict, "model_type": "qwen2_5_vl"}
        out.update(
            model_type="qwen2_5_vl",
            architectures=["Qwen2_5_VLForConditionalGeneration"],
            tie_word_embeddings=lm.tie_word_embeddings,
            image_token_id=self.image_token_id,
            video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id,
            torch_dtype=torch_dtype,
        )
        return out


# ---------------------------------------------------------------------- presets
def _vision(out_hidden_size: int, **kw: Any) -> VisionConfig:
    return VisionConfig(out_hidden_size=out_hidden_size, **kw)


def qwen25vl_3b() -> Qwen25VLConfig:
    lm = LanguageConfig(vocab_size=151936, hidden_size=2048, num_layers=36, num_attention_heads=16,
                        num_kv_heads=2, ffn_hidden_size=11008, tie_word_embeddings=True)
    return Qwen25VLConfig(language=lm, vision=_vision(2048)).validate()


def qwen25vl_7b() -> Qwen25VLConfig:
    return Qwen25VLConfig(language=LanguageConfig(), vision=_vision(3584)).validate()


def qwen25vl_32b() -> Qwen25VLConfig:
    lm = LanguageConfig(vocab_size=152064, hidden_size=5120, num_layers=64, num_attention_heads=40,
                        num_kv_heads=8, ffn_hidden_size=27648, rms_norm_eps=1e-6)
    return Qwen25VLConfig(language=lm, vision=_vision(5120)).validate()


def qwen25vl_72b() -> Qwen25VLConfig:
    lm = LanguageConfig(vocab_size=152064, hidden_size=8192, num_layers=80, num_attention_heads=64,
                        num_kv_heads=8, ffn_hidden_size=29568, rms_norm_eps=1e-6)
    return Qwen25VLConfig(language=lm, vision=_vision(8192, intermediate_size=3456)).validate()


def tiny() -> Qwen25VLConfig:
    """A few-MB model with the real geometry's shape rules (GQA, sections, windows, full blocks)."""
    lm = LanguageConfig(vocab_size=151936, hidden_size=64, num_layers=2, num_attention_heads=4,
                        num_kv_heads=2, ffn_hidden_size=128, mrope_section=(2, 3, 3),
                        max_position_embeddings=32768, tie_word_embeddings=False)
    vis = VisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                       fullatt_block_indexes=(1,))
    return Qwen25VLConfig(language=lm, vision=vis).validate()


def tiny_serve() -> Qwen25VLConfig:
    """``tiny`` made servable: attention head size 32 in the LM and the ViT (vLLM's CPU attention
    needs 32 or more; ``tiny`` has 16), tied embeddings like the 3B, still a few tens of MB."""
    lm = LanguageConfig(vocab_size=151936, hidden_size=128, num_layers=2, num_attention_heads=4,
                        num_kv_heads=2, ffn_hidden_size=256, mrope_section=(4, 6, 6),
                        max_position_embeddings=32768, tie_word_embeddings=True)
    vis = VisionConfig(depth=2, hidden_size=64, num_heads=2, intermediate_size=128, out_hidden_size=128,
                       fullatt_block_indexes=(1,))
    return Qwen25VLConfig(language=lm, vision=vis).validate()


PRESETS = {"tiny": tiny, "tiny-serve": tiny_serve, "3b": qwen25vl_3b,
           "7b": qwen25vl_7b, "32b": qwen25vl_32b, "72b": qwen25vl_72b}
