"""Training checkpoints in torch.distributed.checkpoint (DCP) format, resharding by design.

Every rank writes only what it holds: its FSDP shard (over DP x CP) of its tensor-parallel shard.
Each tensor is described as a DTensor on a 2-D mesh (TP, DP x CP) whose *global* shape is the
TP=1 layout, so a checkpoint written at one (TP, DP, CP) loads at any other, and into a plain
single-process model (export, evaluation):

    key                       global tensor                     placements (TP, DP x CP)
    model.<name>              the TP=1 parameter                Shard(partition_dim) | Replicate,
                                                                Shard(fsdp_dim) | Replicate
    model.<...>.linear_fc1.weight   [2, ffn, hidden] (gate, up)  Shard(1), Shard(2)
    optimizer.exp_avg.<name>  like the parameter
    optimizer.exp_avg_sq.<name>

The views share storage with the parameters and optimizer moments, so loading writes in place.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import parallel_state
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from megatron_vlm.checkpoint.safe_metadata import SafeFileSystemReader, check_directory
from megatron_vlm.parallel.param_layout import ParamLayout, record_layouts

FORMAT = "dcp-tp-fsdp"  # megatron_vlm.json "weights_format" of directories written here
MOMENTS = ("exp_avg", "exp_avg_sq")

_MESHES: dict[tuple, DeviceMesh] = {}


def checkpoint_mesh(device_type: str) -> DeviceMesh:
    """The (TP, DP x CP) mesh of the current parallel layout (collective the first time)."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    key = (device_type, id(tp_group), id(dp_group))
    if key not in _MESHES:
        tp, dp = dist.get_world_size(tp_group), dist.get_world_size(dp_group)
        mine = (dist.get_rank(), dist.get_rank(tp_group), dist.get_rank(dp_group))
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        ranks = torch.empty(tp, dp, dtype=torch.int)
        for rank, tp_rank, dp_rank in everyone:
            ranks[tp_rank, dp_rank] = rank
        _MESHES[key] = DeviceMesh.from_group([tp_group, dp_group], device_type, mesh=ranks,
                                             mesh_dim_names=("tp", "dp_cp"))
    return _MESHES[key]


def _contiguous_stride(shape: list[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


def global_view(tensor: torch.Tensor, layout: ParamLayout, mesh: DeviceMesh) -> DTensor:
    """``tensor`` (a parameter or a moment: an FSDP DTensor or a plain TP-local tensor) as a DTensor
    over (TP, DP x CP) with the TP=1 global shape, sharing its storage."""
    if isinstance(tensor, DTensor):
        local = tensor.to_local()
        fsdp_dim: Optional[int] = next((p.dim for p in tensor.placements if isinstance(p, Shard)), None)
    else:
        local, fsdp_dim = tensor, None
    shape = list(tensor.shape)  # the TP-local tensor, unsharded over DP x CP
    tp = mesh.size(0)
    tp_dim: Optional[int] = layout.partition_dim if layout.tensor_parallel else None
    if layout.swiglu:  # [2F/tp, H] -> [2, F/tp, H]: gate and up halves, each TP-sharded on its rows
        local = local.unflatten(0, (2, local.shape[0] // 2))
        shape = [2, shape[0] // 2, *shape[1:]]
        tp_dim = 1
        fsdp_dim = None if fsdp_dim is None else fsdp_dim + 1
    if tp_dim is not None:
        shape[tp_dim] *= tp
    placements = (Shard(tp_dim) if tp_dim is not None else Replicate(),
                  Shard(fsdp_dim) if fsdp_dim is not None else Replicate())
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=_contiguous_stride(shape))


def model_views(model: torch.nn.Module, layouts: dict[str, ParamLayout], mesh: DeviceMesh) -> dict[str, DTensor]:
    with torch.no_grad():
        return {f"model.{name}": global_view(param.detach() if not isinstance(param, DTensor) else param,
                                             layouts[name], mesh)
                for name, param in model.named_parameters()}


def optimizer_views(model: torch.nn.Module, optimizer: torch.optim.Optimizer, layouts: dict[str, ParamLayout],
                    mesh: DeviceMesh) -> dict[str, DTensor]:
    views = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            state = optimizer.state.get(param)
            if not state:
                continue
            for moment in MOMENTS:
                views[f"optimizer.{moment}.{name}"] = global_view(state[moment], layouts[name], mesh)
    return views


def init_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every trainable parameter its (zero) moments, so a fresh optimizer has the structure a
    checkpoint is loaded into (and a step-0 checkpoint has moments to save)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def save(directory: str, model: torch.nn.Module, layouts: dict[str, ParamLayout],
         optimizer: Optional[torch.optim.Optimizer], device_type: str) -> None:
    """Collective: every rank writes its shards of the model (and optimizer moments) to ``directory``."""
    mesh = checkpoint_mesh(device_type)
    state = model_views(model, layouts, mesh)
    if optimizer is not None:
        init_adam_state(optimizer)
        state.update(optimizer_views(model, optimizer, layouts, mesh))
    dcp.save(state, storage_writer=dcp.FileSystemWriter(directory, single_file_per_rank=True))


def load(directory: str, model: torch.nn.Module, layouts: Optional[dict[str, ParamLayout]] = None,
         optimizer: Optional[torch.optim.Optimizer] = None, device_type: str = "cpu") -> None:
    """Collective: fill ``model`` (FSDP-sharded or plain, any TP size) and, if given, the optimizer's
    moments in place from a checkpoint written at any layout."""
    if not os.path.isfile(os.path.join(directory, ".metadata")):
        raise FileNotFoundError(f"{directory} is not a training checkpoint's weights (no .metadata)")
    check_directory(directory)  # a clear refusal on every rank before DCP reads anything
    layouts = layouts or record_layouts(model)
    mesh = checkpoint_mesh(device_type)
    state = model_views(model, layouts, mesh)
    if optimizer is not None:
        init_adam_state(optimizer)
        state.update(optimizer_views(model, optimizer, layouts, mesh))
    dcp.load(state, storage_reader=SafeFileSystemReader(directory))  # metadata read without unpickling code
