"""What a run folder holds, and reading and writing it.

    RUN/config.json                  the RunConfig (data, model, schedule, train)
    RUN/metrics.csv                  one row per finished epoch (METRIC_COLUMNS)
    RUN/reference.png                the first validation images (for the report's Fig. 1)
    RUN/samples/epoch-NNNN.png       a sample grid of the EMA network per epoch
    RUN/checkpoints/last.safetensors the newest checkpoint (and step-N, best-kid)
    RUN/.animeddim.lock              held (flock) by the process training in RUN; its PID
    RUN/eval-*.json, RUN/steps.csv   what `evaluate` and a steps study wrote

Knows nothing of training: `train` calls these to create, resume and append to a run;
`report` calls `read_run`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .config import ConfigError, RunConfig, settings
from .config_files import loads_json
from .io import (
    file_in_the_way,
    is_temp_name,
    missing_folders,
    remove_empty_folders,
    remove_stale_temp_files,
    write_bytes_atomic,
    write_text_atomic,
)
from .words import counted

DASH = "–"  # what an empty or missing value prints as

METRIC_COLUMNS = [
    "epoch",
    "step",
    "train_noise_loss",
    "train_image_loss",
    "val_noise_loss",
    "val_image_loss",
    "kid",
    "learning_rate",
    "images_per_s",
    "epoch_seconds",  # of training since the previous row (train --epoch-end-every)
    "wall_seconds",
    "kid_seconds",
    "standard_kid",  # train --eval-every: against --eval-real, on --eval-images samples
    "standard_kid_seconds",
]


class RunFolderError(ValueError):
    """The run folder cannot be used (exists with another run, missing on resume, ...)."""


LOCK_NAME = ".animeddim.lock"  # held (flock) by the process writing into the run folder
# What a run folder holds before its first checkpoint: a start that failed there (bad data,
# a batch larger than the split, a kill) leaves only these, and a new run may take the folder.
_UNSTARTED = {"config.json", "reference.png", "checkpoints", "samples", LOCK_NAME}


def started(run_dir: Path) -> bool:
    """True once a run folder holds a checkpoint or a metrics row: then only --resume uses it."""
    ck = run_dir / "checkpoints"
    if (run_dir / "metrics.csv").exists() or (ck.is_dir() and any(ck.glob("*.safetensors"))):
        return True
    names = {p.name for p in run_dir.iterdir() if not is_temp_name(p.name)}
    samples = run_dir / "samples"
    return bool(names - _UNSTARTED) or (samples.is_dir() and any(samples.iterdir()))


def check_new_run_dir(run_dir: Path) -> None:
    """RunFolderError unless `run_dir` is absent, empty, or a run that never got going."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"--out {str(run_dir)!r} is a file, not a folder")
    if (blocker := file_in_the_way(run_dir)) is not None:
        raise RunFolderError(
            f"--out {str(run_dir)!r} cannot be created: {str(blocker)!r} is a file, not a folder"
        )
    if run_dir.is_dir() and any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        if not (run_dir / "config.json").is_file() or started(run_dir):
            raise RunFolderError(
                f"run folder {str(run_dir)!r} already holds files; use --resume to continue "
                "that run or choose a new --out"
            )


def prepare_run_dir(run_dir: Path, cfg: RunConfig, resume: bool) -> None:
    """Make `run_dir` ready: a new run's folders and config.json, or a resumed run's cleanup
    (its config.json is written once its checkpoint is read: `write_config`)."""
    cfg_file = run_dir / "config.json"
    if resume:
        if not cfg_file.is_file():
            raise RunFolderError(f"cannot resume: {str(run_dir)!r} is not an animeddim run folder")
        for d in (run_dir, run_dir / "checkpoints", run_dir / "samples"):
            remove_stale_temp_files(d)  # half-written files of a killed process
        return
    check_new_run_dir(run_dir)
    for d in (run_dir, run_dir / "checkpoints", run_dir / "samples"):
        if d.is_dir():
            remove_stale_temp_files(d)
    (run_dir / "reference.png").unlink(missing_ok=True)  # of the start that failed
    # config.json before the folders: a start whose config.json cannot be written (a full
    # disk) leaves a folder the same command takes again, not one --resume cannot read and
    # a new run refuses ("already holds files").
    write_text_atomic(cfg_file, cfg.to_json() + "\n")
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "samples").mkdir(exist_ok=True)


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    """Record a resumed run's settings in its config.json (more epochs, another device, ...)."""
    write_text_atomic(run_dir / "config.json", cfg.to_json() + "\n")


