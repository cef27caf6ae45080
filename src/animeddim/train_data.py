"""What training reads, and what it refuses before any work.

The data folder decoded, split and measured (`TrainData`); the checks that turn a setting
that cannot train (a batch larger than the split, a 1x1 BatchNorm level, `--out` inside
`--data`, a resume on changed data) into one ConfigError before the run folder is touched.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import batches as batches_mod
from . import data as data_mod
from . import distributed
from .config import PROFILES_TO_SRGB, ConfigError, RunConfig
from .image_files import EARLIER_EXTENSIONS, folder_problem
from .io import save_grid
from .resume_labels import check_same_labels
from .run_folder import (
    RunFolderError,
    check_new_run_dir,
    check_same_data,
    data_fingerprint,
    recorded_data,
)
from .words import counted


@dataclass
class TrainData:
    """The decoded images, their split and the training split's per-channel statistics."""

    imageset: data_mod.ImageSet
    train_idx: np.ndarray
    val_idx: np.ndarray
    mean: torch.Tensor  # [C], in [0, 1]
    std: torch.Tensor  # [C]
    steps_per_epoch: int
    fingerprint: str  # run_folder.data_fingerprint of the image list
    codes: np.ndarray | None = None  # [N x A] attribute codes of the images (data.labels)
    on_device: torch.Tensor | None = None  # the uint8 images on the device (data_on_device)

    @property
    def labels_digest(self) -> str:
        """The digest of `codes` a conditional run records (data.labels_digest); '' without."""
        from .labels import codes_digest

        return "" if self.codes is None else codes_digest(self.codes)

    @property
    def pixels(self) -> np.ndarray | torch.Tensor:
        """What batches are gathered from: the cache on the device if it was copied there."""
        return self.imageset.images if self.on_device is None else self.on_device


def check_start(cfg: RunConfig, run_dir: Path, resume: bool) -> None:
    """ConfigError / RunFolderError for what can be refused before reading any image."""
    data = data_root(cfg, resume)
    if not cfg.data.path:
        raise ConfigError("no training data: give --data DIR (or data.path in the config file)")
    tc = cfg.train
    problem = folder_problem(tc.eval_real) if tc.eval_every and tc.eval_real else None
    if problem is not None:
        raise ConfigError(
            f"--eval-real {tc.eval_real!r} {problem}: give a folder of real images for the "
            "--eval-every KID (or leave it out to use the validation split)"
        )
    if resume:
        if not (run_dir / "config.json").is_file():
            raise RunFolderError(f"cannot resume: {str(run_dir)!r} is not an animeddim run folder")
        return
    if data.is_dir() and run_dir.resolve().is_relative_to(data.resolve()):
        raise ConfigError(
            f"--out {str(run_dir)!r} lies inside --data {str(data)!r}: the next run would train "
            "on this run's own samples; choose an --out outside the data folder"
        )
    real = Path(tc.eval_real) if tc.eval_every and tc.eval_real else None
    if real is not None and run_dir.resolve().is_relative_to(real.resolve()):
        raise ConfigError(  # its reference grid and samples would be read as real images
            f"--out {str(run_dir)!r} lies inside --eval-real {tc.eval_real!r}: a resume would "
            "read this run's own grids there as real images (and refuse their size); choose "
            "an --out outside that folder"
        )
    check_new_run_dir(run_dir)


def check_batchnorm_batch(cfg: RunConfig, world_size: int) -> None:
    """ConfigError when training BatchNorm would see one value per channel (a 1x1 level)."""
    inner = cfg.model.image_size // 2 ** (len(cfg.model.widths) - 1)
    per_rank = cfg.train.batch_size // world_size
    if per_rank * inner * inner < 2:
        error = ConfigError(
            f"with --image-size {cfg.model.image_size} and {len(cfg.model.widths)} widths the "
            f"innermost level is {inner}x{inner} pixels, and a batch of {per_rank} image per "
            "process gives BatchNorm one value per channel: use --batch-size 2 or more "
            "(per process), a larger --image-size or fewer --widths"
        )
        error.mirrored = not distributed.is_main()  # every rank finds it; rank 0 reports it
        raise error


