"""Single-process pieces of context parallelism: per-document padding, the zig-zag split and its
permutations, head-count validation (the multi-process equality tests are in tests/multiproc)."""

from __future__ import annotations

import pytest
import torch

from megatron_vlm.data.rope_index import packed_mrope_positions
from megatron_vlm.parallel.context_parallel import (ContextParallelError, ContextParallelPlan, check_heads,
                                                    pad_row_for_context_parallel, zigzag_token_index)
from megatron_vlm.testing import make_sample, pack
from megatron_vlm.config import tiny


def _row(cp):
    cfg = tiny()
    g = torch.Generator().manual_seed(0)
    docs = [make_sample(cfg, [3, (1, 8, 12), 5], g), make_sample(cfg, [3], g), make_sample(cfg, [17], g)]
    row, cu = pack(docs)
    pos = packed_mrope_positions(row.input_ids, cu, row.image_grid_thw)
    labels = torch.roll(row.input_ids, -1)
    return row, cu, pos, pad_row_for_context_parallel(row.input_ids, pos, labels, torch.ones(len(labels)), cu, cp)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_padding_keeps_every_document_and_masks_the_pads(cp):
    row, cu, pos, padded = _row(cp)
    lengths = (cu[1:] - cu[:-1]).tolist()
    new_lengths = (padded.cu_seqlens[1:] - padded.cu_seqlens[:-1]).tolist()
    for old, new, start_old, start_new in zip(lengths, new_lengths, cu[:-1].tolist(), padded.cu_seqlens[:-1].tolist()):
        assert new % (2 * cp) == 0 and old <= new < old + 2 * cp
        assert torch.equal(padded.input_ids[start_new:start_new + old], row.input_ids[start_old:start_old + old])
        assert torch.equal(padded.position_ids[:, start_new:start_new + old], pos[:, start_old:start_old + old])
        assert padded.loss_mask[start_new:start_new + old].all()
        assert not padded.loss_mask[start_new + old:start_new + new].any()
        pad_pos = padded.position_ids[:, start_new + old:start_new + new]
        if new > old:  # pads continue after the document's largest position, increasing
            assert int(pad_pos.min()) == int(pos[:, start_old:start_old + old].max()) + 1
            assert bool((pad_pos[:, 1:] > pad_pos[:, :-1]).all())


@pytest.mark.parametrize("cp", [2, 4])
def test_zigzag_split_partitions_each_document_symmetrically(cp):
    _, _, _, padded = _row(cp)
    cu = padded.cu_seqlens
    parts = [zigzag_token_index(cu, cp, r) for r in range(cp)]
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(int(cu[-1])))
    assert len({len(p) for p in parts}) == 1  # equal work
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        chunk = (end - start) // (2 * cp)
        for r, part in enumerate(parts):
            mine = part[(part >= start) & (part < end)] - start
            expected = torch.cat([torch.arange(r * chunk, (r + 1) * chunk),
                                  torch.arange((2 * cp - 1 - r) * chunk, (2 * cp - r) * chunk)])
            assert torch.equal(mine, expected)


def test_plan_permutations_are_inverse():
    _, _, _, padded = _row(4)
    plan = ContextParallelPlan.build(padded.cu_seqlens, 4, 1)
    n = int(padded.cu_seqlens[-1])
    assert torch.equal(plan.rank_major_to_global[plan.global_to_rank_major], torch.arange(n))
    assert torch.equal(plan.local_index, plan.rank_major_to_global[n // 4:n // 2])


def test_unpadded_row_is_a_clear_error():
    row, cu, _, _ = _row(2)
    with pytest.raises(ContextParallelError, match="pad_row_for_context_parallel"):
        zigzag_token_index(cu, 2, 0)


def test_head_validation():
    assert check_heads(28, 4, 2) == 1
    assert check_heads(14, 2, 2) == 1
    assert check_heads(8, 1, 2) == 2  # one KV head per TP rank: replicated to both CP ranks
    with pytest.raises(ContextParallelError, match="query heads"):
        check_heads(7, 1, 2)
    with pytest.raises(ContextParallelError, match="KV heads"):
        check_heads(12, 3, 4)


def test_images_are_split_into_contiguous_balanced_runs():
    from megatron_vlm.parallel.context_parallel import split_images

    grid = torch.tensor([[1, 8, 12], [1, 4, 4], [1, 6, 8], [1, 40, 40], [1, 8, 8]])
    patches = (grid[:, 0] * grid[:, 1] * grid[:, 2]).tolist()
    for cp in (1, 2, 3, 4, 8):
        images, rows, tokens = split_images(grid, cp)
        assert len(images) == cp and images[0][0] == 0 and images[-1][1] == len(grid)
        assert all(a[1] == b[0] for a, b in zip(images, images[1:]))  # contiguous, in order
        assert [r[1] - r[0] for r in rows] == [sum(patches[a:b]) for a, b in images]
        assert sum(tokens) == sum(patches) // 4
    images, _, _ = split_images(grid, 2)
    assert images == [(0, 3), (3, 5)]  # cut at the border nearest to half the work
    images, _, _ = split_images(torch.tensor([[1, 8, 8]] * 8), 4)
    assert images == [(0, 2), (2, 4), (4, 6), (6, 8)]
