"""Shared fixtures: one single-process Megatron world for the CPU unit tests, tiny models."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from megatron_vlm.testing import random_hf_model  # noqa: F401  (re-exported for tests)

warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
warnings.filterwarnings("ignore", category=FutureWarning)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def megatron_world():
    """A world of one process (gloo on CPU) with Megatron's TP=1 groups."""
    from megatron_vlm.parallel import initialize_parallel

    initialize_parallel(tensor_parallel=1)
    yield
