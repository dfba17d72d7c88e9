"""The one training path over several processes (FSDP2 over DP x CP around Megatron TP, gloo here,
NCCL on a cluster) equals the single-process run, in fp32 and in bf16.

Every run goes through the NCCL double (``device_restricted_collectives``): a collective on a
tensor that is not on the training device fails it. Odd global rows carry no image, so a DP rank
(and CP ranks) see micro-batches without images: the vision tower must still run there, or FSDP's
collectives would not line up.

On a GPU machine, ``tools/gpu_acceptance.sh`` runs this file with the processes sharing one GPU
(``MVLM_DIST_BACKEND=gloo`` carrying CUDA tensors).
"""

from __future__ import annotations

import pytest
import torch

from tests.multiproc.launch import torchrun

pytestmark = pytest.mark.multiproc
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the training device the workers use

# bf16: every layout rounds its matmuls differently (TP splits them, CP reorders attention), so the
# comparison is to the precision of bf16 over three Adam steps; fp32 is exact to summation order.
def _group(name: str) -> str:
    """vision.blocks.0.attn.qkv.bias -> vision.blocks.0; language_model.output_layer.weight -> ...output_layer"""
    parts = name.split(".")
    cut = next((i + 1 for i, p in enumerate(parts) if p.isdigit()), len(parts) - 1)
    return ".".join(parts[:cut])


def _update_errors(run: dict, ref: dict, grouped: bool) -> dict[str, float]:
    """Relative L2 difference of the total updates (final - initial weights), per tensor or per
    module (a layer, a block, the embedding ...)."""
    got, expected = {}, {}
    for name in ref["weights"]:
        key = _group(name) if grouped else name
        got.setdefault(key, []).append((run["weights"][name] - run["initial"][name]).flatten())
        expected.setdefault(key, []).append((ref["weights"][name] - ref["initial"][name]).flatten())
    return {key: float((torch.cat(got[key]) - torch.cat(expected[key])).norm()
                       / torch.cat(expected[key]).norm().clamp_min(1e-12)) for key in got}


def assert_same_updates(run: dict, ref: dict, label: str, fp32_ref: dict | None = None) -> None:
    """The run's updates equal the reference's.

    Elementwise checks would not do: Adam divides by sqrt(v), so elements whose gradient is ~0 move
    by up to lr per step on rounding noise alone. fp32: every tensor within 2%. bf16: the bar is bf16
    itself, per module: the layout may change a module's update by at most twice what computing in
    bf16 instead of fp32 changes it, plus 2% (per tensor, small biases are noise-dominated: TP's
    bf16 all-reduces alone move some by 10-20%, as they would under Megatron on GPUs)."""
    for name in ref["weights"]:
        assert torch.equal(run["initial"][name], ref["initial"][name]), f"{label} {name}: different init"
    errors = _update_errors(run, ref, grouped=fp32_ref is not None)
    bars = ({k: 2 * v + 0.02 for k, v in _update_errors(ref, fp32_ref, grouped=True).items()}
            if fp32_ref is not None else {k: 0.02 for k in errors})
    for key, error in errors.items():
        assert error < bars[key], f"{label} {key}: update differs by {error:.3g} (relative L2; allowed {bars[key]:.3g})"


def _run(tmp_path, procs: int, tp: int = 1, cp: int = 1, *extra: str, dtypes: str = "fp32,bf16") -> dict:
    name = f"p{procs}_tp{tp}_cp{cp}"
    args = ["--run-dir", str(tmp_path / name), "--cp", str(cp), "--tp", str(tp), "--dtypes", dtypes, *extra]
    return torchrun("train_worker.py", procs, args, str(tmp_path / f"{name}.pt"))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("single"), 1, 1, 1, "--text-only-odd-rows")


@pytest.mark.parametrize("procs,tp,cp", [(2, 1, 1), (2, 1, 2), (2, 2, 1), (4, 2, 2)],
                         ids=["dp2", "cp2", "tp2", "tp2cp2"])
