#!/usr/bin/env python
"""mRoPE throughput on one GPU: fused kernels vs the unfused PyTorch path, its torch.compile, and
Megatron-Core's rotary path, for Qwen2.5-VL-7B shapes (q: 28 heads, k: 4 heads, head_dim 128).

  python tools/bench/mrope.py [--tokens 32768,131072] [--dtype bf16] [--peak-bandwidth-tbs auto]
                              [--repeats 50] [--out results.json]

Achieved bandwidth = bytes of q and k read + written / time (the traffic a perfect kernel cannot
avoid; positions, frequencies and any cos/sin tables are not credited), reported as GB/s, as a
fraction of the GPU's peak HBM bandwidth and as a speed ratio to every baseline, all measured in
the same run. ``--out`` writes every number as JSON. Takes well under two minutes on an H100/H200
(most of it torch.compile).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402

from megatron_vlm.kernels import mrope  # noqa: E402

SECTION = (16, 24, 24)
# Peak HBM bandwidth in TB/s by device-name substring; the longest matching key wins.
PEAK_TBS = {"H100": 3.35, "H100 PCIE": 2.0, "H100 NVL": 3.9, "H200": 4.8, "A100": 2.0, "A100-SXM4-80GB": 2.04,
            "H20": 4.0, "B200": 8.0, "GH200": 4.0}


def peak_bandwidth_tbs(device_name: str) -> float:
    """TB/s of the GPU's HBM from its name (0 when unknown: fractions of peak are then omitted)."""
    upper = device_name.upper()
    keys = sorted((k for k in PEAK_TBS if k.upper() in upper), key=len, reverse=True)
    return PEAK_TBS[keys[0]] if keys else 0.0


def record(label: str, tokens: int, seconds: float, moved_bytes: int, peak_bytes_per_s: float,
           times: dict) -> dict:
    """One JSON result: time, achieved GB/s, fraction of peak and speed ratio to the others."""
    bandwidth = moved_bytes / seconds
    return {"impl": label, "tokens": tokens, "seconds": seconds, "bytes": moved_bytes,
            "achieved_gb_per_s": bandwidth / 1e9,
            "fraction_of_peak": bandwidth / peak_bytes_per_s if peak_bytes_per_s else None,
            "speedup_vs": {other: times[other] / seconds for other in times if other != label}}


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
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=None, help="write every result as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tools/bench/mrope.py needs a CUDA GPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    name = torch.cuda.get_device_name()
    peak = (peak_bandwidth_tbs(name) if args.peak_bandwidth_tbs == "auto" else float(args.peak_bandwidth_tbs)) * 1e12
    results, errors = [], []
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
        times = {}
        for label, fn in candidates.items():
            try:
                times[label] = timed(fn, args.repeats)
            except Exception as err:  # one failing baseline (e.g. torch.compile) must not lose the rest
                errors.append({"impl": label, "tokens": tokens, "error": f"{type(err).__name__}: {err}"})
                print(f"  {label}: failed: {type(err).__name__}: {err}")
        print(f"T = {tokens}:")
        for label, seconds in times.items():
            entry = record(label, tokens, seconds, qk_bytes, peak, times)
            results.append(entry)
            share = f" = {100 * entry['fraction_of_peak']:.0f}% of peak" if peak else ""
            ratios = ", ".join(f"{r:.2f}x vs {o}" for o, r in entry["speedup_vs"].items())
            print(f"  {label:14s} {seconds * 1e6:9.1f} us  {entry['achieved_gb_per_s']:8.0f} GB/s{share}  ({ratios})")
        del q, k, pos, candidates
        torch.cuda.empty_cache()
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"bench": "mrope", "device": name, "torch": torch.__version__, "dtype": args.dtype,
                       "peak_bandwidth_gb_per_s": peak / 1e9, "repeats": args.repeats,
                       "bytes_counted": "q and k, read + written", "results": results, "errors": errors}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
