"""HF <-> Megatron conversion of Qwen2.5-VL checkpoints, and the logit check users run after it.

* ``hf_to_megatron``: HF safetensors -> a model directory (see ``checkpoint/dist.py``) in Megatron's
  distributed format, which loads at any tensor-parallel size.
* ``megatron_to_hf``: a model directory -> HF safetensors that ``transformers`` loads, with the
  tokenizer/processor files carried along and the (possibly changed) rope base in config.json.
* ``verify``: both models on fixed inputs (text, one image); the max abs logit difference.

Tensors stream: the Megatron model is filled (or read) one HF tensor group at a time, so peak
memory is the model plus one layer, about 1.1x the checkpoint size.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Callable, Iterable, Iterator, Optional

import torch

from megatron_vlm.checkpoint import dist as dist_ckpt
from megatron_vlm.checkpoint.hf_io import HFCheckpointReader, non_weight_files, write_hf_checkpoint
from megatron_vlm.checkpoint.hf_mapping import CheckpointMismatch, hf_to_megatron_stream, megatron_to_hf_stream
from megatron_vlm.config import ConfigError, Qwen25VLConfig

HF_ASSETS = "hf_assets"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)} or auto")
    return DTYPES[name]


def check_tensor_parallel(cfg: Qwen25VLConfig, tp: int) -> None:
    """Clear errors for shapes that do not divide by the requested TP size."""
    lm = cfg.language
    problems = []
    if tp < 1:
        problems.append(f"TP must be >= 1, got {tp}")
    else:
        if lm.num_attention_heads % tp:
            problems.append(f"num_attention_heads {lm.num_attention_heads} % TP {tp} != 0")
        if lm.num_kv_heads % tp and tp % lm.num_kv_heads:
            problems.append(f"num_key_value_heads {lm.num_kv_heads} and TP {tp}: neither divides the other")
        if lm.ffn_hidden_size % tp:
            problems.append(f"intermediate_size {lm.ffn_hidden_size} % TP {tp} != 0")
        if lm.vocab_size % tp:
            problems.append(f"vocab_size {lm.vocab_size} % TP {tp} != 0")
    if problems:
        raise ConfigError("this model cannot be split at tensor-parallel size "
                          f"{tp}: " + "; ".join(problems))


# ------------------------------------------------------------------------- in-memory (TP=1)
def load_hf_tensors(model: torch.nn.Module, cfg: Qwen25VLConfig, hf_names: Iterable[str],
                    load: Callable[[str], torch.Tensor]) -> None:
    """Fill a TP=1 model from HF tensors, checking every name and shape."""
    params = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}
    filled = set()
    with torch.no_grad():
        for name, tensor in hf_to_megatron_stream(cfg, hf_names, load):
            if name not in params:
                raise CheckpointMismatch(f"no parameter {name} in the Megatron model (is it TP=1?)")
            target = params[name]
            if tuple(target.shape) != tuple(tensor.shape):
                raise CheckpointMismatch(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape "
                                         f"{tuple(target.shape)} (TP>1 models load through dist checkpoints)")
            target.copy_(tensor)
            filled.add(name)
    unfilled = sorted(set(params) - filled)
    if unfilled:
        raise CheckpointMismatch(f"model tensors not in the checkpoint: {', '.join(unfilled[:20])}")


def model_hf_tensors(model: torch.nn.Module, cfg: Qwen25VLConfig, layout: str = "current"
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs from a TP=1 model, in HF's own order."""
    params = model.state_dict()
    return megatron_to_hf_stream(cfg, params.__getitem__, layout)


def build_model(cfg: Qwen25VLConfig, dtype: torch.dtype, tensor_parallel: int = 1, init: bool = True,
                recompute: bool = False, context_parallel: int = 1):
    """A Megatron model at the given TP (initialising the process groups if needed)."""
    from megatron_vlm.models.qwen2_5_vl import Qwen25VLModel
    from megatron_vlm.parallel import initialize_parallel

    initialize_parallel(tensor_parallel=tensor_parallel, context_parallel=context_parallel)
    return Qwen25VLModel(cfg, params_dtype=dtype, init_weights=init, recompute=recompute)


