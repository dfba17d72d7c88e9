"""Our Megatron Qwen2.5-VL against HF transformers' implementation on the same random weights."""

from __future__ import annotations

import pytest
import torch

from megatron_vlm.checkpoint.convert import build_model, load_hf_tensors
from megatron_vlm.config import Qwen25VLConfig
from megatron_vlm.data.rope_index import mrope_positions, packed_mrope_positions
from megatron_vlm.models.qwen2_5_vl import packed_seq_params
from megatron_vlm.testing import make_sample, pack
from tests.conftest import random_hf_model

TOL = 1e-4


def _pair(**overrides):
    hf = random_hf_model(**overrides)
    cfg = Qwen25VLConfig.from_hf_dict(hf.config.to_dict())
    ours = build_model(cfg, torch.float32).eval()
    state = hf.state_dict()
    load_hf_tensors(ours, cfg, state.keys(), state.__getitem__)
    return hf, ours, cfg


@pytest.fixture(scope="module")
def models(megatron_world):
    return _pair()


@torch.no_grad()
def _hf_logits(hf, sample):
    return hf(input_ids=sample.input_ids[None], pixel_values=sample.pixel_values,
              image_grid_thw=sample.image_grid_thw).logits[0]


@torch.no_grad()
def _our_logits(model, sample, cu_seqlens=None):
    if cu_seqlens is None:
        positions, params = mrope_positions(sample.input_ids, sample.image_grid_thw), None
    else:
        positions = packed_mrope_positions(sample.input_ids, cu_seqlens, sample.image_grid_thw)
        params = packed_seq_params(cu_seqlens)
    return model(sample.input_ids[None], positions[:, None, :], sample.pixel_values, sample.image_grid_thw,
                 packed_seq_params=params)[0]


