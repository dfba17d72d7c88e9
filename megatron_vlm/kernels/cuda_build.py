"""How ``setup.py`` builds the optional CUDA extension ``megatron_vlm._C`` from ``csrc/``: the
compiler flags and the decision whether to build at all, in one place that setup.py and the tests
both read.

No torch at import time: setup.py loads this file by path, also in an isolated build environment
where torch is absent (the extension is then skipped, and the reason printed).
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Optional

# No --use_fast_math: it turns sincosf into the approximate hardware sin.approx/cos.approx, which
# have no range reduction (1.8e-2 absolute error at 128K positions). mRoPE angles reach
# position x inv_freq ~ 1e5 rad, so the kernel needs the precise sincosf. It is memory bound:
# the precise path costs nothing measurable.
NVCC_FLAGS: tuple[str, ...] = ("-O3", "-lineinfo")
CXX_FLAGS: tuple[str, ...] = ("-O3",)
EXTENSION_NAME = "megatron_vlm._C"
SKIP_ENV = "MEGATRON_VLM_SKIP_CUDA_EXT"
REQUIRE_ENV = "MEGATRON_VLM_REQUIRE_CUDA_EXT"


def extension_sources(root: str) -> list[str]:
    """Every .cu/.cpp under ``root``/csrc, relative to ``root`` (setuptools wants relative paths)."""
    found = glob.glob(os.path.join(root, "csrc", "**", "*.cu"), recursive=True) + glob.glob(
        os.path.join(root, "csrc", "**", "*.cpp"), recursive=True)
    return sorted(os.path.relpath(path, root) for path in found)


def build_decision(*, skip: bool, have_sources: bool, torch_cuda: Optional[str], cuda_home: Optional[str],
                   gpu_visible: bool, arch_list: Optional[str]) -> tuple[bool, str]:
    """Whether to compile the extension, and why (or why not)."""
    if skip:
        return False, f"{SKIP_ENV} is set"
    if not have_sources:
        return False, "no CUDA sources in csrc/"
    if torch_cuda is None:
        return False, ("torch is not importable in the build environment, or is a CPU build (build with "
                       "`pip install -e . --no-build-isolation` and a CUDA torch)")
    if cuda_home is None:
        return False, "no CUDA toolkit (nvcc) found: set CUDA_HOME"
    if not gpu_visible and not arch_list:
        return False, "no GPU visible and TORCH_CUDA_ARCH_LIST unset (e.g. TORCH_CUDA_ARCH_LIST=9.0)"
    return True, f"torch CUDA {torch_cuda}, toolkit {cuda_home}"


def _detect() -> dict:
    """What the build environment has: torch's CUDA version, the toolkit, a GPU."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return {"torch_cuda": None, "cuda_home": None, "gpu_visible": False}
    torch_cuda = torch.version.cuda
    return {"torch_cuda": torch_cuda, "cuda_home": CUDA_HOME if torch_cuda else None,
            "gpu_visible": bool(torch_cuda) and torch.cuda.is_available()}


def cuda_extensions(root: str, detect=_detect, log=None) -> tuple[list, dict]:
    """``(ext_modules, cmdclass)`` for ``setup()``: the extension where torch with CUDA and a toolkit
    are present, else nothing (a note on stderr says why; ``MEGATRON_VLM_REQUIRE_CUDA_EXT=1`` makes
    that an error)."""
    log = log or (lambda message: print(message, file=sys.stderr))
    skip = os.environ.get(SKIP_ENV, "0") not in ("", "0")
    sources = extension_sources(root)
    found = detect() if not skip and sources else {"torch_cuda": None, "cuda_home": None, "gpu_visible": False}
    build, reason = build_decision(skip=skip, have_sources=bool(sources), arch_list=os.environ.get(
        "TORCH_CUDA_ARCH_LIST") or None, **found)
    if not build:
        if os.environ.get(REQUIRE_ENV, "0") not in ("", "0"):
            raise RuntimeError(f"{REQUIRE_ENV} is set but the CUDA extension cannot be built: {reason}")
        log(f"megatron-vlm: not building the CUDA extension {EXTENSION_NAME}: {reason}; the Triton / PyTorch "
            "paths are used instead")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    log(f"megatron-vlm: building the CUDA extension {EXTENSION_NAME} ({reason})")
    ext = CUDAExtension(name=EXTENSION_NAME, sources=sources,
                        extra_compile_args={"cxx": list(CXX_FLAGS), "nvcc": list(NVCC_FLAGS)})
    return [ext], {"build_ext": BuildExtension}
