#!/usr/bin/env bash
# Stage 2 of the shipped avatar model, one prepared run on a lent GPU: continue training from
# stage 1's exported weights (INIT) with configs/avatars-64-stage2.json, export the EMA
# weights, sample a grid. Writes everything to $OUT. DEVICE and MINUTES override for a dry run.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
INIT=${INIT:-src/animeddim/models/avatars-64.safetensors}
DEVICE=${DEVICE:-cuda}
MINUTES=${MINUTES:-7.5}
RUN=${RUN:-/tmp/avatars-64-stage2}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  date -u; } > "$OUT/gpu.txt"
# The outer limit leaves time for the export even if the last epoch runs long.
timeout $(python3 -c "print(int($MINUTES * 60 + 80))") python3 -m animeddim train \
  --data .gpu/avatars64 --out "$RUN" --config configs/avatars-64-stage2.json --init "$INIT" \
  --time-limit "$MINUTES" --checkpoint-every 1000 --device "$DEVICE" --no-kid --quiet > "$OUT/train.log" 2>&1
echo "train exit $?" >> "$OUT/train.log"
cp "$RUN/metrics.csv" "$RUN/config.json" "$OUT/" 2>/dev/null
python3 -m animeddim export --run "$RUN" --out "$OUT/avatars-64.safetensors" >> "$OUT/train.log" 2>&1
python3 -m animeddim sample --run "$OUT/avatars-64.safetensors" --n 64 --steps 20 \
  --grid "$OUT/grid.png" --device "$DEVICE" >> "$OUT/train.log" 2>&1
echo "sample exit $?" >> "$OUT/train.log"
tail -n 3 "$OUT/metrics.csv"; tail -n 4 "$OUT/train.log"