def load_model_dir(directory: str, dtype: Optional[torch.dtype] = None, tensor_parallel: int = 1,
                   context_parallel: int = 1):
    """A model directory -> (model, config); loads at any TP (and CP) size."""
    meta = dist_ckpt.read_meta(directory)
    cfg = Qwen25VLConfig.from_hf_dir(directory)
    dtype = dtype or DTYPES[meta.get("dtype", "bf16")]
    model = build_model(cfg, dtype, tensor_parallel, init=False, context_parallel=context_parallel)
    dist_ckpt.load_model_weights(model, directory)
    return model, cfg


# ------------------------------------------------------------------------- directories
def hf_to_megatron(hf_dir: str, out_dir: str, tensor_parallel: int = 1, rope_theta: Optional[float] = None,
                   dtype: Optional[torch.dtype] = None, log: Callable[[str], None] = print) -> Qwen25VLConfig:
    start = time.time()
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf_config = json.load(f)
    cfg = Qwen25VLConfig.from_hf_dir(hf_dir).with_rope_theta(rope_theta)
    check_tensor_parallel(cfg, tensor_parallel)
    reader = HFCheckpointReader(hf_dir)
    dtype = dtype or reader.dtype()
    if os.path.exists(os.path.join(out_dir, dist_ckpt.MODEL_SUBDIR)):
        raise FileExistsError(f"{out_dir} already holds a checkpoint; choose a new --out-dir, or --force to replace it")
    log(f"building {cfg.language.num_layers}-layer model ({dtype}) ...")
    model = build_model(cfg, dtype, tensor_parallel=1, init=False)
    log(f"streaming {len(reader.names())} tensors from {hf_dir} ...")
    load_hf_tensors(model, cfg, reader.names(), lambda n: reader.load(n))
    os.makedirs(out_dir, exist_ok=True)
    dist_ckpt.save_model_weights(model, out_dir)
    _write_json(os.path.join(out_dir, "config.json"), cfg.to_hf_dict(base=hf_config, torch_dtype=_dtype_name(dtype)))
    _copy_assets(hf_dir, os.path.join(out_dir, HF_ASSETS))
    dist_ckpt.write_meta(out_dir, {"dtype": _short(dtype), "source": os.path.abspath(hf_dir),
                                   "hf_layout": _layout_of(reader.names()),
                                   "converted_for_tp": tensor_parallel})
    log(f"wrote {out_dir} in {time.time() - start:.1f}s (loads at any TP; checked divisible by TP={tensor_parallel})")
    return cfg


def megatron_to_hf(in_dir: str, out_dir: str, layout: str = "source", dtype: Optional[torch.dtype] = None,
                   rope_theta: Optional[float] = None, max_shard_bytes: int = 5 * 1024**3,
                   log: Callable[[str], None] = print) -> None:
    start = time.time()
    if layout == "source":  # what the HF checkpoint we came from used; published Qwen repos are legacy
        layout = dist_ckpt.read_meta(in_dir).get("hf_layout", "legacy")
    model, cfg = load_model_dir(in_dir, dtype)
    if rope_theta is not None:
        model.set_rope_theta(rope_theta)
        cfg = cfg.with_rope_theta(rope_theta)
    with open(os.path.join(in_dir, "config.json")) as f:
        base = json.load(f)
    out_dtype = dtype or next(model.parameters()).dtype
    names = write_hf_checkpoint(lambda: model_hf_tensors(model, cfg, layout), out_dir, max_shard_bytes, out_dtype)
    _write_json(os.path.join(out_dir, "config.json"), cfg.to_hf_dict(base=base, torch_dtype=_dtype_name(out_dtype)))
    assets = os.path.join(in_dir, HF_ASSETS)
    if os.path.isdir(assets):
        _copy_assets(assets, out_dir)
    log(f"wrote {len(names)} tensors to {out_dir} in {time.time() - start:.1f}s "
        f"(rope_theta {cfg.language.rope_theta:g})")


def _layout_of(names: list[str]) -> str:
    from megatron_vlm.checkpoint.hf_mapping import detect_layout
    return detect_layout(names)


def _copy_assets(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for name in non_weight_files(src):
        shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