CASES = {
    "text_only": [40],
    "one_image": [7, (1, 8, 12), 9],
    "several_images": [3, (1, 4, 4), 5, (1, 6, 10), 2, (1, 16, 8), 4],
    "image_at_start_and_end": [(1, 4, 6), 6, (1, 6, 4)],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(models, case):
    hf, ours, cfg = models
    sample = make_sample(cfg, CASES[case], torch.Generator().manual_seed(7))
    ref, out = _hf_logits(hf, sample), _our_logits(ours, sample)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= TOL
    assert ref.abs().max().item() > 0.1  # the comparison is not between near-zero tensors


def test_packed_row_equals_documents_run_alone(models):
    hf, ours, cfg = models
    g = torch.Generator().manual_seed(3)
    docs = [make_sample(cfg, [5, (1, 6, 8), 11], g), make_sample(cfg, [17], g),
            make_sample(cfg, [(1, 4, 4), 3, (1, 8, 4), 6], g)]
    row, cu = pack(docs)
    packed = _our_logits(ours, row, cu)
    for doc, start, end in zip(docs, cu[:-1].tolist(), cu[1:].tolist()):
        assert (packed[start:end] - _hf_logits(hf, doc)).abs().max().item() <= TOL


def test_packed_documents_do_not_see_each_other(models):
    _, ours, cfg = models
    g = torch.Generator().manual_seed(4)
    first, second = make_sample(cfg, [12, (1, 4, 4), 5], g), make_sample(cfg, [9, (1, 4, 6)], g)
    changed = make_sample(cfg, [12, (1, 4, 4), 5], torch.Generator().manual_seed(99))
    row_a, cu = pack([first, second])
    row_b, _ = pack([changed, second])
    logits_a, logits_b = _our_logits(ours, row_a, cu), _our_logits(ours, row_b, cu)
    start = int(cu[1])
    assert not torch.allclose(logits_a[:start], logits_b[:start])
    torch.testing.assert_close(logits_a[start:], logits_b[start:], rtol=0, atol=1e-6)


def test_tied_embeddings_and_rope_base_override(megatron_world):
    hf, ours, cfg = _pair(tie_word_embeddings=True, rope_theta=4e6)
    assert cfg.language.tie_word_embeddings and ours.language_model.output_layer.weight is None
    sample = make_sample(cfg, [6, (1, 4, 8), 10], torch.Generator().manual_seed(5))
    assert (_our_logits(ours, sample) - _hf_logits(hf, sample)).abs().max().item() <= TOL


def test_changing_rope_base_changes_logits(models):
    hf, ours, cfg = models
    sample = make_sample(cfg, [60], torch.Generator().manual_seed(8))
    before = _our_logits(ours, sample)
    ours.set_rope_theta(4e6)
    try:
        after = _our_logits(ours, sample)
    finally:
        ours.set_rope_theta(1e6)
    assert (after - before).abs().max().item() > 1e-6  # tiny random model: small but real change
    torch.testing.assert_close(_our_logits(ours, sample), before, rtol=0, atol=0)


def test_loss_is_cross_entropy_of_logits(models):
    _, ours, cfg = models
    sample = make_sample(cfg, [9, (1, 4, 4), 7], torch.Generator().manual_seed(9))
    labels = torch.roll(sample.input_ids, -1)[None]
    positions = mrope_positions(sample.input_ids, sample.image_grid_thw)[:, None, :]
    with torch.no_grad():
        loss = ours(sample.input_ids[None], positions, sample.pixel_values, sample.image_grid_thw, labels=labels)
    expected = torch.nn.functional.cross_entropy(_our_logits(ours, sample), labels[0], reduction="none")
    torch.testing.assert_close(loss[0], expected, rtol=1e-5, atol=1e-5)


def test_wrong_number_of_image_tokens_is_a_clear_error(models):
    _, ours, cfg = models
    sample = make_sample(cfg, [4, (1, 4, 4), 4], torch.Generator().manual_seed(1))
    grid = torch.tensor([[1, 4, 8]])
    pixels = torch.randn(32, cfg.vision.patch_dim)
    positions = torch.zeros(3, 1, len(sample.input_ids), dtype=torch.long)
    with pytest.raises(ValueError, match="image_pad"):
        ours(sample.input_ids[None], positions, pixels, grid)


def _loss_and_grads(model, sample, labels):
    model.zero_grad(set_to_none=True)
    positions = mrope_positions(sample.input_ids, sample.image_grid_thw)[:, None, :]
    loss = model(sample.input_ids[None], positions, sample.pixel_values, sample.image_grid_thw, labels=labels)
    loss.mean().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_recompute_gives_identical_loss_and_grads(megatron_world):
    hf = random_hf_model(seed=6)
    cfg = Qwen25VLConfig.from_hf_dict(hf.config.to_dict())
    state = hf.state_dict()
    plain, recomputed = build_model(cfg, torch.float32), build_model(cfg, torch.float32, recompute=True)
    for model in (plain, recomputed):
        load_hf_tensors(model, cfg, state.keys(), state.__getitem__)
        model.train()
    sample = make_sample(cfg, [5, (1, 4, 8), 9], torch.Generator().manual_seed(2))
    labels = torch.roll(sample.input_ids, -1)[None]
    loss_a, grads_a = _loss_and_grads(plain, sample, labels)
    loss_b, grads_b = _loss_and_grads(recomputed, sample, labels)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(plain.parameters()))
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)


def test_text_only_micro_batch_keeps_vision_tower_in_the_graph(models):
    _, ours, cfg = models
    sample = make_sample(cfg, [30], torch.Generator().manual_seed(3))
    ours.train()
    try:
        _, grads = _loss_and_grads(ours, sample, torch.roll(sample.input_ids, -1)[None])
    finally:
        ours.eval()
        ours.zero_grad(set_to_none=True)
    vision = {n: g for n, g in grads.items() if n.startswith("vision.")}
    assert len(vision) == len(list(ours.vision.parameters()))  # every DP rank reduces the same set
    assert all(torch.count_nonzero(g) == 0 for g in vision.values())


def test_output_index_selects_logits_and_losses(models):
    _, ours, cfg = models
    sample = make_sample(cfg, [9, (1, 4, 4), 12], torch.Generator().manual_seed(10))
    positions = mrope_positions(sample.input_ids, sample.image_grid_thw)[:, None, :]
    labels = torch.roll(sample.input_ids, -1)[None]
    index = torch.tensor([3, len(sample.input_ids) - 4, len(sample.input_ids) - 2])
    args = (sample.input_ids[None], positions, sample.pixel_values, sample.image_grid_thw)
    with torch.no_grad():
        full_logits, full_loss = ours(*args), ours(*args, labels=labels)
        part_logits, part_loss = ours(*args, output_index=index), ours(*args, labels=labels, output_index=index)
    torch.testing.assert_close(part_logits[0], full_logits[0, index], rtol=0, atol=1e-6)
    torch.testing.assert_close(part_loss[0], full_loss[0, index], rtol=0, atol=1e-6)
