#!/usr/bin/env bash
# GPU first light (issue #21): one device call, at most 8 minutes on one H100, that checks every CUDA path and
# measures the headline numbers. Each stage runs under its own time limit and writes its JSON to $OUT as soon as
# it finishes (stages 1, 2 and 4 also after every check, test or measurement), so a limit loses only the stage,
# or the part of it, that ran out:
#
#   1 smoke      60 s  environment; import; each Triton kernel once against the float64 PyTorch reference; one
#                      tiny compiled training step (no host sync; a NaN batch skipped on the device by fused AdamW)
#   2 tests     120 s  the CUDA-only tests, then the kernel tests compiled for real (pytest)
#   3 train     180 s  erw-bench train, SiT-XL/2 256 px, DINOv2-B on the fly, bf16, batch 32: Phase 2 eager and the
#                      reference-step imitation; then Phase 2 and Phase 1 compiled
#   4 alignment 100 s  NT-Xent fwd+bwd at M = 16384, D = 768 (Triton two-pass and one-pass, naive, compiled naive,
#                      chunked torch); the cosine kernel at B = 256 against REPA's per-sample loop
#   5 summary          the measured numbers against the targets: printed last, and summary.{json,md}
#
#   bash benchmarks/first_light.sh             # on the GPU (device tool: timeout_s about 540)
#   bash benchmarks/first_light.sh --dry-run   # the same stages and code on CPU in about a minute: tiny shapes,
#                                              # TRITON_INTERPRET=1 (or DRY_RUN=1); CI runs it
#
# $OUT receives 7 files (the device tool returns at most 8): stage1_smoke.json, stage2_tests.json,
# stage3_train.json, stage4_alignment.json, summary.json, summary.md, first_light.log; everything else goes to a
# scratch folder. Without $OUT: benchmarks/results/first_light on a GPU; a scratch folder for the dry run, whose
# numbers are not results. Nothing run here may import DeepSpeed, webdataset, DALI or diffusers (the device image
# has none of them): the dry run makes those imports fail. Exit status 0 when every stage passed.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=${DRY_RUN:-0}
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
  esac
done

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=$PWD/.venv/bin/python
else PY=python3; fi  # the device image: python3 holds torch

if [ "$DRY_RUN" = 1 ]; then
  DEST=${OUT:-${TMPDIR:-/tmp}/erw_first_light_dry_run}
  DEVICE=cpu
  PRECISION=fp32  # bf16 matmuls are many times slower than fp32 on most CPUs; the code path is the same
  # inductor's C++ code generation would take minutes on a small CPU; dynamo and AOTAutograd still trace the step.
  COMPILE_BACKEND=aot_eager
  export TRITON_INTERPRET=1
  ABSENT=(deepspeed webdataset nvidia.dali diffusers)
else
  DEST=${OUT:-benchmarks/results/first_light}
  DEVICE=cuda
  PRECISION=bf16
  COMPILE_BACKEND=inductor
  unset TRITON_INTERPRET  # the kernels must compile for the GPU, not run in the interpreter
  ABSENT=()
fi
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
rm -f "$DEST"/stage[1-4]_*.json "$DEST"/summary.json "$DEST"/summary.md "$DEST"/first_light.log
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/first_light.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
exec > >(tee -a "$DEST/first_light.log") 2>&1

# Every Python process below (pytest's subprocesses too) maps erw_fast.kernels to this checkout's kernels/, which
# the device image cannot import otherwise (the project is not installed there), and in the dry run refuses the
# packages the device image lacks.
"$PY" benchmarks/first_light_site.py "$SCRATCH/site" --repo "$PWD" ${ABSENT[@]+--absent "${ABSENT[@]}"}
export PYTHONUNBUFFERED=1 PYTHONPATH="$SCRATCH/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
FL=benchmarks/first_light.py
FAILED=0
T0=$SECONDS

# run STAGE CALL LIMIT CMD...: CMD under `timeout LIMIT`, its output shown and kept; then its exit code, wall time
# and log tail merged into the stage's JSON. CALL, when not empty, names one of the stage's several commands (its
# JSON document is $SCRATCH/stage3_CALL.json; STAGE_LIMIT is the whole stage's). A failed or timed-out command
# never stops the script.
run() {
  local stage=$1 call=$2 limit=$3 started rc
  shift 3
  local file log="$SCRATCH/${stage}${call:+_$call}.log"
  file="$DEST/stage${stage%%_*}_${stage#*_}.json"
  echo "=== stage $stage${call:+ ($call)}: limit $limit s, $((SECONDS - T0)) s elapsed ==="
  started=$(date +%s.%N)
  set +e
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  echo "=== stage $stage${call:+ ($call)}: exit $rc ==="
  "$PY" "$FL" record "$file" --stage "$stage" --rc "$rc" --started "$started" --timeout "$limit" --log "$log" \
    ${call:+--call "$call" --doc "$SCRATCH/stage3_$call.json" --stage-limit "$STAGE_LIMIT"} \
    || echo "could not record stage $stage" >&2
  if [ "$rc" != 0 ]; then FAILED=$((FAILED + 1)); fi
}