def check_left_to_train(
    run_dir: Path, cfg: RunConfig, epoch: int, step: int, batch_in_epoch: int, steps_per_epoch: int
) -> None:
    """RunFolderError when a run resumed at (epoch, step, batch_in_epoch) has nothing left to
    train: its epochs are done, or it stopped at --max-steps inside an epoch or after its end
    (one stopped before its epoch end still has that to do)."""
    tc, why, remedy = cfg.train, [], []
    if epoch >= tc.epochs:
        why.append(f"{counted(epoch, 'epoch')} done and --epochs is {tc.epochs}")
        remedy.append(f"--epochs above {epoch}")
    if tc.max_steps and step >= tc.max_steps and batch_in_epoch < steps_per_epoch:
        why.append(f"{counted(step, 'step')} done and --max-steps is {tc.max_steps}")
        remedy.append(f"--max-steps above {step} (or 0: no limit)")
    if why:
        raise RunFolderError(
            f"nothing to train in run folder {str(run_dir)!r}: {' and '.join(why)}; resume with "
            f"{' and '.join(remedy)} to train on"
        )


@contextmanager
def lock(run_dir: Path, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the run folder for this process: RunFolderError naming the holder if another has it.

    An advisory lock (flock) on RUN/.animeddim.lock, which holds the holder's PID. The kernel
    drops the lock when its process dies, so a killed run never blocks the next one; the PID
    it left behind is then reported in a note and replaced.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows): no protection
        yield
        return
    made = missing_folders(run_dir)  # runs/a/b: each of them that is new, innermost first
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise RunFolderError(
                f"run folder {str(run_dir)!r} is in use by process {holder} (it holds "
                f"{str(path)!r}); wait for it to finish or stop it first"
            ) from None
        previous = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        if previous and previous != str(os.getpid()):
            log(f"note: took over the lock of process {previous}, which no longer runs")
        try:
            try:  # a full disk: the error names the file (the kernel's does not)
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(path)) from None
            yield
        finally:
            os.ftruncate(fd, 0)  # released cleanly: no PID left to report
            if made and [p.name for p in run_dir.iterdir()] == [LOCK_NAME]:
                path.unlink()  # a start that failed before writing anything leaves nothing
                remove_empty_folders(made)
    finally:
        os.close(fd)


def data_fingerprint(files: Sequence[Path], root: Path) -> str:
    """Digest of an image list: each file's path below `root` and byte size, in order.

    Links that lead nowhere (broken, or to themselves) are left out: `data.find_images` lists
    them so that their reason is noted, but a run started before it did has them out of its
    fingerprint, and they hold no image either way.
    """
    h, count = hashlib.sha256(), 0
    for f in files:
        try:
            size = f.stat().st_size
        except OSError:
            if f.is_symlink():  # broken, or a link to itself
                continue
            size = -1
        # fsencode: a name that is not UTF-8 (Latin-1 from an old archive) is its own bytes,
        # where str.encode raised; UTF-8 names give the bytes they always gave.
        h.update(os.fsencode(f.relative_to(root).as_posix()) + f"\0{size}\n".encode())
        count += 1
    return f"{count}:{h.hexdigest()[:32]}"


def recorded_data(meta: dict[str, Any], name: str) -> str:
    """The data setting `name` as the checkpoint whose metadata is `meta` recorded it ('' where
    it recorded none: a checkpoint written before the setting existed)."""
    return meta["config"].get("data", {}).get(name, "")


def check_same_data(
    cfg: RunConfig, root: Path, fingerprint: str, trained_on: str = ""
) -> str | None:
    """What differs between the images a run trained on and those in `root` now, or None if
    nothing. The images are compared (`data_fingerprint`: names below the folder and sizes),
    not the folder's place: a folder moved or copied elsewhere holds the same images.

    :param trained_on: where the run read them (its last checkpoint's `data.abs_path`),
        named when `root` is another folder; default the place `cfg` records.
    Runs written before the data was recorded (no fingerprint) are accepted.
    """
    if not cfg.data.fingerprint or fingerprint == cfg.data.fingerprint:
        return None
    then_root = trained_on or cfg.data.abs_path or cfg.data.path
    n_then, n_now = (int(f.split(":")[0]) for f in (cfg.data.fingerprint, fingerprint))
    counts = f"{counted(n_then, 'file')} then, {n_now} now, or files renamed or rewritten"
    if Path(then_root).resolve() != root.resolve():
        return (
            f"the images in {str(root)!r} are not those the run trained on in {then_root!r} "
            f"({counts})"
        )
    return f"the images in {then_root!r} changed since the run started ({counts})"


