"""LongPT training: config and recipes, optimisation, loss normalisation, checkpoints, metrics, loop."""
