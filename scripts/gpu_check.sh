#!/usr/bin/env bash
# The one prepared GPU check (H200; system python3 with torch/triton/pytest preinstalled; no network).
#   1. build the extension in place (C++ CPU kernels only, in the background beside step 2)
#   2. pytest -m gpu tests/test_bsa_triton_gpu.py: the attention kernels on CUDA
#   3. benchmarks/gpu_timing.py: our Triton block-sparse attention vs dense SDPA (flash) vs compiled Flex,
#      forward and forward+backward, the latter with both Triton backward schemes (two_pass, atomic),
#      after a sampled fp32 check of the gradients at the full shapes; gpu_timing.json also keeps the
#      config Triton's autotuner chose per kernel and key, with its timings of every config
#   4. the other gpu-marked tests and the Triton-backend tests of every op
#   4b. (right after 3) scripts/vae_gpu_check.py: the causal video VAE on CUDA: the issue's 121x512x768 bf16 encode and decode,
#      ours vs diffusers' AutoencoderKLHunyuanVideo (time, peak memory), then the conv kernels and a 17x256x256
#      fp32/bf16 check (time, peak memory, bf16 error)
#   4c. scripts/offload_gpu_check.py: Video Lite blocks at S = 93,696 with activation checkpointing, with and
#       without the host offload of the block inputs: peak memory, step time, and a torch.profiler summary of
#       the offload copies (DtoH / HtoD) hidden behind compute on the other stream (< 70 s)
#   5. python -m benchmarks --profile gpu: the pytest-benchmark GPU suite at Kandinsky shapes (10 % density
#      first), for the time left; a timed-out run still writes the cases it finished
# Every stage is time-limited and the next one runs whatever happened; exit codes go to summary.txt.
# Written under $OUT: env.txt summary.txt failures.log build.log pytest_bsa.log pytest.log timing.log gpu_timing.json
# gpu_timing_table.txt vae.log vae_gpu.json offload.log offload_gpu.json bench.log, and the folder bench/
# (results.json, progress.log, report.md, plots).
# Whole run: < 9.5 minutes (GPU_CHECK_TOTAL_S, default 540 s, plus the timeouts' kill grace): under the
# device tool's 10-minute limit per command.
# Usage: OUT=/some/dir bash scripts/gpu_check.sh
# Through the device tool (which brings back at most 8 files from its $OUT), as run on 2026-12-04:
#   here, once a session: bash scripts/device_wheels.sh   (diffusers into the git-ignored .whl/)
#   run (carry [".whl"], timeout_s 600):
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site;
#     D=$OUT; OUT=/tmp/gc GPU_CHECK_TGZ=$D/gpu_check.tgz bash scripts/gpu_check.sh; cp /tmp/gc/summary.txt $D/
#   then, at once (the machine stays warm 30 s; a fresh start took ~30 s of the 15-minute budget): the whole
#   bench profile, which this script has no time for (~4 min): python3 -m benchmarks --profile gpu --out ...
# GPU_CHECK_TGZ=FILE: a tarball of everything written, refreshed every 25 s, so a run killed at the
# device's limit still brings back what it had. Each pytest stage appends every failure's traceback to
# failures.log as it happens (KANDINSKY_TEST_FAILURE_LOG; a killed pytest prints no summary).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PY:-python3}"   # the GPU machine's system python; override for a dry run elsewhere
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the package is used in place, not installed
TOTAL_S="${GPU_CHECK_TOTAL_S:-540}"   # planned wall time; the timeouts' kill grace keeps it under 9.5 min
VAE_S="${GPU_CHECK_VAE_S:-100}"       # at most this for stage 4b (the VAE), reserved out of the timing stage's share
#   (2026-12-04: its 121-frame rows took ~38 s, the rest ~7 s; the parity step, new since, adds ~10 s)
OFFLOAD_S="${GPU_CHECK_OFFLOAD_S:-50}"  # reserved for stage 4c (the training offload)
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export KANDINSKY_TEST_FAILURE_LOG="$OUT/failures.log"
TGZ="${GPU_CHECK_TGZ:-}"
TAR_PID=""
if [ -n "$TGZ" ]; then
  ( while sleep 25; do tar czf "$TGZ.tmp" -C "$OUT" . 2>/dev/null && mv -f "$TGZ.tmp" "$TGZ"; done ) &
  TAR_PID=$!
