"""``tools/make_tiny_checkpoint.py`` writes a complete model directory, as ``vllm serve`` needs one:
it loads with AutoTokenizer / AutoProcessor / Qwen2_5_VLForConditionalGeneration from its own folder
(offline), the chat template renders an image turn, a processed image + text runs through the
model, attention heads are at least 32 wide, and ``convert.py hf-to-megatron`` + ``verify`` work on it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tests.conftest import REPO

TOOL = os.path.join(REPO, "tools", "make_tiny_checkpoint.py")
CONVERT = os.path.join(REPO, "tools", "checkpoint", "convert.py")
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=ENV)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("serve") / "tiny-serve")
    run = _run(TOOL, out)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "tiny-serve" in run.stdout
    return out


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def processor_loading(monkeypatch):
    """Qwen2_5_VLProcessor also loads a video processor, which needs torchvision. Where torchvision
    is missing (this CPU environment), a stand-in takes its place; images never use it."""
    if importlib.util.find_spec("torchvision") is not None:
        return "torchvision"
    from transformers.processing_utils import ProcessorMixin

    original = ProcessorMixin.get_possibly_dynamic_module

    class NoVideo:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return cls()

        def to_dict(self):
            return {}

    def patched(name):
        return NoVideo if name in ("AutoVideoProcessor", "BaseVideoProcessor") else original(name)

    monkeypatch.setattr(ProcessorMixin, "get_possibly_dynamic_module", staticmethod(patched))
    return "stand-in video processor"


def test_directory_is_complete(model_dir):
    names = set(os.listdir(model_dir))
    for required in ("config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
                     "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja"):
        assert required in names, required
    config = json.load(open(os.path.join(model_dir, "config.json")))
    text, vision = config["text_config"], config["vision_config"]
    assert text["hidden_size"] // text["num_attention_heads"] >= 32  # vLLM's CPU attention: 32 and up
    assert vision["hidden_size"] // vision["num_heads"] >= 32
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    tok_cfg = json.load(open(os.path.join(model_dir, "tokenizer_config.json")))
    assert "<|image_pad|>" in tok_cfg["chat_template"] and tok_cfg["eos_token"] == "<|im_end|>"
    assert open(os.path.join(model_dir, "chat_template.jinja")).read() == tok_cfg["chat_template"]
    gen = json.load(open(os.path.join(model_dir, "generation_config.json")))
    assert gen["eos_token_id"] == [151645, 151643] and "temperature" not in gen
    pre = json.load(open(os.path.join(model_dir, "preprocessor_config.json")))
    assert (pre["image_processor_type"], pre["patch_size"], pre["merge_size"], pre["temporal_patch_size"]) == (
        "Qwen2VLImageProcessor", 14, 2, 2)
    assert (pre["min_pixels"], pre["max_pixels"]) == (3136, 12845056)


def test_loads_with_auto_classes_and_runs_an_image_turn(model_dir, processor_loading):
    from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655 and tokenizer.chat_template
    processor = AutoProcessor.from_pretrained(model_dir)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert type(processor.image_processor).__name__.startswith("Qwen2VLImageProcessor")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>What colour is it?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    image = Image.new("RGB", (120, 90), (200, 30, 30))
    batch = processor(text=[text], images=[image], return_tensors="pt")
    grid = batch["image_grid_thw"]
    assert grid.tolist() == [[1, 6, 8]]  # 90x120 pixels -> 84x112 -> 6x8 patches -> 12 LM tokens
    assert int((batch["input_ids"] == 151655).sum()) == 12
    # the saved image processor settings are our own preprocessing's (the training data's)
    from megatron_vlm.data.image_processing import preprocess_images

    pixels, our_grid = preprocess_images([image])
    assert our_grid.tolist() == grid.tolist()
    assert torch.allclose(torch.from_numpy(pixels).float(), batch["pixel_values"].float(), atol=0.05)

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], 151936) and torch.isfinite(logits).all()
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] <= batch["input_ids"].shape[1] + 3


def test_converts_and_verifies(model_dir, tmp_path):
    meg = str(tmp_path / "meg")
    run = _run(CONVERT, "hf-to-megatron", "--hf-dir", model_dir, "--out-dir", meg, "--tp", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    ok = _run(CONVERT, "verify", "--hf-dir", model_dir, "--megatron-dir", meg)
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-3000:]
    last = ok.stdout.strip().splitlines()[-1]
    assert last.startswith("max abs logit diff:") and float(last.split()[4]) <= 1e-4


def test_tiny_preset_still_available(tmp_path):
    out = str(tmp_path / "tiny")
    run = _run(TOOL, out, "--preset", "tiny", "--seed", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["text_config"]["hidden_size"] == 64 and config["tie_word_embeddings"] is False
