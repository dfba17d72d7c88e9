"""The training loop (the one path: FSDP2 + Megatron TP, here a world of one): schedule, overrides,
global-batch loss normalisation, exact resume, stop signals, freezing, weight decay groups, dtypes,
and the loss falling on the tiny recipe. Multi-process equivalence: tests/multiproc/test_one_path.py."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from megatron_vlm.training.config import apply_overrides
from megatron_vlm.training.recipes import RECIPES, tiny_cpu
from megatron_vlm.training.schedule import learning_rate


def _cfg(tmp_path, **sets):
    cfg = tiny_cpu()
    overrides = {"data.max_seq_len": 256, "schedule.global_batch_tokens": 512, "schedule.train_steps": 6,
                 "checkpoint.interval": 0, "log.run_dir": str(tmp_path / "run"), "log.tensorboard": False,
                 "log.interval": 100, **sets}
    return apply_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()])


def test_schedule_matches_the_formula_at_chosen_steps():
    total, peak, floor = 1000, 1e-5, 1e-6
    warmup = 100
    assert learning_rate(0, total, peak, floor, 0.1) == pytest.approx(peak / warmup)
    assert learning_rate(49, total, peak, floor, 0.1) == pytest.approx(peak * 50 / warmup)
    assert learning_rate(99, total, peak, floor, 0.1) == pytest.approx(peak)
    for step in (100, 325, 550, 999, 1000):
        progress = (step - warmup) / (total - warmup)
        expected = floor + (peak - floor) * (1 + math.cos(math.pi * progress)) / 2
        assert learning_rate(step, total, peak, floor, 0.1) == pytest.approx(expected)
    assert learning_rate(550, total, peak, floor, 0.1) == pytest.approx((peak + floor) / 2)


def test_overrides_are_typed_and_checked():
    cfg = apply_overrides(tiny_cpu(), ["optim.lr=2e-5", "schedule.global_batch_tokens=4M", "model.freeze_vision=true",
                                       "model.rope_theta=4e6", "checkpoint.dir=/tmp/x"])
    assert cfg.optim.lr == 2e-5 and cfg.schedule.global_batch_tokens == 4 * 1024**2
    assert cfg.model.freeze_vision is True and cfg.model.rope_theta == 4e6 and cfg.checkpoint.dir == "/tmp/x"
    with pytest.raises(ValueError, match="unknown key"):
        apply_overrides(tiny_cpu(), ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="expected int"):
        apply_overrides(tiny_cpu(), ["data.max_seq_len=long"])
    paper = RECIPES["qwen25vl_7b_longpt_128k"]()
    assert paper.rows_per_step() == 32 and paper.total_steps() == 1280  # 5B tokens / 4M per step
    assert (paper.optim.lr, paper.optim.min_lr, paper.optim.beta2, paper.model.rope_theta) == (1e-5, 1e-6, 0.95, 4e6)


def test_loss_is_normalised_over_the_global_batch(tmp_path, megatron_world):
    """Two rows with different numbers of supervised tokens: the step's gradient is that of the mean
    over all supervised tokens (not the mean of per-row means), computed on a plain model with the
    same initial weights (no FSDP, plain autograd)."""
    from megatron_vlm.models.qwen2_5_vl import Qwen25VLModel, packed_seq_params
    from megatron_vlm.training.sharding import full_state
    from megatron_vlm.training.synthetic import synthetic_row
    from megatron_vlm.training.trainer import Trainer

    cfg = _cfg(tmp_path, **{"optim.clip_grad": 0.0, "optim.lr": 0.0, "optim.min_lr": 0.0})
    trainer = Trainer(cfg)
    torch.manual_seed(cfg.seed)  # the trainer's own construction order: same initial weights
    model = Qwen25VLModel(trainer.model_config, params_dtype=torch.float32).train()
    start = full_state(trainer.model, trainer.layouts)
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), start[name]), name
    rows = [synthetic_row(trainer.model_config, 0, 7, 256), synthetic_row(trainer.model_config, 1, 7, 120)]
    assert rows[0].num_loss_tokens != rows[1].num_loss_tokens
    metrics = trainer.train_step(rows)
    ours = full_state(trainer.model, trainer.layouts, grads=True)

    logits, targets = [], []
    for row in rows:
        out = model(row.input_ids, row.position_ids, row.pixel_values, row.image_grid_thw,
                    packed_seq_params=packed_seq_params(row.cu_seqlens))[0]
        keep = row.loss_mask[0] > 0
        logits.append(out[keep])
        targets.append(row.labels[0][keep])
    reference = F.cross_entropy(torch.cat(logits), torch.cat(targets))  # mean over every supervised token
    reference.backward()
    assert metrics["loss"] == pytest.approx(reference.item(), rel=1e-5)
    norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, megatron_world):
    from megatron_vlm.training.trainer import Trainer

    straight = Trainer(_cfg(tmp_path / "a", **{"checkpoint.resume": "false"}))
    expected = straight.train()
    first = Trainer(_cfg(tmp_path / "b", **{"checkpoint.interval": 3}))
    losses = first.train(max_steps=3)  # "killed" after step 3; its checkpoint is the last thing written
    resumed = Trainer(_cfg(tmp_path / "b", **{"checkpoint.interval": 3}))
    assert resumed.step == 3
    losses += resumed.train()
    assert losses == expected  # exact, not approximate


def test_sigterm_saves_and_stops(tmp_path, megatron_world):
    from megatron_vlm.training import checkpoint as ckpt
    from megatron_vlm.training.trainer import Trainer

    trainer = Trainer(_cfg(tmp_path))
    trainer._request_stop(None, None)
    losses = trainer.train()
    assert len(losses) == 1
    path = ckpt.latest_checkpoint(trainer.ckpt_dir)
    assert path is not None and path.endswith("iter_0000001")


class _SignalAt:
    """A row source that sends this process a real signal while serving the given step's rows."""

    def __init__(self, source, step: int, signum: int):
        self.source, self.step, self.signum, self.served = source, step, signum, 0

    def next_rows(self, count):
        self.served += 1
        if self.served == self.step:
            os.kill(os.getpid(), self.signum)
        return self.source.next_rows(count)

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1], ids=["SIGINT", "SIGTERM", "SIGUSR1"])
def test_a_real_stop_signal_finishes_the_step_saves_and_resumes(tmp_path, megatron_world, signum):
    from megatron_vlm.training import checkpoint as ckpt
    from megatron_vlm.training.trainer import Trainer

    lines = []
    trainer = Trainer(_cfg(tmp_path), log=lines.append)
    trainer.source = _SignalAt(trainer.source, 2, signum)
    previous = signal.getsignal(signum)
    losses = trainer.train()  # no KeyboardInterrupt: Ctrl-C is a stop request like SIGTERM
    assert len(losses) == 2 and signal.getsignal(signum) == previous
    assert ckpt.latest_checkpoint(trainer.ckpt_dir).endswith("iter_0000002")
    assert any("rerun the same command to resume" in line for line in lines)
    resumed = Trainer(_cfg(tmp_path), log=lambda _: None)
    assert resumed.step == 2


