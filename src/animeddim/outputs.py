"""What a command may write over: existing outputs are refused unless --force.

Every command that writes checks its outputs here before any work starts, so a refusal
costs nothing and nothing already on disk is touched. With --force the command's earlier
outputs that it does not write again are removed once the new ones are written (or just
before, for samples): the folder ends up holding one call's outputs, never a mix, and a
failed run leaves the old ones in place. The files themselves are written atomically
(`io`), so a crash or a full disk never leaves half a file under its final name.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

# what `sample --out DIR` writes (with --grid-by: ATTR-VALUE-seedS-IIIIII.png): the image
# index in six digits, more from 1,000,000 on, without leading zeros (`sample_names`)
SAMPLE_NAME = re.compile(r"([\w.-]+-)?seed-?\d+-(\d{6}|[1-9]\d{6,})\.png")


def sample_names(seed: int, n: int, first: int = 0) -> list[str]:
    """The files of images first .. first + n - 1 of `seed`: seedS-IIIIII.png (index
    1,000,000 and on: seedS-IIIIIII.png, as many digits as it has; `SAMPLE_NAME`)."""
    return [f"seed{seed}-{i:06d}.png" for i in range(first, first + n)]


REPORT_NAMES = re.compile(  # what `report --out DIR` writes
    r"report\.(md|html)|fig[\w.-]*\.png|samples-[\w.-]+\.png|"
    r"(table[\w.-]*|steps-table)\.(md|csv)"
)
# Left in --out while a report is written: a report stopped before its end (Ctrl-C, a kill,
# a full disk) is written again by the next call without --force (`unfinished`).
REPORT_PENDING = ".animeddim-report-pending"
# Left in `sample --out DIR` while its images are drawn, holding the settings that draw them:
# the same command again keeps the images there and draws the rest (`resumable_samples`).
SAMPLE_PENDING = ".animeddim-sample-pending.json"
STEPS_NAMES = ("steps.csv", "steps.md", "steps.png")
INVERT_NAMES = ("latents.safetensors", "side-by-side.png")
COVERAGE_NAMES = ("coverage.json", "coverage.csv", "coverage.md", "coverage.png")


# a file name that is only an extension ('.png', '.safetensors'): no name before the dot
ONLY_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,15}")


class OutputExists(ValueError):
    """An output already exists and --force was not given; the message says which."""


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(os.path.abspath(a)) == Path(os.path.abspath(b))


def _no_file_above(path: Path, flag: str) -> None:
    """Refuse an output under a file ('notes.txt/out.png'): it could never be created, and
    the mkdir would fail only once the work is done, with "File exists: notes.txt"."""
    from .io import file_in_the_way  # here: io loads numpy, and the CLI's parser must not

    blocker = file_in_the_way(path)
    if blocker is not None:
        raise OutputExists(
            f"{flag} {str(path)!r} cannot be created: {str(blocker)!r} is a file, not a folder"
        )
    _writable(path, flag)


def _writable(path: Path, flag: str) -> None:
    """Refuse an output whose folder cannot be written: a read-only file system, or (for
    users other than root) a folder without write permission. Before: the command did all
    its work (minutes of sampling and KID), then failed writing its first file. The folder
    written into is the deepest one that exists on the way to `path`."""
    folder = next((p for p in (path, *path.parents) if p.is_dir()), Path("."))
    if not os.access(folder, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if _read_only(folder) else "has no write permission"
        raise OutputExists(f"{flag} {str(path)!r} cannot be written: {str(folder)!r} {why}")


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows)
        return False


def new_file(path: str | Path, force: bool, flag: str = "--out") -> Path:
    """`path`, checked to be writable as a file: absent, or present and `force` given."""
    file_name(path, flag)
    path = Path(path)
    _no_file_above(path, flag)
    if path.is_dir():
        raise OutputExists(f"{flag} {str(path)!r} is a folder; give a file name")
    if path.exists() and not force:
        raise OutputExists(
            f"{flag} {str(path)!r} already exists; use --force to replace it (or choose "
            "another name)"
        )
    return path


def file_name(path: str | Path, flag: str = "--out") -> None:
    """Refuse a file output typed with a trailing slash ('models/'): it names a folder, but
    `Path` drops the slash, so the file was written under the folder's name ('models', no
    suffix) beside where the user meant it to go. Refuse a name that is only an extension
    ('.png', 'out/.gif'): `Path` reads it as a hidden file with no suffix, so `sample --grid
    .png` was told to name it .png and `interpolate --out .gif` wrote '.gif.png'."""
    text = os.fspath(path)
    if len(text) > 1 and text.endswith(tuple(s for s in (os.sep, os.altsep) if s)):
        raise OutputExists(
            f"{flag} {text!r} ends in {text[-1]!r}, which names a folder; give a file name "
            f"(e.g. {os.path.join(text, 'NAME')!r})"
        )
    name = Path(text).name
    if ONLY_EXTENSION.fullmatch(name):
        named = os.path.join(os.path.dirname(text), "NAME" + name)
        raise OutputExists(
            f"{flag} {text!r} is only an extension, with no name before it (it would be a "
            f"hidden file); give a name (e.g. {named!r})"
        )


def distinct(paths: Sequence[tuple[str, Path]]) -> None:
    """Refuse two outputs of one command that name the same file ((flag, path) pairs)."""
    for i, (flag_a, a) in enumerate(paths):
        for flag_b, b in paths[i + 1 :]:
            if _same(a, b):
                raise OutputExists(f"{flag_a} and {flag_b} name the same file {str(a)!r}")


def not_inside(
    out: str | Path,
    inputs: Iterable[str | Path],
    flag: str,
    what: str,
    why: str = "a later run would read these outputs as input",
) -> None:
    """Refuse an output folder or file inside (or equal to) an input folder or file."""
    out_abs = Path(os.path.realpath(out))
    for src in inputs:
        src_abs = Path(os.path.realpath(src))
        if out_abs == src_abs or src_abs in out_abs.parents:
            raise OutputExists(
                f"{flag} {str(out)!r} is inside {what} {str(src)!r}; {why}: choose a place "
                "outside it"
            )


def images_what(images: str | Path) -> str:
    """How `not_inside` names an --images input: a folder, or one image file."""
    return "the --images file" if Path(images).is_file() else "the --images folder"


def earlier_outputs(
    folder: str | Path,
    names: re.Pattern[str] | Sequence[str],
    force: bool,
    flag: str = "--out",
    recursive_in: Sequence[str] = (),
) -> list[Path]:
    """The files in `folder` an earlier run of the command wrote (top level: names matching
    `names`; everything inside the subfolders `recursive_in`).

    Without `force`, any of them is an error. With it, they are returned for :func:`remove`
    once the new outputs are ready to be written.
    """
    folder = Path(folder)
    _no_file_above(folder, flag)
    if folder.exists() and not folder.is_dir():
        raise OutputExists(f"{flag} {str(folder)!r} is a file; give a folder")
    if not folder.is_dir():
        return []

    def matches(name: str) -> bool:
        return bool(names.fullmatch(name)) if isinstance(names, re.Pattern) else name in names

    found = [p for p in sorted(folder.iterdir()) if p.is_file() and matches(p.name)]
    for sub in recursive_in:
        if (folder / sub).is_dir():
            found += sorted(p for p in (folder / sub).rglob("*") if p.is_file())
    if found and not force:
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        raise OutputExists(
            f"{flag} {str(folder)!r} already holds earlier outputs ({found[0].name}{more}); "
            "use --force to replace them (or choose another folder)"
        )
    return found


def unfinished(folder: str | Path, note: str) -> bool:
    """Whether `folder` holds `note` (:data:`REPORT_PENDING`): a command that writes it
    before its first output and removes it after its last was stopped in between, so the
    outputs there are its unfinished ones, which the next call replaces without --force."""
    return (Path(folder) / note).is_file()


def read_note(folder: str | Path, note: str) -> dict | None:
    """The JSON object a pending `note` in `folder` holds: None when there is none, {} when
    it cannot be read (a note of unknown settings)."""
    path = Path(folder) / note
    if not path.is_file():
        return None
    try:
        held = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return held if isinstance(held, dict) else {}


def resumable_samples(
    folder: str | Path,
    settings: dict,
    force: bool,
    own: Sequence[Path] = (),
    flag: str = "--out",
) -> tuple[list[Path], dict | None]:
    """Check `folder` for `sample --out`, which writes its images as they are drawn and
    leaves :data:`SAMPLE_PENDING` (holding `settings`, JSON values) until the last is: the
    earlier samples to remove before the first new one is written (with `force`), and the
    note when the folder holds an unfinished call with these settings, whose images are
    kept (None otherwise). Unfinished samples of other settings are refused without
    `force`, naming what differs: they are never mixed with these."""
    note = read_note(folder, SAMPLE_PENDING)
    present = Path(folder).is_dir() and any(
        SAMPLE_NAME.fullmatch(p.name) for p in Path(folder).iterdir()
    )
    if note is not None and (note.get("settings") == settings or not present):
        sample_folder(folder, True, own, flag)  # images that are not samples: refused
        return [], note
    if note is not None and not force:
        raise OutputExists(
            f"{flag} {str(folder)!r} holds the unfinished samples of other settings "
            f"({settings_differences(note.get('settings'), settings)}): give another {flag}, "
            "or use --force to replace them"
        )
    return sample_folder(folder, force, own, flag), None


def settings_differences(there: object, here: dict) -> str:
    """'steps 20 there, 10 now; ...' for the keys whose values differ."""
    if not isinstance(there, dict):
        return f"its note {SAMPLE_PENDING} cannot be read"
    return "; ".join(
        f"{k} {json.dumps(there.get(k))} there, {json.dumps(here.get(k))} now"
        for k in sorted(there.keys() | here.keys())
        if there.get(k) != here.get(k)
    )


def remove(files: Iterable[Path]) -> None:
    """Delete earlier outputs (see :func:`earlier_outputs`)."""
    for f in files:
        f.unlink(missing_ok=True)


def sample_folder(
    folder: str | Path, force: bool, own: Sequence[Path] = (), flag: str = "--out"
) -> list[Path]:
    """Earlier samples in `folder` (refused without `force`); images that are not samples,
    anywhere under it, are refused even with it: the folder must end up holding these
    samples only (a KID of it would otherwise mix sets and sizes). `own`: other outputs of
    the same command (--grid) that may lie in the folder; `flag`: the option that named it."""
    from .data import find_images

    earlier = earlier_outputs(folder, SAMPLE_NAME, force, flag)
    if Path(folder).is_dir():
        mine = {Path(os.path.abspath(p)) for p in [*earlier, *own]}
        foreign = [p for p in find_images(Path(folder)) if Path(os.path.abspath(p)) not in mine]
        if foreign:
            raise OutputExists(
                f"{flag} {str(folder)!r} holds images that are not samples (e.g. "
                f"{str(foreign[0])!r}); sample into a new or empty folder"
            )
    return earlier


def signature(files: Iterable[Path]) -> dict[Path, tuple[int, int]]:
    """Identity (inode, mtime) of each file, for :func:`remove_unchanged`."""
    sig = {}
    for f in files:
        st = f.stat()
        sig[f] = (st.st_ino, st.st_mtime_ns)
    return sig


def remove_unchanged(before: dict[Path, tuple[int, int]]) -> None:
    """After a command has written its new outputs, delete the earlier ones it did not write
    again (same inode and mtime as before): a failed command leaves all earlier outputs,
    a successful one leaves only its own."""
    for f, sig in before.items():
        try:
            st = f.stat()
        except FileNotFoundError:
            continue
        if (st.st_ino, st.st_mtime_ns) == sig:
            f.unlink(missing_ok=True)
