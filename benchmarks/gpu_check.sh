#!/usr/bin/env bash
# One command on a GPU machine gives every GPU figure, in one file: benchmarks/results/gpu_check.json.
#
#   bash benchmarks/gpu_check.sh              # at most 8 minutes on one GPU (a CUDA torch and this package installed)
#   bash benchmarks/gpu_check.sh --cpu-smoke  # the same steps as tiny fp32 runs on CPU: a check of the plumbing,
#                                             # not a measurement (its file goes under /tmp, never to results/)
#
# Steps, in order (benchmarks/gpu_check.py says what each measures): the int8 frozen-stack kernel on CUDA
# (torch._weight_int8pack_mm with bf16 activations); a bf16 stackwise run, elastic layout, world size 1 over NCCL
# (deepspeed --num_gpus 1 launch/train.py) with frozen_precision same, then int8; benchmarks/gpu.py (tokens/s and
# MFU of the ~124M rack, short); frozen_precision bf16; the stack cache off vs disk. Each step records passed/failed,
# its figures and its error; a failed or timed-out step does not stop the next. The whole check stops starting
# steps when GPU_CHECK_TOTAL_S (default 470 s) would be passed, and the rest are recorded as skipped.
# No network access is needed: the data is the Python standard library's source (the default), tokenized here.
# CI never runs this. PYTHON (default: python) picks the interpreter.
set -u
cd "$(dirname "$0")/.." || exit 2

PYTHON=${PYTHON:-python}
TOTAL_S=${GPU_CHECK_TOTAL_S:-470}
ASSEMBLE_RESERVE_S=20  # kept back for writing the results file
SMOKE=()
OUT=benchmarks/results/gpu_check.json
if [[ "${1:-}" == "--cpu-smoke" ]]; then
  SMOKE=(--cpu-smoke)
  OUT=${TMPDIR:-/tmp}/gpu_check_smoke.json
elif [[ $# -gt 0 ]]; then
  echo "usage: bash benchmarks/gpu_check.sh [--cpu-smoke]" >&2
  exit 2
fi

# step name and its own time limit in seconds (the last steps get what is left)
STEPS=(
  "int8_kernel 60"
  "stackwise_same 100"
  "stackwise_int8 90"
  "gpu_mfu 200"
  "stackwise_bf16 90"
  "stack_cache 150"
)

DIR=$(mktemp -d "${TMPDIR:-/tmp}/stackwise_gpu_check.XXXXXX")
echo "[gpu_check] records and logs in $DIR; total limit ${TOTAL_S}s"
start=$SECONDS
for entry in "${STEPS[@]}"; do
  read -r name cap <<<"$entry"
  left=$((TOTAL_S - ASSEMBLE_RESERVE_S - (SECONDS - start)))
  if ((left < 20)); then
    echo "not started: the check's total limit (${TOTAL_S}s) was reached" >"$DIR/$name.skipped"
    echo "[gpu_check] $name: skipped (out of time)"
    continue
  fi
  ((cap > left)) && cap=$left
  echo "[gpu_check] $name (limit ${cap}s, $((SECONDS - start))s so far)"
  # the helper stops its own run 10 s before the limit and records it; timeout is the backstop
  timeout --kill-after=10 "$cap" "$PYTHON" -m benchmarks.gpu_check step "$name" --dir "$DIR" \
    --limit $((cap - 10)) ${SMOKE[@]+"${SMOKE[@]}"} >"$DIR/$name.log" 2>&1
  echo $? >"$DIR/$name.rc"
  tail -n 1 "$DIR/$name.log"
done

"$PYTHON" -m benchmarks.gpu_check assemble --dir "$DIR" --out "$OUT" --total-limit "$TOTAL_S" \
  ${SMOKE[@]+"${SMOKE[@]}"}
echo "[gpu_check] done in $((SECONDS - start))s"
