#!/usr/bin/env python
"""One LongPT training step (forward + backward + AdamW) of Qwen2.5-VL on packed rows: ours vs HF
transformers in the same run, with tokens/s, step time, peak memory and MFU.

  python tools/bench/train_step.py [--preset 7b] [--layers 4] [--lengths 8K,32K] [--dtype bf16]
                                   [--no-recompute] [--skip-hf] [--repeats 3] [--out results.json]

Rows look like the pool: pages of 2,508 tokens (a Letter page at 144 DPI, grid 1x114x88) with a
short question and answer per document, documents of pool-native lengths packed up to the row
length. The 7B geometry keeps full width and the full vision tower; ``--layers`` cuts LM depth so
that the defaults (4 layers, full recompute, 8K and 32K) fit one 80 GB GPU: the memory planner
(megatron_vlm/parallel/memory.py) is printed for every length before anything runs (about 27 and
50 GiB; 64K needs ~79 GiB, and no recompute ~80 GiB at 8K, 282 GiB at 32K).

Each side runs alone: our model is built, measured at every length and freed before HF's is built,
so each peak (``torch.cuda.max_memory_allocated`` after a warm-up step, reset per length; on CPU
the process's peak RSS) holds only that side's model, gradients, AdamW states and activations.
An out-of-memory step is recorded as "oom" and the run goes on. ``--out`` writes everything as
JSON. FLOPs count Σ sᵢ² attention per document and the ViT's windows (training/flops.py); MFU uses
the GPU's dense bf16 peak. HF runs its best attention on the machine: flash_attention_2 packed with
cu_seqlens when flash-attn is installed, else SDPA one document at a time (the same work; HF's SDPA
path cannot keep packed documents apart). On CPU, ``--preset tiny --lengths 2K --dtype fp32`` is a
smoke test of the script (tests/unit/test_bench_train_step.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import warnings
from typing import Optional

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from megatron_vlm.config import PRESETS, Qwen25VLConfig  # noqa: E402
from megatron_vlm.data.batch import PackedBatch  # noqa: E402
from megatron_vlm.data.rope_index import packed_mrope_positions  # noqa: E402
from megatron_vlm.parallel.memory import (STATIC_PREFIXES, Layout, MemoryPlan, Workload, lm_parameters, plan_memory,  # noqa: E402
                                          vision_parameters)
from megatron_vlm.training.flops import peak_flops, training_step_flops  # noqa: E402

PAGE_GRID = (1, 114, 88)  # 1596 x 1232 px -> 2,508 tokens
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def parse_length(text: str) -> int:
    text = text.strip().upper()
    return int(float(text[:-1]) * 1024) if text.endswith("K") else int(text)


def row_documents(cfg: Qwen25VLConfig, length: int, grid: tuple, seed: int) -> list[tuple[list, list, int]]:
    """Documents of 8-50 pages (pool-native) packed until ``length``, as (token ids, loss mask,
    pages); the last one is cut to fit. No pixels: the memory plan needs only the layout."""
    g = torch.Generator().manual_seed(seed)
    page_tokens = grid[0] * grid[1] * grid[2] // cfg.vision.merge_unit
    docs = []
    remaining = length
    while remaining > page_tokens + 64:
        pages = min(int(torch.randint(8, 51, (1,), generator=g)), (remaining - 64) // (page_tokens + 2))
        doc = []
        for _ in range(pages):
            doc += [cfg.vision_start_token_id] + [cfg.image_token_id] * page_tokens + [cfg.vision_end_token_id]
        question, answer = torch.randint(10, 150000, (40,), generator=g).tolist(), torch.randint(
            10, 150000, (12,), generator=g).tolist()
        doc += question + answer
        mask = [0.0] * (len(doc) - len(answer) - 1) + [1.0] * len(answer) + [0.0]
        docs.append((doc, mask, pages))
        remaining -= len(doc)
    return docs


def make_row(cfg: Qwen25VLConfig, length: int, grid: tuple, seed: int) -> PackedBatch:
    docs = row_documents(cfg, length, grid, seed)
    g = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.cat([torch.tensor(doc) for doc, _, _ in docs])
    masks = torch.cat([torch.tensor(mask) for _, mask, _ in docs])
    lengths = [len(doc) for doc, _, _ in docs]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    grid_t = torch.tensor([list(grid)] * sum(pages for _, _, pages in docs))
    patches = int((grid_t[:, 0] * grid_t[:, 1] * grid_t[:, 2]).sum())
    return PackedBatch(input_ids[None], torch.roll(input_ids, -1)[None], masks[None],
                       packed_mrope_positions(input_ids, cu, grid_t)[:, None], cu, max(lengths),
                       torch.randn(patches, cfg.vision.patch_dim, generator=g), grid_t, int(masks.sum()))


def bench_plan(cfg: Qwen25VLConfig, length: int, grid: tuple, recompute: bool, dtype_bytes: int = 2) -> MemoryPlan:
    """The memory planner's estimate for *our* side of this benchmark on one GPU (TP = CP = DP = 1):
    the planner's activation terms for this row's real image share and supervised tokens, with the
    static terms of what the bench holds (weights and gradients in the model dtype, and
    ``torch.optim.AdamW``'s two states in that dtype: no fp32 master copy)."""
    docs = row_documents(cfg, length, grid, seed=length)
    tokens = sum(len(doc) for doc, _, _ in docs)
    images = sum(doc.count(cfg.image_token_id) for doc, _, _ in docs)
    supervised = int(sum(sum(mask) for _, mask, _ in docs))
    work = Workload(tokens, image_token_share=images / tokens, logit_tokens=supervised, recompute=recompute)
    plan = plan_memory(cfg, Layout(), work)
    params = lm_parameters(cfg.language, 1) + vision_parameters(cfg.vision, cfg.language.hidden_size)
    static = {"weights": dtype_bytes * params, "gradients": dtype_bytes * params,
              "AdamW states (2, model dtype)": 2 * dtype_bytes * params}
    dynamic = {k: v for k, v in plan.parts.items() if not k.startswith(STATIC_PREFIXES)}
    return MemoryPlan(plan.layout, plan.workload, {**static, **dynamic})


def step_ours(model, optimizer, row: PackedBatch) -> None:
    from megatron_vlm.models.qwen2_5_vl import packed_seq_params

    index = torch.nonzero(row.loss_mask[0], as_tuple=True)[0]
    loss = model(row.input_ids, row.position_ids, row.pixel_values, row.image_grid_thw,
                 packed_seq_params=packed_seq_params(row.cu_seqlens, row.max_seqlen), labels=row.labels,
                 output_index=index)
    (loss.sum() / row.num_loss_tokens).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_hf(model, optimizer, row: PackedBatch, packed: bool) -> None:
    logits_loss = torch.nn.functional.cross_entropy
    bounds = row.cu_seqlens.tolist()
    pages = (row.image_grid_thw[:, 1] * row.image_grid_thw[:, 2]).tolist()
    if packed:  # flash-attention-2 with cu_seqlens: one call, documents kept apart
        out = model.model(input_ids=row.input_ids, pixel_values=row.pixel_values, image_grid_thw=row.image_grid_thw,
                          position_ids=row.position_ids, cu_seq_lens_q=row.cu_seqlens, cu_seq_lens_k=row.cu_seqlens,
                          max_length_q=row.max_seqlen, max_length_k=row.max_seqlen)
        hidden = out.last_hidden_state[0]
        index = torch.nonzero(row.loss_mask[0], as_tuple=True)[0]
        loss = logits_loss(model.lm_head(hidden[index]).float(), row.labels[0, index], reduction="sum")
        (loss / row.num_loss_tokens).backward()
    else:
        image, patch = 0, 0
        for start, end in zip(bounds[:-1], bounds[1:]):
            ids = row.input_ids[:, start:end]
            n_images = int((ids == 151652).sum())
            n_patches = sum(pages[image:image + n_images])
            hidden = model.model(input_ids=ids, pixel_values=row.pixel_values[patch:patch + n_patches],
                                 image_grid_thw=row.image_grid_thw[image:image + n_images]).last_hidden_state[0]
            image, patch = image + n_images, patch + n_patches
            index = torch.nonzero(row.loss_mask[0, start:end], as_tuple=True)[0]
            loss = logits_loss(model.lm_head(hidden[index]).float(), row.labels[0, start + index], reduction="sum")
            (loss / row.num_loss_tokens).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


GIB = 1024**3
ALLOCATOR_SLACK = 0.92  # as tools/bench/memory_estimator.py: 8% of the GPU for fragmentation


def reset_peak_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:  # Linux: writing 5 resets the process's peak RSS (VmHWM) to the current RSS
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_memory_gib(device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / GIB
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 / GIB
    except (OSError, StopIteration, ValueError):
        return None


def measure(step, repeats: int, device) -> tuple[float, Optional[float]]:
    """Seconds per step and peak GiB over ``repeats`` steps after one warm-up step (allocations,
    kernels, autotuning, and AdamW's lazily created states, which the peak then includes)."""
    step()
    reset_peak_memory(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats, peak_memory_gib(device)


def free_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="7b", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=4, help="LM layers kept (full width, full ViT)")
    parser.add_argument("--lengths", default="8K,32K")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=True,
                        help="full activation recompute of LM layers and ViT blocks, both sides (default on)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--page-grid", default=None, help="t,h,w of each page's patch grid (default Letter)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="budget the plan is checked against")
    parser.add_argument("--out", default=None, help="write the plan and every result as JSON here")
    return parser


def model_config(args) -> Qwen25VLConfig:
    cfg = PRESETS[args.preset]()
    cfg.language.num_layers = args.layers
    return cfg


def page_grid(args) -> tuple:
    if args.page_grid:
        return tuple(int(v) for v in args.page_grid.split(","))
    return PAGE_GRID if args.preset != "tiny" else (1, 8, 8)


def run_side(impl: str, build, rows: dict, args, device, dtype, peak: float, flops: dict, step) -> list[dict]:
    """Build one side's model, measure every row, free it. OOM (at build or in a step) -> "oom"."""
    results = []
    try:
        model = build()
    except OOM:
        model = None
    if model is None:
        free_memory(device)
        return [{"impl": impl, "length": length, "tokens": int(row.cu_seqlens[-1]), "status": "oom",
                 "error": "out of memory building the model"} for length, row in rows.items()]
    for length, row_cpu in rows.items():
        tokens = int(row_cpu.cu_seqlens[-1])
        entry = {"impl": impl, "length": length, "tokens": tokens}
        row = optimizer = None
        oom = False
        try:
            row = row_cpu.to(device)
            row.pixel_values = row.pixel_values.to(dtype)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
            seconds, memory = measure(lambda: step(model, optimizer, row), args.repeats, device)
        except OOM:
            oom = True  # cleaned up below, outside the handler, once the traceback's frames are gone
        if oom:
            entry.update(status="oom", peak_memory_gib=peak_memory_gib(device))
        else:
            entry.update(status="ok", step_s=seconds, tokens_per_s=tokens / seconds,
                         tflops_per_s=flops[length] / seconds / 1e12,
                         mfu=flops[length] / seconds / peak if peak else None, peak_memory_gib=memory)
        results.append(entry)
        for p in model.parameters():
            p.grad = None
        del row, optimizer
        free_memory(device)
    del model
    free_memory(device)
    return results


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_vlm.checkpoint.convert import build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = model_config(args)
    grid = page_grid(args)
    lengths = [parse_length(x) for x in args.lengths.split(",")]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = peak_flops(device_name) if device.type == "cuda" else 0.0
    try:
        import flash_attn  # noqa: F401
        hf_attention = "flash_attention_2"
    except ImportError:
        hf_attention = "sdpa"
    print(f"device {device_name}, torch {torch.__version__}, Qwen2.5-VL-{args.preset} geometry with {args.layers} "
          f"LM layers, {args.dtype}, recompute {'on' if args.recompute else 'off'}, HF attention {hf_attention}")

    budget = args.gpu_memory_gib * GIB * ALLOCATOR_SLACK
    plans = []
    print(f"memory plan of our side on one GPU (megatron_vlm/parallel/memory.py), budget {args.gpu_memory_gib:g} GiB "
          f"x {ALLOCATOR_SLACK}:")
    for length in lengths:
        plan = bench_plan(cfg, length, grid, args.recompute, dtype_bytes=2 if args.dtype == "bf16" else 4)
        fits = plan.total <= budget
        plans.append({"length": length, "total_gib": plan.total / GIB, "fits": fits,
                      "parts_gib": {k: v / GIB for k, v in plan.parts.items()}})
        print(f"  {length // 1024:>4}K  {plan.total / GIB:7.1f} GiB  {'fits' if fits else 'DOES NOT FIT (may OOM)'}  ("
              + ", ".join(f"{k} {v / GIB:.1f}" for k, v in plan.parts.items() if v >= 0.05 * GIB) + ")")

    rows, flops = {}, {}
    for length in lengths:
        row = make_row(cfg, length, grid, seed=length)
        rows[length] = row
        doc_lengths = (row.cu_seqlens[1:] - row.cu_seqlens[:-1]).tolist()
        flops[length] = training_step_flops(cfg, doc_lengths, row.image_grid_thw.tolist(), row.num_loss_tokens)

    def build_ours():
        torch.manual_seed(0)
        return build_model(cfg, dtype, recompute=args.recompute).to(device).train()

    def build_hf():
        hf_config = Qwen2_5_VLConfig(**cfg.to_hf_dict(torch_dtype="bfloat16" if args.dtype == "bf16" else "float32"))
        hf_config._attn_implementation = hf_attention
        torch.manual_seed(0)
        with torch.device(device):  # initialise on the GPU: no fp32 copy in host memory
            hf = Qwen2_5_VLForConditionalGeneration(hf_config)
        hf = hf.to(dtype=dtype).train()
        if args.recompute:
            hf.gradient_checkpointing_enable()
        return hf

    results = run_side("ours", build_ours, rows, args, device, dtype, peak, flops, step_ours)
    if not args.skip_hf:
        results += run_side("hf", build_hf, rows, args, device, dtype, peak, flops,
                            lambda model, opt, row: step_hf(model, opt, row, hf_attention == "flash_attention_2"))

    print(f"{'length':>7} {'impl':>6} {'status':>6} {'step s':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'peak GiB':>9}  ratio")
    by_key = {(r["impl"], r["length"]): r for r in results}
    speedup = {}
    for r in sorted(results, key=lambda r: (r["length"], r["impl"] != "ours")):
        hf = by_key.get(("hf", r["length"]))
        ratio = ""
        if r["impl"] == "ours" and r["status"] == "ok" and hf is not None:
            if hf["status"] == "ok":
                speedup[str(r["length"])] = hf["step_s"] / r["step_s"]
                ratio = f"{speedup[str(r['length'])]:.2f}x HF"
            else:
                ratio = f"HF {hf['status']}"
        memory = f"{r['peak_memory_gib']:9.1f}" if r.get("peak_memory_gib") is not None else f"{'n/a':>9}"
        if r["status"] == "ok":
            mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] else "  n/a"
            print(f"{r['length'] // 1024:>6}K {r['impl']:>6} {'ok':>6} {r['step_s']:8.3f} {r['tokens_per_s']:10.0f} "
                  f"{r['tflops_per_s']:8.1f} {mfu} {memory}  {ratio}")
        else:
            print(f"{r['length'] // 1024:>6}K {r['impl']:>6} {r['status']:>6} {'':>8} {'':>10} {'':>8} {'':>6} {memory}")

    report = {
        "bench": "train_step", "device": device_name, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "preset": args.preset, "layers": args.layers,
        "dtype": args.dtype, "recompute": args.recompute, "repeats": args.repeats, "hf_attention": hf_attention,
        "page_grid": list(grid), "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss",
        "gpu_memory_gib": args.gpu_memory_gib, "plan": plans, "results": results, "speedup_vs_hf": speedup,
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
