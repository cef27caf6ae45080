#!/usr/bin/env bash
# Issue 18's "DDP with 2 processes on one GPU": what NCCL says, then the same tiny training
# run by one process and by two gloo processes sharing the GPU (ANIMEDDIM_DDP_BACKEND=gloo),
# compared weight by weight as tests/test_distributed.py does (about a minute). Writes to $OUT:
#   nccl.txt   torchrun of two ranks on cuda:0 with NCCL: an all_reduce's result or NCCL's error
#   ddp.json   the largest weight differences, network and EMA, of the two runs
# Needs 24 images: the first 24 of $DATA (the carried avatars, unpacked by gpu-throughput.sh
# or here). DEVICE=cpu dry-runs it (gloo on the CPU; no NCCL probe).
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
[ -n "${NO_BUNDLE:-}" ] || . benchmarks/gpu-bundle.sh  # results.tgz (not when run by another script)
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-/tmp/gpu-data/avatars64}
[ -d "$DATA" ] || python3 benchmarks/pack_images.py unpack .gpu/avatars64.u8.xz "$DATA"
W=${WORK:-/tmp/gpu-ddp}
rm -rf "$W" && mkdir -p "$W/data"
ls "$DATA" | grep -i '\.png$' | head -n 24 | while read -r f; do cp "$DATA/$f" "$W/data/"; done
TORCHRUN="python3 -m torch.distributed.run --standalone --nproc_per_node 2"

if [ "$DEVICE" = cuda ]; then
  cat > "$W/nccl_probe.py" <<'PY'
import os, torch, torch.distributed as dist
torch.cuda.set_device(0)
dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
t = torch.full((1,), float(dist.get_rank() + 1), device="cuda")
dist.all_reduce(t)
print(f"rank {dist.get_rank()}: all_reduce on cuda:0 gave {t.item()} (expected 3.0)")
dist.destroy_process_group()
PY
  timeout 60 $TORCHRUN "$W/nccl_probe.py" > "$OUT/nccl.txt" 2>&1
  echo "nccl probe exit $?" | tee -a "$OUT/nccl.txt"
fi

echo '{"model": {"image_size": 16, "widths": [8, 16], "block_depth": 1, "embedding_dims": 8},
       "data": {"val_fraction": 0.25}}' > "$W/tiny.json"
args() { echo train --data "$W/data" --out "$W/$1" --config "$W/tiny.json" --epochs 2 \
  --batch-size 6 --no-kid --quiet --precision fp32 --no-compile --device "$DEVICE"; }
timeout 120 python3 -m animeddim $(args one) > "$OUT/ddp-one.log" 2>&1
echo "one process exit $?" | tee "$OUT/ddp.txt"
ANIMEDDIM_DDP_BACKEND=gloo timeout 180 $TORCHRUN -m -- animeddim $(args two) \
  > "$OUT/ddp-two.log" 2>&1
echo "two gloo processes exit $?" | tee -a "$OUT/ddp.txt"
python3 - "$W" "$OUT/ddp.json" <<'PY' 2>&1 | tee -a "$OUT/ddp.txt"
import json, sys
from pathlib import Path
from animeddim import checkpoint as ckpt
w, out = Path(sys.argv[1]), sys.argv[2]
a, ma = ckpt.load(w / "one/checkpoints/last.safetensors")
b, mb = ckpt.load(w / "two/checkpoints/last.safetensors")
diff = {"steps": [ma["step"], mb["step"]]}
for prefix in ("model", "ema"):
    keys = [k for k in a if k.startswith(prefix + ".") and a[k].is_floating_point()]
    diff[prefix] = max((a[k].double() - b[k].double()).abs().max().item() for k in keys)
json.dump(diff, open(out, "w"))
print("largest weight differences, two processes vs one:", diff)
PY