def test_parallel_training_equals_one_process(single, tmp_path, procs, tp, cp):
    # the largest layout also recomputes activations (FSDP re-gathers units inside the recompute)
    got = _run(tmp_path, procs, tp, cp, "--text-only-odd-rows", *(["--recompute"] if procs == 4 else []))
    for dtype, (loss_tol, norm_tol) in {"fp32": (1e-5, 1e-4), "bf16": (2e-3, 3e-2)}.items():
        ref, run = single[dtype], got[dtype]
        assert run["collective_devices"] == [DEVICE] and run["collectives"] > 0
        torch.testing.assert_close(run["losses"], ref["losses"], rtol=loss_tol, atol=0, msg=dtype)
        # the gradient norm is that of the global-mean gradient: not 1/(DP x CP) of it
        torch.testing.assert_close(run["grad_norms"], ref["grad_norms"], rtol=norm_tol, atol=0, msg=dtype)
        assert ref["losses"][-1] < ref["losses"][0]
        assert_same_updates(run, ref, dtype, fp32_ref=single["fp32"] if dtype == "bf16" else None)
        assert run["vision_replicas_identical"]
        if cp > 1:  # rank 0 received only the patches it encodes, never a whole row's
            assert all(received < whole for received, whole in run["pixel_rows"] if whole), run["pixel_rows"]


def test_context_parallel_rank_without_images_in_bf16(tmp_path):
    """Rows of one document (one image) under CP=2: one CP rank encodes nothing. Its placeholder
    must have the tower's dtype (bf16) for the all-gather, and the run must equal one process."""
    one_doc = ["--seq-len", "48", "--rows", "2"]
    ref = _run(tmp_path, 1, 1, 1, *one_doc, dtypes="bf16")["bf16"]
    got = _run(tmp_path, 2, 1, 2, *one_doc, dtypes="bf16")["bf16"]
    torch.testing.assert_close(got["losses"], ref["losses"], rtol=2e-3, atol=0)
    torch.testing.assert_close(got["grad_norms"], ref["grad_norms"], rtol=3e-2, atol=0)


def test_tensor_parallel_vision_replicas_stay_identical(tmp_path):
    """A backward that differs in the last bits between TP ranks (simulated: TP rank 1 scales the
    vision tower's incoming gradient by 1 + 1e-3) must not let the replicated tower drift apart."""
    got = _run(tmp_path, 2, 2, 1, "--perturb-vision-grads", dtypes="fp32")["fp32"]
    assert got["vision_replicas_identical"]
    assert not got["tower_unchanged"]


def test_frozen_vision_tower_is_bit_identical_after_steps_dp2(tmp_path):
    """model.freeze_vision (patch embedding + blocks; the merger trains) over DP=2 in bf16."""
    got = _run(tmp_path, 2, 1, 1, "--freeze-vision", "--text-only-odd-rows", dtypes="bf16")["bf16"]
    assert got["tower_unchanged"] and not got["merger_unchanged"]
    assert got["losses"][-1] < got["losses"][0]


def test_dp2_checkpoint_resume_reproduces_the_losses_exactly(tmp_path):
    """Save at step 2 -> the processes end (a kill after the checkpoint) -> a new launch resumes from
    the sharded checkpoint and continues bit-for-bit like the uninterrupted run."""
    common = ["--steps", "4", "--checkpoint-interval", "2", "--text-only-odd-rows"]
    straight = _run(tmp_path / "straight", 2, 1, 1, *common, dtypes="bf16")["bf16"]
    first = _run(tmp_path / "killed", 2, 1, 1, *common, "--max-steps", "3", dtypes="bf16")["bf16"]
    resumed = _run(tmp_path / "killed", 2, 1, 1, *common, dtypes="bf16")["bf16"]
    assert first["resumed_at"] == 0 and resumed["resumed_at"] == 2
    assert torch.equal(first["losses"][:2], straight["losses"][:2])
    assert torch.equal(resumed["losses"], straight["losses"][2:])  # exact, not approximate
    for name, weight in straight["weights"].items():
        assert torch.equal(resumed["weights"][name], weight), name

    # the DP=2 sharded checkpoint loads into one process (what export and evaluation do)
    from megatron_vlm.checkpoint.convert import load_model_dir
    from megatron_vlm.parallel import initialize_parallel
    from megatron_vlm.training.checkpoint import latest_checkpoint

    initialize_parallel(tensor_parallel=1)
    path = latest_checkpoint(str(tmp_path / "killed" / "p2_tp1_cp1" / "bf16" / "checkpoints"))
    assert path is not None and path.endswith("iter_0000004")
    model, _ = load_model_dir(path, dtype=torch.float32)
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), resumed["weights"][name]), name
