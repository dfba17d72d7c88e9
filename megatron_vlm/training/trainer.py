"""The LongPT training loop.

One optimizer step consumes ``global_batch_tokens / max_seq_len`` packed rows, split over the
data-parallel ranks (context-parallel ranks of a DP rank share its rows). The loss is the sum of
token cross-entropies over supervised tokens divided by the number of supervised tokens in the
*whole global batch* (all DP ranks, all micro-batches), so uneven micro-batches weigh by their
tokens, not equally. Logits are computed only at supervised positions (``output_index``).

One path on every device (``sharding.py``): FSDP2 over DP x CP around Megatron's TP layers, fp32
main weights sharded with their AdamW moments, compute in ``model.dtype`` (bf16), fp32 gradient
reduction. A CPU (gloo) and a GPU cluster (NCCL) differ only in where tensors live and which
attention/mRoPE kernels run. Every collective here runs on tensors of the training device.
"""

from __future__ import annotations

import json
import os
import signal
import time
import warnings
from dataclasses import replace
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_vlm.config import PRESETS, Qwen25VLConfig
from megatron_vlm.data.batch import PackedBatch
from megatron_vlm.models.qwen2_5_vl import packed_seq_params
from megatron_vlm.parallel import initialize_parallel
from megatron_vlm.parallel.context_parallel import (ContextParallelPlan, context_parallel_params,
                                                    pad_row_for_context_parallel)
from megatron_vlm.parallel.param_layout import record_layouts
from megatron_vlm.training import checkpoint as ckpt
from megatron_vlm.training.config import TrainConfig
from megatron_vlm.training.flops import peak_flops, training_step_flops
from megatron_vlm.training.metrics import MetricsLogger, memory_in_use_gib
from megatron_vlm.training.optimizer import apply_freezing, build_adamw
from megatron_vlm.training.schedule import learning_rate
from megatron_vlm.training.sharding import (average_replicated_gradients, clip_gradients, parameter_counts,
                                            shard_model)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# FSDP2 warns when a unit returns a view (the embedding's and the model's outputs): harmful only if
# the caller modifies that view in place, which nothing here does.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # scancel/preemption, Ctrl-C, Slurm's warning