def check_data(
    cfg: RunConfig,
    data: TrainData,
    saved: tuple | None = None,
    allow_changed: bool = False,
    log=print,
) -> None:
    """ConfigError if the split cannot train, or a resumed conditional run's labels are not
    those it trained on (`saved`: its checkpoint; unless `allow_changed`); found by every
    process: raised once, not once per process."""
    distributed.on_every(lambda: _check_data(cfg, data))
    if data.codes is None:
        return
    digest = data.labels_digest
    distributed.check_same(
        {f"the digest of the labels in '{cfg.data.labels}'": digest},
        "every process must read the same labels: the labels file at the same path, with the "
        "same rows, on every node",
    )
    if saved is not None:
        root = data_root(cfg, resume=True)
        distributed.on_every(
            lambda: check_same_labels(cfg, data, saved[1], root, allow_changed, log)
        )


def _check_data(cfg: RunConfig, data: TrainData) -> None:
    n, n_train, n_val = len(data.imageset.images), len(data.train_idx), len(data.val_idx)
    if data.steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size {cfg.train.batch_size} is larger than the training split ({n_train} "
            f"of {counted(n, 'image')}, {n_val} held out for validation): lower --batch-size"
            + (" or --val-fraction" if n_val else "")
        )
    if cfg.train.eval_every and not cfg.train.eval_real and n_val < 2:
        raise ConfigError(
            f"--eval-every compares samples with the validation split, and it has "
            f"{counted(n_val, 'image')}: give --eval-real DIR, or raise --val-fraction"
        )


def _check_same_images(
    cfg: RunConfig, root: Path, fingerprint: str, allow_changed: bool, log, trained_on: str
) -> None:
    """ConfigError if a resumed run's images are not those it trained on (unless
    `allow_changed`); a note if they are, in another folder than `trained_on` (its last
    checkpoint's `data.abs_path`): the data moved or was copied there."""
    changed = check_same_data(cfg, root, fingerprint, trained_on)
    moved = bool(trained_on) and Path(trained_on).resolve() != root.resolve()
    if changed and not allow_changed:
        remedy = "give --data the folder that holds them" if moved else "restore the data"
        raise ConfigError(
            f"cannot resume on changed data: {changed}; {remedy}, or resume with "
            "--allow-changed-data to train on it as it is now"
        )
    if changed:
        log(f"note: resuming on changed data ({changed})")
    elif moved:
        log(f"note: the run's data folder moved from {trained_on!r} to {str(root.resolve())!r}")


def record_data(cfg: RunConfig, root: Path, data: TrainData) -> None:
    """Record in `cfg` what a run read: the data folder and a labels file by their absolute
    places (so a resume finds them from any working directory; each process resolves its own:
    nodes may reach one folder by other paths), the images' fingerprint and labels' digest."""
    from .labels import FOLDERS

    cfg.data.abs_path = str(root.resolve())
    if cfg.data.labels not in ("", FOLDERS):
        cfg.data.labels = str(Path(cfg.data.labels).resolve())
    cfg.data.fingerprint, cfg.data.labels_digest = data.fingerprint, data.labels_digest


def data_root(cfg: RunConfig, resume: bool) -> Path:
    """The data folder: --data for a new run; for a resumed one, where the run trained (the
    absolute path it recorded, whatever the working directory is now)."""
    return Path(cfg.data.abs_path or cfg.data.path) if resume else Path(cfg.data.path)


def list_data(
    cfg: RunConfig, root: Path, saved: tuple | None = None, allow_changed: bool = False, log=print
) -> tuple[data_mod.Listing, str]:
    """The walk of the data folder a run reads and the fingerprint of its images, the same on
    every process. A resumed run's (`saved`: its checkpoint, `train_state.resume_point`) are
    checked to be those it trained on, wherever the folder is now, before any is decoded:
    ConfigError if not, unless `allow_changed`."""
    # Each process lists the folder (a node may lack it, or hold other images): a failure or
    # another list in any process is refused by every process, before any image is decoded.
    resume = saved is not None
    trained_on = recorded_data(saved[1], "abs_path") if resume else ""
    listing, fingerprint = distributed.on_every(
        lambda: _image_list_of_the_run(cfg, root, resume, trained_on)
    )
    distributed.check_same(
        {f"the fingerprint of the images in '{root}'": fingerprint},
        "every process must read the same images: the data folder at the same path, with the "
        "same files, on every node",
    )
    if resume:
        distributed.on_every(
            lambda: _check_same_images(cfg, root, fingerprint, allow_changed, log, trained_on)
        )
    return listing, fingerprint


