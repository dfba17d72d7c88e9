"""torchrun worker for context parallelism: load a converted checkpoint at TP x CP, run one packed
row (uneven documents, images straddling chunk borders, a document shorter than 2*CP) forward and
backward, and save from global rank 0 the full-row logits, the summed loss and every gradient
(summed over the CP group, gathered to the TP=1 layout)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

PAD_TO = 8  # 2 * the largest CP size tested, so every run sees the same padded row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--meg-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1)
    args = parser.parse_args()

    from megatron.core import parallel_state

    from megatron_vlm.checkpoint.convert import load_model_dir
    from megatron_vlm.data.rope_index import packed_mrope_positions
    from megatron_vlm.models.qwen2_5_vl import gather_logits, packed_seq_params
    from megatron_vlm.parallel import destroy_parallel
    from megatron_vlm.parallel.context_parallel import (ContextParallelPlan, all_reduce_grads,
                                                        context_parallel_params, pad_row_for_context_parallel)
    from megatron_vlm.parallel.tensor_parallel import full_state
    from megatron_vlm.testing import make_sample, pack

    model, cfg = load_model_dir(args.meg_dir, torch.float32, tensor_parallel=args.tp, context_parallel=args.cp)
    model.train()
    g = torch.Generator().manual_seed(21)
    docs = [make_sample(cfg, [3, (1, 8, 12), 5], g),      # 34 tokens: the image crosses chunk borders
            make_sample(cfg, [3], g),                      # shorter than 2*CP chunks: mostly padding
            make_sample(cfg, [11, (1, 4, 4), 2, (1, 6, 8), 7], g),
            make_sample(cfg, [29], g)]
    row, cu = pack(docs)
    positions = packed_mrope_positions(row.input_ids, cu, row.image_grid_thw)
    labels = torch.roll(row.input_ids, -1)
    loss_mask = torch.ones(len(row.input_ids))
    loss_mask[cu[1:].long() - 1] = 0.0  # the last token of a document predicts nothing
    padded = pad_row_for_context_parallel(row.input_ids, positions, labels, loss_mask, cu, PAD_TO // 2)

    cp_group = parallel_state.get_context_parallel_group()
    cp_rank = parallel_state.get_context_parallel_rank()
    if args.cp > 1:
        plan = ContextParallelPlan.build(padded.cu_seqlens, args.cp, cp_rank, cp_group, row.image_grid_thw)
        params, local = context_parallel_params(plan), plan.local_index
    else:
        plan, params, local = None, packed_seq_params(padded.cu_seqlens), torch.arange(len(padded.input_ids))

    inputs = (padded.input_ids[None], padded.position_ids[:, None, :], row.pixel_values, row.image_grid_thw)
    logits = gather_logits(model(*inputs, packed_seq_params=params))[0]
    loss = model(*inputs, packed_seq_params=params, labels=padded.labels[None])[0]
    total = (loss * padded.loss_mask[local]).sum()
    total.backward()
    if args.cp > 1:
        all_reduce_grads(model, cp_group)
        dist.all_reduce(total.detach(), group=cp_group)
        parts = [torch.empty_like(logits) for _ in range(args.cp)]
        dist.all_gather(parts, logits.detach().contiguous(), group=cp_group)
        logits = torch.cat(parts).index_select(0, plan.global_to_rank_major)
    grads = full_state(model, grads=True)
    if dist.get_rank() == 0:
        real = padded.loss_mask.clone()
        real[padded.cu_seqlens[1:].long() - 1] = 1.0
        keep = padded.input_ids != 151643  # real tokens (the pad id is not drawn by make_sample)
        torch.save({"logits": logits.detach()[keep], "loss": total.detach(), "grads": grads}, args.out)
    destroy_parallel()


if __name__ == "__main__":
    main()
