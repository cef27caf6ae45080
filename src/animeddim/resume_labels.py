"""The labels a resumed conditional run reads: its labels file found where the run recorded
it, and checked to be the labels it trained on.

A run records the digest of the attribute codes it trains on (`data.labels_digest`) and its
labels file by its absolute place (`data.labels`). A run started before either was recorded
kept its labels file as given (relative to the directory it started in, which it did not
record) and nothing of its labels but their vocabulary (`model.vocabulary`): what it did
record stands for the rest where it can (`find_recorded_labels`, `check_same_labels`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ConfigError, RunConfig
from .run_folder import recorded_data

if TYPE_CHECKING:
    from .train_data import TrainData


def recorded_place(labels: str, data_path: str, abs_path: str) -> str:
    """The absolute place of a labels file a run recorded as `labels` relative to the
    directory it started in, found from its data folder as given (`data_path`) and its
    absolute place (`abs_path`): the start directory is `abs_path` less `data_path`, or, for
    a data folder reached through a link, the labels file lies in it (`data/labels.csv` of
    `--data data`). '' where they cannot tell (an absolute data path and a labels file outside
    it, or a run that recorded no absolute place)."""
    lab, given = Path(labels), Path(data_path)
    if not abs_path or given.is_absolute():
        return ""
    there = Path(abs_path)
    n = len(given.parts)
    if ".." not in given.parts and there.parts[len(there.parts) - n :] == given.parts:
        return str(Path(*there.parts[: len(there.parts) - n]) / lab)
    if lab.is_relative_to(given):
        return str(there / lab.relative_to(given))
    return ""


def find_recorded_labels(cfg: RunConfig, meta: dict[str, Any], log) -> None:
    """Set `cfg.data.labels` to the place of the labels file a resumed run recorded relative
    to the directory it started in (a run from before labels files were recorded by their
    absolute place; `meta`: its checkpoint's metadata), whatever the working directory is
    now, with a note where that is not what the path reads from here. ConfigError naming the
    file and the remedy where it is not there, or the place cannot be told and the path leads
    to no file from here (from here: read as before)."""
    from .labels import FOLDERS

    labels = cfg.data.labels
    if labels in ("", FOLDERS) or Path(labels).is_absolute():
        return
    if labels != recorded_data(meta, "labels") or not recorded_data(meta, "abs_path"):
        return  # given anew, or a run that reads its data folder from here too
    place = recorded_place(labels, recorded_data(meta, "path"), recorded_data(meta, "abs_path"))
    if not place:
        if Path(labels).is_file():
            return
        raise ConfigError(
            f"labels file {labels!r} does not exist in {os.getcwd()!r}: the run recorded it "
            "relative to the directory it started in, which it did not record; resume from "
            "that directory, or give --labels with the file's place"
        )
    if Path(place).resolve() == Path(labels).resolve():
        return  # resumed from the directory it started in
    if not Path(place).is_file() and Path(recorded_data(meta, "abs_path")).is_dir():
        raise ConfigError(  # (a data folder gone too is said next, with its remedy)
            f"labels file {place!r} does not exist: the run's labels file, recorded as "
            f"{labels!r} relative to the directory it started in; put it back there, or resume "
            "with --labels and its place now and --allow-changed-data (the run recorded "
            "nothing to check other labels by)"
        )
    cfg.data.labels = place
    if Path(place).is_file():
        log(
            f"note: the run's labels file {labels!r}, recorded relative to the directory it "
            f"started in, is read from {place!r}"
        )


def last_read(meta: dict[str, Any], given: str) -> str:
    """Where the run whose checkpoint's metadata is `meta` last read its labels: the file it
    recorded, made absolute where it was recorded relative (`recorded_place`). Where that
    cannot be told, `given` if it names that path (a file at its place from the start
    directory), else the path as recorded."""
    labels = recorded_data(meta, "labels")
    if not labels or Path(labels).is_absolute():
        return labels
    place = recorded_place(labels, recorded_data(meta, "path"), recorded_data(meta, "abs_path"))
    if place:
        return place
    ends = Path(os.path.abspath(given)).parts[-len(Path(labels).parts) :]
    return given if ".." not in Path(labels).parts and ends == Path(labels).parts else labels


def check_same_labels(
    cfg: RunConfig, data: TrainData, meta: dict[str, Any], root: Path, allow_changed: bool, log
) -> None:
    """ConfigError if the labels a resumed run reads now (from `cfg.data.labels`, in `data`)
    are not those it trained on (`cfg.data.labels_digest`), unless `allow_changed`. A run that
    recorded no digest (started before labels were digested) goes on with the labels file it
    read (`last_read` of `meta`, its checkpoint's metadata) or its subfolders' names (checked
    with its images), and with labels shown the same as far as it recorded them
    (`_unrecorded`); other labels cannot be checked, and are refused as changed labels are."""
    from .labels import FOLDERS

    given, then, digest = cfg.data.labels, cfg.data.labels_digest, data.labels_digest
    read_from = last_read(meta, given)
    same_file = given == FOLDERS or Path(given).resolve() == Path(read_from).resolve()
    if digest == then or (not then and same_file):
        return
    if then:
        why = f"the labels in {given!r} differ from those the run trained on"
        remedy = (
            "restore them" if same_file else f"give --labels the run's labels file ({read_from!r})"
        )
    else:
        why, remedy = _unrecorded(cfg, data, meta, root, read_from, log)
        if not why:
            return
    if not allow_changed:
        raise ConfigError(
            f"cannot resume on changed labels: {why}; {remedy}, or resume with "
            "--allow-changed-data to train on these labels"
        )
    log(f"note: resuming on changed labels ({why})")


def _unrecorded(
    cfg: RunConfig, data: TrainData, meta: dict[str, Any], root: Path, read_from: str, log
) -> tuple[str, str]:
    """Whether the labels of a run that recorded no digest, read from another file than its
    own (`read_from`), are those it trained on, as far as it recorded anything: ('', '') if
    so, else why not and the remedy. Its own file, still there, gives the codes it trained
    on, compared with these. Gone, the labels file that moved with its data folder stands for
    it (at its place in the folder, whose images are the run's by their fingerprint) where it
    holds each attribute's values the run knew (`model.vocabulary`), as a resume in place
    takes the run's file as it is."""
    from .labels import LabelError, canonical, codes_digest, csv_labels, quoted

    given, dc, paths = cfg.data.labels, cfg.data, data.imageset.paths
    if Path(read_from).is_file():
        try:
            run_codes = csv_labels(
                read_from, root, paths, missing=dc.labels_missing, vocab=cfg.model.vocabulary
            ).codes
        except LabelError:
            run_codes = None
        if run_codes is not None and codes_digest(run_codes) == data.labels_digest:
            return "", ""
        why = f"the labels in {given!r} differ from those in the run's labels file"
        return why, f"give --labels the run's labels file ({read_from!r})"
    trained_on = recorded_data(meta, "abs_path")
    place = _below(Path(given).resolve(), root.resolve())
    moved_with = bool(trained_on) and place is not None
    moved_with = moved_with and place == _below(Path(os.path.abspath(read_from)), Path(trained_on))
    if moved_with and dc.fingerprint and data.fingerprint == dc.fingerprint:
        found = csv_labels(given, root, paths, missing=dc.labels_missing).vocab
        for a, values in cfg.model.vocabulary.items():
            now = found.get(canonical(a), ())
            if now != tuple(canonical(v) for v in values):
                why = (
                    f"the labels in {given!r} differ from those the run trained on: their "
                    f"{a} values are {quoted(now)}, the run's {quoted(values)}"
                )
                return why, "restore them"  # the run's file, moved and edited there
        log(
            f"note: the run's labels file moved with its data folder, from {read_from!r} to "
            f"{given!r}; the run started before its labels were recorded, so they are checked "
            "as far as it recorded them (its images and each attribute's values), and recorded "
            "from now on"
        )
        return "", ""
    why = (
        f"the labels in {given!r} cannot be checked: the run started before its labels were "
        f"recorded, and read them from {read_from!r}, which is gone; nothing else it recorded "
        "can vouch for them"
    )
    return why, "put that file back there (a copy will do)"


def _below(path: Path, folder: Path) -> Path | None:
    """`path` relative to `folder`, or None where it lies outside it."""
    return path.relative_to(folder) if path.is_relative_to(folder) else None
