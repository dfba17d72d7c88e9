#!/usr/bin/env python
"""Write a tiny random Qwen2.5-VL checkpoint in Hugging Face format (no download needed).

  python tools/make_tiny_checkpoint.py OUT_DIR [--seed 0] [--tie-word-embeddings]

It has the real architecture (ViT with window + full attention, merger, GQA mRoPE decoder) at a
few MB, saved by transformers itself, so every tool can be exercised on a laptop.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--std", type=float, default=0.05, help="std of the random weights (norms too)")
    parser.add_argument("--tie-word-embeddings", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    from megatron_vlm.testing import random_hf_model

    model = random_hf_model(args.seed, args.std, tie_word_embeddings=args.tie_word_embeddings)
    model.save_pretrained(args.out_dir)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote a tiny random Qwen2.5-VL ({n / 1e6:.1f}M parameters) to {args.out_dir}")


if __name__ == "__main__":
    main()
