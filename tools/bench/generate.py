#!/usr/bin/env python
"""Greedy generation speed of the ``megatron:`` eval backend: KV cache (one prefill, the vision
tower once, one token per decode step) vs the old full recompute (the whole sequence, images
included, once per new token), on the same prompt of page images.

  python tools/bench/generate.py [--tokens 2048,4096] [--new-tokens 16] [--threads N]
                                 [--model-dir MEGATRON_DIR] [--page-size 448] [--skip-recompute]
                                 [--out results.json]

Without ``--model-dir`` a tiny random Qwen2.5-VL (``megatron_vlm.testing``) is converted into a
temporary folder. For each prompt length it prints the prompt tokens, seconds of both paths, the
speedup (recompute / cached) and whether both produced the same ids. ``--out`` writes the rows
as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402


def make_instance(folder: str, pages: int, size: int, seed: int = 0):
    """An instance of ``pages`` random page images (``size`` x ``size`` pixels) of one document."""
    from PIL import Image

    from megatron_vlm.eval.build import Instance
    from megatron_vlm.eval.data import ContextItem

    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(pages):
        path = os.path.join(folder, f"page{size}_{i}.png")
        if not os.path.exists(path):
            pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(path)
        items.append(ContextItem("page", "doc", i + 1, path, 0, None, "gold"))
    return Instance("bench", "x", 0, "docqa", "What is written on page 1?", "x", "String", "doc", [1], items, 0,
                    "whole", 0)


def instance_of_length(backend, folder: str, tokens: int, size: int):
    """Add pages until the prompt holds at least ``tokens`` tokens."""
    one = backend.inputs(make_instance(folder, 1, size))[0].numel()
    two = backend.inputs(make_instance(folder, 2, size))[0].numel()
    per_page = two - one
    pages = max(1, 1 + -(-(tokens - one) // per_page))
    inst = make_instance(folder, pages, size)
    return inst, backend.inputs(inst)[0].numel()


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def tiny_model_dir(folder: str) -> str:
    from megatron_vlm.checkpoint.convert import hf_to_megatron
    from megatron_vlm.testing import random_hf_model

    random_hf_model(seed=5).save_pretrained(os.path.join(folder, "hf"))
    hf_to_megatron(os.path.join(folder, "hf"), os.path.join(folder, "meg"), log=lambda _: None)
    return os.path.join(folder, "meg")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="2048,4096", help="prompt lengths, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--model-dir", help="a megatron-vlm model folder (default: a tiny random one)")
    parser.add_argument("--dtype", default="", help="fp32|bf16 (default: the checkpoint's)")
    parser.add_argument("--device", default="", help="cpu|cuda (default: cuda when available)")
    parser.add_argument("--page-size", type=int, default=448, help="page side in pixels (448: 256 tokens)")
    parser.add_argument("--skip-recompute", action="store_true", help="time the cached path only")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from megatron_vlm.eval.backends import GenerationConfig, MegatronBackend, parse_model_spec
    from megatron_vlm.parallel import initialize_parallel

    initialize_parallel(tensor_parallel=1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or tiny_model_dir(tmp)
        options = "".join(f",{k}={v}" for k, v in (("dtype", args.dtype), ("device", args.device)) if v)
        backend = MegatronBackend(parse_model_spec(f"megatron:{model_dir}{options}"),
                                  GenerationConfig(max_new_tokens=args.new_tokens))
        print(f"threads={torch.get_num_threads()} device={backend.device} dtype={backend.dtype} "
              f"new_tokens={args.new_tokens}", flush=True)
        for target in [int(t) for t in args.tokens.split(",") if t]:
            inst, prompt = instance_of_length(backend, tmp, target, args.page_size)
            backend.generate_ids(make_instance(tmp, 1, args.page_size))  # warm-up
            cached_ids, cached_s = timed(backend.generate_ids, inst)
            row = {"target_tokens": target, "prompt_tokens": prompt, "pages": len(inst.items),
                   "new_tokens": len(cached_ids), "cached_s": round(cached_s, 3)}
            if not args.skip_recompute:
                old_ids, old_s = timed(backend.generate_ids_recompute, inst)
                row.update(recompute_s=round(old_s, 3), speedup=round(old_s / cached_s, 2),
                           same_ids=old_ids == cached_ids)
            rows.append(row)
            print(json.dumps(row), flush=True)
        backend.close()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
