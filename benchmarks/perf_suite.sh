#!/usr/bin/env bash
# The performance issue's measurements in one GPU call (about 8 minutes on an H200), each script's JSON under
# OUT (default benchmarks/results/perf): MDLM-small's training step with the vocabulary unpadded (1) and padded
# (64), MDLM and ATAT in one process each; tiny's; sampling 64 x 1024 tokens in 1000 steps, plain and cached
# (same seed: the report gives the fraction of equal tokens), and the evaluation throughput at num_t 4, both with
# the compiled blocks. A step that fails or runs past its time limit is reported and the rest still run.
#
#   bash benchmarks/perf_suite.sh [OUT]            # on the GPU machine
#   SMOKE=1 bash benchmarks/perf_suite.sh /tmp/p   # tiny shapes on the CPU: checks that every step runs
set -u
OUT=${1:-benchmarks/results/perf}
mkdir -p "$OUT"
export PYTHONPATH="${PWD}/src${PYTHONPATH:+:$PYTHONPATH}"
if [ "${SMOKE:-0}" = 1 ]; then
  SHAPE="--device cpu --hidden-dim 32 --num-layers 1 --num-heads 2 --vocab-size 1000"
  TRAIN="python3 benchmarks/train_step.py $SHAPE --batch-size 2 --seq-len 32 --steps 2 --warmup 1 --loss fused"
  SAMPLE="python3 benchmarks/sample_speed.py $SHAPE --batch-size 2 --seq-len 32 --steps 8 --eval-batches 2"
  SIZES=(--size=small --size=tiny) VARIANTS=eager,atat COMPILE="" LIMIT=300
else
  TRAIN="python3 benchmarks/train_step.py --batch-size 32 --seq-len 1024 --steps 20 --warmup 5 --loss fused"
  SAMPLE="python3 benchmarks/sample_speed.py --size small --batch-size 64 --seq-len 1024 --steps 1000 --eval-batches 8"
  SIZES=(--size=small --size=tiny) VARIANTS=compiled,atat-compiled COMPILE=--compile LIMIT=150
fi

failed=()
step() {  # name, command...: run with a time limit, keep going on failure
  local name=$1; shift
  echo "== $name: $*"
  timeout "$LIMIT" "$@" || failed+=("$name (exit $?)")
}
for pad in 1 64; do
  step "train_step small pad $pad" $TRAIN ${SIZES[0]} --variants $VARIANTS --pad-vocab-multiple $pad \
    --output "$OUT/train_step_small_pad$pad.json"
done
step "train_step tiny" $TRAIN ${SIZES[1]} --variants ${VARIANTS%%,*} --output "$OUT/train_step_tiny.json"
step "sampling and evaluation" $SAMPLE --samplers ancestral,ancestral-cache --num-t 4 $COMPILE \
  --output "$OUT/sample_speed_small.json"
echo "written: $(ls "$OUT" | tr '\n' ' ')"
if [ ${#failed[@]} -gt 0 ]; then
  printf 'failed: %s\n' "${failed[@]}"
  exit 1
fi
