#!/usr/bin/env python
"""Write a tiny random Qwen2.5-VL model directory in Hugging Face format (no download needed).

  python tools/make_tiny_checkpoint.py OUT_DIR [--preset tiny-serve|tiny] [--seed 0] [--std 0.05]
      [--tie-word-embeddings | --no-tie-word-embeddings] [--dtype float32|bfloat16]

It has the real architecture (ViT with window + full attention, merger, GQA mRoPE decoder) at a
few tens of MB, saved by transformers itself, so every tool can be exercised on a laptop. The
directory is complete, as a served model needs it: weights and config.json, the Qwen2.5-VL
tokenizer (tokenizer.json, vocab.json, merges.txt, tokenizer_config.json; rebuilt offline, see
megatron_vlm/data/tokenizer.py), the chat template (chat_template.jinja), the image processor's
settings (preprocessor_config.json) and generation_config.json. It loads with
``AutoProcessor.from_pretrained(OUT_DIR)`` and ``Qwen2_5_VLForConditionalGeneration.from_pretrained``
and can be given to ``vllm serve OUT_DIR`` (see README, "Serve the export with vLLM").

Presets: ``tiny-serve`` (the default) has attention head size 32 in the decoder and the ViT (vLLM's
CPU attention supports 32 and up) and tied embeddings; ``tiny`` is the 16-wide model of the unit
tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from megatron_vlm import cli  # noqa: E402

SERVABLE_PRESETS = ("tiny-serve", "tiny")


def image_processor_config() -> dict:
    """Qwen2.5-VL's published preprocessor_config.json, from the constants our own preprocessing uses."""
    from megatron_vlm.data.image_processing import (IMAGE_MEAN, IMAGE_STD, MAX_PIXELS, MERGE_SIZE, MIN_PIXELS,
                                                    PATCH_SIZE, TEMPORAL_PATCH_SIZE)

    return {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD), "rescale_factor": 1 / 255,
        "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        "patch_size": PATCH_SIZE, "temporal_patch_size": TEMPORAL_PATCH_SIZE, "merge_size": MERGE_SIZE,
        "resample": 3,  # bicubic
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    }


def generation_config() -> dict:
    """Stop at <|im_end|> or <|endoftext|>; no sampling defaults (servers that read this file, as vLLM
    does, would otherwise apply them to every request that does not set its own)."""
    from megatron_vlm.data.tokenizer import ENDOFTEXT_ID, IM_END_ID

    return {"bos_token_id": ENDOFTEXT_ID, "eos_token_id": [IM_END_ID, ENDOFTEXT_ID], "pad_token_id": ENDOFTEXT_ID}


def write_model_dir(out_dir: str, preset: str = "tiny-serve", seed: int = 0, std: float = 0.05,
                    tie_word_embeddings: bool | None = None, dtype: str = "float32") -> int:
    """Write the complete directory; returns the parameter count."""
    import torch

    from megatron_vlm.data.tokenizer import QWEN25VL_CHAT_TEMPLATE, default_tokenizer_dir
    from megatron_vlm.common.storage import atomic_write_bytes, atomic_write_json
    from megatron_vlm.testing import random_hf_model

    overrides = {} if tie_word_embeddings is None else {"tie_word_embeddings": tie_word_embeddings}
    model = random_hf_model(seed, std, preset=preset, **overrides)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
        model.config.torch_dtype = torch.bfloat16
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)

    # The tokenizer with the chat template in tokenizer_config.json (where the published
    # Qwen2.5-VL has it, for readers that look only there), and the template again as
    # chat_template.jinja, the file transformers 4.57's processors and tokenizers write and read first.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_tokenizer_dir())
    tokenizer.chat_template = QWEN25VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    atomic_write_bytes(os.path.join(out_dir, "chat_template.jinja"), QWEN25VL_CHAT_TEMPLATE.encode("utf-8"))
    atomic_write_json(os.path.join(out_dir, "preprocessor_config.json"), image_processor_config())
    atomic_write_json(os.path.join(out_dir, "generation_config.json"),
                      {**generation_config(), "transformers_version": _transformers_version()})
    return sum(p.numel() for p in model.parameters())


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="the model directory to write (created if missing)")
    parser.add_argument("--preset", default="tiny-serve", choices=SERVABLE_PRESETS,
                        help="model geometry (megatron_vlm/config.py PRESETS); default: tiny-serve")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    parser.add_argument("--std", type=float, default=0.05, help="std of the random weights, norms too (default: 0.05)")
    tie = parser.add_mutually_exclusive_group()
    tie.add_argument("--tie-word-embeddings", dest="tie", action="store_true", default=None,
                     help="share the input embedding with the output layer (tiny-serve does by default)")
    tie.add_argument("--no-tie-word-embeddings", dest="tie", action="store_false",
                     help="a separate output layer (tiny does by default)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="dtype of the saved weights (default: float32)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    cli.on_stop(lambda: f"stopped: {args.out_dir} may be incomplete; rerun the same command to rewrite it")
    try:
        n = write_model_dir(args.out_dir, args.preset, args.seed, args.std, args.tie, args.dtype)
    except OSError as err:
        raise cli.UserError(f"cannot write {args.out_dir}: {err}") from None
    print(f"wrote a tiny random Qwen2.5-VL ({args.preset}, {n / 1e6:.1f}M parameters) with its tokenizer, "
          f"chat template and image processor settings to {args.out_dir}")
    return 0

if __name__ == "__main__":
    cli.run_cli(main)
