"""What `sample --out` finds in its folder and leaves there while it draws."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import outputs
from ..words import counted


class SampleFolder:
    """What `sample --out` finds in and leaves in its folder (checked on process 0, its
    refusal raised on every process): the images an unfinished call with the same settings
    left (`kept`, not drawn again), the earlier samples --force replaces (`earlier`,
    removed just before the first new image is written), and the pending note
    (`outputs.SAMPLE_PENDING`) that holds the settings from the first image to the last."""

    def __init__(self, a: argparse.Namespace, files, job, settings: dict | None) -> None:
        from ..distributed import is_main, on_main

        self.out = Path(a.out) if a.out else None
        self.names, self.settings = job.names, settings
        self.ours = [str(p.resolve()) for _, p in files]  # --grid, --trajectory
        self.kept: set[str] = set()
        self.earlier: list[Path] = []
        self.begun = False
        on_main(lambda: self._check(a, files))
        if self.out is not None and not self.earlier and is_main():
            self.begin()

    def _check(self, a: argparse.Namespace, files) -> None:
        from ..pipelines.folder import complete_files

        note, others = None, [p for _, p in files]
        if self.out is not None:
            self.earlier, note = outputs.resumable_samples(self.out, self.settings, a.force, others)
        listed = set(note.get("files", [])) if note else set()
        for flag, path in files:  # an unfinished call's own grid is replaced
            outputs.new_file(path, a.force or str(path.resolve()) in listed, flag)
        if note and self.out is not None:
            self.kept = complete_files(self.out, self.names, self.settings["image_size"])
            if self.kept:
                print(
                    f"note: {str(self.out)!r} holds {len(self.kept)} of "
                    f"{counted(len(self.names), 'image')} of this sample, stopped before its "
                    "end: drawing the other "
                    f"{len(self.names) - len(self.kept)}",
                    file=sys.stderr,
                )

    def begin(self) -> None:
        """Remove the earlier samples (--force), then leave the note: from here on the
        folder holds this call's images only."""
        import json

        from ..io import write_text_atomic

        outputs.remove(self.earlier)
        note = {"settings": self.settings, "files": self.ours}
        try:
            write_text_atomic(self.out / outputs.SAMPLE_PENDING, json.dumps(note, indent=1) + "\n")
        except OSError as e:  # the folder the user gave, not the note's hidden name
            raise OSError(e.errno, e.strerror, str(self.out)) from e
        self.begun = True

    def count_kept(self) -> int:
        """Images of this call in the folder (none before `begin`: those are earlier ones)."""
        if not self.begun:
            return 0
        return sum((self.out / name).is_file() for name in self.names)

    def abandon(self) -> None:
        """After a failure: the note goes if no image of this call is there (the folder is
        then as it was); else it stays, and the same command goes on."""
        if self.begun and not self.count_kept():
            (self.out / outputs.SAMPLE_PENDING).unlink(missing_ok=True)

    def finish(self) -> None:
        if self.out is not None:
            (self.out / outputs.SAMPLE_PENDING).unlink(missing_ok=True)


def _folder_settings(a: argparse.Namespace, loaded, settings, asked: dict, job) -> dict | None:
    """What the images of `sample --out` depend on, as JSON values: the model file's
    digest, the image size, --n, the seed, sampler, steps, eta, clipping, precision, the
    kind of device, whether the network is compiled (its rounding; `job.compiled`) and what
    the images are asked (`asked`). Other values would draw other
    images, which an unfinished folder must not be mixed with; the batch size and the
    number of processes change none of them."""
    import json

    import torch

    from ..diffusion.samplers import resolve_clip
    from ..distributed import is_main
    from ..io import file_digest

    if not a.out or not is_main():
        return None
    held = {
        "model": f"sha256:{file_digest(loaded.path)[:16]}",
        "image_size": loaded.config.model.image_size,
        "n": a.n,
        "seed": settings.seed,
        "sampler": settings.sampler,
        "steps": settings.steps,
        "eta": settings.eta,
        "clip_x0": bool(resolve_clip(settings.clip, settings.sampler)),
        "precision": settings.precision,
        "device": torch.device(settings.device).type,
        "compiled": job.compiled,
        **asked,
    }
    return json.loads(json.dumps(held))
