#!/usr/bin/env python
"""One LongPT training step (forward + backward + AdamW) of Qwen2.5-VL on packed rows: ours vs HF
transformers in the same run, with tokens/s, step time, peak memory and MFU.

  python tools/bench/train_step.py [--preset 7b] [--layers 4] [--lengths 8K,32K,64K,128K]
                                   [--dtype bf16] [--skip-hf] [--repeats 3]

Rows look like the pool: pages of 2,508 tokens (a Letter page at 144 DPI, grid 1x114x88) with a
short question and answer per document, documents of pool-native lengths packed up to the row
length. The 7B geometry keeps full width and the full vision tower; ``--layers`` cuts LM depth to
fit one GPU. FLOPs count Σ sᵢ² attention per document and the ViT's windows (training/flops.py);
MFU uses the GPU's dense bf16 peak. HF runs its best attention on the machine: flash_attention_2
packed with cu_seqlens when flash-attn is installed, else SDPA one document at a time (the same
work; HF's SDPA path cannot keep packed documents apart). On CPU use e.g. ``--preset tiny
--lengths 2K --dtype fp32`` as a smoke test of the script.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from megatron_vlm.config import PRESETS, Qwen25VLConfig  # noqa: E402
from megatron_vlm.data.batch import PackedBatch  # noqa: E402
from megatron_vlm.data.rope_index import packed_mrope_positions  # noqa: E402
from megatron_vlm.training.flops import peak_flops, training_step_flops  # noqa: E402

PAGE_GRID = (1, 114, 88)  # 1596 x 1232 px -> 2,508 tokens


def parse_length(text: str) -> int:
    text = text.strip().upper()
    return int(float(text[:-1]) * 1024) if text.endswith("K") else int(text)


def make_row(cfg: Qwen25VLConfig, length: int, grid: tuple, seed: int) -> PackedBatch:
    """Documents of 8-50 pages (pool-native), packed until ``length``; the last one is cut to fit."""
    g = torch.Generator().manual_seed(seed)
    page_tokens = grid[0] * grid[1] * grid[2] // cfg.vision.merge_unit
    ids, masks, grids, lengths = [], [], [], []
    remaining = length
    while remaining > page_tokens + 64:
        pages = min(int(torch.randint(8, 51, (1,), generator=g)), (remaining - 64) // (page_tokens + 2))
        doc = []
        for _ in range(pages):
            doc += [cfg.vision_start_token_id] + [cfg.image_token_id] * page_tokens + [cfg.vision_end_token_id]
            grids.append(list(grid))
        question, answer = torch.randint(10, 150000, (40,), generator=g).tolist(), torch.randint(
            10, 150000, (12,), generator=g).tolist()
        doc += question + answer
        mask = [0.0] * (len(doc) - len(answer) - 1) + [1.0] * len(answer) + [0.0]
        ids.append(torch.tensor(doc))
        masks.append(torch.tensor(mask))
        lengths.append(len(doc))
        remaining -= len(doc)
    input_ids = torch.cat(ids)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    grid_t = torch.tensor(grids)
    patches = int((grid_t[:, 0] * grid_t[:, 1] * grid_t[:, 2]).sum())
    return PackedBatch(input_ids[None], torch.roll(input_ids, -1)[None], torch.cat(masks)[None],
                       packed_mrope_positions(input_ids, cu, grid_t)[:, None], cu, max(lengths),
                       torch.randn(patches, cfg.vision.patch_dim, generator=g), grid_t,
                       int(torch.cat(masks).sum()))


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


def measure(step, repeats: int, device) -> tuple[float, float]:
    step()  # warm-up (allocations, kernels, autotuning)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    memory = torch.cuda.max_memory_allocated() / 1024**3 if device.type == "cuda" else float("nan")
    return seconds, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="7b", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=4, help="LM layers kept (full width, full ViT)")
    parser.add_argument("--lengths", default="8K,32K,64K,128K")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--page-grid", default=None, help="t,h,w of each page's patch grid (default Letter)")
    args = parser.parse_args()

    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_vlm.checkpoint.convert import build_model, load_hf_tensors

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = PRESETS[args.preset]()
    cfg.language.num_layers = args.layers
    grid = tuple(int(v) for v in args.page_grid.split(",")) if args.page_grid else (
        PAGE_GRID if args.preset != "tiny" else (1, 8, 8))
    peak = peak_flops(torch.cuda.get_device_name()) if device.type == "cuda" else 0.0
    try:
        import flash_attn  # noqa: F401
        hf_attention = "flash_attention_2"
    except ImportError:
        hf_attention = "sdpa"
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"Qwen2.5-VL-{args.preset} geometry with {args.layers} LM layers, {args.dtype}, HF attention {hf_attention}")
    print(f"{'length':>7} {'impl':>6} {'step s':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}  ratio")

    hf_config = Qwen2_5_VLConfig(**cfg.to_hf_dict(torch_dtype="bfloat16" if args.dtype == "bf16" else "float32"))
    hf_config._attn_implementation = hf_attention
    torch.manual_seed(0)
    ours = build_model(cfg, dtype, recompute=args.recompute).to(device).train()
    for length in (parse_length(x) for x in args.lengths.split(",")):
        row = make_row(cfg, length, grid, seed=length).to(device)
        row.pixel_values = row.pixel_values.to(dtype)
        doc_lengths = (row.cu_seqlens[1:] - row.cu_seqlens[:-1]).tolist()
        flops = training_step_flops(cfg, doc_lengths, row.image_grid_thw.tolist(), row.num_loss_tokens)
        tokens = int(row.cu_seqlens[-1])
        results = {}
        optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-5, fused=device.type == "cuda")
        results["ours"] = measure(lambda: step_ours(ours, optimizer, row), args.repeats, device)
        del optimizer
        if not args.skip_hf:
            hf = Qwen2_5_VLForConditionalGeneration(hf_config).to(device=device, dtype=dtype).train()
            if args.recompute:
                hf.gradient_checkpointing_enable()
            hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, fused=device.type == "cuda")
            try:
                results["hf"] = measure(lambda: step_hf(hf, hf_opt, row, hf_attention == "flash_attention_2"),
                                        args.repeats, device)
            except torch.OutOfMemoryError:
                results["hf"] = (float("inf"), float("nan"))
            del hf, hf_opt
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for impl, (seconds, memory) in results.items():
            ratio = results["hf"][0] / seconds if "hf" in results and impl == "ours" else float("nan")
            mfu = f"{100 * flops / seconds / peak:5.1f}%" if peak and seconds != float("inf") else "  n/a"
            print(f"{length // 1024:>6}K {impl:>6} {seconds:8.3f} {tokens / seconds:10.0f} {flops / seconds / 1e12:8.1f} "
                  f"{mfu} {memory:9.1f}  {'' if ratio != ratio else f'{ratio:.2f}x HF'}")


if __name__ == "__main__":
    main()
