"""Helpers every stage shares and none owns: atomic writes and JSON files (``storage``), line-checked
JSONL reading (``jsonl``), input discovery with ``--shard I/N`` and SHA-256 (``inputs``), one writer per
output (``locks``) and a process pool with a time limit per task (``workers``).

This package imports nothing else from ``megatron_vlm`` except ``cli`` (for the error type), so the
pool, synthesis, mixing, ``data`` and ``eval`` may all import it without climbing back up the data flow.
"""