# ---- 1: environment and smoke
run 1_smoke "" 60 "$PY" "$FL" smoke "$DEST/stage1_smoke.json" --device "$DEVICE" --compile-backend "$COMPILE_BACKEND" \
  --precision "$PRECISION"

# ---- 2: CUDA-only tests first (they skip on CPU), then the kernels against float64, most important first
TESTS=(
  tests/test_trainer.py::test_the_training_step_never_syncs_with_the_host_on_cuda
  tests/test_device_prefetch.py::test_cuda_batches_staged_on_a_side_stream_are_safe_to_use
  tests/test_loader_threads_cuda.py
  tests/test_checkpoint.py::test_cuda_rng_and_map_location
  tests/test_alignment_family_devices.py
  tests/test_kernels_nt_xent.py::test_one_pass_matches_reference
  tests/test_kernels_nt_xent.py::test_matches_reference
  tests/test_kernels_cosine.py::test_matches_reference
  tests/test_objectives.py::test_triton_backend_dispatch_matches_torch_reference
  tests/test_kernels_nt_xent.py::test_torch_compile_fullgraph
  tests/test_kernels_cosine.py::test_torch_compile_fullgraph
  tests/test_kernels_nt_xent.py::test_one_pass_gpu_default_tiles
  tests/test_kernels_nt_xent.py::test_gpu_default_tiles
  tests/test_kernels_nt_xent.py::test_key_splits
  tests/test_kernels_nt_xent.py::test_encoder_feature_dims
)
PYTEST=(-q -rfEs -p no:cacheprovider -p first_light_pytest)
if [ "$DRY_RUN" = 1 ]; then
  # The same list is collected (a renamed test fails here first); the interpreter runs one case of each kernel.
  PYTEST+=(-k "cuda or (reference and float32 and not symmetric and not position and not trained)")
fi
run 2_tests "" 120 env FIRST_LIGHT_TESTS_JSON="$DEST/stage2_tests.json" PYTHONPATH="$PWD/benchmarks:$PYTHONPATH" \
  "$PY" -m pytest "${PYTEST[@]}" "${TESTS[@]}"

# ---- 3: erw-bench train on the ERW SiT-XL/2 preset. The eager call first: it needs no compiler, so a compile
# failure in the second call cannot take the reference step's number with it.
TRAIN=("$PY" -m erw_fast.cli.bench train --config configs/erw_sit_xl2.yaml)
if [ "$DRY_RUN" = 1 ]; then
  TRAIN+=(model.input_size=8 model.depth=2 model.hidden_size=64 model.num_heads=2 model.num_classes=10
          model.projector_dim=64 "encoder.names=[demo-vit-t]" encoder.resolution=64 data.image_size=64
          erw.warmup_depth=1 alignment.encoder_depth=2 "train.compile_backend=$COMPILE_BACKEND")
  SIZE=(--batch 4 --steps 1 --warmup 1 --precision "$PRECISION")
else
  SIZE=(--batch 32 --steps 20 --warmup 5)
fi
STAGE_LIMIT=180
TRAIN_END=$((SECONDS + STAGE_LIMIT))
run 3_train eager_reference 75 "${TRAIN[@]}" "${SIZE[@]}" --phases full --compile off --reference-step \
  --device "$DEVICE" --out "$SCRATCH" --name stage3_eager_reference
LEFT=$((TRAIN_END - SECONDS))
run 3_train compiled $((LEFT > 30 ? LEFT : 30)) "${TRAIN[@]}" "${SIZE[@]}" --phases full,warmup --compile on \
  --device "$DEVICE" --out "$SCRATCH" --name stage3_compiled

# ---- 4: the alignment kernels (bench_alignment's measurements at the target shapes)
if [ "$DRY_RUN" = 1 ]; then
  SHAPES=(--m 64 --d 32 --tokens 16 --cosine-batch 4 --reps 1 --warmup 0)
else
  SHAPES=(--m 16384 --d 768 --tokens 256 --cosine-batch 256 --reps 30 --warmup 5)
fi
run 4_alignment "" 100 "$PY" "$FL" alignment "$DEST/stage4_alignment.json" --device "$DEVICE" \
  --compile-backend "$COMPILE_BACKEND" "${SHAPES[@]}"

# ---- 5: the summary, last on the screen
echo "=== summary: $((SECONDS - T0)) s in all; $FAILED command(s) failed or timed out; files in $DEST ==="
timeout 30 "$PY" "$FL" summary "$DEST" $([ "$DRY_RUN" = 1 ] && echo --dry-run) || FAILED=$((FAILED + 1))
exit $((FAILED > 0))