def resume_changes(run: RunConfig, given: RunConfig) -> list[tuple[str, str]]:
    """The settings (section, name) a resume cannot change (all but those marked resumable)
    that `given` (the run's settings with what a resume was given applied) holds otherwise
    than `run`, compared as `compared` says. Where the data lies may change (moved or
    copied: `take_moved_data`): a labels file's place (`_kept`), and the data folder's where
    the run recorded a fingerprint of its images, checked as they are read (`check_same_data`)."""
    changes = []
    for section, f in settings():
        key = (section, f.name)
        if f.metadata["resume"] or (key == ("data", "path") and run.data.fingerprint):
            continue
        mine, theirs = compared(run, given, section, f)
        if _kept(section, f.name, mine) != _kept(section, f.name, theirs):
            changes.append(key)
    return changes


def take_moved_data(run: RunConfig, given: RunConfig) -> None:
    """Record in `run` the data folder and labels file `given` names where they lie elsewhere
    than the run's (the data moved or was copied; `resume_changes` found no other change). A
    labels file the run read from its data folder, not given anew, is taken at its place in
    the new folder where it is there: it moved with the folder."""
    where = {f.name: f for s, f in settings() if s == "data"}
    labels_then, labels_now = compared(run, given, "data", where["labels"])
    if labels_then != labels_now:
        run.data.labels = given.data.labels
    then, now = compared(run, given, "data", where["path"])
    if then == now:
        return
    if labels_then == labels_now and _kept("data", "labels", run.data.labels) != run.data.labels:
        labels = Path(os.path.abspath(run.data.labels))
        for base in (Path(then), Path(os.path.abspath(run.data.path))):
            if labels.is_relative_to(base):
                moved = Path(given.data.path) / labels.relative_to(base)
                if moved.is_file():
                    run.data.labels = str(moved)
                break
    # where `train` reads it, recorded as a new run's is: its absolute place once it is read
    # (each process resolves its own: nodes may reach one folder by other paths)
    run.data.path, run.data.abs_path = given.data.path, ""


def compared(run: RunConfig, given: RunConfig, section: str, f: Any) -> tuple[Any, Any]:
    """The run's value of setting `f` and the given one, as a resume compares them: a folder
    or file is the same however it is spelt (relative, a trailing slash, a symbolic link:
    both made absolute and resolved), and the run's data folder is the one it trained on
    (`data.abs_path`, wherever it is resumed from)."""
    mine, theirs = getattr(getattr(run, section), f.name), getattr(getattr(given, section), f.name)
    if mine != theirs and f.metadata["path"] and mine and theirs and isinstance(theirs, str):
        if (section, f.name) == ("data", "path"):
            mine = run.data.abs_path or mine
        return str(Path(mine).resolve()), str(Path(theirs).resolve())
    return mine, theirs


