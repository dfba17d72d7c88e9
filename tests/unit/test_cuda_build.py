"""How the CUDA extension is built: its nvcc flags keep the precise sine/cosine (checked in the PTX
nvcc emits for sm_90), pyproject declares a setuptools build, and setup.py builds ``megatron_vlm._C``
exactly where torch with CUDA and a toolkit are present."""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_vlm.kernels import cuda_build

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
KERNEL = os.path.join(ROOT, "csrc", "mrope", "mrope_kernel.cu")


def _nvcc():
    found = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if not found and home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            found = os.path.join(home, "bin", "nvcc")
    return found


def test_mrope_kernel_ptx_uses_precise_sincos(tmp_path):
    """Compile the kernel to sm_90 PTX with the flags setup.py passes (ours + torch's common nvcc
    flags) and look for the approximate trig instructions that --use_fast_math substitutes for
    sincosf: sin.approx.f32 has no range reduction and is off by 1.8e-2 at 128K positions."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not installed")
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    include = os.path.join(os.path.dirname(torch.__file__), "include")
    includes = [include, os.path.join(include, "torch", "csrc", "api", "include")]
    if not os.path.exists(os.path.join(include, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        # A CPU build of torch ships the c10/cuda headers without this generated one.
        stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.insert(0, str(tmp_path / "stub"))
    ptx = tmp_path / "mrope_kernel.ptx"
    cmd = [nvcc, "-std=c++17", "-arch=sm_90", "--ptx", *COMMON_NVCC_FLAGS, *cuda_build.NVCC_FLAGS,
           *(f"-I{path}" for path in includes), KERNEL, "-o", str(ptx)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-4000:]}"
    text = ptx.read_text()
    entries = re.findall(r"\.entry\s+(\S*mrope_rotate_kernel\S*)\(", text)
    assert len(entries) == 6, entries  # {fp32, fp16, bf16} x {int64, int32 positions}
    approx = sorted(set(re.findall(r"\b(?:sin|cos)\.approx\S*", text)))
    assert not approx, f"fast-math trig in the mRoPE kernel: {approx} (flags {cuda_build.NVCC_FLAGS})"


def test_pyproject_declares_a_setuptools_build_without_torch():
    """Without [build-system], pip's isolated build never sees torch and silently skips the
    extension. torch is deliberately not a build requirement: an isolated build would download a
    CUDA torch (GBs) on every CPU install; the extension is built with --no-build-isolation."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        build = tomllib.load(f)["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    names = [re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0].lower() for req in build["requires"]]
    assert "setuptools" in names and "torch" not in names


@pytest.mark.parametrize("found, built", [
    ({"torch_cuda": "12.8", "cuda_home": "/usr/local/cuda", "gpu_visible": True}, True),
    ({"torch_cuda": "12.8", "cuda_home": "/usr/local/cuda", "gpu_visible": False}, False),  # no arch list
    ({"torch_cuda": None, "cuda_home": None, "gpu_visible": False}, False),  # CPU torch or none at all
    ({"torch_cuda": "12.8", "cuda_home": None, "gpu_visible": True}, False),  # no nvcc
])
def test_build_decision(found, built):
    assert cuda_build.build_decision(skip=False, have_sources=True, arch_list=None, **found)[0] is built
    assert not cuda_build.build_decision(skip=True, have_sources=True, arch_list=None, **found)[0]
    if found["torch_cuda"] and found["cuda_home"]:  # no GPU on the build machine: the arch list decides
        assert cuda_build.build_decision(skip=False, have_sources=True, arch_list="9.0", **found)[0]


def _run_setup(monkeypatch) -> dict:
    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["setup.py", "--name"])
    runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    return captured


def test_setup_py_builds_the_extension_where_torch_has_cuda_and_nvcc(monkeypatch, tmp_path):
    """setup.py itself, run with torch reporting CUDA 12.8, a GPU and a toolkit: it hands setuptools
    the extension, compiled with the flags the PTX test checks."""
    import torch.utils.cpp_extension as cpp_extension

    for name in (cuda_build.SKIP_ENV, cuda_build.REQUIRE_ENV, "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    kwargs = _run_setup(monkeypatch)
    [ext] = kwargs["ext_modules"]
    assert ext.name == "megatron_vlm._C"
    assert sorted(ext.sources) == ["csrc/mrope/mrope.cpp", "csrc/mrope/mrope_kernel.cu"]
    assert ext.extra_compile_args["nvcc"] == list(cuda_build.NVCC_FLAGS)
    assert kwargs["cmdclass"]["build_ext"] is cpp_extension.BuildExtension

    monkeypatch.setenv(cuda_build.SKIP_ENV, "1")
    assert _run_setup(monkeypatch)["ext_modules"] == []


def test_setup_py_skips_the_extension_on_cpu_torch_and_says_why(monkeypatch, capsys):
    monkeypatch.delenv(cuda_build.SKIP_ENV, raising=False)
    monkeypatch.delenv(cuda_build.REQUIRE_ENV, raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert _run_setup(monkeypatch)["ext_modules"] == []
    assert "not building the CUDA extension" in capsys.readouterr().err
    monkeypatch.setenv(cuda_build.REQUIRE_ENV, "1")
    with pytest.raises(RuntimeError, match="cannot be built"):
        _run_setup(monkeypatch)
