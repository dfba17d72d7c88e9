"""Mixing: synthesized long samples and short data -> one training JSONL with the recipe's task ratios,
length distribution (pool-native or long-biased) and short-data share (``mixer``)."""