def load_run_config(run_dir: Path) -> RunConfig:
    """The config.json of an existing run folder."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():  # its config.json, checkpoints/, ...?
        raise RunFolderError(
            ckpt.not_a_run_folder(run_dir)
            or f"{str(run_dir)!r} is not an animeddim run folder (no config.json)"
        )
    try:
        d = loads_json((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8 at all
        raise RunFolderError(f"cannot read {str(run_dir / 'config.json')!r}: {e}") from None
    return RunConfig.from_dict(d).validate()


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """Add `row` to RUN/metrics.csv (its header first, in a new or empty file).

    The file is written again whole, under a temporary name renamed over it (`io`), rather
    than appended to: an append cut short by a full disk left half a row, numbers cut off
    that the report read as they stood, and an error naming no file.
    """
    path = run_dir / "metrics.csv"
    try:
        before = path.read_bytes()
    except FileNotFoundError:
        before = b""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS)
    if not before:
        w.writeheader()
    w.writerow({k: _fmt(row.get(k)) for k in METRIC_COLUMNS})
    write_bytes_atomic(path, before + buf.getvalue().encode("utf-8"))


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def truncate_metrics(run_dir: Path, epoch: int) -> None:
    """Drop rows of epochs after `epoch` (they came after the checkpoint we resume from)."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return
    rows = _read_csv(path)[1]
    try:
        rows = [r for r in rows if int(r["epoch"]) <= epoch]
    except (KeyError, TypeError, ValueError):
        raise RunFolderError(
            f"cannot resume: {str(path)!r} is damaged (a row without an integer epoch); "
            "repair it, or remove it to resume without the earlier epochs' rows"
        ) from None
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\r\n")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def latest_checkpoint(
    run_dir: Path, cfg: RunConfig, log: Callable[[str], None] = print
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of the newest complete checkpoint of the run in `run_dir`.

    That is last.safetensors, or a step-N file with a higher step: a kill between writing
    step-N and last.safetensors, or a damaged last.safetensors, leaves step-N the newest.
    CheckpointError if none is readable or the newest belongs to another model or schedule.
    """
    d = run_dir / "checkpoints"
    found, errors = None, []
    try:
        if (d / "last.safetensors").is_file():
            found = (*ckpt.load(d / "last.safetensors"), d / "last.safetensors")
    except ckpt.CheckpointError as e:
        errors.append(str(e))
    files = d.iterdir() if d.is_dir() else ()
    names = ((re.fullmatch(r"step-(\d+)\.safetensors", f.name), f) for f in files)
    steps = [(int(m.group(1)), f) for m, f in names if m]
    for n, f in sorted(steps, reverse=True):
        if found is not None and n <= found[1]["step"]:
            break
        try:
            found = (*ckpt.load(f), f)
            break
        except ckpt.CheckpointError as e:
            errors.append(str(e))
    if found is None:
        others = sorted(f.name for f in d.glob("*.safetensors")) if d.is_dir() else []
        why = "the run stopped before its first one"
        if errors:
            why = errors[0]
        elif others:  # last.safetensors deleted, say: best-kid is an older state
            why = (
                f"no last.safetensors or step-N file; it holds {', '.join(others)}, which a "
                "resume does not start from"
            )
        raise ckpt.CheckpointError(
            f"cannot resume: run folder {str(run_dir)!r} holds no complete checkpoint ({why})"
        )
    tensors, meta, f = found
    if f.name != "last.safetensors":
        log(f"note: resuming from {f.name}, newer than last.safetensors")
    _check_same_run(meta, cfg, f)
    return tensors, meta


# Settings of the data and train sections that a resumed run's config.json may hold otherwise
# than its checkpoint, besides those marked resumable: where the data folder is (data moved:
# config.json edited to say where; its labels file too: `_kept`) and the weights the run
# started from.
RECORDS = {
    ("data", "path"),
    ("data", "abs_path"),
    ("data", "fingerprint"),
    ("data", "labels_digest"),  # recorded as the fingerprint is: new labels allowed on resume
    ("data", "colour_profiles"),  # how the run reads its images: taken from its checkpoint
    ("train", "init"),
}


def _kept(section: str, name: str, value: Any) -> Any:
    """What of a setting a run keeps: its value; of data.labels only its source (none,
    'folders' or a labels file), as a labels file lying in the data folder moves with it."""
    if (section, name) == ("data", "labels") and value not in ("", "folders"):
        return "a labels file"
    return value


def _fixed(section: str, part: Any) -> list[str]:
    """The settings of `section` that stay as the run started (all of model and schedule)."""
    if section in ("model", "schedule"):
        return list(vars(part))
    return [
        f.name
        for s, f in settings()
        if s == section and not f.metadata["resume"] and (s, f.name) not in RECORDS
    ]


def _check_same_run(meta: dict[str, Any], cfg: RunConfig, path: Path) -> None:
    """CheckpointError unless the checkpoint's settings that a run keeps (network, schedule,
    objective, data split, optimiser, seed, ...: all but the resumable ones) are those of
    `cfg`: a checkpoint of another run, or a config.json edited by hand."""
    if meta.get("kind") != "training":  # every training checkpoint says so
        raise ckpt.CheckpointError(
            f"{str(path)!r} is not a training checkpoint (its kind is {meta.get('kind')!r}: an "
            "exported model holds the EMA weights alone, not the network, optimiser and step "
            "a resume needs); move it out of the run's checkpoints folder"
        )
    try:
        stored = RunConfig.from_dict(meta["config"])
    except (KeyError, ConfigError) as e:
        raise ckpt.CheckpointError(f"{str(path)!r} has no usable config: {e}") from None
    for part in ("model", "schedule", "train", "data"):
        mine, theirs = getattr(cfg, part), getattr(stored, part)
        diff = [
            k
            for k in _fixed(part, mine)
            if _kept(part, k, vars(theirs)[k]) != _kept(part, k, vars(mine)[k])
        ]
        if diff:
            k = diff[0]
            raise ckpt.CheckpointError(
                f"{str(path)!r} belongs to another run: {part}.{k} is "
                f"{getattr(theirs, k)!r} there and {getattr(mine, k)!r} in config.json (a run "
                "keeps the settings it started with, all but those `train --help` says may "
                f"change on --resume: put {getattr(theirs, k)!r} back in config.json, or start "
                "a new run)"
            )


@dataclass
class RunFiles:
    """What one run folder holds, parsed; numbers are floats, empty cells None."""

    path: Path
    name: str  # sanitised folder name, unique within one report
    config: RunConfig
    rows: list[dict[str, float | None]]  # metrics.csv, one per epoch, in file order
    evals: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # oldest first
    steps: list[dict[str, str]] | None = None  # steps.csv rows, None if there is none

    @property
    def dataset(self) -> str:
        """Name of the training folder, e.g. "danbooru": its basename, from the absolute path
        recorded at training (so `--data .` is named too), with the parent for a folder named
        "images" (`data flowers102 --out flowers` trains on "flowers/images")."""
        data = self.config.data
        path = Path(data.abs_path or data.path)
        if path.name == "images" and path.parent.name:
            return f"{path.parent.name}/{path.name}"
        return path.name or data.path or DASH

    @property
    def has_kid(self) -> bool:
        return any(r.get("kid") is not None for r in self.rows)

    @property
    def has_standard_kid(self) -> bool:  # `train --eval-every`
        return any(r.get("standard_kid") is not None for r in self.rows)

    @property
    def has_val(self) -> bool:
        return any(r.get("val_noise_loss") is not None for r in self.rows)


def sanitise(name: str) -> str:
    """A folder name made safe for file names: letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"