def compute_dtype(name: str) -> torch.dtype:
    """The dtype layers compute in (main weights stay fp32). fp16 would need loss scaling: refused."""
    if name == "fp16":
        raise ValueError("model.dtype=fp16 is not supported: fp16 training needs loss scaling, which this trainer "
                         "does not do; use model.dtype=bf16 (what Qwen2.5-VL was trained in) or fp32")
    if name not in DTYPES:
        raise ValueError(f"model.dtype {name!r} unknown; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


class Trainer:
    def __init__(self, cfg: TrainConfig, source: Optional[Any] = None, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        self.dtype = compute_dtype(cfg.model.dtype)
        initialize_parallel(cfg.parallel.tensor_parallel, cfg.parallel.context_parallel)
        # Device placement is the only thing that depends on the hardware.
        self.device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                       else torch.device("cpu"))
        self.rank = dist.get_rank()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.cp_size = parallel_state.get_context_parallel_world_size()
        self.cp_rank = parallel_state.get_context_parallel_rank()
        rows = cfg.rows_per_step()
        if rows % self.dp_size:
            raise ValueError(f"{rows} rows per step (global_batch_tokens / max_seq_len) do not divide over "
                             f"{self.dp_size} data-parallel ranks")
        self.rows_per_rank = rows // self.dp_size
        self.total_steps = cfg.total_steps()
        self.model_config, self.hf_assets = self._model_config()
        torch.manual_seed(cfg.seed)
        self.model = self._build_model()
        self.optimizer = build_adamw(self.model, cfg.optim)
        self.source = source if source is not None else self._build_source()
        self.step = 0
        self.ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.log.run_dir, "checkpoints")
        self._stop_requested = False
        self.history: list[dict[str, float]] = []  # every step's metrics
        self._resume()
        self.metrics = MetricsLogger(cfg.log.run_dir if cfg.log.tensorboard else None, enabled=self.rank == 0,
                                     gpu_metrics=self.device.type == "cuda")
        self.peak = peak_flops(torch.cuda.get_device_name()) if self.device.type == "cuda" else 0.0

    # ------------------------------------------------------------------ construction
    def _model_config(self) -> tuple[Qwen25VLConfig, Optional[str]]:
        mcfg = self.cfg.model
        if mcfg.load:
            config = Qwen25VLConfig.from_hf_dir(mcfg.load)
            assets = os.path.join(mcfg.load, "hf_assets")
        else:
            if mcfg.preset not in PRESETS:
                raise ValueError(f"model.preset {mcfg.preset!r} unknown; choose one of {sorted(PRESETS)}")
            config, assets = PRESETS[mcfg.preset](), None
        return config.with_rope_theta(mcfg.rope_theta), assets

    def _build_model(self):
        """fp32 main weights -> load -> freeze -> record TP layouts -> device -> FSDP (in that order:
        FSDP must see the final requires_grad flags, and renames nothing)."""
        from megatron_vlm.checkpoint import dist as model_dir
        from megatron_vlm.models.qwen2_5_vl import Qwen25VLModel

        model = Qwen25VLModel(self.model_config, params_dtype=torch.float32, recompute=self.cfg.model.recompute,
                              init_weights=not self.cfg.model.load)
        if self.cfg.model.load:
            model_dir.load_model_weights(model, self.cfg.model.load)
            model.set_rope_theta(self.model_config.language.rope_theta)
        apply_freezing(model, self.cfg.model)
        trainable, frozen = parameter_counts(model)
        if self.rank == 0:
            self.log(f"parameters (per TP rank): {trainable:,} trainable, {frozen:,} frozen; "
                     f"compute {self.cfg.model.dtype}, fp32 main weights sharded over "
                     f"{parallel_state.get_data_parallel_world_size(with_context_parallel=True)} DP x CP ranks")
        self.layouts = record_layouts(model)
        model.to(self.device)
        return shard_model(model, self.dtype, self.device, self.layouts)

    def _build_source(self):
        from megatron_vlm.training.data import build_source

        return build_source(self.cfg, self.model_config, self.dp_rank, self.dp_size, self.cp_size,
                            pin_memory=self.device.type == "cuda")

    @property
    def core_model(self):
        return self.model

    # ------------------------------------------------------------------ checkpoints
    def _resume(self) -> None:
        for leftover in ckpt.remove_unfinished(self.ckpt_dir):
            self.log(f"removed {leftover}: a checkpoint whose save did not finish")
        path = ckpt.latest_checkpoint(self.ckpt_dir) if self.cfg.checkpoint.resume else None
        if path is None:
            return
        state = ckpt.load_checkpoint(path, self.model, self.optimizer, self.layouts, self.device.type)
        self.step = int(state["step"])
        self.source.load_state_dict(state.get("data"))
        self.log(f"resumed from {path} at step {self.step}")

    def save(self) -> str:
        state = {"data": self.source.state_dict(), "total_steps": self.total_steps, "config": self.cfg.to_dict()}
        path = ckpt.save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer, self.layouts, state,
                                    self.model_config.to_hf_dict(), self.cfg.checkpoint.keep_last, self.hf_assets,
                                    self.device.type, self.cfg.model.dtype)
        self.log(f"saved checkpoint {path}")
        return path

    def _request_stop(self, signum, frame) -> None:
        """SIGTERM (scancel, preemption), SIGUSR1 (Slurm's early warning), Ctrl-C: finish the step,
        save, stop. A second Ctrl-C while saving is ignored: the save is what the user asked for."""
        if not self._stop_requested and self.rank == 0 and signum is not None:
            self.log(f"{signal.Signals(signum).name}: finishing step {self.step + 1}, then saving and stopping")
        self._stop_requested = True

    # ------------------------------------------------------------------ the step
    def _prepare(self, row: PackedBatch):
        """Host-side work first (CP padding and plan, this rank's pixels, the loss positions), then
        one asynchronous copy of what this rank needs to the device. Returns the model inputs,
        packed-sequence params, labels, local loss mask and output positions."""
        if self.cp_size == 1:
            mask = row.loss_mask[0]
            output_index = torch.nonzero(mask, as_tuple=True)[0]
            row = row.to(self.device, non_blocking=True)
            params = packed_seq_params(row.cu_seqlens, row.max_seqlen)
            inputs = (row.input_ids, row.position_ids, row.pixel_values, row.image_grid_thw)
            return inputs, params, row.labels, row.loss_mask[0], output_index.to(self.device, non_blocking=True)
        padded = pad_row_for_context_parallel(row.input_ids[0], row.position_ids[:, 0], row.labels[0],
                                              row.loss_mask[0], row.cu_seqlens, self.cp_size)
        plan = ContextParallelPlan.build(padded.cu_seqlens, self.cp_size, self.cp_rank,
                                         parallel_state.get_context_parallel_group(), row.image_grid_thw)
        mask = padded.loss_mask[plan.local_index]
        output_index = torch.nonzero(mask, as_tuple=True)[0]
        pixels, levels = row.pixel_values, row.pixel_levels
        if plan.patch_splits:  # this rank receives only the patches it encodes
            start, end = plan.patch_splits[self.cp_rank]
            pixels = None if pixels is None else pixels[start:end]
            levels = None if levels is None else levels[start:end]
        local = replace(row, input_ids=padded.input_ids[None], labels=padded.labels[None], loss_mask=mask[None],
                        position_ids=padded.position_ids[:, None], cu_seqlens=padded.cu_seqlens,
                        pixel_values=pixels, pixel_levels=levels).to(self.device, non_blocking=True)
        plan = plan.to(self.device)
        inputs = (local.input_ids, local.position_ids, local.pixel_values, local.image_grid_thw)
        return (inputs, context_parallel_params(plan), local.labels, local.loss_mask[0],
                output_index.to(self.device, non_blocking=True))

    def train_step(self, rows: list[PackedBatch]) -> dict[str, float]:
        start = time.perf_counter()
        model = self.model
        self.optimizer.zero_grad(set_to_none=True)
        global_tokens = torch.tensor(float(sum(r.num_loss_tokens for r in rows)), dtype=torch.float64,
                                     device=self.device)
        if self.dp_size > 1:
            dist.all_reduce(global_tokens, group=parallel_state.get_data_parallel_group())
        total_tokens = float(global_tokens)
        if total_tokens == 0:
            raise RuntimeError(f"step {self.step}: the global batch has no supervised token")
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for row in rows:
            inputs, params, labels, mask, output_index = self._prepare(row)
            losses = model(*inputs, packed_seq_params=params, labels=labels, output_index=output_index)
            weighted = (losses[0] * mask[output_index]).sum()
            (weighted / total_tokens).backward()  # FSDP sums (not averages) over DP x CP
            loss_sum += weighted.detach().double()
        average_replicated_gradients(model, self.layouts)
        grad_norm = clip_gradients(model, self.layouts, self.cfg.optim.clip_grad)
        lr = learning_rate(self.step, self.total_steps, self.cfg.optim.lr, self.cfg.optim.min_lr,
                           self.cfg.optim.warmup_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.dp_size * self.cp_size > 1:  # CP ranks hold partial sums of their rows' losses
            dist.all_reduce(loss_sum, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        self.step += 1
        elapsed = time.perf_counter() - start
        return self._step_metrics(rows, float(loss_sum) / total_tokens, lr, grad_norm, elapsed)

    def _step_metrics(self, rows: list[PackedBatch], loss: float, lr: float, grad_norm: float,
                      seconds: float) -> dict[str, float]:
        tokens = sum(int(r.cu_seqlens[-1]) for r in rows) * self.dp_size
        docs = sum(len(r.cu_seqlens) - 1 for r in rows) * self.dp_size
        train_vision = any(p.requires_grad for n, p in self.model.named_parameters() if n.startswith("vision."))
        flops = self.dp_size * sum(training_step_flops(
            self.model_config, (r.cu_seqlens[1:] - r.cu_seqlens[:-1]).tolist(),
            [] if r.image_grid_thw is None else r.image_grid_thw.tolist(), r.num_loss_tokens, train_vision)
            for r in rows)
        world = dist.get_world_size()
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "step_seconds": seconds,
                "tokens_per_second": tokens / seconds, "samples_per_second": docs / seconds,
                "tflops_per_gpu": flops / seconds / world / 1e12,
                "mfu": flops / seconds / world / self.peak if self.peak else 0.0,
                "memory_gib": memory_in_use_gib()}

    # ------------------------------------------------------------------ the loop
    def train(self, max_steps: Optional[int] = None) -> list[float]:
        """Run until the budget (or ``max_steps`` more steps); returns the losses of the steps run."""
        previous = {sig: signal.signal(sig, self._request_stop) for sig in STOP_SIGNALS}
        os.makedirs(self.cfg.log.run_dir, exist_ok=True)
        if self.rank == 0:
            with open(os.path.join(self.cfg.log.run_dir, "config.json"), "w") as f:
                f.write(self.cfg.to_json())
        losses = []
        end = self.total_steps if max_steps is None else min(self.total_steps, self.step + max_steps)
        started = time.perf_counter()
        first_step = self.step
        if self.rank == 0 and self.step < end:
            self.log(f"training steps {self.step + 1}-{end} of {self.total_steps}: {self.rows_per_rank * self.dp_size} "
                     f"rows of {self.cfg.data.max_seq_len} tokens per step on {dist.get_world_size()} "
                     f"{self.device.type.upper()} process(es); Ctrl-C or SIGTERM saves and stops")
        try:
            self.model.train()
            while self.step < end:
                metrics = self.train_step(self.source.next_rows(self.rows_per_rank))
                losses.append(metrics["loss"])
                self.history.append(metrics)
                # the first steps always (an early line and ETA), then every log.interval steps
                if self.step - first_step <= 2 or self.step % self.cfg.log.interval == 0 or self.step == end:
                    eta = (time.perf_counter() - started) / (self.step - first_step) * (self.total_steps - self.step)
                    self.metrics.log(self.step, self.total_steps, metrics, eta)
                if self._stop_agreed():
                    if self.rank == 0:
                        self.log(f"stop requested: saving at step {self.step}")
                    path = self.save()
                    if self.rank == 0:
                        self.log(f"stopped at step {self.step}; kept {path}; rerun the same command to resume")
                    break
                if self.cfg.checkpoint.interval and self.step % self.cfg.checkpoint.interval == 0:
                    self.save()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.metrics.close()
        return losses

    def _stop_agreed(self) -> bool:
        flag = torch.tensor(1.0 if self._stop_requested else 0.0, device=self.device)
        if dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag > 0)
