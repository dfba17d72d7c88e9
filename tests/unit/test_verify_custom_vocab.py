"""``convert.py verify`` on a custom config whose special token ids lie inside a small vocabulary:
its random text must not contain the image/video pad or vision start/end ids."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from megatron_vlm.checkpoint.convert import hf_to_megatron
from megatron_vlm.config import Qwen25VLConfig
from megatron_vlm.testing import make_sample, special_token_ids
from tests.conftest import REPO

CLI = os.path.join(REPO, "tools", "checkpoint", "convert.py")
# Qwen's order (start, end, -, image, video) moved into a 1000-token vocabulary; 902 is among the
# ids the fixed inputs' first random text draws.
SMALL_SPECIALS = dict(vision_start_token_id=902, vision_end_token_id=903, image_token_id=905, video_token_id=906)


def _small_vocab_model(seed: int = 7):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_vlm.testing import tiny_hf_config

    torch.manual_seed(seed)
    hf = tiny_hf_config(vocab_size=1000)
    hf.update(SMALL_SPECIALS)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hf)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def test_random_text_avoids_special_ids():
    cfg = Qwen25VLConfig.from_hf_dict({**_small_vocab_model().config.to_dict()})
    assert cfg.image_token_id == 905 and cfg.language.vocab_size == 1000
    sample = make_sample(cfg, [20000], torch.Generator().manual_seed(0))
    drawn = set(sample.input_ids.tolist())
    assert not drawn & set(special_token_ids(cfg))
    assert max(drawn) < 1000 and len(drawn) == 1000 - 4  # every other id can still be drawn


def test_verify_passes_with_special_ids_inside_a_small_vocab(tmp_path, megatron_world):
    hf_dir, meg = str(tmp_path / "hf"), str(tmp_path / "meg")
    _small_vocab_model().save_pretrained(hf_dir)
    hf_to_megatron(hf_dir, meg, log=lambda _: None)
    run = subprocess.run([sys.executable, CLI, "verify", "--hf-dir", hf_dir, "--megatron-dir", meg],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("max abs logit diff:") and float(last.split()[4]) <= 1e-4
