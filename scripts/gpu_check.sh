#!/usr/bin/env bash
# The whole GPU check in one go (see ../shared/GPU.md):
#   1. build against the machine's torch (register/spill report in build.log),
#   2. the whole test suite, CUDA tests included (tests.log, junit XML),
#   3. the benchmark suite on CUDA -> <gpu>-<yyyy-mm-dd>.json (+ .png),
#   4. a short summary table, printed last.
# Usage: bash scripts/gpu_check.sh OUTDIR
# Env: GPU_CHECK_STEPS (default "build tests bench"), GPU_CHECK_SUITE (default "full"),
#      GPU_CHECK_PYTEST_ARGS (extra pytest args, e.g. "-m 'not slow'").
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
STEPS=${GPU_CHECK_STEPS:-build tests bench}
SUITE=${GPU_CHECK_SUITE:-full}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1 || true
cat "$OUT/gpu.txt"

if [[ " $STEPS " == *" build "* ]]; then
  echo "== build"
  t0=$(date +%s)
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} FASTCONV_PTXAS_VERBOSE=1 \
    python3 -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
  rc=$?
  echo "build rc=$rc in $(( $(date +%s) - t0 )) s"
  grep -E "ptxas info *: (Used|Compiling)|spill" "$OUT/build.log" | grep -B1 -E "spill stores [1-9]|Used" \
    | grep -v "^--" | tail -n 60 > "$OUT/ptxas.txt" || true
  if [ $rc -ne 0 ]; then tail -n 60 "$OUT/build.log"; exit 1; fi
  python3 -m fastconv info | tee "$OUT/info.txt" || status=1
fi

if [[ " $STEPS " == *" tests "* ]]; then
  echo "== tests"
  t0=$(date +%s)
  eval python3 -m pytest tests -q -rfEs --junitxml="$OUT/tests.xml" ${GPU_CHECK_PYTEST_ARGS:-} > "$OUT/tests.log" 2>&1
  rc=$?
  echo "tests rc=$rc in $(( $(date +%s) - t0 )) s"; tail -n 25 "$OUT/tests.log"
  [ $rc -eq 0 ] || status=1
fi

if [[ " $STEPS " == *" bench "* ]]; then
  echo "== bench"
  gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace('NVIDIA ','').replace(' ','-'))" 2>/dev/null || echo gpu)
  json="$OUT/${gpu}-$(date +%F).json"
  python3 -m fastconv bench --device cuda --suite "$SUITE" --direction both \
    --json "$json" --plot "${json%.json}.png" > "$OUT/bench.log" 2>&1
  rc=$?
  echo "bench rc=$rc"; [ $rc -eq 0 ] || status=1
fi

echo "== summary"
[ -f "$OUT/tests.log" ] && grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -n 30
[ -f "$OUT/bench.log" ] && tail -n 60 "$OUT/bench.log"
exit $status
