"""torchrun worker: a few tiny-recipe training steps at a given TP x CP layout (DP fills the rest of
the world), through the one training path (FSDP2 + Megatron TP). Rank 0 saves, per dtype, the
losses, gradient norms, final weights (TP=1 layout) and checks made on every rank.

Every collective goes through ``device_restricted_collectives`` (the NCCL double): a tensor that is
not on the training device fails the run, as it would under NCCL.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient: a stand-in for a non-deterministic
    backward kernel that makes TP replicas' gradients differ in the last bits."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _perturb_vision_gradients(model, tp_rank: int) -> None:
    vision = model.vision
    original = vision.forward

    def forward(*args, **kwargs):
        return _ScaleGradient.apply(original(*args, **kwargs), 1.0 + 1e-3 * tp_rank)

    vision.forward = forward


class TextOnlyOddRows:
    """Wraps a source: rows with an odd global index lose their images (image tokens become text),
    so some micro-batches, and in DP some ranks, see no image at all."""

    def __init__(self, source, model_config):
        self.source, self.cfg = source, model_config

    def next_rows(self, count):
        from megatron_vlm.data.rope_index import packed_mrope_positions

        first = self.source.consumed_rows
        rows = self.source.next_rows(count)
        out = []
        for i, row in enumerate(rows):
            index = first + i * self.source.dp_size + self.source.dp_rank
            if index % 2:
                ids = row.input_ids.clone()
                for token in (self.cfg.image_token_id, self.cfg.vision_start_token_id, self.cfg.vision_end_token_id):
                    ids[ids == token] = 300
                positions = packed_mrope_positions(ids[0], row.cu_seqlens, None)[:, None, :]
                row = type(row)(**{**row.__dict__, "input_ids": ids, "position_ids": positions,
                                   "pixel_values": None, "image_grid_thw": None})
            out.append(row)
        return out

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dtypes", default="fp32")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (a 'kill')")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rows", type=int, default=4, help="rows per global batch")
    parser.add_argument("--checkpoint-interval", type=int, default=0)
    parser.add_argument("--text-only-odd-rows", action="store_true")
    parser.add_argument("--perturb-vision-grads", action="store_true")
    parser.add_argument("--freeze-vision", action="store_true")
    parser.add_argument("--recompute", action="store_true", help="activation recompute (LM layers, ViT blocks)")
    args = parser.parse_args()

    from megatron_vlm.parallel import destroy_parallel
    from megatron_vlm.testing import device_restricted_collectives
    from megatron_vlm.training.config import apply_overrides
    from megatron_vlm.training.recipes import tiny_cpu
    from megatron_vlm.training.sharding import full_state
    from megatron_vlm.training.synthetic import SyntheticSource
    from megatron_vlm.training.trainer import Trainer

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for dtype in args.dtypes.split(","):
        cfg = apply_overrides(tiny_cpu(), [
            f"data.max_seq_len={args.seq_len}", f"schedule.global_batch_tokens={args.rows * args.seq_len}",
            f"schedule.train_steps={args.steps}", f"checkpoint.interval={args.checkpoint_interval}",
            f"log.run_dir={args.run_dir}/{dtype}", "log.tensorboard=false", "log.interval=100",
            f"parallel.context_parallel={args.cp}", f"parallel.tensor_parallel={args.tp}", f"model.dtype={dtype}",
            f"model.freeze_vision={str(args.freeze_vision).lower()}", f"model.recompute={str(args.recompute).lower()}"])
        with device_restricted_collectives(device_type) as double:
            trainer = Trainer(cfg, log=lambda _: None)
            if args.text_only_odd_rows:
                trainer.source = TextOnlyOddRows(trainer.source, trainer.model_config)
            from megatron.core import parallel_state
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            if args.perturb_vision_grads:
                _perturb_vision_gradients(trainer.model, tp_rank)
            pixel_rows: list[tuple[int, int]] = []  # (rows this rank received, rows of the whole row)
            prepare = trainer._prepare

            def recording_prepare(row):
                out = prepare(row)
                received = out[0][2]
                pixel_rows.append((0 if received is None else int(received.shape[0]),
                                   0 if row.pixel_values is None else int(row.pixel_values.shape[0])))
                return out

            trainer._prepare = recording_prepare
            initial_vision = {n: p.detach().full_tensor().clone() for n, p in trainer.model.named_parameters()
                              if n.startswith("vision.")}
            resumed_at = trainer.step
            initial = full_state(trainer.model, trainer.layouts)
            losses = trainer.train(max_steps=args.max_steps)
        assert isinstance(trainer.source, (SyntheticSource, TextOnlyOddRows))
        vision = {n: p.detach().full_tensor() for n, p in trainer.model.named_parameters() if n.startswith("vision.")}
        # TP replicas of the vision tower: equal bit for bit across the TP group?
        flat = torch.cat([v.flatten().double() for v in vision.values()])
        gathered = [torch.empty_like(flat) for _ in range(args.tp)]
        dist.all_gather(gathered, flat, group=parallel_state.get_tensor_model_parallel_group())
        replicas_identical = all(torch.equal(g, gathered[0]) for g in gathered)
        unchanged = {n: torch.equal(vision[n], initial_vision[n]) for n in vision}
        weights = full_state(trainer.model, trainer.layouts)
        results[dtype] = {
            "losses": torch.tensor(losses, dtype=torch.float64),
            "grad_norms": torch.tensor([m["grad_norm"] for m in trainer.history], dtype=torch.float64),
            "weights": weights, "initial": initial, "resumed_at": resumed_at,
            "vision_replicas_identical": replicas_identical,
            "tower_unchanged": all(v for n, v in unchanged.items() if not n.startswith("vision.merger.")),
            "merger_unchanged": all(v for n, v in unchanged.items() if n.startswith("vision.merger.")),
            "collective_devices": sorted({d for _, devices in double.calls for d in devices}),
            "collectives": len(double.calls),
            "pixel_rows": pixel_rows,
        }
        flags = torch.tensor([float(replicas_identical)], device=flat.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        results[dtype]["vision_replicas_identical"] = bool(flags.item())
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    destroy_parallel()


if __name__ == "__main__":
    main()
