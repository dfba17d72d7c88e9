"""torchrun worker: load a converted checkpoint at a given TP size, run a packed row forward and
backward, and save (from rank 0) the full logits, losses and every gradient in the TP=1 layout."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
warnings.filterwarnings("ignore")

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--meg-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, required=True)
    args = parser.parse_args()

    from megatron_vlm.checkpoint.convert import load_model_dir
    from megatron_vlm.data.rope_index import packed_mrope_positions
    from megatron_vlm.models.qwen2_5_vl import gather_logits, packed_seq_params
    from megatron_vlm.parallel import destroy_parallel
    from megatron_vlm.parallel.tensor_parallel import full_state
    from megatron_vlm.testing import make_sample, pack

    model, cfg = load_model_dir(args.meg_dir, torch.float32, tensor_parallel=args.tp)
    model.train()
    g = torch.Generator().manual_seed(11)
    docs = [make_sample(cfg, [6, (1, 6, 8), 9], g), make_sample(cfg, [13], g),
            make_sample(cfg, [(1, 4, 4), 5, (1, 8, 4), 3], g)]
    row, cu = pack(docs)
    positions = packed_mrope_positions(row.input_ids, cu, row.image_grid_thw)[:, None, :]
    params = packed_seq_params(cu)
    labels = torch.roll(row.input_ids, -1)[None]

    logits = gather_logits(model(row.input_ids[None], positions, row.pixel_values, row.image_grid_thw,
                                 packed_seq_params=params))
    loss = model(row.input_ids[None], positions, row.pixel_values, row.image_grid_thw,
                 packed_seq_params=params, labels=labels)
    loss.mean().backward()
    grads = full_state(model, grads=True)
    weights = full_state(model)
    if torch.distributed.get_rank() == 0:
        torch.save({"logits": logits.detach(), "loss": loss.detach(), "grads": grads, "weights": weights}, args.out)
    destroy_parallel()


if __name__ == "__main__":
    main()
