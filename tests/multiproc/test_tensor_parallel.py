"""TP=2 and TP=4 over gloo (torchrun processes) equal TP=1: logits, losses and every gradient.

The tiny model has 4 query heads and 2 KV groups, so TP=4 also covers Megatron's path for fewer
KV groups than ranks. The TP>1 runs load the checkpoint written at TP=1, so this also proves the
distributed checkpoint reshards on load.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import random_hf_model
from tests.multiproc.launch import torchrun

pytestmark = pytest.mark.multiproc


def _run(tp: int, meg_dir: str, out: str) -> dict:
    return torchrun("tp_worker.py", tp, ["--meg-dir", meg_dir, "--tp", str(tp)], out, timeout=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory, megatron_world):
    from megatron_vlm.checkpoint.convert import hf_to_megatron

    tmp = tmp_path_factory.mktemp("tp")
    random_hf_model(seed=1).save_pretrained(tmp / "hf")
    hf_to_megatron(str(tmp / "hf"), str(tmp / "meg"), tensor_parallel=2, log=lambda _: None)
    return {tp: _run(tp, str(tmp / "meg"), str(tmp / f"tp{tp}.pt")) for tp in (1, 2, 4)}


@pytest.mark.parametrize("tp", [2, 4])
def test_logits_and_loss_equal_tp1(results, tp):
    tp1, tp2 = results[1], results[tp]
    assert tp1["logits"].shape == tp2["logits"].shape
    torch.testing.assert_close(tp2["logits"], tp1["logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(tp2["loss"], tp1["loss"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("tp", [2, 4])
def test_checkpoint_load_reshards_exactly(results, tp):
    tp1, tp2 = results[1], results[tp]
    assert tp1["weights"].keys() == tp2["weights"].keys()
    for name, weight in tp1["weights"].items():
        assert torch.equal(tp2["weights"][name], weight), name


@pytest.mark.parametrize("tp", [2, 4])
def test_gradients_equal_tp1(results, tp):
    tp1, tp2 = results[1], results[tp]
    assert tp1["grads"].keys() == tp2["grads"].keys()
    nonzero = 0
    for name, grad in tp1["grads"].items():
        scale = max(grad.abs().max().item(), 1e-6)
        diff = (tp2["grads"][name] - grad).abs().max().item()
        assert diff <= 1e-5 * scale + 1e-7, f"{name}: max diff {diff:.3e} (grad scale {scale:.3e})"
        nonzero += grad.abs().max().item() > 0
    assert nonzero >= len(tp1["grads"]) - 1  # every parameter takes part (at most one stray zero)
