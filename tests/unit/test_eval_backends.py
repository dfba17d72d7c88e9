"""The local backends are independent implementations (transformers' image processor, rope index
and KV-cached ``generate`` vs our preprocessing, mRoPE positions and KV-cached greedy loop on the
Megatron model): on a tiny random model they must produce the same greedy tokens. The Megatron
backend must also encode the images once per prompt and feed only the new token per decode step."""

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
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def backends(tmp_path_factory, megatron_world):
    root = tmp_path_factory.mktemp("eval_models")
    random_hf_model(seed=5).save_pretrained(root / "hf")
    hf_to_megatron(str(root / "hf"), str(root / "meg"), log=lambda _: None)
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, max_pixels=MAX_PIXELS)
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


CASES = {"two-pages": ([(224, 280), (196, 140)], False),
         "three-pages-and-a-needle": ([(140, 168), (308, 196), (84, 84)], True),
         "five-pages": ([(224, 224), (56, 112), (308, 140), (168, 196), (112, 56)], False)}


@pytest.mark.parametrize("sizes,needle", list(CASES.values()), ids=list(CASES))
def test_megatron_and_transformers_agree(backends, tmp_path, sizes, needle):
    hf, meg = backends
    inst = _instance(tmp_path, sizes, needle)
    ids, pixels, grid = meg.inputs(inst)
    assert grid.shape[0] == len(sizes) and int((ids == 151655).sum()) == int(grid.prod(-1).sum()) // 4
    a, b = hf.generate_ids(inst), meg.generate_ids(inst)
    assert len(a) == NEW_TOKENS and a == b  # a random model does not stop early; same tokens, same order
    assert hf.tokenizer.decode(a, skip_special_tokens=True) == meg.tokenizer.decode(b, skip_special_tokens=True)


class _Counter:
    """Forward (pre-)hooks that record calls on a module for the length of a ``with`` block."""

    def __init__(self, module, pre: bool = False):
        self.module, self.pre, self.calls = module, pre, []

    def __enter__(self):
        if self.pre:  # the decoder is called with keyword arguments: record the tokens it is fed
            self.handle = self.module.register_forward_pre_hook(
                lambda m, args, kwargs: self.calls.append(int(kwargs["hidden_states"].shape[0])), with_kwargs=True)
        else:
            self.handle = self.module.register_forward_hook(lambda m, args, out: self.calls.append(args[0].shape[0]))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_vision_runs_once_and_decode_feeds_one_token(backends, tmp_path):
    _, meg = backends
    inst = _instance(tmp_path, CASES["five-pages"][0])
    ids, pixels, _ = meg.inputs(inst)
    with _Counter(meg.model.vision) as vision, _Counter(meg.model.language_model.decoder, pre=True) as decoder:
        new = meg.generate_ids(inst)
    assert len(new) == NEW_TOKENS
    assert vision.calls == [pixels.shape[0]]  # one call, over all the prompt's patches
    # one prefill over the prompt, then one token per decode step (none after the last token)
    assert decoder.calls == [ids.numel()] + [1] * (NEW_TOKENS - 1)
    assert sum(decoder.calls) == ids.numel() + NEW_TOKENS - 1


def test_kv_cache_decoding_equals_full_recompute(backends, tmp_path):
    _, meg = backends
    inst = _instance(tmp_path, CASES["three-pages-and-a-needle"][0], needle=True)
    with _Counter(meg.model.vision) as vision:
        reference = meg.generate_ids_recompute(inst)
    assert len(vision.calls) == NEW_TOKENS  # the old path encodes the images at every step
    assert meg.generate_ids(inst) == reference
