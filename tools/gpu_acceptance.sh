#!/usr/bin/env bash
# GPU acceptance in one command, <= 8 minutes on one H100/H200, offline. docs/gpu_acceptance.md.
#
#   bash tools/gpu_acceptance.sh                  # -> $OUT/gpu_acceptance.json (OUT=acceptance_out)
#   ACCEPTANCE_DRY_RUN=1 bash tools/gpu_acceptance.sh   # no GPU: run the harness, stub every step
#
# Steps, each under `timeout`, each recorded (status, seconds, log, log tail); a failing step does not
# stop the others: 1 install_wheels (only what the image lacks, from WHEELS_DIR, --no-index --no-deps),
# 2 build_ext (csrc/ -> megatron_vlm._C in place), 3 gpu_tests (pytest -m gpu tests/gpu),
# 4 dp2_equivalence (tests/multiproc/test_one_path.py, 2 processes on the one GPU), 5 bench_mrope,
# 6 bench_train_step (8K,32K). Exit: 0 all passed, 1 a step failed or timed out, 2 none failed but
# some were skipped (e.g. no GPU) -- not an acceptance.
# Knobs: OUT, WHEELS_DIR (shared/wheels), PYTHON (python3), ACCEPTANCE_BUDGET_S (470: the whole run;
# a step gets min(its timeout, what is left)), T_<STEP> (a step's timeout, e.g. T_BUILD_EXT=300),
# TRAIN_STEP_LENGTHS (8K,32K), ACCEPTANCE_DRY_RUN, ACCEPTANCE_DRY_FAIL=<step> (dry run: make it fail).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
OUT=${OUT:-acceptance_out}
WHEELS_DIR=${WHEELS_DIR:-shared/wheels}
BUDGET=${ACCEPTANCE_BUDGET_S:-470}
DRY=${ACCEPTANCE_DRY_RUN:-0}
LENGTHS=${TRAIN_STEP_LENGTHS:-8K,32K}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
STEPS_TSV="$OUT/logs/steps.tsv"
: > "$STEPS_TSV"
START=$(date +%s)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build is what the steps import
export PYTHONUNBUFFERED=1

note() { printf '[acceptance] %s\n' "$*" >&2; }
has() { "$PY" -c "import $1" >/dev/null 2>&1; }  # has module -> 0

# record NAME STATUS RC SECONDS LOG REASON JSON_OUT
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$STEPS_TSV"; }

# step NAME DEFAULT_TIMEOUT JSON_OUT|- -- command...   (SKIP_REASON set by the caller skips it)
step() {
  local name=$1 default=$2 json=$3; shift 4
  local log="$OUT/logs/$name.log" var="T_${name^^}" t0 t1 rc status reason=${SKIP_REASON:-}
  local limit=${!var:-$default}
  local left=$(( BUDGET - ($(date +%s) - START) ))
  (( limit > left )) && limit=$left
  [[ -z "$reason" && $limit -lt 10 ]] && reason="out of the ${BUDGET}s time budget"
  if [[ -n "$reason" ]]; then
    echo "skipped: $reason" > "$log"; note "$name: skipped ($reason)"
    record "$name" skipped "" 0 "$log" "$reason" "$json"; SKIP_REASON=; return 0
  fi
  note "$name: $* (timeout ${limit}s)"
  t0=$(date +%s.%N)
  if [[ "$DRY" != 0 ]]; then
    { echo "DRY RUN: $*"; } > "$log"
    [[ "$json" != - ]] && printf '{"dry_run": true, "step": "%s"}\n' "$name" > "$json"
    rc=0; [[ "${ACCEPTANCE_DRY_FAIL:-}" == "$name" ]] && { echo "simulated failure" >> "$log"; rc=1; }
  else
    timeout --signal=TERM --kill-after=20 "$limit" "$@" > "$log" 2>&1 < /dev/null
    rc=$?
  fi
  t1=$(date +%s.%N)
  case $rc in 0) status=passed ;; 124|137) status=timeout; reason="timed out after ${limit}s" ;; *) status=failed ;; esac
  [[ "$status" == failed && -z "$reason" ]] && reason="exit status $rc"
  [[ "$DRY" != 0 && "$status" == passed ]] && status=dry_run
  record "$name" "$status" "$rc" "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')" "$log" "$reason" "$json"
  note "$name: $status${reason:+ ($reason)}"
}

# ---------------------------------------------------------------- what this machine has
GPU_REASON=
if [[ "$DRY" == 0 ]]; then
  if ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' >/dev/null 2>&1; then
    GPU_REASON="no CUDA GPU visible to torch"
  else
    # compile for this GPU only (minutes saved), unless the caller chose
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
  fi
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# ---------------------------------------------------------------- 1. wheels
install_wheels() {  # install the wheels whose distribution is not installed at all (the image's win)
  local files
  files=$("$PY" - "$WHEELS_DIR" <<'PYEOF'
import glob, importlib.metadata as md, os, re, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.whl"))):
    name = re.sub(r"[-_.]+", "-", os.path.basename(path).split("-")[0]).lower()
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(path)
PYEOF
  ) || return 1
  [[ -f "$WHEELS_DIR/MANIFEST" ]] && { echo "MANIFEST:"; cat "$WHEELS_DIR/MANIFEST"; }
  if [[ -z "$files" ]]; then echo "every carried wheel's package is already installed"; return 0; fi
  echo "installing:"; echo "$files"
  # shellcheck disable=SC2086
  "$PY" -m pip install --no-index --no-deps --find-links "$WHEELS_DIR" --no-warn-script-location $files
}
if [[ "$DRY" == 0 ]] && ! compgen -G "$WHEELS_DIR/*.whl" >/dev/null; then
  SKIP_REASON="no wheels in $WHEELS_DIR (run tools/acceptance/fetch_wheels.sh where PyPI is reachable)"