def load_data(
    cfg: RunConfig,
    root: Path,
    progress: bool,
    resume: bool = False,
    listed: tuple[data_mod.Listing, str] | None = None,
    log=print,
) -> TrainData:
    """Decode the data folder, split it and measure the training split's statistics.

    A new run applies the images' embedded colour profiles and records so in
    `data.colour_profiles`; a resumed run reads its images as it began (one started before
    profiles were applied has no record, and reads them as sRGB: the pixels it trained on).
    `listed`: what `list_data` returned (default: the folder is listed here). The images
    smaller than --image-size, enlarged to it as they are decoded, are said in one note to
    `log` (under torchrun `train` gives process 0 alone a `log` that prints).
    """
    if not resume:
        cfg.data.colour_profiles = PROFILES_TO_SRGB
    listing, fingerprint = listed or list_data(cfg, root)
    with distributed.local_main_first():  # one process per node fills the disk cache
        imageset = data_mod.load_folder(
            root,
            cfg.model.image_size,
            cache=cfg.data.cache,
            strict=cfg.data.strict,
            progress=progress,
            profiles=cfg.data.profiles_applied,
            listing=listing,  # the walk made for the fingerprint: the folder is walked once
        )
    if note := imageset.enlarged.note(cfg.model.image_size, "--image-size"):
        log(f"note: {note}")
    train_idx, val_idx = data_mod.split_indices(
        len(imageset.images), cfg.data.val_fraction, cfg.data.split_seed
    )
    mean_l, std_l = data_mod.channel_stats(imageset.images, train_idx)
    return TrainData(
        imageset,
        train_idx,
        val_idx,
        torch.tensor(mean_l, dtype=torch.float32),
        torch.tensor(std_l, dtype=torch.float32).clamp(min=1e-3),
        batches_mod.num_batches(len(train_idx), cfg.train.batch_size, drop_last=True),
        fingerprint,
        label_codes(cfg, imageset, root),
    )


def _image_list_of_the_run(
    cfg: RunConfig, root: Path, resume: bool = False, trained_on: str = ""
) -> tuple[data_mod.Listing, str]:
    """The walk of `root` this run reads (`image_files.list_images`: as a new run lists it, or
    with `everything` or the `extensions` of an earlier animeddim), and the fingerprint of the
    images in it. `data.load_folder` reads that walk: the folder is not walked again.

    A run started before hidden files and hidden and system folders were passed over, or
    before .jfif, .jpe, .avif and .apng files were read, on a folder holding such images,
    trained on (or without) them: it goes on with the images it started with (its fingerprint
    says which), so that it resumes as it would have, and a note says so. Any other run reads
    the folder as a new one does; a changed folder is then refused by `list_data`. A resumed
    run's folder that is gone is named with the remedy: `trained_on` is where the run last
    read its images (another place than `root`: `root` was given as their new one).
    """
    if resume and not root.exists() and trained_on and Path(trained_on) != root.resolve():
        raise data_mod.DataError(  # a new place given (--data), where no folder is
            f"image folder '{root}' does not exist: give --data the folder the run's images "
            f"are in now (it trained on them in '{trained_on}')"
        )
    if resume and not root.exists():  # moved, most often: say how to go on there
        raise data_mod.DataError(
            f"image folder '{root}' does not exist: the run's data folder; if it moved, resume "
            "with --data and its new place (its images are checked to be the run's)"
        )
    listing = data_mod.list_images(root)  # DataError for a missing folder or a file
    now, then = data_fingerprint(listing.files, root), cfg.data.fingerprint
    if not then or now == then:
        return listing, now
    for earlier in EARLIER_LISTINGS:
        earlier_listing = data_mod.list_images(root, **earlier)
        files = earlier_listing.files
        if data_fingerprint(files, root) == then:
            break
    else:
        return listing, now
    before, new_run = [], []
    if earlier.get("everything"):
        before.append("its hidden files and hidden and system folders were passed over")
        if listing.passed_over:
            new_run.append(data_mod.passed_over_note(listing))
    if "extensions" in earlier:
        before.append(".jfif, .jpe, .avif and .apng files were read")
        kept = set(files)
        added = [p.relative_to(root).as_posix() for p in listing.files if p not in kept]
        if added:
            more = f", and {len(added) - 5} more" if len(added) > 5 else ""
            listed = ", ".join(data_mod.shown(a) for a in added[:5])
            new_run.append(f"read {counted(len(added), 'more image file')}: {listed}{more}")
    if distributed.is_main():  # every process lists the same folder: said once
        warnings.warn(
            f"this run started on '{root}' before {' and before '.join(before)}, and goes on "
            f"with the images it began with; a new run would have {' and '.join(new_run)}",
            data_mod.PassedOverWarning,
            stacklevel=3,
        )
    return earlier_listing, then