def number_or_none(s: str | None) -> float | None:
    """A CSV cell as a float; empty or unparsable cells are None (printed as a dash)."""
    if s is None or not s.strip():
        return None
    try:
        return float(s)
    except ValueError:
        return None


def read_run(path: str | Path, name: str | None = None) -> RunFiles:
    """Parse a run folder; RunFolderError naming the folder if config.json or metrics.csv is bad."""
    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"run folder {str(path)!r} does not exist")
    missing = [f for f in ("config.json", "metrics.csv") if not (path / f).is_file()]
    if missing:  # a file or a run's checkpoints/ folder: the run folder to give is named
        raise RunFolderError(
            ckpt.not_a_run_folder(path)
            or f"{str(path)!r} is not an animeddim run folder: no {' and no '.join(missing)} "
            "(both are written by `animeddim train`)"
        )
    try:
        config = RunConfig.from_dict(json.loads((path / "config.json").read_text("utf-8")))
        config.validate()
    except (OSError, ValueError, ConfigError) as e:  # ValueError: not JSON, or not UTF-8
        raise RunFolderError(f"cannot read {str(path / 'config.json')!r}: {e}") from None
    fields, table = _read_csv(path / "metrics.csv")
    if "epoch" not in fields:
        raise RunFolderError(f"{str(path / 'metrics.csv')!r} has no 'epoch' column")
    rows = [{k: number_or_none(v) for k, v in r.items() if k} for r in table]
    rows = [r for r in rows if r.get("epoch") is not None]
    evals = []
    # Newest last: by modification time, then name, so "the newest" is well defined.
    for p in sorted(path.glob("eval-*.json"), key=lambda p: (p.stat().st_mtime, p.name)):
        try:
            evals.append((p.name, json.loads(p.read_text("utf-8"))))
        except (OSError, ValueError) as e:
            raise RunFolderError(f"cannot read {str(p)!r}: {e}") from None
    steps = None
    if (path / "steps.csv").is_file():
        steps = _read_csv(path / "steps.csv")[1]
    return RunFiles(path, name or sanitise(path.resolve().name), config, rows, evals, steps)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The column names and rows of a CSV the run folder holds; RunFolderError naming it if
    it cannot be read as UTF-8 CSV (a damaged or foreign file)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)
    except (OSError, ValueError, csv.Error) as e:  # ValueError: not UTF-8
        raise RunFolderError(f"cannot read {str(path)!r}: {e}") from None


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Sanitised folder names, suffixed -2, -3, ... where two runs share a name."""
    names: list[str] = []
    for p in paths:
        base = sanitise(p.resolve().name)
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names
