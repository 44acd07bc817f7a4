#!/usr/bin/env bash
# The performance issue's measurements in one GPU call (about 8 minutes on an H200), each script's JSON under
# OUT (default benchmarks/results/perf): MDLM-small's training step with the vocabulary unpadded (1) and padded
# (64), MDLM and ATAT in one process each; tiny's; sampling 64 x 1024 tokens in 1000 steps, plain and cached
# (same seed: the report gives the fraction of equal tokens), and the evaluation throughput at num_t 4, both with
# the compiled blocks; the padded training step and the evaluation are profiled too (their top kernels: what
# remains). A step that fails or runs past its time limit is reported and the rest still run.
#
# PART=medium runs instead the medium model's largest batch (its own call: each probed batch compiles anew).
#
#   bash benchmarks/perf_suite.sh [OUT]                 # on the GPU machine
#   PART=medium bash benchmarks/perf_suite.sh [OUT]     # the same machine, another call
#   SMOKE=1 bash benchmarks/perf_suite.sh /tmp/p        # tiny shapes on the CPU: checks that every step runs
set -u
OUT=${1:-benchmarks/results/perf}
PART=${PART:-main}
mkdir -p "$OUT"
export PYTHONPATH="${PWD}/src${PYTHONPATH:+:$PYTHONPATH}"
if [ "${SMOKE:-0}" = 1 ]; then
  SHAPE="--device cpu --hidden-dim 32 --num-layers 1 --num-heads 2 --vocab-size 1000"
  TRAIN="python3 benchmarks/train_step.py $SHAPE --batch-size 2 --seq-len 32 --steps 2 --warmup 1 --loss fused"
  SAMPLE="python3 benchmarks/sample_speed.py $SHAPE --batch-size 2 --seq-len 32 --steps 8 --eval-batches 2"
  SIZES=(--size=small --size=tiny --size=medium) VARIANTS=eager,atat COMPILE="" LIMIT=300 MAXBATCH="" SHARED_STEPS=2 MIN_OVERLAP=0
else
  TRAIN="python3 benchmarks/train_step.py --batch-size 32 --seq-len 1024 --steps 20 --warmup 5 --loss fused"
  SAMPLE="python3 benchmarks/sample_speed.py --size small --batch-size 64 --seq-len 1024 --steps 1000 --eval-batches 8"
  SIZES=(--size=small --size=tiny --size=medium) VARIANTS=compiled,atat-compiled COMPILE=--compile LIMIT=150
  MAXBATCH="--max-batch 512" SHARED_STEPS=200 MIN_OVERLAP=0.9
fi

failed=()
step() {  # name, command...: run with a time limit (LIMIT seconds), keep going on failure
  local name=$1; shift
  echo "== $name: $*"
  timeout "$LIMIT" "$@" || failed+=("$name (exit $?)")
}
if [ "$PART" = medium ]; then
  LIMIT=540 step "train_step medium, largest batch" $TRAIN ${SIZES[2]} --variants ${VARIANTS%%,*} $MAXBATCH \
    --output "$OUT/train_step_medium.json"
else
  # The padded step (the default) is also profiled: the top kernels are what remains of goal 1.
  step "train_step small pad 1" $TRAIN ${SIZES[0]} --variants $VARIANTS --pad-vocab-multiple 1 \
    --output "$OUT/train_step_small_pad1.json"
  step "train_step small pad 64" $TRAIN ${SIZES[0]} --variants $VARIANTS --pad-vocab-multiple 64 --profile 3 \
    --output "$OUT/train_step_small_pad64.json"
  step "train_step tiny" $TRAIN ${SIZES[1]} --variants ${VARIANTS%%,*} --output "$OUT/train_step_tiny.json"
  # Two tiny jobs sharing the GPU, as the study runs them: they meet after their warm-up (--start-with) so that
  # their timed windows overlap, and shared_gpu.py gives their combined tokens/s.
  SHARED="$TRAIN ${SIZES[1]} --variants ${VARIANTS%%,*} --start-with 2 --barrier-dir '$OUT/barrier' --steps $SHARED_STEPS"
  rm -rf "$OUT/barrier"
  step "train_step tiny, two at once" bash -c "$SHARED --output '$OUT/train_step_tiny_shared_a.json' \
    > '$OUT/tiny_shared_a.log' 2>&1 & a=\$!; $SHARED --output '$OUT/train_step_tiny_shared_b.json' \
    > '$OUT/tiny_shared_b.log' 2>&1; b=\$?; wait \$a; exit \$(( \$? || b ))"
  rm -rf "$OUT/barrier"
  step "tiny, two at once: combined" python3 benchmarks/shared_gpu.py "$OUT/train_step_tiny_shared_a.json" \
    "$OUT/train_step_tiny_shared_b.json" --min-overlap $MIN_OVERLAP --output "$OUT/tiny_shared_combined.json"
  step "sampling and evaluation" $SAMPLE --samplers ancestral,ancestral-cache --num-t 4 $COMPILE --profile 2 \
    --output "$OUT/sample_speed_small.json"
fi
echo "written: $(ls "$OUT" | tr '\n' ' ')"
if [ ${#failed[@]} -gt 0 ]; then
  printf 'failed: %s\n' "${failed[@]}"
  exit 1
fi
