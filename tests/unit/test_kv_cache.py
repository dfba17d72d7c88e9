"""KV-cache inference of our model (``Qwen25VLModel.forward_cached``) against its own full forward:
prefill + decode must give the logits a full forward over the whole sequence gives, at every
position, with images, one or several tokens per step, and a cache that has to grow."""

from __future__ import annotations

import pytest
import torch

from megatron_vlm.checkpoint.convert import build_model
from megatron_vlm.config import Qwen25VLConfig
from megatron_vlm.data.rope_index import mrope_positions
from megatron_vlm.models.attention import cached_attention
from megatron_vlm.models.language import KVCache
from megatron_vlm.testing import make_sample, tiny_hf_config

TOL = 1e-4


@pytest.fixture(scope="module")
def model(megatron_world):
    torch.manual_seed(0)
    cfg = Qwen25VLConfig.from_hf_dict(tiny_hf_config())
    return build_model(cfg, torch.float32).eval(), cfg


def _full_logits(model, ids, pixels, grid):
    positions = mrope_positions(ids, grid)[:, None, :]
    with torch.no_grad():
        return model(ids[None], positions, pixels, grid)[0]  # [S, V]


@pytest.mark.parametrize("chunks,capacity", [((None, 1, 1, 1, 1, 1, 1), 0), ((None, 3, 1, 4), 5)],
                         ids=["one-token-steps", "multi-token-steps-growing-cache"])
def test_prefill_then_decode_equals_full_forward(model, chunks, capacity):
    net, cfg = model
    sample = make_sample(cfg, [6, (1, 4, 6), 5, (1, 8, 4), 7, 9], torch.Generator().manual_seed(1))
    ids, pixels, grid = sample.input_ids, sample.pixel_values, sample.image_grid_thw
    full = _full_logits(net, ids, pixels, grid)
    positions = mrope_positions(ids, grid)
    tail = sum(c for c in chunks if c)
    prompt = ids.numel() - tail  # the images lie in the prompt; the tail is text
    cache = net.new_kv_cache(capacity)
    start = 0
    for size in chunks:
        end = prompt if size is None else start + size
        index = torch.arange(end - start)
        out = net.forward_cached(ids[None, start:end], positions[:, None, start:end], cache,
                                 pixels if start == 0 else None, grid if start == 0 else None,
                                 output_index=index)[0]
        assert (out - full[start:end]).abs().max().item() <= TOL
        start = end
    assert start == ids.numel() and cache.length == ids.numel()
    assert cache.keys[0].shape[2] >= ids.numel()


def test_decode_positions_continue_after_the_prompt():
    """Text after the prompt sits at max(prompt positions) + 1 + k on all three axes (what the
    backend feeds, and what transformers' rope_deltas gives)."""
    cfg = Qwen25VLConfig.from_hf_dict(tiny_hf_config())
    sample = make_sample(cfg, [4, (1, 8, 12), 3], torch.Generator().manual_seed(2))
    prompt = mrope_positions(sample.input_ids, sample.image_grid_thw)
    extended = torch.cat([sample.input_ids, torch.tensor([11, 12, 13])])
    whole = mrope_positions(extended, sample.image_grid_thw)
    expected = int(prompt.max()) + 1 + torch.arange(3)
    assert torch.equal(whole[:, -3:], expected.expand(3, 3))


def test_cached_attention_masks_new_tokens_causally():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 2, 7, 8, generator=g), torch.randn(1, 2, 7, 8,
                                                                                                         generator=g)
    out = cached_attention(q, k, v)
    for i in range(3):  # query i sees keys 0 .. 4 + i
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, i:i + 1], k[:, :, :5 + i], v[:, :, :5 + i],
                                                               enable_gqa=True)
        assert torch.allclose(out[:, :, i:i + 1], ref, atol=1e-6)


def test_cache_grows_and_keeps_its_contents():
    cache = KVCache(num_layers=1, capacity=2)
    first = torch.randn(2, 1, 3, 4)  # [S, B, H, D]
    cache.update(0, first, first + 1)
    cache.advance(2)
    second = torch.randn(3, 1, 3, 4)
    keys, values = cache.update(0, second, second + 1)
    cache.advance(3)
    assert keys.shape == (1, 3, 5, 4) and cache.capacity >= 5
    assert torch.equal(keys, torch.cat([first, second]).permute(1, 2, 0, 3))
    assert torch.equal(values, torch.cat([first, second]).permute(1, 2, 0, 3) + 1)
