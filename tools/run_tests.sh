#!/usr/bin/env bash
# The test command (README.md, .ci/run): installs what the tests need, then runs the CPU suite.
# GPU tests are marked and skip themselves without CUDA. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
# torch first, and only the local CPU build: a bare `pip install torch` would pull GBs of CUDA wheels.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
# --no-build-isolation: the build sees the torch installed above (pyproject.toml says why); setup.py
# compiles the CUDA extension where that torch has CUDA and nvcc exists, and skips it here otherwise.
"$PY" -m pip install -q "setuptools>=64" wheel
"$PY" -m pip install -q --no-build-isolation -e ".[dev]"
# Tesseract for the document pool's OCR of scanned pages, and its Russian data for the OCR of
# mojibake text layers (their tests skip without them). Best effort: needs root and apt-get;
# elsewhere the suite runs without them.
TESSERACT_PACKAGES=""
command -v tesseract >/dev/null 2>&1 || TESSERACT_PACKAGES=" tesseract-ocr"
ls /usr/share/tesseract-ocr/*/tessdata/rus.traineddata >/dev/null 2>&1 \
  || TESSERACT_PACKAGES="$TESSERACT_PACKAGES tesseract-ocr-rus"
if [ -n "$TESSERACT_PACKAGES" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  # shellcheck disable=SC2086  # a list of package names
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $TESSERACT_PACKAGES; } \
    >/dev/null 2>&1 || echo "note: could not install$TESSERACT_PACKAGES; OCR tests will skip" >&2
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
exec "$PY" -m pytest -q "$@"
