"""Context parallelism over gloo: CP=2, CP=4 and TP=2 x CP=2 give the same logits, the same loss
and the same gradient of every parameter (fp32) as one process, on a packed row with documents
of uneven lengths, images straddling chunk borders and a document shorter than 2*CP chunks."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import random_hf_model
from tests.multiproc.launch import torchrun

pytestmark = pytest.mark.multiproc
LAYOUTS = [(1, 2), (1, 4), (2, 2)]  # (TP, CP)


def _run(tp: int, cp: int, meg_dir: str, out: str) -> dict:
    return torchrun("cp_worker.py", tp * cp, ["--meg-dir", meg_dir, "--tp", str(tp), "--cp", str(cp)], out)


@pytest.fixture(scope="module")
def results(tmp_path_factory, megatron_world):
    from megatron_vlm.checkpoint.convert import hf_to_megatron

    tmp = tmp_path_factory.mktemp("cp")
    random_hf_model(seed=5).save_pretrained(tmp / "hf")
    hf_to_megatron(str(tmp / "hf"), str(tmp / "meg"), log=lambda _: None)
    layouts = [(1, 1)] + LAYOUTS
    return {(tp, cp): _run(tp, cp, str(tmp / "meg"), str(tmp / f"tp{tp}cp{cp}.pt")) for tp, cp in layouts}


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"tp{l[0]}cp{l[1]}")
def test_logits_and_loss_equal_single_process(results, layout):
    ref, got = results[(1, 1)], results[layout]
    assert got["logits"].shape == ref["logits"].shape
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=0, atol=2e-5)
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"tp{l[0]}cp{l[1]}")
def test_gradients_equal_single_process(results, layout):
    ref, got = results[(1, 1)], results[layout]
    assert ref["grads"].keys() == got["grads"].keys()
    for name, grad in ref["grads"].items():
        scale = max(grad.abs().max().item(), 1e-6)
        diff = (got["grads"][name] - grad).abs().max().item()
        assert diff <= 2e-5 * scale + 1e-7, f"{name}: max diff {diff:.3e} (grad scale {scale:.3e})"
    vision = [g for n, g in ref["grads"].items() if n.startswith("vision.")]
    assert vision and all(g.abs().max() > 0 for g in vision)  # images really took part
