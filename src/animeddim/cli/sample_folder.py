"""What `sample --out` and `evaluate --samples-out` find in their folder and leave there
while they draw: a stopped call's images are kept, and the same command again draws the
rest."""

from __future__ import annotations

import sys
from pathlib import Path

from .. import outputs
from ..words import counted


class SampleFolder:
    """What `sample --out` (`evaluate --samples-out`: `flag`) finds in and leaves in its
    folder `out` (None: no folder; checked on process 0, its refusal raised on every
    process): the images an unfinished call with the same settings left (`kept`, not drawn
    again), the earlier samples `force` replaces (`earlier`, removed just before the first
    new image is written), and the pending note (`outputs.SAMPLE_PENDING`) that holds the
    settings from the first image to the last. `files`: (flag, path) of the command's other
    outputs, which may lie in the folder (--grid, --trajectory); `what`: how the note on kept
    images names them ("image", "sample") and the call ("sample", "evaluation")."""

    def __init__(
        self,
        out: str | Path | None,
        force: bool,
        files,
        job,
        settings: dict | None,
        flag: str = "--out",
        what: tuple[str, str] = ("image", "sample"),
    ) -> None:
        from ..distributed import is_main, on_main

        self.out = Path(out) if out else None
        self.names, self.settings, self.what = job.names, settings, what
        self.ours = [str(p.resolve()) for _, p in files]  # --grid, --trajectory
        self.kept: set[str] = set()
        self.earlier: list[Path] = []
        self.begun = False
        on_main(lambda: self._check(force, files, flag))
        if self.out is not None and not self.earlier and is_main():
            self.begin()

    def _check(self, force: bool, files, flag: str) -> None:
        from ..pipelines.folder import complete_files

        note, others = None, [p for _, p in files]
        if self.out is not None:
            self.earlier, note = outputs.resumable_samples(
                self.out, self.settings, force, others, flag
            )
        listed = set(note.get("files", [])) if note else set()
        for other, path in files:  # an unfinished call's own grid is replaced
            outputs.new_file(path, force or str(path.resolve()) in listed, other)
        if note and self.out is not None:
            self.kept = complete_files(self.out, self.names, self.settings["image_size"])
            if self.kept:
                noun, call = self.what
                rest, measures = len(self.names) - len(self.kept), call == "evaluation"
                then = f", then measuring all {len(self.names)}" if measures else ""
                # a stop after the last image (measuring, writing the grid) left none to draw
                doing = (
                    f"drawing the other {rest}{then}"
                    if rest
                    else ("measuring them" if measures else "none left to draw")
                )
                print(
                    f"note: {str(self.out)!r} holds {len(self.kept)} of "
                    f"{counted(len(self.names), noun)} of this {call}, stopped before its "
                    f"end: {doing}",
                    file=sys.stderr,
                )

    def begin(self) -> None:
        """Remove the earlier samples (--force), then leave the note: from here on the
        folder holds this call's images only."""
        import json

        from ..io import missing_folders, remove_empty_folders, write_text_atomic

        outputs.remove(self.earlier)
        # removed again (innermost first, each if empty) if the call fails before an image
        self.made = missing_folders(self.out)
        note = {"settings": self.settings, "files": self.ours}
        try:
            write_text_atomic(self.out / outputs.SAMPLE_PENDING, json.dumps(note, indent=1) + "\n")
        except BaseException as e:  # a full disk, Ctrl-C: the folders made for the note go
            remove_empty_folders(self.made)
            if not isinstance(e, OSError):
                raise
            # the folder the user gave, not the note's hidden name
            raise OSError(e.errno, e.strerror, str(self.out)) from e
        self.begun = True

    def count_kept(self) -> int:
        """Images of this call in the folder (none before `begin`: those are earlier ones)."""
        if not self.begun:
            return 0
        return sum((self.out / name).is_file() for name in self.names)

    def abandon(self) -> None:
        """After a failure: the note goes if no image of this call is there (the folder is
        then as it was, and gone, with each folder above it that the call made, if the call
        made it); else it stays, and the same command goes on."""
        from ..io import remove_empty_folders

        if self.begun and not self.count_kept():
            (self.out / outputs.SAMPLE_PENDING).unlink(missing_ok=True)
            remove_empty_folders(self.made)  # only if empty: nothing but the note was written

    def finish(self) -> None:
        if self.out is not None:
            (self.out / outputs.SAMPLE_PENDING).unlink(missing_ok=True)


def folder_settings(out, n: int, loaded, settings, asked: dict, job) -> dict | None:
    """What the images of `sample --out` or `evaluate --samples-out` (`out`; None: no
    folder, and None returned) depend on, as JSON values: the model file's digest, the image
    size, --n (`n`), the seed, sampler, steps, eta, clipping, precision, the
    kind of device, whether the network is compiled (its rounding; `job.compiled`) and what
    the images are asked (`asked`). Other values would draw other
    images, which an unfinished folder must not be mixed with; the batch size and the
    number of processes change none of them."""
    import json

    import torch

    from ..diffusion.samplers import resolve_clip
    from ..distributed import is_main
    from ..io import file_digest

    if not out or not is_main():
        return None
    held = {
        "model": f"sha256:{file_digest(loaded.path)[:16]}",
        "image_size": loaded.config.model.image_size,
        "n": n,
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
