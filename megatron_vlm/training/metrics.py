"""Step metrics to the console (a progress line with ETA) and TensorBoard."""

from __future__ import annotations

import os
import resource
from typing import Optional

import torch


def memory_in_use_gib() -> float:
    """Peak GPU memory allocated by torch, or this process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def _eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class MetricsLogger:
    def __init__(self, tensorboard_dir: Optional[str], enabled: bool = True, gpu_metrics: bool = True):
        self.enabled = enabled
        self.gpu_metrics = gpu_metrics  # TFLOP/s per GPU and MFU mean nothing on a CPU: not printed there
        self.writer = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(tensorboard_dir, "tensorboard"))

    def log(self, step: int, total: int, metrics: dict[str, float], eta_seconds: float) -> None:
        if not self.enabled:
            return
        compute = ""
        if self.gpu_metrics:
            mfu = f" mfu {100 * metrics['mfu']:.1f}%" if metrics.get("mfu") else ""
            compute = f" | {metrics['tflops_per_gpu']:.2f} TFLOP/s/GPU{mfu}"
        memory = "GPU mem" if self.gpu_metrics else "peak RSS"
        print(f"step {step}/{total} ({100 * step / total:.1f}%) | loss {metrics['loss']:.4f} | lr {metrics['lr']:.3g} "
              f"| grad norm {metrics['grad_norm']:.3f} | {metrics['tokens_per_second']:.0f} tok/s "
              f"{metrics['samples_per_second']:.1f} samples/s{compute} "
              f"| {memory} {metrics['memory_gib']:.2f} GiB | {metrics['step_seconds']:.2f} s/step | ETA {_eta(eta_seconds)}",
              flush=True)
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
