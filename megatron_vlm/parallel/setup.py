"""Process groups: torch.distributed + Megatron-Core's parallel_state, on GPU (NCCL) or CPU (gloo).

One call, ``initialize_parallel(tp=..., cp=...)``, works under ``torchrun`` (reads RANK/WORLD_SIZE)
and in a plain single process (makes a world of one), so tools, tests and training share it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state


@dataclass(frozen=True)
class ParallelLayout:
    tensor_parallel: int = 1
    context_parallel: int = 1

    def validate(self, world_size: int) -> None:
        model_parallel = self.tensor_parallel * self.context_parallel
        if world_size % model_parallel:
            raise ValueError(f"world size {world_size} is not divisible by TP {self.tensor_parallel} "
                             f"x CP {self.context_parallel}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_parallel(tensor_parallel: int = 1, context_parallel: int = 1, backend: str | None = None) -> None:
    """Initialise torch.distributed (if needed) and Megatron's model-parallel groups."""
    on_gpu = torch.cuda.is_available()
    if not dist.is_initialized():
        # On GPUs, NCCL for CUDA tensors and gloo for anything on the host (object collectives,
        # checkpoint planning). MVLM_DIST_BACKEND overrides (e.g. gloo: several ranks on one GPU).
        backend = backend or os.environ.get("MVLM_DIST_BACKEND") or ("cpu:gloo,cuda:nccl" if on_gpu else "gloo")
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        if "RANK" in os.environ:  # launched by torchrun / srun
            dist.init_process_group(backend=backend)
        else:  # a plain process: a world of one. The environment is left alone, so child
            # processes (e.g. a tool started from a test) do not think they joined this world.
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1)
    ParallelLayout(tensor_parallel, context_parallel).validate(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size() == tensor_parallel
                and parallel_state.get_context_parallel_world_size() == context_parallel):
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel, context_parallel_size=context_parallel,
    )
    if not on_gpu:
        install_cpu_shims()


def destroy_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


_SHIMMED = False


def install_cpu_shims() -> None:
    """Let Megatron's distributed checkpointing run without CUDA, and without forking.

    megatron-core 0.16 calls ``torch.cuda.synchronize()`` and ``torch.cuda.current_device()`` on
    its save/load paths; on a CPU-only machine the first is a no-op and the second means "cpu".
    Its file writer also forks one writer process per bucket and waits on a queue for each; a
    child that dies before reporting leaves the parent waiting forever (seen here: a fresh venv
    without psutil hung in that join), and forking a process that runs gloo/OpenMP threads is
    unsafe anyway. On CPU the buckets are written in-process, so errors surface as exceptions. Only installed when CUDA is
    absent, so GPU runs keep Megatron's asynchronous writer.
    """
    global _SHIMMED
    if _SHIMMED or torch.cuda.is_available():
        return
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(_write_buckets_in_process)
    _SHIMMED = True


def _write_buckets_in_process(transform_list, use_msc, rank, write_buckets, global_results_queue) -> None:
    """Megatron's ``write_preloaded_data_multiproc`` contract, one bucket after another in this
    process: per-bucket results keyed by bucket index, or the first exception, into the queue."""
    import queue

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    results: dict | Exception = {}
    for index, bucket in enumerate(write_buckets):
        local_results, done = queue.Queue(), queue.Queue()
        done.put(index)
        FileSystemWriterAsync.write_preloaded_data(transform_list, index, bucket, local_results, done, True,
                                                   use_msc=use_msc)
        _, outcome = local_results.get()
        if isinstance(outcome, Exception):
            results = outcome
            break
        results[index] = outcome
    global_results_queue.put(results)
