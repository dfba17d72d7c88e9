"""Training-time loading: deterministic DP-sharded order, exact resume, worker processes that give
the same rows as the main process, blends by weight, and batches the model trains on correctly
(the tiny model's loss on a loader batch equals transformers' loss per document)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from megatron_vlm.data.dataset import BlendedRowDataset, PackedRowDataset, build_dataset
from megatron_vlm.data.indexed import IndexedSamples
from megatron_vlm.data.loader import PackedRowSampler, build_loader
from tests.unit.data_helpers import build_small_dataset


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    return build_small_dataset(str(tmp_path_factory.mktemp("loader")))


def _same(a, b):
    assert a.row_index == b.row_index and a.sample_ids == b.sample_ids
    for name in ("input_ids", "labels", "loss_mask", "position_ids", "cu_seqlens", "pixel_values", "image_grid_thw"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y), name


# ---------------------------------------------------------------------------- sampler
def test_sampler_shards_rows_over_data_parallel_ranks():
    rows = 23
    ranks = [list(PackedRowSampler(rows, r, 3, seed=4)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == 7  # 21 rows used, 2 left out this epoch
    steps = [[ranks[r][s] for r in range(3)] for s in range(7)]
    flat = [row for step in steps for row in step]
    assert len(set(flat)) == 21 and set(flat) <= set(range(rows))
    order = np.random.default_rng([4, 0]).permutation(rows)  # the documented order: seed, epoch
    assert flat == order[:21].tolist()
    assert ranks[1] == list(PackedRowSampler(rows, 1, 3, seed=4))  # deterministic


def test_sampler_resumes_exactly_and_reshuffles_each_epoch():
    full = PackedRowSampler(10, 1, 2, seed=7, num_epochs=3)
    everything = list(full)
    assert len(everything) == len(full) == 15
    first_epoch, second_epoch = everything[:5], everything[5:10]
    assert sorted(first_epoch) != first_epoch or first_epoch != second_epoch
    resumed = PackedRowSampler(10, 1, 2, seed=7, num_epochs=3)
    resumed.load_state_dict({"consumed_rows": 8, "num_rows": 10, "seed": 7})  # 4 steps of 2 ranks
    assert list(resumed) == everything[4:]
    with pytest.raises(ValueError, match="seed=8"):
        resumed.load_state_dict({"consumed_rows": 8, "num_rows": 10, "seed": 8})
    with pytest.raises(ValueError, match="multiple of the DP size"):
        resumed.load_state_dict({"consumed_rows": 3})
    endless = iter(PackedRowSampler(4, 0, 1, seed=1, num_epochs=None))
    assert len([next(endless) for _ in range(13)]) == 13


# ---------------------------------------------------------------------------- loader
def test_workers_give_the_same_rows_and_resume_exactly(prefix):
    dataset = PackedRowDataset(prefix, seed=0)
    assert len(dataset) >= 4
    inline = list(build_loader(dataset, seed=3, num_workers=0))
    with_workers = build_loader(dataset, seed=3, num_workers=2)
    seen = []
    for batch in with_workers:
        seen.append(batch)
        if len(seen) == 2:
            state = with_workers.state_dict()
            break
    for a, b in zip(seen, inline):
        _same(a, b)
    assert state["consumed_rows"] == 2
    resumed = build_loader(dataset, seed=3, num_workers=0)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(inline) - 2
    for a, b in zip(rest, inline[2:]):
        _same(a, b)
    # DP rank 1 of 2 gets the odd positions of the same global order
    rank1 = list(build_loader(dataset, dp_rank=1, dp_size=2, seed=3, num_workers=0))
    assert [b.row_index for b in rank1] == [b.row_index for b in inline[1:2 * len(rank1):2]]


def test_rows_hold_the_planned_samples_with_their_images(prefix):
    dataset = PackedRowDataset(prefix, max_seq_len=512)
    store = IndexedSamples(prefix)
    ids = [r["id"] for r in store.records()]
    covered = []
    for r in range(len(dataset)):
        batch = dataset[r]
        plan_row = dataset.plan.row(r)
        assert batch.sample_ids == tuple(ids[i] for i in plan_row)
        lengths = [len(store.tokens(i)) for i in plan_row]
        assert batch.cu_seqlens.tolist() == np.cumsum([0] + lengths).tolist()
        assert batch.num_tokens <= 512
        images = sum(len(store.image_indices(i)) for i in plan_row)
        assert (0 if batch.image_grid_thw is None else len(batch.image_grid_thw)) == images
        if batch.pixel_values is not None:
            assert batch.pixel_values.shape == (int(batch.image_grid_thw.prod(1).sum()), 1176)
            tokens = int((batch.input_ids == 151655).sum())
            assert tokens * 4 == batch.pixel_values.shape[0]
        covered += plan_row.tolist()
    assert sorted(covered) == list(range(len(store)))


def test_pixel_formats_give_the_same_model_input(prefix):
    reference = PackedRowDataset(prefix, max_seq_len=512)
    row = next(r for r in range(len(reference)) if reference[r].pixel_values is not None)
    expected = reference[row].pixel_values
    halved = PackedRowDataset(prefix, max_seq_len=512, pixels="bfloat16")[row]
    assert torch.equal(halved.pixel_values, expected.to(torch.bfloat16))
    levels = PackedRowDataset(prefix, max_seq_len=512, pixels="levels")[row]
    assert levels.pixel_values is None and levels.pixel_levels.dtype == torch.uint8
    moved = levels.to("cpu")
    assert moved.pixel_levels is None and torch.equal(moved.pixel_values, expected)  # exact, not close
    with pytest.raises(ValueError, match="pixels must be one of"):
        PackedRowDataset(prefix, pixels="fp8")


def test_blend_follows_the_weights(prefix):
    a = PackedRowDataset(prefix, max_seq_len=512)
    b = PackedRowDataset(prefix, max_seq_len=1024)  # another plan of the same samples
    blend = BlendedRowDataset([a, b], [3, 1], size=40, seed=1)
    counts = np.bincount(blend.dataset_index, minlength=2)
    assert counts.tolist() == [30, 10]
    for n in (4, 8, 20):  # every prefix of the order is close to 3:1
        assert abs(np.bincount(blend.dataset_index[:n], minlength=2)[0] - 0.75 * n) <= 1
    drawn = [blend.locate(i)[1] for i in range(40) if blend.dataset_index[i] == 0]
    assert sorted(drawn[:len(a)]) == list(range(len(a)))  # each row once per pass over a
    assert blend[5].row_index == 5
    assert isinstance(build_dataset([prefix, prefix], [1, 1], max_seq_len=512), BlendedRowDataset)


# ---------------------------------------------------------------------------- the model
@pytest.mark.parametrize("cp_size", [1, 2])
def test_loss_on_a_loader_batch_equals_hf_per_document(prefix, megatron_world, cp_size):
    from megatron_vlm.checkpoint.convert import build_model, load_hf_tensors
    from megatron_vlm.config import Qwen25VLConfig
    from megatron_vlm.models.qwen2_5_vl import packed_seq_params
    from megatron_vlm.testing import random_hf_model

    hf = random_hf_model(seed=11)
    cfg = Qwen25VLConfig.from_hf_dict(hf.config.to_dict())
    model = build_model(cfg, torch.float32).eval()
    state = hf.state_dict()
    load_hf_tensors(model, cfg, state.keys(), state.__getitem__)
    dataset = PackedRowDataset(prefix, max_seq_len=512, cp_size=cp_size)
    loader = build_loader(dataset, seed=0, num_workers=0)
    batch = next(b for b in loader if b.num_documents >= 2 and b.pixel_values is not None)
    with torch.no_grad():
        losses = model(batch.input_ids, batch.position_ids, batch.pixel_values, batch.image_grid_thw,
                       packed_seq_params=packed_seq_params(batch.cu_seqlens, batch.max_seqlen), labels=batch.labels)
    weighted = losses[0] * batch.loss_mask[0]
    store = IndexedSamples(prefix)
    plan_row = dataset.plan.row(batch.row_index)
    cu = batch.cu_seqlens.tolist()
    grids = batch.image_grid_thw.tolist()
    pixels = batch.pixel_values
    total_ref, count_ref = 0.0, 0
    for d, sample in enumerate(plan_row):
        ids = torch.from_numpy(store.tokens(int(sample)).astype(np.int64))
        answer = torch.from_numpy(store.loss_mask(int(sample)).astype(bool))
        n_images = len(store.image_indices(int(sample)))
        doc_grids, grids = grids[:n_images], grids[n_images:]
        patches = sum(t * h * w for t, h, w in doc_grids)
        doc_pixels, pixels = pixels[:patches], pixels[patches:]
        labels = torch.where(answer, ids, torch.full_like(ids, -100))
        with torch.no_grad():
            ref = hf(input_ids=ids[None], labels=labels[None],
                     pixel_values=doc_pixels if n_images else None,
                     image_grid_thw=torch.tensor(doc_grids) if n_images else None).loss
        ours = weighted[cu[d]:cu[d + 1]].sum() / batch.loss_mask[0, cu[d]:cu[d + 1]].sum()
        assert abs(ours.item() - ref.item()) < 1e-4, (d, ours.item(), ref.item())
        total_ref += ref.item() * int(answer[1:].sum())
        count_ref += int(answer[1:].sum())
    assert count_ref == batch.num_loss_tokens
    assert abs(weighted.sum().item() / batch.num_loss_tokens - total_ref / count_ref) < 1e-4