def test_an_unfinished_save_is_removed_on_the_next_start(tmp_path, megatron_world):
    from megatron_vlm.training.trainer import Trainer

    leftover = tmp_path / "run" / "checkpoints" / "iter_0000007.tmp"
    (leftover / "model").mkdir(parents=True)
    lines = []
    trainer = Trainer(_cfg(tmp_path), log=lines.append)
    assert not leftover.exists() and trainer.step == 0
    assert any("iter_0000007.tmp" in line for line in lines)


def test_fp16_is_refused_with_a_reason(tmp_path, megatron_world):
    from megatron_vlm.training.trainer import Trainer

    with pytest.raises(ValueError, match="loss scaling"):
        Trainer(_cfg(tmp_path, **{"model.dtype": "fp16"}))


def test_no_weight_decay_on_biases_and_norms(tmp_path, megatron_world):
    """With zero gradients an AdamW step only decays: matrices shrink by lr * wd, biases and norm
    weights stay exactly as they were (Megatron's convention, on the one path)."""
    from megatron_vlm.training.sharding import full_state
    from megatron_vlm.training.trainer import Trainer

    trainer = Trainer(_cfg(tmp_path, **{"optim.weight_decay": 0.5}))
    before = full_state(trainer.model, trainer.layouts)
    lr = 1e-2
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr
    for param in trainer.model.parameters():
        param.grad = torch.zeros_like(param)
    trainer.optimizer.step()
    after = full_state(trainer.model, trainer.layouts)
    for name, value in after.items():
        if name.endswith(".bias") or before[name].dim() < 2:
            assert torch.equal(value, before[name]), f"{name} decayed"
        else:
            torch.testing.assert_close(value, before[name] * (1 - lr * 0.5), msg=name)
    assert any(n.endswith("layernorm.weight") for n in after) and any(n.endswith(".bias") for n in after)


