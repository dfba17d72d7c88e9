"""The local backends are independent implementations (transformers' image processor, rope index
and KV-cached ``generate`` vs our preprocessing, mRoPE positions and full-recompute greedy loop on
the Megatron model): on a tiny random model they must produce the same greedy tokens."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from megatron_vlm.checkpoint.convert import hf_to_megatron
from megatron_vlm.eval.backends import GenerationConfig, make_backend, parse_model_spec
from megatron_vlm.eval.build import Instance
from megatron_vlm.eval.data import ContextItem
from tests.conftest import random_hf_model

MAX_PIXELS = 28 * 28 * 64  # small pages keep the CPU run short; both backends get the same cap


@pytest.fixture(scope="module")
def backends(tmp_path_factory, megatron_world):
    root = tmp_path_factory.mktemp("eval_models")
    random_hf_model(seed=5).save_pretrained(root / "hf")
    hf_to_megatron(str(root / "hf"), str(root / "meg"), log=lambda _: None)
    cfg = GenerationConfig(max_new_tokens=5, max_pixels=MAX_PIXELS)
    return (make_backend(parse_model_spec(f"hf:{root / 'hf'},dtype=fp32"), cfg),
            make_backend(parse_model_spec(f"megatron:{root / 'meg'}"), cfg))


def _instance(tmp_path, sizes, needle: bool = False) -> Instance:
    items = []
    g = torch.Generator().manual_seed(len(sizes))
    for i, (w, h) in enumerate(sizes):
        pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        path = tmp_path / f"page{i}.png"
        Image.fromarray(pixels).save(path)
        items.append(ContextItem("page", "docabc", i + 1, str(path), 0, None, "gold"))
    if needle:
        items.insert(1, ContextItem("text", text="The blue safe opens with 4821.", role="needle"))
    return Instance("set", "x", 4096, "niah" if needle else "docqa", "What is written on page 2?", "x", "String",
                    "docabc", [2], items, 0, "whole", 0)


@pytest.mark.parametrize("sizes,needle", [([(224, 280), (196, 140)], False), ([(140, 168), (308, 196), (84, 84)], True)],
                         ids=["two-pages", "three-pages-and-a-needle"])
def test_megatron_and_transformers_agree(backends, tmp_path, sizes, needle):
    hf, meg = backends
    inst = _instance(tmp_path, sizes, needle)
    ids, pixels, grid = meg.inputs(inst)
    assert grid.shape[0] == len(sizes) and int((ids == 151655).sum()) == int(grid.prod(-1).sum()) // 4
    a, b = hf.generate_ids(inst), meg.generate_ids(inst)
    assert len(a) == 5 and a == b  # a random model does not stop early; same tokens, same order
    assert hf.tokenizer.decode(a, skip_special_tokens=True) == meg.tokenizer.decode(b, skip_special_tokens=True)
