# Sourced by the gpu-*.sh scripts. A call brings back at most 8 files from $OUT (16 MiB each,
# two folders down), and these scripts write more: on exit everything under $OUT goes into
# one archive, $OUT/results.tgz, with log.txt also left beside it to read at once.
bundle_out() {
  [ -d "$OUT" ] || return 0
  tar -czf /tmp/gpu-results.tgz -C "$OUT" . 2>/dev/null || return 0
  cp "$OUT/log.txt" /tmp/gpu-results-log.txt 2>/dev/null
  find "$OUT" -mindepth 1 -delete
  mv /tmp/gpu-results.tgz "$OUT/results.tgz"
  mv /tmp/gpu-results-log.txt "$OUT/log.txt" 2>/dev/null
  echo "results: $OUT/results.tgz ($(du -h "$OUT/results.tgz" | cut -f1)); unpack with tar -xzf"
}
trap bundle_out EXIT