fi
export -f install_wheels; export PY WHEELS_DIR
step install_wheels 90 - -- bash -c install_wheels
[[ -f "$WHEELS_DIR/MANIFEST" ]] && grep '^left_out' "$WHEELS_DIR/MANIFEST" | while read -r line; do note "wheels $line"; done

# what the later steps need, after the install
NEED_CORE=
if [[ "$DRY" == 0 ]]; then
  for mod in megatron.core pytest numpy PIL safetensors; do has "$mod" || NEED_CORE+="${NEED_CORE:+, }$mod"; done
  [[ -n "$NEED_CORE" ]] && NEED_CORE="not importable: $NEED_CORE (not in $WHEELS_DIR?)"
  has transformers || note "transformers not importable: HF parity tests will skip/fail, train_step runs --skip-hf"
  has tensorboard || note "tensorboard not importable: the trainer's TensorBoard writer is unavailable"
fi

# ---------------------------------------------------------------- 2. build the CUDA extension
build_ext() {
  MEGATRON_VLM_REQUIRE_CUDA_EXT=1 "$PY" setup.py -q build_ext --inplace || return 1
  "$PY" -c 'import megatron_vlm._C as c; print("built", c.__file__)'
}
SKIP_REASON=$GPU_REASON
export -f build_ext
step build_ext 200 - -- bash -c build_ext

# ---------------------------------------------------------------- 3. GPU tests
SKIP_REASON=${GPU_REASON:-$NEED_CORE}
step gpu_tests 150 - -- "$PY" -m pytest -m gpu tests/gpu -q

# ---------------------------------------------------------------- 4. DP=2 on one GPU == one process
SKIP_REASON=${GPU_REASON:-$NEED_CORE}
step dp2_equivalence 180 - -- env MVLM_DIST_BACKEND=gloo \
  "$PY" -m pytest -q tests/multiproc/test_one_path.py -k "dp2"

# ---------------------------------------------------------------- 5-6. benchmarks
SKIP_REASON=$GPU_REASON
step bench_mrope 90 "$OUT/mrope.json" -- "$PY" tools/bench/mrope.py --out "$OUT/mrope.json"
HF_FLAG=()
[[ "$DRY" == 0 ]] && ! has transformers && HF_FLAG=(--skip-hf)
SKIP_REASON=${GPU_REASON:-$NEED_CORE}
step bench_train_step 200 "$OUT/train_step.json" -- "$PY" tools/bench/train_step.py --lengths "$LENGTHS" \
  --out "$OUT/train_step.json" "${HF_FLAG[@]}"

# ---------------------------------------------------------------- one JSON + a table
"$PY" - "$STEPS_TSV" "$OUT/gpu_acceptance.json" "$DRY" "$BUDGET" "$WHEELS_DIR" <<'PYEOF'
import json, os, platform, subprocess, sys, time
tsv, out, dry, budget, wheels = sys.argv[1], sys.argv[2], sys.argv[3] != "0", int(sys.argv[4]), sys.argv[5]

def tail(path, n=30):
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[-n:]
    except OSError:
        return []

def bench(path):
    if path in ("", "-") or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        return {"unreadable": str(e)}

steps = []
for line in open(tsv):
    name, status, rc, seconds, log, reason, js = line.rstrip("\n").split("\t")
    steps.append({"name": name, "status": status, "rc": int(rc) if rc else None, "seconds": float(seconds),
                  "log": log, "reason": reason or None, "log_tail": tail(log),
                  **({"json": js, "result": bench(js)} if js != "-" else {})})
env = {"python": platform.python_version(), "host": platform.node(), "dry_run": dry, "budget_s": budget,
       "wheels_dir": wheels}
try:
    env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    pass
if not dry:
    try:
        import torch
        env.update(torch=torch.__version__, cuda=torch.version.cuda,
                   gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except Exception as e:  # noqa: BLE001
        env["torch"] = f"not importable: {e}"
failed = [s["name"] for s in steps if s["status"] in ("failed", "timeout")]
skipped = [s["name"] for s in steps if s["status"] == "skipped"]
report = {"accepted": not failed and not skipped and not dry, "failed": failed, "skipped": skipped,
          "total_seconds": round(sum(s["seconds"] for s in steps), 1),
          "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": env, "steps": steps}
with open(out, "w") as f:
    json.dump(report, f, indent=2)
print(f"\n{'step':<18} {'status':<8} {'seconds':>8}  note")
for s in steps:
    print(f"{s['name']:<18} {s['status']:<8} {s['seconds']:>8.1f}  {s['reason'] or ''}")
verdict = "DRY RUN" if dry else ("ACCEPTED" if report["accepted"] else "NOT ACCEPTED")
print(f"{verdict}: {len(steps) - len(failed) - len(skipped)}/{len(steps)} steps passed; {out}")
sys.exit(1 if failed else (2 if skipped else 0))
PYEOF
