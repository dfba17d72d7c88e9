"""Model checkpoints in Megatron-Core's distributed format (torch_dist), resharding by design.

A directory written at one tensor-parallel size loads at any other: each rank saves only its
shards with their global offsets, and loading asks for the shards the *current* layout needs.

Layout of a model directory (what ``convert.py hf-to-megatron`` writes, what training loads)::

    DIR/config.json        the HF-style Qwen2.5-VL config (rope_theta included): the model's identity
    DIR/megatron_vlm.json  format version, dtype, source checkpoint
    DIR/model/             megatron-core dist checkpoint (metadata.json + .distcp shards), or, in a
                           training checkpoint (megatron_vlm.json "weights_format": "dcp-tp-fsdp"),
                           torch DCP shards of model + optimizer (see checkpoint/sharded.py)
    DIR/hf_assets/         tokenizer / processor / chat-template files carried from the HF source
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from megatron.core import dist_checkpointing

from megatron_vlm.checkpoint import sharded
from megatron_vlm.checkpoint.safe_metadata import check_directory
from megatron_vlm.parallel.setup import install_cpu_shims

FORMAT_VERSION = 1
MODEL_SUBDIR = "model"
META_FILE = "megatron_vlm.json"


def save_model_weights(model: torch.nn.Module, directory: str) -> None:
    """Collective: every rank calls it with its own shards."""
    install_cpu_shims()
    target = os.path.join(directory, MODEL_SUBDIR)
    if torch.distributed.get_rank() == 0:
        os.makedirs(target, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), target)
    torch.distributed.barrier()


def load_model_weights(model: torch.nn.Module, directory: str) -> None:
    """Collective: fill ``model`` (any TP size) from a checkpoint written at any TP size."""
    target = os.path.join(directory, MODEL_SUBDIR)
    meta_path = os.path.join(directory, META_FILE)
    if os.path.isfile(meta_path) and read_meta(directory).get("weights_format") == sharded.FORMAT:
        # a training checkpoint (torch DCP, FSDP x TP shards): its model part, at this layout
        device = next(model.parameters()).device
        sharded.load(target, model, device_type=device.type)
        return
    install_cpu_shims()
    if not os.path.isfile(os.path.join(target, "metadata.json")):
        raise FileNotFoundError(f"{target} is not a Megatron distributed checkpoint (no metadata.json); "
                                "create one with: python tools/checkpoint/convert.py hf-to-megatron")
    check_directory(target)  # megatron-core reads .metadata with plain pickle: vet it first
    template = model.sharded_state_dict()
    state = dist_checkpointing.load(template, target)
    state = {key: value for key, value in state.items() if key in template}
    model.load_state_dict(state, strict=True)


def write_meta(directory: str, meta: dict[str, Any]) -> None:
    path = os.path.join(directory, META_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"format_version": FORMAT_VERSION, **meta}, f, indent=2)
    os.replace(tmp, path)


def read_meta(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} missing: {directory} is not a megatron-vlm model directory")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}")
    return meta
