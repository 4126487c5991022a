#!/usr/bin/env bash
# The GPU measurements the open issues wait for, in stages that each fit one device call (< 10 min).
#
#   bash benchmarks/gpu_suite.sh kernels   # #4: Triton NT-Xent / cosine vs PyTorch (+ correctness preamble)
#   bash benchmarks/gpu_suite.sh train     # #7: erw-bench train (eager / regional compile / reference step),
#                                          #     a profiled step, and the cost report with measured seconds
#   bash benchmarks/gpu_suite.sh attention # #7: the full step with each SDPA kernel pinned (256 tokens, head dim 72)
#   bash benchmarks/gpu_suite.sh ntxent    # #4/#7: ERW steps with the NT-Xent objective, Triton (one pass for
#                                          #     the frozen teacher) vs the PyTorch backend
#   bash benchmarks/gpu_suite.sh engines   # #6: single-GPU step time, DDP engine vs DeepSpeed ZeRO-0/1/2
#   bash benchmarks/gpu_suite.sh tests     # the CUDA-only tests (no host sync in the step, GPU bench, checkpoints)
#   bash benchmarks/gpu_suite.sh tune      # #4: measure candidate NT-Xent tiles; winners -> $DEST/tuned_tiles.json
#                                          #     (review, then copy into kernels/tuned_tiles.json and commit)
#
# Results go to $OUT when set (the device tool brings that folder back, at most 8 files), else benchmarks/results.
# Every stage writes JSON with the device, versions, settings and raw timings next to a markdown table. The
# `engines` stage needs DeepSpeed (and hjson, pydantic) importable: see benchmarks/README_GPU.md for carrying them
# as wheels. Run benchmarks/first_light.sh first: it checks every CUDA path and measures the headline numbers in
# one call.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
PY="${PYTHON:-python3}"
# The device image runs this checkout without installing it: erw_fast.kernels (kernels/, pyproject's package-dir)
# imports only through this start-up hook, installed in every Python process below.
SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite_site.XXXXXX")
trap 'rm -rf "$SITE"' EXIT
"$PY" benchmarks/first_light_site.py "$SITE" --repo "$PWD"
export PYTHONPATH="$SITE:$PYTHONPATH"
pack_train_extras() {
  local extras=() name
  for name in train_h100_xl2.png train_profile.png cost_measured.png; do
    if [ -f "$DEST/$name" ]; then extras+=("$name"); fi
  done
  for name in "$DEST"/trace_*.json; do
    if [ -f "$name" ]; then extras+=("${name##*/}"); fi
  done
  if [ ${#extras[@]} -gt 0 ] && tar czf "$DEST/train_extras.tar.gz" -C "$DEST" "${extras[@]}"; then
    (cd "$DEST" && rm -f "${extras[@]}")
  fi
  rm -rf "$SITE"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv | tee "$DEST/gpu.csv"

case "${1:-}" in
  kernels)
    timeout 540 "$PY" benchmarks/bench_alignment.py --out "$DEST" --reps 50 --warmup 10
    ;;
  train)
    # This stage writes eleven files, three more than the device tool brings back: the plots and the profiler
    # traces travel as one archive, packed however the stage ends.
    trap pack_train_extras EXIT
    timeout 420 "$PY" -m erw_fast.cli.bench train --config configs/erw_sit_xl2.yaml --batch 32 64 --phases warmup,full \
      --compile both --reference-step --out "$DEST" --name train_h100_xl2
    timeout 120 "$PY" -m erw_fast.cli.bench train --config configs/erw_sit_xl2.yaml --batch 32 --phases full --steps 3 \
      --warmup 3 --compile on --profile "$DEST" --profile-steps 2 --out "$DEST" --name train_profile
    timeout 60 "$PY" -m erw_fast.cli.bench cost --measure --measure-batch 32 --out "$DEST" --name cost_measured
    ;;
  attention)
    timeout 540 "$PY" -m erw_fast.cli.bench train --config configs/erw_sit_xl2.yaml --batch 32 --phases full --steps 10 --warmup 3 \
      --attn-backend sdpa sdpa_flash sdpa_efficient sdpa_cudnn math --out "$DEST" --name train_attention
    ;;
  ntxent)
    for backend in triton torch; do
      timeout 260 "$PY" -m erw_fast.cli.bench train --config configs/erw_sit_xl2.yaml alignment.objective=nt_xent \
        --batch 32 --phases warmup,full --steps 10 --warmup 3 --alignment-backend "$backend" --out "$DEST" --name "train_ntxent_$backend"
    done
    ;;
  engines)
    timeout 540 "$PY" benchmarks/bench_engines.py --model SiT-XL/2 --batch 32 --precision bf16 --out "$DEST" \
      --tag engines_gpu --scratch /tmp/bench_engines
    ;;
  tests)
    timeout 540 "$PY" -m pytest -q -rs -p no:cacheprovider \
      "tests/test_trainer.py::test_the_training_step_never_syncs_with_the_host_on_cuda" \
      "tests/test_bench_cli.py::test_train_bench_on_gpu_reports_mfu_and_memory" \
      tests/test_checkpoint.py tests/test_kernels_nt_xent.py tests/test_kernels_cosine.py \
      tests/test_loader_threads_cuda.py "tests/test_device_prefetch.py::test_cuda_batches_staged_on_a_side_stream_are_safe_to_use" \
      tests/test_objectives.py 2>&1 | tee "$DEST/gpu_tests.log"
    ;;
  tune)
    # Extra arguments go to the tuner (e.g. `tune --kernels lse_grad` when one call cannot fit all three
    # kernels). Winners merge into a copy of the committed table, so the calls accumulate once each returned
    # table is copied to kernels/tuned_tiles.json.
    if [ -f kernels/tuned_tiles.json ]; then cp kernels/tuned_tiles.json "$DEST/tuned_tiles.json"; fi
    timeout 540 "$PY" benchmarks/tune_alignment_kernels.py --out "$DEST" --table "$DEST/tuned_tiles.json" \
      --dtype bf16 --d 768 1024 --rows 8192 --position-batches 32 256 "${@:2}"
    ;;
  *)
    echo "usage: $0 kernels|train|attention|ntxent|engines|tests|tune" >&2
    exit 2
    ;;
esac
