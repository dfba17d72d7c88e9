"""The LongPT training loop.

One optimizer step consumes ``global_batch_tokens / max_seq_len`` packed rows, split over the
data-parallel ranks (context-parallel ranks of a DP rank share its rows). The loss is the sum of
token cross-entropies over supervised tokens divided by the number of supervised tokens in the
*whole global batch* (all DP ranks, all micro-batches), so uneven micro-batches weigh by their
tokens, not equally. Logits are computed only at supervised positions (``output_index``).

CPU (no CUDA): one process or a gloo group, torch AdamW, explicit gradient all-reduce over DP x CP.
GPU: Megatron-Core DistributedDataParallel + distributed optimizer (bf16 params, fp32 main weights).
"""

from __future__ import annotations

import json
import os
import signal
import time
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
from megatron_vlm.training import checkpoint as ckpt
from megatron_vlm.training.config import TrainConfig
from megatron_vlm.training.flops import peak_flops, training_step_flops
from megatron_vlm.training.metrics import MetricsLogger, memory_in_use_gib
from megatron_vlm.training.optimizer import all_reduce_gradients, apply_freezing, build_adamw, clip_gradients
from megatron_vlm.training.schedule import learning_rate

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Trainer:
    def __init__(self, cfg: TrainConfig, source: Optional[Any] = None, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        initialize_parallel(cfg.parallel.tensor_parallel, cfg.parallel.context_parallel)
        self.on_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
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
        apply_freezing(self.model, cfg.model)
        self.optimizer = self._build_optimizer()
        self.source = source if source is not None else self._build_source()
        self.step = 0
        self.ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.log.run_dir, "checkpoints")
        self._stop_requested = False
        self._resume()
        self.metrics = MetricsLogger(cfg.log.run_dir if cfg.log.tensorboard else None, enabled=self.rank == 0)
        self.peak = peak_flops(torch.cuda.get_device_name()) if self.on_gpu else 0.0

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
        from megatron_vlm.checkpoint import dist as model_dir
        from megatron_vlm.models.qwen2_5_vl import Qwen25VLModel

        dtype = DTYPES[self.cfg.model.dtype] if self.on_gpu else torch.float32
        model = Qwen25VLModel(self.model_config, params_dtype=dtype, recompute=self.cfg.model.recompute,
                              init_weights=not self.cfg.model.load)
        if self.cfg.model.load:
            model_dir.load_model_weights(model, self.cfg.model.load)
            model.set_rope_theta(self.model_config.language.rope_theta)
        model.to(self.device)
        if self.on_gpu:
            model = self._wrap_ddp(model)
        return model

    def _wrap_ddp(self, model):  # GPU only
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=True)
        return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)

    def _build_optimizer(self):
        o = self.cfg.optim
        if not self.on_gpu:
            return build_adamw(self.model, o)
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        config = OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                                 adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.clip_grad,
                                 bf16=self.cfg.model.dtype == "bf16", params_dtype=torch.float32,
                                 use_distributed_optimizer=True)
        return get_megatron_optimizer(config, [self.model])

    def _build_source(self):
        from megatron_vlm.training.data import build_source

        return build_source(self.cfg, self.model_config, self.dp_rank, self.dp_size, self.cp_size)

    @property
    def core_model(self):
        return self.model.module if hasattr(self.model, "module") else self.model

    # ------------------------------------------------------------------ checkpoints
    def _resume(self) -> None:
        path = ckpt.latest_checkpoint(self.ckpt_dir) if self.cfg.checkpoint.resume else None
        if path is None:
            return
        state = ckpt.load_checkpoint(path, self.core_model, self.optimizer)
        self.step = int(state["step"])
        self.source.load_state_dict(state.get("data"))
        self.log(f"resumed from {path} at step {self.step}")

    def save(self) -> str:
        state = {"data": self.source.state_dict(), "total_steps": self.total_steps, "config": self.cfg.to_dict()}
        path = ckpt.save_checkpoint(self.ckpt_dir, self.step, self.core_model, self.optimizer, state,
                                    self.model_config.to_hf_dict(), self.cfg.checkpoint.keep_last, self.hf_assets)
        self.log(f"saved checkpoint {path}")
        return path

    def _request_stop(self, signum, frame) -> None:  # Slurm sends SIGTERM before preemption
        self._stop_requested = True

    # ------------------------------------------------------------------ the step
    def _prepare(self, row: PackedBatch):
        """Move a row to the device and, under CP, pad it and keep this rank's tokens; returns the
        model inputs and the local positions that carry a loss."""
        row = row.to(self.device, non_blocking=True)
        if self.cp_size == 1:
            mask = row.loss_mask[0]
            params = packed_seq_params(row.cu_seqlens, row.max_seqlen)
            inputs = (row.input_ids, row.position_ids, row.pixel_values, row.image_grid_thw)
            return inputs, params, row.labels, mask
        padded = pad_row_for_context_parallel(row.input_ids[0].cpu(), row.position_ids[:, 0].cpu(),
                                              row.labels[0].cpu(), row.loss_mask[0].cpu(), row.cu_seqlens.cpu(),
                                              self.cp_size)
        plan = ContextParallelPlan.build(padded.cu_seqlens, self.cp_size, self.cp_rank,
                                         parallel_state.get_context_parallel_group(),
                                         None if row.image_grid_thw is None else row.image_grid_thw.cpu()
                                         ).to(self.device)
        inputs = (padded.input_ids[None].to(self.device), padded.position_ids[:, None].to(self.device),
                  row.pixel_values, row.image_grid_thw)
        mask = padded.loss_mask.to(self.device)[plan.local_index]
        return inputs, context_parallel_params(plan), padded.labels[None].to(self.device), mask

    def train_step(self, rows: list[PackedBatch]) -> dict[str, float]:
        start = time.perf_counter()
        model = self.model
        if self.on_gpu:
            model.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none=True)
        local_tokens = torch.tensor(float(sum(r.num_loss_tokens for r in rows)), dtype=torch.float64)
        global_tokens = local_tokens.clone()
        if self.dp_size > 1:
            dist.all_reduce(global_tokens, group=parallel_state.get_data_parallel_group())
        if float(global_tokens) == 0:
            raise RuntimeError(f"step {self.step}: the global batch has no supervised token")
        loss_sum = torch.zeros((), dtype=torch.float64)
        for row in rows:
            inputs, params, labels, mask = self._prepare(row)
            output_index = torch.nonzero(mask, as_tuple=True)[0]
            losses = model(*inputs, packed_seq_params=params, labels=labels, output_index=output_index)
            weighted = (losses[0] * mask[output_index]).sum()
            (weighted / float(global_tokens)).backward()
            loss_sum += weighted.detach().double().cpu()
        lr = learning_rate(self.step, self.total_steps, self.cfg.optim.lr, self.cfg.optim.min_lr,
                           self.cfg.optim.warmup_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.on_gpu:
            model.finish_grad_sync()
            _, grad_norm, _ = self.optimizer.step()
        else:
            all_reduce_gradients(model)
            grad_norm = clip_gradients(model, self.cfg.optim.clip_grad)
            self.optimizer.step()
        if self.dp_size * self.cp_size > 1:  # CP ranks hold partial sums of their rows' losses
            dist.all_reduce(loss_sum, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        self.step += 1
        elapsed = time.perf_counter() - start
        return self._step_metrics(rows, float(loss_sum / global_tokens), lr, float(grad_norm or 0.0), elapsed)

    def _step_metrics(self, rows: list[PackedBatch], loss: float, lr: float, grad_norm: float,
                      seconds: float) -> dict[str, float]:
        tokens = sum(int(r.cu_seqlens[-1]) for r in rows) * self.dp_size
        docs = sum(len(r.cu_seqlens) - 1 for r in rows) * self.dp_size
        train_vision = any(p.requires_grad for n, p in self.core_model.named_parameters() if n.startswith("vision."))
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
        previous = signal.signal(signal.SIGTERM, self._request_stop)
        os.makedirs(self.cfg.log.run_dir, exist_ok=True)
        if self.rank == 0:
            with open(os.path.join(self.cfg.log.run_dir, "config.json"), "w") as f:
                f.write(self.cfg.to_json())
        losses = []
        end = self.total_steps if max_steps is None else min(self.total_steps, self.step + max_steps)
        started = time.perf_counter()
        first_step = self.step
        try:
            self.model.train()
            while self.step < end:
                metrics = self.train_step(self.source.next_rows(self.rows_per_rank))
                losses.append(metrics["loss"])
                if self.step % self.cfg.log.interval == 0 or self.step == end:
                    eta = (time.perf_counter() - started) / (self.step - first_step) * (self.total_steps - self.step)
                    self.metrics.log(self.step, self.total_steps, metrics, eta)
                if self._stop_agreed():
                    self.log(f"SIGTERM: saving at step {self.step} and stopping")
                    self.save()
                    break
                if self.cfg.checkpoint.interval and self.step % self.cfg.checkpoint.interval == 0:
                    self.save()
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.metrics.close()
        return losses

    def _stop_agreed(self) -> bool:
        flag = torch.tensor(1.0 if self._stop_requested else 0.0)
        if dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag > 0)
