"""How each parameter is laid out over tensor-parallel and data-parallel ranks.

Megatron marks TP shards with ``tensor_model_parallel``/``partition_dim`` attributes; FSDP replaces
parameters with sharded DTensors and those attributes are gone, so the layout is recorded by name
first and read from here by the sharding, the gradient norm and the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SWIGLU_FC1_SUFFIX = "mlp.linear_fc1.weight"  # each TP rank holds [gate_r; up_r]


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter is split by tensor parallelism, recorded before FSDP wraps it."""

    tensor_parallel: bool  # a TP shard (else a replica on every TP rank)
    partition_dim: int  # the TP-sharded dimension (when tensor_parallel)
    swiglu: bool  # Megatron's fused [gate; up] fc1 weight: TP-sharded per half
    fsdp_dim: int  # the dimension FSDP shards over DP x CP


def record_layouts(model: torch.nn.Module) -> dict[str, ParamLayout]:
    layouts = {}
    for name, param in model.named_parameters():
        tp = bool(getattr(param, "tensor_model_parallel", False))
        swiglu = tp and name.endswith(SWIGLU_FC1_SUFFIX)
        # fc1 is sharded along its input dimension so a local shard is still [gate_part; up_part]
        # (rows of both halves), which the checkpoint stores as a [2, ffn, hidden] tensor.
        fsdp_dim = 1 if swiglu else 0
        layouts[name] = ParamLayout(tp, int(getattr(param, "partition_dim", 0)) if tp else 0, swiglu, fsdp_dim)
    return layouts