@pytest.mark.parametrize("flag,prefix", [("freeze_vision", "vision.blocks."), ("freeze_language", "language_model.")])
def test_freezing_happens_before_sharding_and_holds(tmp_path, megatron_world, flag, prefix):
    """Frozen parameters get no gradient and no optimizer state, stay bit-identical over steps, and
    the run reports trainable / frozen counts."""
    from megatron_vlm.training.sharding import full_state
    from megatron_vlm.training.trainer import Trainer

    lines = []
    trainer = Trainer(_cfg(tmp_path, **{f"model.{flag}": "true", "schedule.train_steps": 2}), log=lines.append)
    frozen = [n for n, p in trainer.model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(prefix) or n.startswith("vision.patch_embed") for n in frozen)
    count = sum(p.numel() for n, p in trainer.model.named_parameters() if not p.requires_grad)
    assert any(f"{count:,} frozen" in line for line in lines), lines
    before = full_state(trainer.model, trainer.layouts)
    trainer.train()
    after = full_state(trainer.model, trainer.layouts)
    assert all(torch.equal(after[n], before[n]) for n in frozen)
    assert not any(torch.equal(after[n], before[n]) for n, p in trainer.model.named_parameters()
                   if p.requires_grad and p.dim() >= 2)
    state_params = {id(p) for p in trainer.optimizer.state}
    assert not any(id(p) in state_params for p in trainer.model.parameters() if not p.requires_grad)


def test_activation_recompute_changes_nothing_but_memory(tmp_path, megatron_world):
    from megatron_vlm.training.trainer import Trainer

    runs = []
    for recompute in ("false", "true"):
        trainer = Trainer(_cfg(tmp_path / recompute, **{"model.recompute": recompute, "schedule.train_steps": 2}),
                          log=lambda _: None)
        runs.append((trainer.train(), [m["grad_norm"] for m in trainer.history]))
    assert runs[0] == runs[1]  # exact: the same kernels run again


def test_bf16_compute_keeps_fp32_main_weights(tmp_path, megatron_world):
    from torch.distributed.tensor import DTensor

    from megatron_vlm.training.trainer import Trainer

    trainer = Trainer(_cfg(tmp_path, **{"model.dtype": "bf16", "schedule.train_steps": 3}))
    losses = trainer.train()
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizer.state.values())
    assert losses[-1] < losses[0]


def test_collectives_run_on_the_training_device_only(tmp_path, megatron_world):
    """The NCCL double refuses a host tensor when the training device is CUDA (the old trainer's
    token counts, loss sums and stop flag were such tensors); a training run passes every one of
    its collectives through it. Multi-process runs: tests/multiproc/test_one_path.py."""
    import torch.distributed as dist

    from megatron_vlm.testing import WrongDeviceCollective, device_restricted_collectives
    from megatron_vlm.training.trainer import Trainer

    with device_restricted_collectives("cuda"):
        with pytest.raises(WrongDeviceCollective, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.ones(1))  # what `torch.tensor(...)` without a device gives
        dist.barrier()  # object collectives and barriers choose their own device: exempt
    with device_restricted_collectives("cpu") as double:
        trainer = Trainer(_cfg(tmp_path, **{"schedule.train_steps": 2}))
        trainer.train()
    names = {name for name, _ in double.calls}
    assert {"all_reduce"} <= names and all(devices == ("cpu",) * len(devices) for _, devices in double.calls)


def test_loss_falls_on_the_tiny_recipe(tmp_path, megatron_world):
    from megatron_vlm.training.trainer import Trainer

    trainer = Trainer(_cfg(tmp_path, **{"schedule.train_steps": 40}))
    losses = trainer.train()
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)


def test_training_checkpoint_is_a_model_directory_for_export(tmp_path, megatron_world):
    """convert.py megatron-to-hf reads a training checkpoint (model + optimizer) directly."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_vlm.checkpoint.convert import megatron_to_hf
    from megatron_vlm.training import checkpoint as ckpt
    from megatron_vlm.training.trainer import Trainer

    trainer = Trainer(_cfg(tmp_path, **{"schedule.train_steps": 2, "checkpoint.interval": 2}))
    trainer.train()
    megatron_to_hf(ckpt.latest_checkpoint(trainer.ckpt_dir), str(tmp_path / "hf"), log=lambda _: None)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "hf"))
    from megatron_vlm.training.sharding import full_state
    ours = full_state(trainer.model, trainer.layouts)
    torch.testing.assert_close(hf.lm_head.weight, ours["language_model.output_layer.weight"], rtol=0, atol=0)
