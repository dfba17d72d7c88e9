"""Tensor-by-tensor mapping between Hugging Face Qwen2.5-VL and our Megatron model (TP=1 layout).

One table of rules serves both directions. Three HF tensors become one Megatron tensor in two
places: q/k/v projections -> ``linear_qkv`` (Megatron's per-KV-group layout
``[q_g0.., k_g0, v_g0, q_g1.., k_g1, v_g1, ...]``) and gate/up -> ``linear_fc1`` (``[gate; up]``).
Everything is a pure function of tensors, so converters can stream one layer at a time.

HF key layouts: transformers >= 4.52 names ``model.language_model.*`` / ``model.visual.*``;
older checkpoints name ``model.*`` / ``visual.*``. ``lm_head.weight`` is the same in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from megatron_vlm.config import Qwen25VLConfig

LAYOUTS = ("current", "legacy")
_LM_PREFIX = {"current": "model.language_model.", "legacy": "model."}
_VISION_PREFIX = {"current": "model.visual.", "legacy": "visual."}


class CheckpointMismatch(ValueError):
    """Tensors that are missing, unexpected, or of the wrong shape, named one by one."""


def detect_layout(hf_names: Iterable[str]) -> str:
    names = list(hf_names)
    if any(n.startswith("model.language_model.") for n in names):
        return "current"
    if any(n.startswith("model.layers.") for n in names) and any(n.startswith("visual.") for n in names):
        return "legacy"
    sample = ", ".join(sorted(names)[:5])
    raise CheckpointMismatch(
        "not a Qwen2.5-VL checkpoint: expected 'model.language_model.*' (transformers >= 4.52) or "
        f"'model.layers.*' + 'visual.*' tensors; found e.g. {sample}")


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor and the HF tensor(s) it is made of."""

    megatron: str
    hf: tuple[str, ...]
    kind: str = "copy"  # copy | qkv | fc1


def vision_parameter_names(cfg: Qwen25VLConfig) -> list[str]:
    names = ["patch_embed.proj.weight"]
    for i in range(cfg.vision.depth):
        b = f"blocks.{i}."
        names += [b + "norm1.weight", b + "norm2.weight"]
        names += [b + f"attn.{m}.{p}" for m in ("qkv", "proj") for p in ("weight", "bias")]
        names += [b + f"mlp.{m}.{p}" for m in ("gate_proj", "up_proj", "down_proj") for p in ("weight", "bias")]
    names += ["merger.ln_q.weight"] + [f"merger.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    return names


def rules(cfg: Qwen25VLConfig, layout: str = "current") -> list[Rule]:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown HF key layout {layout!r}; choose one of {LAYOUTS}")
    lm, vis = _LM_PREFIX[layout], _VISION_PREFIX[layout]
    out = [Rule("language_model.embedding.word_embeddings.weight", (lm + "embed_tokens.weight",))]
    for i in range(cfg.language.num_layers):
        h, m = f"{lm}layers.{i}.", f"language_model.decoder.layers.{i}."
        out += [
            Rule(m + "input_layernorm.weight", (h + "input_layernorm.weight",)),
            Rule(m + "self_attention.linear_qkv.weight",
                 tuple(h + f"self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
            Rule(m + "self_attention.linear_qkv.bias",
                 tuple(h + f"self_attn.{p}_proj.bias" for p in "qkv"), "qkv"),
            Rule(m + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",)),
            Rule(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",)),
            Rule(m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), "fc1"),
            Rule(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",)),
        ]
    out.append(Rule("language_model.decoder.final_layernorm.weight", (lm + "norm.weight",)))
    if not cfg.language.tie_word_embeddings:
        out.append(Rule("language_model.output_layer.weight", ("lm_head.weight",)))
    out += [Rule("vision." + n, (vis + n,)) for n in vision_parameter_names(cfg)]
    return out


# --------------------------------------------------------------------------- qkv / fc1 layouts
def _qkv_groups(cfg: Qwen25VLConfig) -> tuple[int, int, int]:
    lm = cfg.language
    return lm.num_kv_heads, lm.num_attention_heads // lm.num_kv_heads, lm.head_dim


def merge_qkv(cfg: Qwen25VLConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HF q, k, v ([heads*d, ...]) -> Megatron fused per-group layout."""
    groups, per_group, d = _qkv_groups(cfg)
    tail = q.shape[1:]
    q = q.reshape(groups, per_group * d, *tail)
    k = k.reshape(groups, d, *tail)
    v = v.reshape(groups, d, *tail)
    return torch.cat((q, k, v), dim=1).reshape(groups * (per_group + 2) * d, *tail)


def split_qkv(cfg: Qwen25VLConfig, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, per_group, d = _qkv_groups(cfg)
    tail = qkv.shape[1:]
    grouped = qkv.reshape(groups, (per_group + 2) * d, *tail)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return (q.reshape(groups * per_group * d, *tail), k.reshape(groups * d, *tail), v.reshape(groups * d, *tail))


def to_megatron(cfg: Qwen25VLConfig, rule: Rule, tensors: list[torch.Tensor]) -> torch.Tensor:
    if rule.kind == "qkv":
        return merge_qkv(cfg, *tensors)
    if rule.kind == "fc1":
        return torch.cat(tensors, dim=0)
    return tensors[0]


def to_hf(cfg: Qwen25VLConfig, rule: Rule, tensor: torch.Tensor) -> list[torch.Tensor]:
    if rule.kind == "qkv":
        return list(split_qkv(cfg, tensor))
    if rule.kind == "fc1":
        return list(torch.chunk(tensor, 2, dim=0))
    return [tensor]


def hf_to_megatron_stream(cfg: Qwen25VLConfig, hf_names: Iterable[str],
                          load: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (megatron name, tensor) pairs, loading HF tensors one rule at a time.

    Raises CheckpointMismatch naming every missing HF tensor and every HF tensor no rule uses.
    """
    names = set(hf_names)
    layout = detect_layout(names)
    table = rules(cfg, layout)
    wanted = {n for r in table for n in r.hf}
    ignorable = {"lm_head.weight"} if cfg.language.tie_word_embeddings else set()
    missing = sorted(wanted - names)
    unexpected = sorted(names - wanted - ignorable)
    if missing or unexpected:
        raise CheckpointMismatch(
            "HF checkpoint does not match its config.json (" + layout + " key layout):"
            + (f"\n  missing ({len(missing)}): " + ", ".join(missing[:20]) if missing else "")
            + (f"\n  unexpected ({len(unexpected)}): " + ", ".join(unexpected[:20]) if unexpected else ""))
    for rule in table:
        yield rule.megatron, to_megatron(cfg, rule, [load(n) for n in rule.hf])


def megatron_to_hf_stream(cfg: Qwen25VLConfig, load: Callable[[str], torch.Tensor],
                          layout: str = "current") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) pairs from a TP=1 Megatron state (``load`` by Megatron name)."""
    for rule in rules(cfg, layout):
        for name, tensor in zip(rule.hf, to_hf(cfg, rule, load(rule.megatron))):
            yield name, tensor
