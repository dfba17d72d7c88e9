"""Evaluation: MMLongBench-style long-document VQA at 8K-512K (and a needle-in-a-haystack suite).

``data`` reads examples (MMLongBench files, our held-out Samples, needles over a pool), ``build``
instantiates each at a token budget (trim around the evidence, or pad with whole negative
documents), ``prompt`` renders it, ``backends`` generate (OpenAI-compatible endpoint, transformers,
our Megatron model), ``judge``/``scoring`` score (LLM judge or rules) and ``report`` aggregates.
The CLI is ``tools/evaluate.py``.
"""
