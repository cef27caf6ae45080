#!/usr/bin/env bash
# One prepared run on a lent GPU: train the shipped avatar model from the committed recipe,
# export it, sample a grid, then benchmark. Writes everything to $OUT.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" >> "$OUT/gpu.txt"
RUN=/tmp/avatars-64-run
timeout 450 python3 -m animeddim train --data .gpu/avatars64 --out $RUN \
  --config configs/avatars-64.json --device cuda --no-kid --quiet > "$OUT/train.log" 2>&1
echo "train exit $?" >> "$OUT/train.log"
cp $RUN/metrics.csv $RUN/config.json "$OUT/" 2>/dev/null
python3 -c "
from animeddim.checkpoint import export_weights
export_weights('$RUN', '$OUT/avatars-64.safetensors')
" >> "$OUT/train.log" 2>&1
python3 -m animeddim sample --run "$OUT/avatars-64.safetensors" --n 64 --steps 20 \
  --grid "$OUT/grid.png" --device cuda >> "$OUT/train.log" 2>&1
timeout 150 python3 -m animeddim bench --device cuda --iters 10 --no-kid --json \
  > "$OUT/bench-cuda.json" 2> "$OUT/bench.err"
echo "bench exit $?" >> "$OUT/train.log"
tail -5 "$OUT/train.log"