fi

left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
note() { echo "$*" | tee -a "$SUMMARY"; }
# stage NAME LIMIT_S LOG CMD...: run under timeout, append output to LOG, record rc and seconds.
# The timeout sends SIGINT (STAGE_SIGNAL): pytest then still prints the failures and durations it has,
# and Python scripts stop with a traceback instead of vanishing; SIGKILL follows 10 s later.
stage() {
  local name=$1 limit=$2 log=$3; shift 3
  local t0 rc
  t0=$(date +%s)
  note "[$(date -u +%H:%M:%S)] $name: start (limit ${limit}s)"
  timeout --signal="${STAGE_SIGNAL:-INT}" --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  note "[$(date -u +%H:%M:%S)] $name: rc=$rc ($(( $(date +%s) - t0 ))s)$([ $rc -eq 124 ] && echo ' TIMED OUT')"
  return 0
}

{
  echo "date: $(date -u)"; echo "host: $(hostname)"; echo "git: $(git rev-parse HEAD 2>/dev/null) $(git status --short 2>/dev/null | wc -l) changed files"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('triton', triton.__version__)" 2>&1
} > "$OUT/env.txt"
cat "$OUT/env.txt"

# 1. build (the extension holds C++ CPU kernels only). No GPU test below uses it, so the build runs niced
#    in the background, beside the first pytest stage (a background job ignores SIGINT, hence TERM).
STAGE_SIGNAL=TERM stage build 120 "$OUT/build.log" nice -n 10 env MAX_JOBS="${MAX_JOBS:-4}" \
  $PY setup.py build_ext --inplace &
BUILD_PID=$!

# 2. the block-sparse attention GPU tests first (their result must not be lost to a slow stage)
LIMIT=$(( $(left) - 290 )); [ $LIMIT -gt 150 ] && LIMIT=150; [ $LIMIT -lt 60 ] && LIMIT=60
stage pytest_bsa $LIMIT "$OUT/pytest_bsa.log" $PY -m pytest -m gpu tests/test_bsa_triton_gpu.py -q -rs \
  -p no:cacheprovider --durations=10
tail -n 5 "$OUT/pytest_bsa.log" | tee -a "$SUMMARY"
grep -h "^=== FAILED" "$OUT/failures.log" 2>/dev/null | head -n 30 | tee -a "$SUMMARY"
wait "$BUILD_PID"

# 3. timing (the issue's goals), before the other ops' tests: it measures the 10 % rows of Lite and Pro
#    first and stops starting measurements at its budget; timeout is the backstop. It gets all but 110 s
#    and the VAE and offload stages' reserves, at most 130 s (on 2026-12-04 it measured the 10 % rows of
#    both models, with the gradient checks, in 106 s), so that the bench (stage 5, the same kernels at
#    every density) keeps about two minutes.
LIMIT=$(( $(left) - 110 - VAE_S - OFFLOAD_S )); [ $LIMIT -gt 130 ] && LIMIT=130; [ $LIMIT -lt 60 ] && LIMIT=60
stage timing $LIMIT "$OUT/timing.log" $PY benchmarks/gpu_timing.py --out-dir "$OUT" --budget-s $(( LIMIT - 25 ))
tail -n 20 "$OUT/timing.log" | tee -a "$SUMMARY"

# 4b. the causal video VAE on CUDA (published config, random weights): the issue's 121x512x768 bf16 encode and
#     decode, ours vs diffusers (time, peak memory) first, then the conv kernels, a 17x256x256 fp32/bf16 run,
#     SDPA backends at head dim 512 (scripts/vae_gpu_check.py -> vae_gpu.json, rewritten after every step; it
#     starts no measurement after --budget-s, the timeout is the backstop). Runs before stage 4 so that its
#     VAE_S, reserved above, is not eaten by the tests.
LIMIT=$(( $(left) - 110 - OFFLOAD_S )); [ $LIMIT -gt $VAE_S ] && LIMIT=$VAE_S; [ $LIMIT -lt 40 ] && LIMIT=40
stage vae $LIMIT "$OUT/vae.log" $PY scripts/vae_gpu_check.py --out-dir "$OUT" --budget-s $(( LIMIT - 30 ))
grep -h '"notes"\|"issue_rows"' "$OUT/vae.log" | tail -n 8 | tee -a "$SUMMARY"

