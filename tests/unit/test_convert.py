"""HF -> Megatron -> HF conversion: bit-exact round trips, both HF key layouts, sharded inputs,
the verify command, and the errors users hit with the wrong checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_vlm.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_vlm.checkpoint.hf_io import HFCheckpointReader
from megatron_vlm.checkpoint.hf_mapping import CheckpointMismatch
from megatron_vlm.config import ConfigError
from megatron_vlm.testing import make_sample
from tests.conftest import REPO, random_hf_model

CLI = os.path.join(REPO, "tools", "checkpoint", "convert.py")
quiet = dict(log=lambda _: None)


def _all_tensors(directory: str) -> dict[str, torch.Tensor]:
    reader = HFCheckpointReader(directory)
    return {name: reader.load(name) for name in reader.names()}


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, CLI, *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny"
    random_hf_model(seed=2).save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer"}))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    return str(path)


def test_cli_round_trip_is_bit_exact_and_loads_in_transformers(hf_dir, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    meg, back = str(tmp_path / "meg"), str(tmp_path / "back")
    run = _cli("hf-to-megatron", "--hf-dir", hf_dir, "--out-dir", meg, "--tp", "2", "--rope-theta", "4e6")
    assert run.returncode == 0, run.stderr[-2000:]
    run = _cli("megatron-to-hf", "--in-dir", meg, "--out-dir", back)
    assert run.returncode == 0, run.stderr[-2000:]

    original, exported = _all_tensors(hf_dir), _all_tensors(back)
    assert original.keys() == exported.keys()
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name

    config = json.load(open(os.path.join(back, "config.json")))
    assert config["text_config"]["rope_theta"] == 4e6 and config["rope_theta"] == 4e6
    for asset in ("tokenizer_config.json", "chat_template.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(back, asset)), asset

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(back, torch_dtype=torch.float32)
    assert model.config.text_config.rope_theta == 4e6
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, torch_dtype=torch.float32)
    reference.config.text_config.rope_theta = 4e6
    sample = make_sample(_cfg(hf_dir), [5, (1, 4, 8), 6], torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(input_ids=sample.input_ids[None], pixel_values=sample.pixel_values,
                  image_grid_thw=sample.image_grid_thw).logits
        b = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir)(
            input_ids=sample.input_ids[None], pixel_values=sample.pixel_values,
            image_grid_thw=sample.image_grid_thw).logits
    assert a.shape == b.shape and not torch.equal(a, b)  # the rope base really changed

    ok = _cli("verify", "--hf-dir", hf_dir, "--megatron-dir", meg)
    assert ok.returncode == 0, ok.stderr[-2000:]
    last = ok.stdout.strip().splitlines()[-1]
    assert last.startswith("max abs logit diff:") and float(last.split()[4]) <= 1e-4


def test_verify_fails_on_a_wrong_conversion(hf_dir, tmp_path, megatron_world):
    meg = str(tmp_path / "meg")
    hf_to_megatron(hf_dir, meg, **quiet)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(hf_dir):
        if name != "model.safetensors":
            (broken / name).write_bytes(open(os.path.join(hf_dir, name), "rb").read())
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] += 0.5
    save_file(tensors, str(broken / "model.safetensors"))
    run = _cli("verify", "--hf-dir", str(broken), "--megatron-dir", meg)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "FAIL" in run.stdout.strip().splitlines()[-1]


def _cfg(directory):
    from megatron_vlm.config import Qwen25VLConfig
    return Qwen25VLConfig.from_hf_dir(directory)


def test_both_layouts_and_sharded_input(tmp_path, megatron_world):
    """save_pretrained writes the legacy names (model.* / visual.*); a checkpoint with the current
    in-memory names (model.language_model.* / model.visual.*), split over two shards, converts too,
    and either exports to either layout bit-exactly."""
    legacy = tmp_path / "legacy"
    random_hf_model(seed=3).save_pretrained(legacy, max_shard_size="300KB")
    assert os.path.isfile(legacy / "model.safetensors.index.json")
    tensors = _all_tensors(str(legacy))
    assert any(n.startswith("visual.") for n in tensors) and any(n.startswith("model.layers.") for n in tensors)

    def current_name(name: str) -> str:
        if name.startswith("visual."):
            return "model." + name
        return name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name

    current = tmp_path / "current"
    current.mkdir()
    (current / "config.json").write_text((legacy / "config.json").read_text())
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, chunk in enumerate((names[:half], names[half:])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({current_name(n): tensors[n].contiguous() for n in chunk}, str(current / file))
        weight_map.update({current_name(n): file for n in chunk})
    (current / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    for source in (legacy, current):
        meg = str(tmp_path / f"meg_{source.name}")
        hf_to_megatron(str(source), meg, **quiet)
        out_current, out_legacy = tmp_path / f"{source.name}_to_current", tmp_path / f"{source.name}_to_legacy"
        megatron_to_hf(meg, str(out_current), layout="current", max_shard_bytes=200_000, **quiet)
        megatron_to_hf(meg, str(out_legacy), layout="legacy", **quiet)
        assert os.path.isfile(out_current / "model.safetensors.index.json")
        got_current, got_legacy = _all_tensors(str(out_current)), _all_tensors(str(out_legacy))
        assert got_legacy.keys() == tensors.keys()
        assert got_current.keys() == {current_name(n) for n in tensors}
        for name, tensor in tensors.items():
            assert torch.equal(got_legacy[name], tensor) and torch.equal(got_current[current_name(name)], tensor), name
        default_out = tmp_path / f"{source.name}_default"
        megatron_to_hf(meg, str(default_out), **quiet)  # keeps the source's layout
        assert _all_tensors(str(default_out)).keys() == _all_tensors(str(source)).keys()


def test_tied_embeddings_round_trip(tmp_path, megatron_world):
    src = tmp_path / "tied"
    random_hf_model(seed=4, tie_word_embeddings=True).save_pretrained(src)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    meg, back = str(tmp_path / "meg"), str(tmp_path / "back")
    hf_to_megatron(str(src), meg, **quiet)
    megatron_to_hf(meg, back, **quiet)
    original, exported = _all_tensors(str(src)), _all_tensors(back)
    assert original.keys() == exported.keys()
    assert all(torch.equal(exported[n], t) for n, t in original.items())
    assert json.load(open(os.path.join(back, "config.json")))["tie_word_embeddings"] is True


def test_bf16_checkpoint_stays_bf16(tmp_path, megatron_world):
    src = tmp_path / "bf16"
    random_hf_model(seed=5).to(torch.bfloat16).save_pretrained(src)
    meg, back = str(tmp_path / "meg"), str(tmp_path / "back")
    hf_to_megatron(str(src), meg, **quiet)
    assert json.load(open(os.path.join(meg, "megatron_vlm.json")))["dtype"] == "bf16"
    megatron_to_hf(meg, back, **quiet)
    original, exported = _all_tensors(str(src)), _all_tensors(back)
    assert all(exported[n].dtype == torch.bfloat16 and torch.equal(exported[n], t) for n, t in original.items())


# ----------------------------------------------------------------------------- errors
def _copy_without(src: str, dst, drop: str = "", config_patch: dict | None = None) -> str:
    os.makedirs(dst, exist_ok=True)
    config = json.load(open(os.path.join(src, "config.json")))
    config.update(config_patch or {})
    json.dump(config, open(os.path.join(dst, "config.json"), "w"))
    tensors = {k: v for k, v in load_file(os.path.join(src, "model.safetensors")).items() if k != drop}
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return str(dst)


def test_not_a_qwen25vl_checkpoint(hf_dir, tmp_path, megatron_world):
    bad = _copy_without(hf_dir, tmp_path / "llava", config_patch={"model_type": "llava"})
    with pytest.raises(ConfigError, match="llava"):
        hf_to_megatron(bad, str(tmp_path / "out"), **quiet)


def test_missing_and_unexpected_tensors_are_named(hf_dir, tmp_path, megatron_world):
    name = "model.layers.0.self_attn.k_proj.bias"
    bad = _copy_without(hf_dir, tmp_path / "missing", drop=name)
    with pytest.raises(CheckpointMismatch, match=r"missing \(1\): " + name.replace(".", r"\.")):
        hf_to_megatron(bad, str(tmp_path / "out"), **quiet)

    extra = tmp_path / "extra"
    _copy_without(hf_dir, extra)
    tensors = load_file(str(extra / "model.safetensors"))
    tensors["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(extra / "model.safetensors"))
    with pytest.raises(CheckpointMismatch, match=r"unexpected \(1\): model\.layers\.9"):
        hf_to_megatron(str(extra), str(tmp_path / "out2"), **quiet)


def test_tensor_parallel_size_must_divide(hf_dir, tmp_path, megatron_world):
    with pytest.raises(ConfigError, match="TP 3"):
        hf_to_megatron(hf_dir, str(tmp_path / "out"), tensor_parallel=3, **quiet)


def test_pickle_weights_get_a_hint(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        HFCheckpointReader(str(tmp_path))


def test_cli_reports_errors_without_a_traceback(tmp_path):
    run = _cli("hf-to-megatron", "--hf-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "o"))
    assert run.returncode == 2
    assert "error:" in run.stderr and "config.json" in run.stderr and "Traceback" not in run.stderr
