"""Training checkpoints: model + optimizer in one Megatron distributed checkpoint, plus the step,
data position and RNG states, so a resumed run continues bit-for-bit.

    CKPT/iter_0000100/config.json, megatron_vlm.json, hf_assets/   a model directory (convert.py reads it)
    CKPT/iter_0000100/model/                                       dist checkpoint: model + optimizer shards
    CKPT/iter_0000100/trainer_state.json                           step, consumed rows, schedule, config
    CKPT/iter_0000100/rng/rank_00000.pt                            per-rank RNG states (tensors only)
    CKPT/latest                                                    name of the newest complete iteration

Optimizer moments are stored with the sharding of their parameters (Megatron's
``optim_state_to_sharding_state``), so they reshard with the model. A checkpoint is written under
``iter_N.tmp`` and renamed when complete; ``latest`` is replaced atomically after that.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                        optim_state_to_sharding_state)

from megatron_vlm.checkpoint import dist as model_dir
from megatron_vlm.parallel.setup import install_cpu_shims

LATEST = "latest"


def iteration_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def latest_checkpoint(root: Optional[str]) -> Optional[str]:
    if not root:
        return None
    marker = os.path.join(root, LATEST)
    if not os.path.isfile(marker):
        return None
    with open(marker) as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise FileNotFoundError(f"{marker} names {name}, which is incomplete or missing; remove {marker} "
                                "to start over or point it at a complete iteration")
    return path


def _init_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every trainable parameter its (zero) moments, so a fresh optimizer has the structure a
    checkpoint is loaded into."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _sharded_state(model: torch.nn.Module, optimizer, is_loading: bool = False) -> tuple[dict, int]:
    if hasattr(optimizer, "sharded_state_dict"):  # Megatron's (distributed) optimizer, on GPU
        model_sd = model.sharded_state_dict()
        return {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading)}, 0
    _init_adam_state(optimizer)
    model_sd = model.sharded_state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    id_map = get_param_id_to_sharded_param_map(model_sd, params)
    optim_sd = optimizer.state_dict()
    steps = {int(s["step"]) for s in optim_sd["state"].values()}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer parameters are at different steps {sorted(steps)}")
    optim_state_to_sharding_state(optim_sd, id_map, exclude_keys=("step",))
    return {"model": model_sd, "optimizer": optim_sd}, (steps.pop() if steps else 0)


def _rng_state() -> dict[str, Any]:
    state = {"python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2], "torch": torch.get_rng_state()}
    np_state = np.random.get_state()
    state["numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    state["numpy_pos"], state["numpy_gauss"] = int(np_state[2]), [int(np_state[3]), float(np_state[4])]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(root: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], model_config: dict[str, Any], keep_last: int,
                    hf_assets: Optional[str] = None) -> str:
    """Collective over all ranks. Returns the iteration directory."""
    install_cpu_shims()
    rank = dist.get_rank()
    final = iteration_dir(root, step)
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, model_dir.MODEL_SUBDIR), exist_ok=True)
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    dist.barrier()
    sharded, optimizer_step = _sharded_state(model, optimizer)
    dist_checkpointing.save(sharded, os.path.join(tmp, model_dir.MODEL_SUBDIR))
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
    dist.barrier()
    if rank == 0:
        state = {**trainer_state, "step": step, "optimizer_step": optimizer_step}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(model_config, f, indent=2)
        dtype = next(model.parameters()).dtype
        model_dir.write_meta(tmp, {"dtype": {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, "fp32"),
                                   "source": "training", "step": step})
        if hf_assets and os.path.isdir(hf_assets):
            shutil.copytree(hf_assets, os.path.join(tmp, "hf_assets"), dirs_exist_ok=True)
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        marker_tmp = os.path.join(root, LATEST + ".tmp")
        with open(marker_tmp, "w") as f:
            f.write(os.path.basename(final))
        os.replace(marker_tmp, os.path.join(root, LATEST))
        _prune(root, keep_last)
    dist.barrier()
    return final


def _prune(root: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    iterations = sorted(d for d in os.listdir(root) if d.startswith("iter_") and not d.endswith(".tmp"))
    for name in iterations[:-keep_last]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> dict[str, Any]:
    """Collective. Restores model, optimizer (if given) and this rank's RNG; returns trainer state."""
    install_cpu_shims()
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if optimizer is None:
        model_dir.load_model_weights(model, path)
        return state
    template, _ = _sharded_state(model, optimizer, is_loading=True)
    loaded = dist_checkpointing.load(template, os.path.join(path, model_dir.MODEL_SUBDIR))
    model.load_state_dict(loaded["model"], strict=True)
    optim_sd = loaded["optimizer"]
    if not hasattr(optimizer, "sharded_state_dict"):  # torch AdamW: its shared step counter
        for param_state in optim_sd["state"].values():
            param_state["step"] = torch.tensor(float(state["optimizer_step"]))
    optimizer.load_state_dict(optim_sd)
    rng_file = os.path.join(path, "rng", f"rank_{dist.get_rank():05d}.pt")
    if os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return state
