"""Checkpoint metadata is read without running code: a planted ``.metadata`` pickle in a training
checkpoint (resume, export) or a converted model directory is refused, and its payload never runs."""

from __future__ import annotations

import os
import pickle

import pytest

from megatron_vlm.checkpoint.safe_metadata import UnsafeCheckpointError, read_metadata


class _Payload:
    """Unpickling this runs ``os.system`` (what an attacker would plant)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(directory: str, marker: str) -> None:
    with open(os.path.join(directory, ".metadata"), "wb") as f:
        pickle.dump(_Payload(marker), f)


def test_planted_pickle_in_a_training_checkpoint_is_not_run_on_resume(tmp_path, megatron_world):
    from megatron_vlm.training.config import apply_overrides
    from megatron_vlm.training.recipes import tiny_cpu
    from megatron_vlm.training.trainer import Trainer

    overrides = ["data.max_seq_len=256", "schedule.global_batch_tokens=512", "schedule.train_steps=2",
                 "checkpoint.interval=1", f"log.run_dir={tmp_path / 'run'}", "log.tensorboard=false"]
    trainer = Trainer(apply_overrides(tiny_cpu(), overrides), log=lambda _: None)
    trainer.train(max_steps=1)
    checkpoint = tmp_path / "run" / "checkpoints" / "iter_0000001"
    read_metadata(str(checkpoint / "model" / ".metadata"))  # a genuine one reads fine
    marker = tmp_path / "pwned"
    _plant(str(checkpoint / "model"), str(marker))
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system"):
        Trainer(apply_overrides(tiny_cpu(), overrides), log=lambda _: None)
    assert not marker.exists()


def test_planted_pickle_in_a_converted_model_directory_is_not_run(tmp_path, megatron_world):
    from megatron_vlm.checkpoint.convert import hf_to_megatron, load_model_dir
    from megatron_vlm.testing import random_hf_model

    random_hf_model().save_pretrained(tmp_path / "hf")
    hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "meg"), log=lambda _: None)
    load_model_dir(str(tmp_path / "meg"))  # a genuine megatron-core checkpoint passes the check
    marker = tmp_path / "pwned"
    _plant(str(tmp_path / "meg" / "model"), str(marker))
    with pytest.raises(UnsafeCheckpointError):
        load_model_dir(str(tmp_path / "meg"))
    assert not marker.exists()
