#!/usr/bin/env bash
# Download, HERE (where PyPI is reachable), the wheels tools/gpu_acceptance.sh installs on an offline
# GPU machine: Python 3.12, manylinux x86_64, torch/triton already there, nothing else assumed.
#
#   bash tools/acceptance/fetch_wheels.sh            # -> shared/wheels (WHEELS_DIR), <= 64 MiB (BUDGET_MIB)
#
# Groups, in priority order; a group that would push the total past the budget is left out whole
# and named in MANIFEST (gpu_acceptance.sh skips what needs it, saying so):
#   core: megatron-core and what the package + tests import at top level (numpy, pillow, ...), pytest
#   hf:   transformers + its deps, less hf-xet (downloads only) (the HF parity tests and the HF baseline of tools/bench/train_step.py)
#   tb:   tensorboard + protobuf (torch.utils.tensorboard, the trainer's metrics writer)
# Versions are pinned to what the CPU suite runs with. Everything is fetched with --no-deps: the
# closure is this list; torch, triton, filelock, fsspec, jinja2, sympy, typing-extensions come with torch.
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")/../.."
DEST=${WHEELS_DIR:-shared/wheels}
BUDGET_MIB=${BUDGET_MIB:-64}
PYVER=${PYVER:-3.12}
PIP=(${PIP:-python3 -m pip})

CORE="megatron-core==0.16.1 numpy==2.4.6 packaging==26.2 pillow==13.0.0 safetensors==0.8.0 tqdm==4.70.1
      psutil==7.2.2 pytest==9.0.3 pluggy==1.6.0 iniconfig==2.3.0 pygments==2.20.0"
HF="transformers==4.57.3 tokenizers==0.22.2 huggingface-hub==0.36.2 pyyaml==6.0.3 regex==2026.5.9
    requests==2.34.2 urllib3==2.7.0 idna==3.20 certifi==2026.5.20 charset-normalizer==3.4.7"
TB="tensorboard==2.21.0 protobuf==7.36.2"

rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
fetch() {  # $1: group name, rest: requirements -> $DEST.tmp/$1/
  local group=$1; shift
  mkdir -p "$DEST.tmp/$group"
  for req in "$@"; do
    "${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any \
      -d "$DEST.tmp/$group" "$req" || { echo "FAILED to download $req" >&2; return 1; }
  done
}
mib() { { (( $# )) && du -sb "$@"; } | awk '{s+=$1} END {printf "%.1f", s/1048576}'; }

rm -rf "$DEST" && mkdir -p "$DEST"
: > "$DEST.tmp/MANIFEST"
for group in core hf tb; do
  case $group in core) reqs=$CORE ;; hf) reqs=$HF ;; tb) reqs=$TB ;; esac
  # shellcheck disable=SC2086
  if ! fetch "$group" $reqs; then echo "skipped $group (download failed)" | tee -a "$DEST.tmp/MANIFEST"; continue; fi
  size=$(mib "$DEST.tmp/$group"/*.whl); total=$(mib "$DEST"/*.whl "$DEST.tmp/$group"/*.whl)
  if awk -v t="$total" -v b="$BUDGET_MIB" 'BEGIN {exit !(t > b)}'; then
    echo "left_out $group ${size}MiB (total would be ${total}MiB > ${BUDGET_MIB}MiB): $reqs" | tr -s ' \n' ' ' \
      | tee -a "$DEST.tmp/MANIFEST"; echo
    continue
  fi
  mv "$DEST.tmp/$group"/*.whl "$DEST"/
  echo "group $group ${size}MiB: $(echo $reqs)" | tee -a "$DEST.tmp/MANIFEST"
done
mv "$DEST.tmp/MANIFEST" "$DEST/MANIFEST" && rm -rf "$DEST.tmp"
echo
ls -l "$DEST"/*.whl | awk '{printf "%8.2f MiB  %s\n", $5/1048576, $NF}'
echo "total $(mib "$DEST"/*.whl) MiB of ${BUDGET_MIB} MiB in $DEST"