# 4. every other gpu-marked test, plus the Triton-backend cases of every op (their triton_device is CUDA
# here). Files in order of what has run on a GPU least: the kernels that never have first (adaln, qk_norm,
# the VAE's; on 2026-12-04 the NABLA, fractal and attention files, first then, passed before the time limit).
# The attention kernels' autotuning was covered above, so here they take the fixed tile (autotuning every
# dtype/head-dim/flag key of test_bsa_triton.py would compile ~10 configs per key); the sm_90 AOT compile
# tests are moot on a GPU.
LIMIT=$(( $(left) - 45 - OFFLOAD_S )); [ $LIMIT -gt 130 ] && LIMIT=130; [ $LIMIT -lt 20 ] && LIMIT=20
REST="tests/test_adaln.py tests/test_qk_norm.py tests/test_vae_kernels.py tests/test_token_index_triton.py \
tests/test_raster_order.py tests/test_nabla.py tests/test_fractal.py tests/test_block_sparse_attention.py \
tests/test_bsa_triton.py"
for f in tests/test_*.py; do  # then every other test file, in name order
  case " $REST tests/test_bsa_triton_gpu.py " in *" $f "*) ;; *) REST="$REST $f" ;; esac
done
# Serially these tests took ~500 s on the H200 (2026-12-04: 30 % done after 155 s), nearly all of it Triton
# compiling on one CPU core; pytest-xdist (preinstalled there) spreads that over the machine's 16 cores.
# test_training_s3.py needs s3fs (missing there, and no GPU case in it); a collection error in any other
# file must not stop the stage again (it did on 2026-12-04), hence --continue-on-collection-errors.
# test_fuzz.py runs its "triton" cases through the CPU interpreter, never on CUDA (CI covers them).
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n ${GPU_CHECK_WORKERS:-8}"
# shellcheck disable=SC2086
stage pytest_rest $LIMIT "$OUT/pytest.log" env KANDINSKY_BSA_AUTOTUNE=0 $PY -m pytest $REST -q $XDIST \
  --ignore=tests/test_training_s3.py --ignore=tests/test_fuzz.py --continue-on-collection-errors \
  -k "(gpu or triton) and not compile_for_hopper and not aot" -rs -p no:cacheprovider --durations=10
tail -n 5 "$OUT/pytest.log" | tee -a "$SUMMARY"
grep -h "^=== FAILED" "$OUT/failures.log" 2>/dev/null | head -n 60 | tee -a "$SUMMARY"

# 4c. the host offload of checkpointed block inputs (training/offload.py): 4 Video Lite blocks at S = 93,696
#     (bf16, dense SDPA), peak memory and step time with AC and AC + offload, and the profiler's summary of
#     the offload copies overlapped with compute (scripts/offload_gpu_check.py -> offload_gpu.json)
LIMIT=$(( $(left) - 70 )); [ $LIMIT -gt $OFFLOAD_S ] && LIMIT=$OFFLOAD_S; [ $LIMIT -lt 30 ] && LIMIT=30
stage offload $LIMIT "$OUT/offload.log" $PY scripts/offload_gpu_check.py --out-dir "$OUT"
tail -n 8 "$OUT/offload.log" | tee -a "$SUMMARY"

# 5. the bench driver's GPU profile (`python -m benchmarks --profile gpu`): the pytest-benchmark GPU suite at
#    Kandinsky shapes, cases in order of importance (10 % density first); on the time limit's SIGINT pytest
#    stops, results.json keeps the finished cases and the driver still writes the report. It gets what is
#    left (the whole profile takes about 4 minutes, more than is left here: run it alone to get all of it)
LIMIT=$(( $(left) - 5 )); [ $LIMIT -lt 20 ] && LIMIT=20
stage bench $LIMIT "$OUT/bench.log" $PY -m benchmarks --profile gpu --out "$OUT/bench"
tail -n 5 "$OUT/bench.log" | tee -a "$SUMMARY"
note "total $(( $(date +%s) - START ))s; files: $(ls "$OUT" | tr '\n' ' ')"
if [ -n "$TGZ" ]; then
  kill "$TAR_PID" 2>/dev/null; wait "$TAR_PID" 2>/dev/null
  tar czf "$TGZ.tmp" -C "$OUT" . && mv -f "$TGZ.tmp" "$TGZ"
fi
exit 0
