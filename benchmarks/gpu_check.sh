#!/usr/bin/env bash
# One command on a GPU machine gives every GPU figure, in one file: gpu_check.json, in $OUT when it is set, else in
# benchmarks/results/ (docs/offline-gpu.md: installing on an offline GPU node).
#
#   bash benchmarks/gpu_check.sh --prepare [DIR]   # where the package index is: build the offline wheelhouse DIR
#                                                  # (default .wheelhouse/, at most 40 MiB; benchmarks/wheelhouse.py)
#   bash benchmarks/gpu_check.sh --wheelhouse DIR  # on the GPU node, without network: install DIR with no index into
#                                                  # DIR/site (no root, no venv; GPU_CHECK_SITE moves it), then check
#   bash benchmarks/gpu_check.sh                   # the check with what python3 has (a CUDA torch, DeepSpeed, ...)
#   bash benchmarks/gpu_check.sh --cpu-smoke       # the same steps as tiny fp32 runs on CPU: a check of the plumbing,
#                                                  # not a measurement (gpu_check_smoke.json, in $OUT, else /tmp)
#
# The check: a preflight (python, torch, CUDA, NCCL, DeepSpeed and datasets versions; stops at once, saying what is
# missing), then the steps of benchmarks/gpu_check.py, each under its own time limit: the int8 frozen-stack matmul
# against bf16 on CUDA; a bf16 stackwise run (elastic layout, world size 1 over NCCL) with frozen stacks in the
# training precision, then int8; benchmarks/gpu.py (tokens/s and MFU of the ~124M rack, short); the stack cache off
# vs disk. A failed or timed-out step is recorded and the next one runs. The whole check, preflight included, stops
# starting steps when GPU_CHECK_TOTAL_S (default 390 s: 6.5 minutes, so the check and one rerun fit in 15 minutes of
# GPU time) would be passed; the rest are recorded as skipped. What one GPU cannot test (pipeline sends over NCCL,
# relays, the tied-weight broadcast, process groups re-created across ranks) is listed in the file as not tested.
# No network: HF_HUB_OFFLINE=1, and the data is the Python standard library's source, tokenized here. CI never runs
# this. PYTHON (default python3) picks the interpreter.
set -u
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
PYTHON=${PYTHON:-python3}
TOTAL_S=${GPU_CHECK_TOTAL_S:-390}
ASSEMBLE_RESERVE_S=10  # kept back for writing the results file
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
USAGE="usage: bash benchmarks/gpu_check.sh [--prepare [DIR] | --wheelhouse DIR | --cpu-smoke]"

die() {
  echo "[gpu_check] $*" >&2
  exit 2
}

install_wheelhouse() {  # DIR: pip-install its wheels into DIR/site, then put that and the checkout on the path
  local dir=$1 site=${GPU_CHECK_SITE:-$1/site}
  [[ -d $dir ]] || die "no wheelhouse at $dir: build it with 'bash benchmarks/gpu_check.sh --prepare $dir' on a machine with the package index, and copy it here"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' ||
    die "the wheelhouse holds wheels for CPython 3.12, but $PYTHON is $("$PYTHON" -V 2>&1): set PYTHON=/path/to/python3.12"
  "$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip, which installs the wheelhouse: '$PYTHON -m ensurepip --user' adds it"
  echo "[gpu_check] installing $dir into $site (no index, no dependencies resolved: the wheelhouse holds them)"
  "$PYTHON" -m pip install --quiet --no-index --no-deps --upgrade --target "$site" "$dir"/*.whl ||
    die "pip could not install the wheelhouse $dir (see above)"
  export PYTHONPATH="$REPO:$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
  "$PYTHON" -m benchmarks.wheelhouse installed "$dir" ||
    die "a requirement of the wheelhouse is not installed here (see above): take it off benchmarks/gpu_node_packages.txt, the node's list, and --prepare again"
}

SMOKE=()
case "${1:-}" in
  --prepare)
    (($# <= 2)) || die "$USAGE"
    exec "$PYTHON" -m benchmarks.wheelhouse prepare "${2:-.wheelhouse}"
    ;;
  --wheelhouse)
    (($# == 2)) || die "$USAGE"
    install_wheelhouse "$2"
    ;;
  --cpu-smoke)
    (($# == 1)) || die "$USAGE"
    SMOKE=(--cpu-smoke)
    ;;
  "") ;;
  *) die "$USAGE" ;;
esac

if ((${#SMOKE[@]})); then
  NAME=gpu_check_smoke RESULTS=${OUT:-${TMPDIR:-/tmp}}
else
  NAME=gpu_check RESULTS=${OUT:-benchmarks/results}
fi
RECORDS=$RESULTS/$NAME  # every step's record and log, and the training runs' logs
rm -rf "$RECORDS" && mkdir -p "$RECORDS" || die "cannot write $RECORDS"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/stackwise_gpu_check.XXXXXX")  # the runs themselves (checkpoints, the cache)
trap 'rm -rf "$WORK"' EXIT
echo "[gpu_check] records and logs in $RECORDS; total limit ${TOTAL_S}s"
start=$SECONDS

timeout --kill-after=5 60 "$PYTHON" -m benchmarks.gpu_check preflight --dir "$RECORDS" ${SMOKE[@]+"${SMOKE[@]}"} \
  2>&1 | tee "$RECORDS/preflight.log"
((PIPESTATUS[0] == 0)) || die "preflight failed: nothing was measured (see $RECORDS/preflight.log)"

# step name and its own time limit in seconds (the last steps get what is left)
STEPS=(
  "int8_kernel 40"
  "stackwise_same 75"
  "stackwise_int8 60"
  "gpu_mfu 90"
  "stack_cache 85"
)
for entry in "${STEPS[@]}"; do
  read -r name cap <<<"$entry"
  left=$((TOTAL_S - ASSEMBLE_RESERVE_S - (SECONDS - start)))
  if ((left < 20)); then
    echo "not started: the check's total limit (${TOTAL_S}s) was reached" >"$RECORDS/$name.skipped"
    echo "[gpu_check] $name: skipped (out of time)"
    continue
  fi
  ((cap > left)) && cap=$left
  echo "[gpu_check] $name (limit ${cap}s, $((SECONDS - start))s so far)"
  # the helper stops its own run 5 s before the limit and records it; timeout is the backstop
  timeout --kill-after=5 "$cap" "$PYTHON" -m benchmarks.gpu_check step "$name" --dir "$RECORDS" --work "$WORK" \
    --limit $((cap - 5)) ${SMOKE[@]+"${SMOKE[@]}"} >"$RECORDS/$name.log" 2>&1
  echo $? >"$RECORDS/$name.rc"
  tail -n 1 "$RECORDS/$name.log"
done

"$PYTHON" -m benchmarks.gpu_check assemble --dir "$RECORDS" --out "$RESULTS/$NAME.json" --total-limit "$TOTAL_S" \
  ${SMOKE[@]+"${SMOKE[@]}"}
echo "[gpu_check] done in $((SECONDS - start))s"
