#!/usr/bin/env bash
# Training throughput on a lent GPU, and what a large batch costs in quality: one prepared run
# (about 8 minutes on an H100/H200, estimated: never run on one yet). Writes everything to $OUT:
#   bench-before.json  the tuned path as shipped (batch $BASE = 128, compiled)
#   bench-after.json   batch $BIG, CUDA graphs (--compile-mode reduce-overhead), sampling
#                      $SAMPLE_BATCH images at 10 dpmpp-2m steps; both against the fp32 eager
#                      baseline measured in the same process
#   q-128/, q-$BIG/    metrics.csv of two trainings from scratch on the same images: batch 128 at
#                      lr 1e-3 (the shipped recipe), and batch $BIG at lr 1e-3 * sqrt($BIG / 128),
#                      warmed up over the first tenth, data on the device, CUDA graphs, the
#                      epoch-end work (validation, grid, checkpoint) every 4 epochs, and an
#                      EMA decay of 0.999^($BIG/128) per step (the same half-life in images)
#   quality.json       validation noise loss of each at the same number of images seen
#   syncs.txt/.json    where a 40-step run at batch $BIG waited for the GPU (sync_check.py)
#   nccl.txt, ddp.*    two DDP processes on one GPU, NCCL and gloo (gpu-ddp.sh), if time is left
# All of it comes back as $OUT/results.tgz (a call returns 8 files at most; gpu-bundle.sh).
# Each step's timeout is cut to what is left of DEADLINE (570 s) and the log says when each
# ended, so the call finishes inside its 600 s and a slow step costs the later ones only.
# Needs the avatars carried with the call: .gpu/avatars64.u8.xz, made by gpu-prepare.sh
# (1.9 MiB; unpacked here to $DATA), or the folder $DATA itself (29 MiB of PNGs).
# DEVICE, DATA, IMAGES, BASE, BIG, SAMPLE_BATCH, ITERS, MODE and DEADLINE override it for a dry
# run on the CPU (tests nothing about speed there).
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
. benchmarks/gpu-bundle.sh  # everything in $OUT comes back as results.tgz
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-/tmp/gpu-data/avatars64}
[ -d "$DATA" ] || python3 benchmarks/pack_images.py unpack .gpu/avatars64.u8.xz "$DATA"
IMAGES=${IMAGES:-384000}
BASE=${BASE:-128}
BIG=${BIG:-1024}
SAMPLE_BATCH=${SAMPLE_BATCH:-4096}
ITERS=${ITERS:-10}
MODE=${MODE:-reduce-overhead}
DEADLINE=${DEADLINE:-570}  # seconds for the whole script: a call may run 600
budget() {  # the timeout of the next step: what it may take, or what is left of the deadline
  local left=$((DEADLINE - SECONDS))
  [ "$left" -lt 10 ] && { echo "out of time before this step" >> "$OUT/log.txt"; echo 0; return; }
  echo $(( $1 < left ? $1 : left ))
}
run_step() {  # timeout seconds, then the command; skipped when no time is left
  local t=$1; shift
  [ "$t" -gt 0 ] && timeout "$t" "$@"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  date -u; } > "$OUT/gpu.txt"

# 1. Throughput, before and after.
common=(--device "$DEVICE" --iters "$ITERS" --no-kid --json --sampler dpmpp-2m --steps 10)
run_step "$(budget 150)" python3 -m animeddim bench "${common[@]}" --batch-size "$BASE" \
  > "$OUT/bench-before.json" 2> "$OUT/bench-before.err"
echo "bench before exit $? at ${SECONDS}s" >> "$OUT/log.txt"
run_step "$(budget 200)" python3 -m animeddim bench "${common[@]}" --batch-size "$BIG" \
  --compile-mode "$MODE" --sample-batch-size "$SAMPLE_BATCH" \
  > "$OUT/bench-after.json" 2> "$OUT/bench-after.err"
echo "bench after exit $? at ${SECONDS}s" >> "$OUT/log.txt"

# 2. Quality at equal images seen: epochs enough for IMAGES images at each batch. The EMA's
# decay per step is scaled so that its half-life in images is the same in both arms (0.999 per
# step at batch BASE), and validation draws depend on an image's position alone: what
# differs is the batch, the learning rate and the path.
train_arm() {  # batch, lr, warm-up images, compile mode, data on device, epoch-end every, EMA
  local bs=$1 run=/tmp/q-$1
  local steps_per_epoch epochs
  rm -rf "$run"  # a warm machine keeps /tmp: never report an earlier call's run
  steps_per_epoch=$(python3 -c "import sys; print(max(1, int(sys.argv[1]) * 8 // 10 // $bs))" \
    "$(find "$DATA" -name '*.png' | wc -l)")
  epochs=$(( (IMAGES / bs + steps_per_epoch - 1) / steps_per_epoch ))
  run_step "$(budget 200)" python3 -m animeddim train --data "$DATA" --out "$run" \
    --config configs/avatars-64.json --time-limit 0 --epochs "$epochs" --batch-size "$bs" \
    --lr "$2" --lr-warmup-images "$3" --compile-mode "$4" --data-on-device "$5" \
    --epoch-end-every "$6" --ema-decay "$7" \
    --device "$DEVICE" --no-kid --quiet > "$OUT/train-$bs.log" 2>&1
  echo "train batch $bs exit $? ($epochs epochs) at ${SECONDS}s" >> "$OUT/log.txt"
  mkdir -p "$OUT/q-$bs" && cp "$run/metrics.csv" "$run/config.json" "$OUT/q-$bs/" 2>/dev/null
}
train_arm "$BASE" 0.001 0 default auto 1 0.999
train_arm "$BIG" "$(python3 -c "print(1e-3 * ($BIG / $BASE) ** 0.5)")" $((IMAGES / 10)) "$MODE" \
  yes 4 "$(python3 -c "print(0.999 ** ($BIG / $BASE))")"
python3 benchmarks/quality_at_equal_images.py "$OUT/q-$BASE/metrics.csv" "$OUT/q-$BIG/metrics.csv" \
  > "$OUT/quality.json" 2>> "$OUT/log.txt"

# 3. Where the loop still waits for the GPU (a diagnostic: last, with what time is left).
run_step "$(budget 150)" python3 benchmarks/sync_check.py --data "$DATA" --batch-size "$BIG" \
  --steps 40 --compile-mode "$MODE" --device "$DEVICE" --out "$OUT/syncs.json" \
  > "$OUT/syncs.txt" 2>&1
echo "sync check exit $? at ${SECONDS}s" >> "$OUT/log.txt"

# 4. Two DDP processes on one GPU: NCCL's answer, then gloo sharing it (gpu-ddp.sh, ~1 min).
NO_BUNDLE=1 DATA=$DATA DEVICE=$DEVICE run_step "$(budget 100)" bash benchmarks/gpu-ddp.sh > /dev/null 2>&1
echo "ddp on one GPU exit $? at ${SECONDS}s" >> "$OUT/log.txt"
cat "$OUT/log.txt" "$OUT/quality.json"
python3 -c "
import json, sys
for f in ('bench-before', 'bench-after'):
    try:
        r = json.load(open('$OUT/' + f + '.json'))
    except Exception as e:
        print(f, 'no result:', e); continue
    t = r['tuned']
    print(f, r['batch_size'], r['sample_batch_size'], 'train', round(t['train_images_per_s']),
          'sample', round(t['sample_images_per_s']), 'x', round(r['train_speedup'], 2))
"
