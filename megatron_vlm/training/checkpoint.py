"""Training checkpoints: model + optimizer moments in one torch distributed checkpoint (each rank
writes its FSDP x TP shards; see ``checkpoint/sharded.py``), plus the step, data position and RNG
states, so a resumed run continues bit-for-bit, at the same or another parallel layout.

    CKPT/iter_0000100/config.json, megatron_vlm.json, hf_assets/   a model directory (convert.py reads it)
    CKPT/iter_0000100/model/                                       DCP shards: model + optimizer moments
    CKPT/iter_0000100/trainer_state.json                           step, consumed rows, schedule, config
    CKPT/iter_0000100/rng/rank_00000.pt                            per-rank RNG states (tensors only)
    CKPT/latest                                                    name of the newest complete iteration

A checkpoint is written under ``iter_N.tmp`` and renamed when complete; ``latest`` is replaced
atomically after that; a ``.tmp`` left by a killed save is removed by the next run.
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

from megatron_vlm.checkpoint import dist as model_dir
from megatron_vlm.checkpoint import sharded
from megatron_vlm.parallel.param_layout import ParamLayout

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


def _optimizer_step(optimizer: torch.optim.Optimizer) -> int:
    steps = {int(state["step"]) for state in optimizer.state.values() if "step" in state}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer parameters are at different steps {sorted(steps)}")
    return steps.pop() if steps else 0


def remove_unfinished(root: Optional[str]) -> list[str]:
    """Delete ``iter_N.tmp`` directories a killed save left behind (rank 0 only); returns them."""
    if not root or not os.path.isdir(root) or dist.get_rank() != 0:
        return []
    leftovers = [os.path.join(root, d) for d in os.listdir(root) if d.startswith("iter_") and d.endswith(".tmp")]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


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
                    layouts: dict[str, ParamLayout], trainer_state: dict[str, Any], model_config: dict[str, Any],
                    keep_last: int, hf_assets: Optional[str] = None, device_type: str = "cpu",
                    dtype: str = "fp32") -> str:
    """Collective over all ranks. Returns the iteration directory."""
    rank = dist.get_rank()
    final = iteration_dir(root, step)
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, model_dir.MODEL_SUBDIR), exist_ok=True)
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    dist.barrier()
    optimizer_step = _optimizer_step(optimizer)
    sharded.save(os.path.join(tmp, model_dir.MODEL_SUBDIR), model, layouts, optimizer, device_type)
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
    dist.barrier()
    if rank == 0:
        state = {**trainer_state, "step": step, "optimizer_step": optimizer_step}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(model_config, f, indent=2)
        model_dir.write_meta(tmp, {"dtype": dtype, "source": "training", "step": step,
                                   "weights_format": sharded.FORMAT})
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


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    layouts: dict[str, ParamLayout], device_type: str = "cpu") -> dict[str, Any]:
    """Collective. Restores model, optimizer and this rank's RNG; returns the trainer state."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if model_dir.read_meta(path).get("weights_format") != sharded.FORMAT:
        raise ValueError(f"{path} is not a training checkpoint of this version (weights_format "
                         f"{sharded.FORMAT!r}); start from it with model.load={path} and checkpoint.resume=false")
    sharded.load(os.path.join(path, model_dir.MODEL_SUBDIR), model, layouts, optimizer, device_type)
    for param_state in optimizer.state.values():  # torch AdamW: its per-parameter step counter
        param_state["step"] = torch.tensor(float(state["optimizer_step"]))
    rng_file = os.path.join(path, "rng", f"rank_{dist.get_rank():05d}.pt")
    if os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return state
