#!/usr/bin/env bash
# Continue the shipped avatar model on a lent GPU with the large-batch path and keep the best
# standard-KID checkpoint: one prepared run. Writes everything to $OUT:
#   metrics.csv, config.json   the run (standard KID of 1,000 samples, 10 dpmpp-2m steps,
#                              against the held-out avatars every $EVAL_EVERY epochs)
#   avatars-64.safetensors     the best standard-KID checkpoint, exported (fp16, ~4 MB)
#   eval-ddim20.json, eval-dpmpp10.json   `evaluate` of it on 1,000 samples (KID and FID)
# All of it comes back as $OUT/results.tgz (a call returns 8 files at most; gpu-bundle.sh).
# The files it needs travel packed in .gpu (64 MiB in all with a call; carry .gpu), made by
# benchmarks/gpu-prepare.sh (1 min 53 s on a 2-core Zen 5; byte-identical on every run).
# MINUTES, BIG, LR, WARM, EVAL_EVERY (a multiple of EPOCH_END), EPOCH_END, EVAL_IMAGES,
# DEVICE, INIT, MODE and PACK (the folder of the packed files) override it (a dry run on the
# CPU: tiny values).
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
. benchmarks/gpu-bundle.sh  # everything in $OUT comes back as results.tgz
DEVICE=${DEVICE:-cuda}
MINUTES=${MINUTES:-5}
BIG=${BIG:-1024}
LR=${LR:-0.002}
WARM=${WARM:-100000}
EVAL_EVERY=${EVAL_EVERY:-20}
EPOCH_END=${EPOCH_END:-10}  # an epoch is 7 steps at batch 1024: its end's work costs as much
EVAL_IMAGES=${EVAL_IMAGES:-1000}
MODE=${MODE:-reduce-overhead}
INIT=${INIT:-avatars-64}
RUN=${RUN:-/tmp/avatars-64-stage3}
WORK=${WORK:-/tmp/gpu-data}
PACK=${PACK:-.gpu}
export ANIMEDDIM_INCEPTION_WEIGHTS=${ANIMEDDIM_INCEPTION_WEIGHTS:-$(realpath "$PACK")/inception-fp16.pt}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  date -u; } > "$OUT/gpu.txt"
# a warm machine keeps /tmp: unpack into empty folders, never beside an earlier call's images
rm -rf "$WORK/avatars64" "$WORK/heldout"
python3 benchmarks/pack_images.py unpack "$PACK/avatars64.u8.xz" "$WORK/avatars64" > "$OUT/log.txt" 2>&1
python3 benchmarks/pack_images.py unpack "$PACK/heldout.u8.xz" "$WORK/heldout" >> "$OUT/log.txt" 2>&1

rm -rf "$RUN"  # a warm machine keeps /tmp: never export an earlier call's run
# Training stops at the first epoch end after MINUTES; the outer limit leaves the export and
# the two evaluations (eager sampling: a compile would cost more than 1,000 samples) their time.
timeout $(python3 -c "print(int($MINUTES * 60 + 100))") python3 -m animeddim train \
  --data "$WORK/avatars64" --out "$RUN" --config configs/avatars-64-stage2.json --init "$INIT" \
  --seed 2 --time-limit "$MINUTES" --epochs 100000 --batch-size "$BIG" --lr "$LR" \
  --lr-warmup-images "$WARM" --compile-mode "$MODE" --data-on-device yes \
  --epoch-end-every "$EPOCH_END" --eval-every "$EVAL_EVERY" --eval-real "$WORK/heldout" \
  --eval-images "$EVAL_IMAGES" --eval-sampler dpmpp-2m --eval-steps 10 --device "$DEVICE" \
  --no-kid --quiet \
  > "$OUT/train.log" 2>&1
echo "train exit $?" >> "$OUT/log.txt"
cp "$RUN/metrics.csv" "$RUN/config.json" "$OUT/" 2>/dev/null
BEST=$RUN/checkpoints/best-standard-kid.safetensors
[ -f "$BEST" ] || BEST=$RUN
python3 -m animeddim export --run "$BEST" --out "$OUT/avatars-64.safetensors" >> "$OUT/log.txt" 2>&1
echo "export exit $? ($BEST)" >> "$OUT/log.txt"
for spec in "ddim20 ddim 20" "dpmpp10 dpmpp-2m 10"; do
  set -- $spec
  timeout 60 python3 -m animeddim evaluate --run "$OUT/avatars-64.safetensors" \
    --real "$WORK/heldout" --n "$EVAL_IMAGES" --sampler "$2" --steps "$3" --device "$DEVICE" \
    --protocols standard --no-compile --out "$OUT/eval-$1.json" >> "$OUT/log.txt" 2>&1
  echo "evaluate $1 exit $?" >> "$OUT/log.txt"
done
cat "$OUT/log.txt"; tail -n 3 "$OUT/metrics.csv"
