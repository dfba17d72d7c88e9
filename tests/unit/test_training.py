"""The training loop on CPU: schedule, overrides, global-batch loss normalisation, exact resume,
SIGTERM save, and the loss falling on the tiny recipe."""

from __future__ import annotations

import math

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
    over all supervised tokens (not the mean of per-row means)."""
    from megatron_vlm.training.synthetic import synthetic_row
    from megatron_vlm.training.trainer import Trainer

    trainer = Trainer(_cfg(tmp_path, **{"optim.clip_grad": 0.0, "optim.lr": 0.0, "optim.min_lr": 0.0}))
    rows = [synthetic_row(trainer.model_config, 0, 7, 256), synthetic_row(trainer.model_config, 1, 7, 120)]
    assert rows[0].num_loss_tokens != rows[1].num_loss_tokens
    metrics = trainer.train_step(rows)
    ours = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}

    model = trainer.model
    model.zero_grad(set_to_none=True)
    from megatron_vlm.models.qwen2_5_vl import packed_seq_params
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
    ours = dict(trainer.model.named_parameters())
    torch.testing.assert_close(hf.lm_head.weight, ours["language_model.output_layer.weight"], rtol=0, atol=0)
