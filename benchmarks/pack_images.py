"""Pack an image folder into one xz-compressed uint8 array, and unpack it to PNGs again.

    python benchmarks/pack_images.py pack FOLDER OUT.u8.xz
    python benchmarks/pack_images.py unpack IN.u8.xz FOLDER

A lent GPU machine takes 64 MiB of files with a call and has none of the avatar renderer's
system libraries. The flat-coloured avatars, which share most of their parts, compress far
better as one raw array under xz than as PNGs: 10,000 64-px avatars in 1.9 MiB (as PNGs,
3.1 KB each), so the training and held-out avatars travel beside the 42 MB fp16 Inception
copy. Lossless: unpacked
PNGs have the same pixels and file names (and labels.csv / CREDITS.md, packed as they are).
"""

from __future__ import annotations

import json
import lzma
import struct
import sys
from pathlib import Path

import numpy as np
from PIL import Image

EXTRA_FILES = ("labels.csv", "CREDITS.md")  # carried byte for byte when present


def pack(folder: Path, out: Path) -> None:
    names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() == ".png")
    if not names:
        raise SystemExit(f"pack: no PNG files in {folder}")
    pixels = np.stack([np.asarray(Image.open(folder / n).convert("RGB")) for n in names])
    extras = {n: (folder / n).read_text() for n in EXTRA_FILES if (folder / n).is_file()}
    header = json.dumps({"names": names, "shape": pixels.shape, "extras": extras}).encode()
    blob = struct.pack("<Q", len(header)) + header + pixels.tobytes()
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(lzma.compress(blob, preset=9 | lzma.PRESET_EXTREME))
    tmp.replace(out)
    print(f"{len(names)} images {pixels.shape[1:]} -> {out} ({out.stat().st_size / 2**20:.1f} MiB)")


def unpack(packed: Path, folder: Path) -> None:
    blob = lzma.decompress(packed.read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    pixels = np.frombuffer(blob[8 + n :], dtype=np.uint8).reshape(header["shape"])
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in zip(header["names"], pixels, strict=True):
        Image.fromarray(image).save(folder / name)
    for name, text in header["extras"].items():
        (folder / name).write_text(text)
    print(f"{len(pixels)} images -> {folder}")


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("pack", "unpack"):
        print(__doc__, file=sys.stderr)
        return 2
    (pack if argv[0] == "pack" else unpack)(Path(argv[1]), Path(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
