"""Shared fixtures: one single-process Megatron world for the CPU unit tests, tiny models."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

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


def random_hf_model(seed: int = 0, std: float = 0.05, **language_overrides):
    """A tiny HF Qwen2.5-VL with every weight random (norms too, so wrong mappings show)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_vlm.testing import tiny_hf_config

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(**tiny_hf_config(**language_overrides))
    config._attn_implementation = "sdpa"
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model
