#!/usr/bin/env python
"""mRoPE throughput on one GPU: fused kernels vs the unfused PyTorch path, its torch.compile, and
Megatron-Core's rotary path, for Qwen2.5-VL-7B shapes (q: 28 heads, k: 4 heads, head_dim 128).

  python tools/bench/mrope.py [--tokens 32768,131072] [--dtype bf16] [--peak-bandwidth-tbs auto]

Bandwidth = bytes of q and k read + written (+ positions and frequencies for the fused kernels,
+ the cos/sin tables the unfused paths materialise) / time; reported against the GPU's peak and
as a speed ratio to every baseline, all measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402

from megatron_vlm.kernels import mrope  # noqa: E402

SECTION = (16, 24, 24)
PEAK_TBS = {"H100": 3.35, "H200": 4.8, "A100": 2.0, "H20": 4.0}


def timed(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="32768,131072")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--peak-bandwidth-tbs", default="auto")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tools/bench/mrope.py needs a CUDA GPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    name = torch.cuda.get_device_name()
    peak = (next((v for k, v in PEAK_TBS.items() if k in name.upper()), 0.0) if args.peak_bandwidth_tbs == "auto"
            else float(args.peak_bandwidth_tbs)) * 1e12
    print(f"{name}, torch {torch.__version__}, {args.dtype}, peak {peak / 1e12:.2f} TB/s")
    inv = mrope.inverse_frequencies(128, 4e6, device="cuda")

    def unfused(q, k, pos):
        cos, sin = mrope.mrope_cos_sin(pos, inv, SECTION)
        return mrope.apply_rotary(q, cos, sin), mrope.apply_rotary(k, cos, sin)

    compiled = torch.compile(unfused)
    for tokens in (int(t) for t in args.tokens.split(",")):
        q = torch.randn(tokens, 28, 128, device="cuda", dtype=dtype)
        k = torch.randn(tokens, 4, 128, device="cuda", dtype=dtype)
        pos = torch.randint(0, tokens, (3, tokens), device="cuda")
        qk_bytes = 2 * (q.numel() + k.numel()) * q.element_size()
        candidates = {"unfused": lambda: unfused(q, k, pos), "torch.compile": lambda: compiled(q, k, pos)}
        for backend in ("cuda", "triton"):
            try:
                mrope.select_mrope_backend(q, backend)
            except RuntimeError:
                continue
            candidates[f"fused-{backend}"] = (lambda b=backend: (mrope.apply_mrope_fused(q, pos, inv, SECTION, b),
                                                                 mrope.apply_mrope_fused(k, pos, inv, SECTION, b)))
        try:
            from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding
            from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
            from megatron.core.transformer.transformer_config import TransformerConfig

            mcfg = TransformerConfig(num_layers=1, hidden_size=3584, num_attention_heads=28, apply_rope_fusion=False)
            mrot = MultimodalRotaryEmbedding(kv_channels=128, rotary_base=4e6).cuda()
            qs, ks, pos3 = q[:, None], k[:, None], pos[:, None, :]
            candidates["megatron-core"] = lambda: (
                apply_rotary_pos_emb(qs, freqs := mrot(pos3, list(SECTION)), mcfg),
                apply_rotary_pos_emb(ks, freqs, mcfg))
        except Exception as err:  # megatron-core not installed on this machine
            print(f"  (megatron-core baseline unavailable: {type(err).__name__}: {err})")
        times = {label: timed(fn) for label, fn in candidates.items()}
        print(f"T = {tokens}:")
        for label, seconds in times.items():
            bandwidth = qk_bytes / seconds
            share = f" = {100 * bandwidth / peak:.0f}% of peak" if peak else ""
            ratios = ", ".join(f"{times[o] / seconds:.2f}x vs {o}" for o in times if o != label)
            print(f"  {label:14s} {seconds * 1e6:9.1f} us  {bandwidth / 1e12:6.2f} TB/s{share}  ({ratios})")


if __name__ == "__main__":
    main()