# How earlier animeddims listed a folder (`image_files.list_images`'s keyword arguments): with the
# hidden and system folders, and without the image extensions added since.
EARLIER_LISTINGS: tuple[dict[str, Any], ...] = (
    {"everything": True},
    {"extensions": EARLIER_EXTENSIONS},
    {"everything": True, "extensions": EARLIER_EXTENSIONS},
)


def label_codes(cfg: RunConfig, imageset: data_mod.ImageSet, root: Path) -> np.ndarray | None:
    """The [N x A] codes of the images from data.labels (None without labels). A new run's
    model.vocabulary is set from them; a run that has one reads the labels under it."""
    from .labels import canonical, load_labels, quoted

    dc, vocab = cfg.data, cfg.model.vocabulary
    if not dc.labels:
        if vocab:
            raise ConfigError(
                "the model is conditional (model.vocabulary is set) but no --labels were given"
            )
        return None
    labels = load_labels(
        dc.labels, root, imageset.paths, missing=dc.labels_missing, vocab=vocab or None
    )
    if vocab:
        return labels.codes
    asked = [canonical(a.strip()) for a in dc.attributes.split(",") if a.strip()]  # as labels
    unknown = [a for a in asked if a not in labels.vocab]
    if unknown:
        raise ConfigError(
            f"--attributes: the labels have no attribute {quoted(unknown)}; "
            f"they have: {quoted(labels.vocab)}"
        )
    keep = asked or labels.attributes
    unfilled = [a for a in keep if not labels.vocab[a]]  # every entry empty (missing="null")
    if unfilled:
        filled = ",".join(a for a in keep if labels.vocab[a])
        hint = f"leave it out with --attributes {filled}" if filled else "train without --labels"
        raise ConfigError(
            f"attribute {unfilled[0]} has no value in any row of the labels ('{dc.labels}'): "
            f"there is nothing to condition on; fill it in, or {hint}"
        )
    cfg.model.vocabulary = {a: list(labels.vocab[a]) for a in keep}
    columns = [labels.attributes.index(a) for a in keep]
    codes = np.ascontiguousarray(labels.codes[:, columns])
    if distributed.is_main():  # every rank reads the same labels: said once
        _warn_of_uninformative_attributes(keep, codes)
    return codes


def _warn_of_uninformative_attributes(names: list[str], codes: np.ndarray) -> None:
    """Warn of a labels column that cannot teach the model anything: one value for every
    image, or a different value for each (a name or note column, taken for an attribute)."""
    import warnings

    from .labels import NULL

    for a, name in enumerate(names):
        column = codes[:, a][codes[:, a] != NULL]
        used, labelled = len(np.unique(column)), len(column)
        others = ",".join(n for n in names if n != name)
        hint = f"leave it out with --attributes {others}" if others else "train without --labels"
        if used == 1 and labelled > 1:
            why = f"has one value for all {labelled} labelled images: it tells the model nothing"
        elif used == labelled >= 8:
            why = (
                f"has a different value for each of its {labelled} labelled images (a name or "
                "note column?): the model cannot learn what its values mean"
            )
        else:
            continue
        warnings.warn(f"attribute {name} {why}; {hint}", stacklevel=2)


def write_reference(run_dir: Path, data: TrainData) -> None:
    """RUN/reference.png, the first validation images, for the report's forward-process figure."""
    ref = run_dir / "reference.png"
    if not ref.exists() and len(data.val_idx):
        images = np.asarray(data.imageset.images[data.val_idx[:8]])
        save_grid(torch.from_numpy(images), ref, cols=8)
