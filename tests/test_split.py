"""`animeddim data split`: a held-out set moved out of a prepared folder, safely."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_here
from test_datasets import _pixels, _png, _said, _save_png, _write_source

from animeddim.data import DataError, load_folder
from animeddim.datasets import prepare, split_held_out
from animeddim.datasets import split as split_module
from animeddim.labels import csv_labels


def _images(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def _labelled(folder: Path) -> list[str]:
    """The files labels.csv names, after checking it labels exactly the folder's images."""
    paths = [folder / name for name in _images(folder)]
    labels = csv_labels(folder / "labels.csv", folder, paths)  # refuses a row for a missing file
    assert labels.codes.shape[0] == len(paths)
    lines = (folder / "labels.csv").read_text().splitlines()
    return sorted(line.split(",")[0] for line in lines[1:])


@pytest.fixture
def avatars(avatars16: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(avatars16, tmp_path / "avatars"))


def test_data_split_moves_images_with_their_labels(avatars: Path, tmp_path: Path) -> None:
    """The README's held-out set was `mkdir` and `mv data/anime/00[01]*.png`: the first
    images in archive order, labels.csv left naming files that moved (which train refuses)
    and the manifests untrue. `data split` moves a seeded random choice with its labels."""
    before = _images(avatars)
    held = tmp_path / "held"
    p = run_here("data", "split", avatars, "--held-out", 5, "--out", held, "--seed", 3)
    assert p.stdout == (
        f"moved 5 images of {avatars} (seed 3) with their labels.csv rows into {held}, held out\n"
    )
    assert any(line.startswith("split: 100%") for line in p.stderr.replace("\r", "\n").split("\n"))
    assert _said(p.stderr.replace("split:", "prepare:")) == []
    ours, theirs = _images(avatars), _images(held)
    assert len(theirs) == 5 and sorted(ours + theirs) == before
    assert _labelled(avatars) == ours and _labelled(held) == theirs
    assert (held / "CREDITS.md").read_text() == (avatars / "CREDITS.md").read_text()
    mine, other = (json.loads((f / "manifest.json").read_text()) for f in (avatars, held))
    assert mine["held_out"] == [{"folder": str(held.resolve()), "n": 5, "seed": 3}]
    assert other["split_from"] == {"folder": str(avatars.resolve()), "n": 5, "seed": 3}
    assert other["style"] == mine["style"] == "adventurer"  # still read as avatars


def test_the_same_seed_chooses_the_same_images(avatars16: Path, tmp_path: Path) -> None:
    chosen = []
    for k, seed in enumerate((3, 3, 4)):
        folder = Path(shutil.copytree(avatars16, tmp_path / f"a{k}"))
        chosen.append(split_held_out(folder, tmp_path / f"h{k}", 5, seed=seed))
    assert chosen[0] == chosen[1] != chosen[2]


def test_a_split_folder_trains_on_its_own_images_not_a_stale_cache(
    avatars: Path, tmp_path: Path
) -> None:
    """The decoded-image cache is keyed on the folder's files: after the split, each folder
    reads its own images, the moved ones exactly as they were."""
    cache = tmp_path / "cache"
    whole = load_folder(avatars, 16, cache="disk", cache_dir=cache, workers=1)
    moved = split_held_out(avatars, tmp_path / "held", 4)
    left = load_folder(avatars, 16, cache="disk", cache_dir=cache, workers=1)
    held = load_folder(tmp_path / "held", 16, cache="disk", cache_dir=cache, workers=1)
    assert (len(left.paths), len(held.paths)) == (20, 4)
    index = {Path(p).name: k for k, p in enumerate(whole.paths)}
    for images, paths in ((left.images, left.paths), (held.images, held.paths)):
        expected = whole.images[[index[Path(p).name] for p in paths]]
        np.testing.assert_array_equal(images, expected)
    assert sorted(Path(p).name for p in held.paths) == sorted(moved)


def _prepared(tmp_path: Path, n: int = 6) -> Path:
    src = tmp_path / "photos"
    for i in range(n):
        _save_png(src / f"{i}.png", _pixels(i))
    return prepare(src, tmp_path / "prepared", size=8, workers=1)


def test_a_prepared_folder_keeps_its_manifest_true(tmp_path: Path) -> None:
    """The manifest's count is its images' count; a prepare done again there would bring
    the held-out images back into training, so it is refused, and so is a render."""
    folder = _prepared(tmp_path)
    split_held_out(folder, tmp_path / "held", 2)
    assert json.loads((folder / "manifest.json").read_text())["count"] == 4
    assert json.loads((tmp_path / "held" / "manifest.json").read_text())["count"] == 2
    assert not (tmp_path / "held" / "labels.csv").exists()
    p = run_here("data", "prepare", tmp_path / "photos", "--out", folder, "--size", 8, check=False)
    assert p.returncode == 2 and "moved out by data split" in p.stderr, p.stderr
    assert len(_images(folder)) == 4
    p = run_here("data", "avatars", "--out", tmp_path / "held", "--n", 2, check=False)
    assert p.returncode == 2 and "data split moved from" in p.stderr, p.stderr


def test_bad_splits_are_refused_in_one_line(avatars: Path, tmp_path: Path) -> None:
    """Each refusal is one line, exit 2, before any image moves."""
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("mine")
    (tmp_path / "afile").write_text("x")
    pending = tmp_path / "pending"
    pending.mkdir()
    (pending / ".animeddim-pending.json").write_text("{}")
    _save_png(pending / "000000.png", _pixels(1))
    _save_png(pending / "000001.png", _pixels(2))
    cases = [
        (avatars, 5, tmp_path / "full", "--out '{}' is not empty".format(tmp_path / "full")),
        (avatars, 24, tmp_path / "h", "--held-out 24 leaves no image to train on: "),
        (avatars, 30, tmp_path / "h", "has 24 images; hold out fewer"),
        (avatars, 2, avatars / "held", "lie one inside the other"),
        (avatars, 2, avatars.parent, "lie one inside the other"),
        (avatars, 2, tmp_path / "afile", "is a file, not a folder"),
        (
            tmp_path / "nope",
            2,
            tmp_path / "h",
            "image folder '{}' does not exist".format(tmp_path / "nope"),
        ),
        (pending, 1, tmp_path / "h", "unfinished data prepare or data avatars"),
    ]
    before = _images(avatars)
    for folder, n, out, said in cases:
        p = run_here("data", "split", folder, "--held-out", n, "--out", out, check=False)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert said in p.stderr and "Traceback" not in p.stderr, (said, p.stderr)
    assert _images(avatars) == before and not (tmp_path / "h").exists()
    p = run_here("data", "split", avatars, "--held-out", 0, "--out", tmp_path / "h", check=False)
    assert p.returncode == 2 and "held-out must be >= 1" in p.stderr


def _split_stopped(
    folder: Path, held: Path, n: int, monkeypatch: pytest.MonkeyPatch, *, at: int, step: str
) -> None:
    """Split ``n`` images of ``folder`` into ``held`` (seed 1), stopped by a Ctrl-C at the
    ``at``-th call of the split's ``step`` (``_move``: an image; ``write_manifest``: a manifest)."""
    real, calls = getattr(split_module, step), []

    def stop(*args: Path) -> None:
        calls.append(args)
        if len(calls) == at:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(split_module, step, stop)
    with pytest.raises(KeyboardInterrupt):
        split_held_out(folder, held, n, seed=1)
    monkeypatch.setattr(split_module, step, real)


def test_a_split_stopped_part_way_loses_no_image_and_a_rerun_finishes_it(
    avatars: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C on the third move: each image is in one of the two folders; the same command
    finishes the split (another one is refused), as an unstopped split would have made it."""
    reference = Path(shutil.copytree(avatars, tmp_path / "reference"))
    split_held_out(reference, tmp_path / "reference-held", 6, seed=1)
    before, held = _images(avatars), tmp_path / "held"
    _split_stopped(avatars, held, 6, monkeypatch, at=3, step="_move")
    assert sorted(_images(avatars) + _images(held)) == before and len(_images(held)) == 2
    with pytest.raises(
        DataError, match=r"holds an unfinished split of .* \(--held-out 6 --seed 1\)"
    ):
        split_held_out(avatars, held, 6, seed=2)

    # Stopped again, as the manifests are written: the re-run records the split once.
    _split_stopped(avatars, held, 6, monkeypatch, at=2, step="write_manifest")
    p = run_here("data", "split", avatars, "--held-out", 6, "--out", held, "--seed", 1)
    assert p.stdout.startswith("moved 6 images")
    assert not (held / split_module.PLAN).exists()
    assert _images(avatars) == _images(reference) and _images(held) == _images(
        reference.parent / "reference-held"
    )
    for mine, theirs in ((avatars, reference), (held, tmp_path / "reference-held")):
        assert (mine / "labels.csv").read_text() == (theirs / "labels.csv").read_text()
        m, t = (json.loads((f / "manifest.json").read_text()) for f in (mine, theirs))
        for record in (*m.pop("held_out", []), *t.pop("held_out", [])):
            assert (record.pop("folder"), record) in (
                (str(held.resolve()), {"n": 6, "seed": 1}),
                (str((tmp_path / "reference-held").resolve()), {"n": 6, "seed": 1}),
            )
        for record in (m.pop("split_from", None), t.pop("split_from", None)):
            assert record is None or {k: record[k] for k in ("n", "seed")} == {"n": 6, "seed": 1}
        assert m == t


def test_a_split_across_file_systems_copies_then_removes(
    avatars: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cross_device(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(split_module.os, "rename", cross_device)
    before = {p.name: p.read_bytes() for p in avatars.glob("*.png")}
    moved = split_held_out(avatars, tmp_path / "held", 3)
    after = {p.name: p.read_bytes() for p in (tmp_path / "held").glob("*.png")}
    assert sorted(after) == sorted(moved) and all(after[n] == before[n] for n in after)
    assert len(_images(avatars)) == 21


def test_a_labels_csv_train_cannot_read_is_refused_before_any_move(
    avatars: Path, tmp_path: Path
) -> None:
    """A labels.csv saved by a spreadsheet in Latin-1 ended the split in a UnicodeDecodeError
    traceback once the images had moved; one with ';' between its columns was left whole
    (naming the moved images) and the held-out folder got its header alone, while the split
    said the rows went with the images. Each is one line naming the file and how to save
    it, exit 2, before any image moves."""
    rows = (avatars / "labels.csv").read_text().splitlines()
    saved = {
        "latin1": ("\n".join(rows) + "\n").replace(",", ",\u00e9", 1).encode("latin-1"),
        "semicolons": ("\n".join(r.replace(",", ";") for r in rows) + "\n").encode(),
    }
    before = _images(avatars)
    for how, data in saved.items():
        (avatars / "labels.csv").write_bytes(data)
        held = tmp_path / f"held-{how}"
        p = run_here("data", "split", avatars, "--held-out", 5, "--out", held, check=False)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        said = "not UTF-8" if how == "latin1" else "separates its columns with ';'"
        assert said in p.stderr and "labels.csv" in p.stderr, p.stderr
        assert _images(avatars) == before and not held.exists()
        assert (avatars / "labels.csv").read_bytes() == data


def test_a_stopped_split_is_refused_by_the_command_that_made_the_folder(
    avatars: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A split stopped after its first move left FOLDER with no sign of it: `data avatars`
    rendered the moved avatar again (byte-identical in both folders) and `data prepare` of a
    folder source prepared its moved image again. FOLDER's manifest says the split is under
    way before the first move, so each is refused, naming the command that finishes it."""
    held = tmp_path / "held"
    _split_stopped(avatars, held, 6, monkeypatch, at=2, step="_move")
    moved = _images(held)
    assert len(moved) == 1
    left = _images(avatars)
    p = run_here("data", "avatars", "--out", avatars, "--n", 24, "--size", 16, check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    finish = f"animeddim data split {avatars} --held-out 6 --out {held.resolve()} --seed 1"
    assert "unfinished data split" in p.stderr and finish in p.stderr, p.stderr
    assert _images(avatars) == left and not set(moved) & set(left)
    # Another split from it would take images the unfinished one means to move.
    p = run_here("data", "split", avatars, "--held-out", 2, "--out", tmp_path / "h2", check=False)
    assert p.returncode == 2 and finish in p.stderr, p.stderr
    assert not (tmp_path / "h2").exists()
    # The same split command finishes it; the folder is then refused as any split one is.
    run_here("data", "split", avatars, "--held-out", 6, "--out", held, "--seed", 1)
    assert len(_images(held)) == 6 and sorted(_images(avatars) + _images(held)) == sorted(
        left + moved
    )
    manifest = json.loads((avatars / "manifest.json").read_text())
    assert "split_under_way" not in manifest and len(manifest["held_out"]) == 1
    assert "split_under_way" not in json.loads((held / "manifest.json").read_text())
    p = run_here("data", "avatars", "--out", avatars, "--n", 24, "--size", 16, check=False)
    assert p.returncode == 2 and "moved out by data split" in p.stderr, p.stderr

    folder = _prepared(tmp_path)
    _split_stopped(folder, tmp_path / "held-prepared", 2, monkeypatch, at=2, step="_move")
    p = run_here("data", "prepare", tmp_path / "photos", "--out", folder, "--size", 8, check=False)
    assert p.returncode == 2 and "unfinished data split" in p.stderr, p.stderr
    assert len(_images(folder)) == 5
    split_held_out(folder, tmp_path / "held-prepared", 2, seed=1)
    assert json.loads((folder / "manifest.json").read_text())["count"] == 4

    # An archive's prepare there returned at once, saying the images moved were prepared.
    archive = _write_source(
        tmp_path / "photos.zip", "zip", [(f"{i}.png", _png(_pixels(i))) for i in range(6)]
    )
    folder = prepare(archive, tmp_path / "zipped", size=8, workers=1)
    _split_stopped(folder, tmp_path / "held-zipped", 2, monkeypatch, at=2, step="_move")
    p = run_here("data", "prepare", archive, "--out", folder, "--size", 8, check=False)
    assert p.returncode == 2 and "unfinished data split" in p.stderr, p.stderr
    assert len(_images(folder)) == 5


def test_the_held_out_folder_of_a_stopped_split_names_the_command_that_finishes_it(
    avatars: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HELDOUT of a stopped split was refused by `data avatars` as a folder holding a foreign
    file ('.animeddim-split.json') and by `data prepare` as not empty, and a split from it
    took images the unfinished split had moved there; none said a split was unfinished. Each
    says so in one line with the finishing command, whose folders are absolute (FOLDER was
    given as typed, relative), so it finishes the split from any directory."""
    monkeypatch.chdir(tmp_path)
    _split_stopped(Path("avatars"), Path("held"), 6, monkeypatch, at=3, step="_move")
    moved, left = _images(tmp_path / "held"), _images(avatars)
    finish = (
        f"animeddim data split {avatars.resolve()} --held-out 6 "
        f"--out {(tmp_path / 'held').resolve()} --seed 1"
    )
    for command in (
        ("data", "avatars", "--out", "held", "--n", 24, "--size", 16),
        ("data", "prepare", "avatars", "--out", "held", "--size", 8),
        ("data", "split", "held", "--held-out", 1, "--out", "h2"),
        ("data", "avatars", "--out", "avatars", "--n", 24, "--size", 16),
    ):
        p = run_here(*command, check=False)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "unfinished data split" in p.stderr and p.stderr.rstrip().endswith(finish), (
            command,
            p.stderr,
        )
    assert _images(tmp_path / "held") == moved and _images(avatars) == left
    assert not (tmp_path / "h2").exists()
    monkeypatch.chdir(tmp_path / "held")  # the command works from another directory
    run_here(*finish.split()[1:])
    assert len(_images(tmp_path / "held")) == 6 and len(_images(avatars)) == 18


def test_a_labels_csv_saved_again_before_a_stopped_split_is_finished_is_refused(
    avatars: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-run that finishes a stopped split read labels.csv without the check the first
    run made: saved again in the meantime in Latin-1 it ended in a UnicodeDecodeError
    traceback once the other images had moved; with ';' between its columns it was left
    whole, naming the moved images, and HELDOUT got its header alone. The re-run checks it
    as train reads it, before any further move; saved right again, the same command
    finishes the split."""
    held = tmp_path / "held"
    good = (avatars / "labels.csv").read_bytes()
    _split_stopped(avatars, held, 6, monkeypatch, at=3, step="_move")
    moved, left = _images(held), _images(avatars)
    rows = good.decode().splitlines()
    saved = {
        "not UTF-8": ("\n".join(rows) + "\n").replace(",", ",\u00e9", 1).encode("latin-1"),
        "separates its columns with ';'": (
            "\n".join(r.replace(",", ";") for r in rows) + "\n"
        ).encode(),
    }
    for said, data in saved.items():
        (avatars / "labels.csv").write_bytes(data)
        p = run_here(
            "data", "split", avatars, "--held-out", 6, "--out", held, "--seed", 1, check=False
        )
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert said in p.stderr and "labels.csv" in p.stderr, p.stderr
        assert _images(held) == moved and _images(avatars) == left
        assert (avatars / "labels.csv").read_bytes() == data
    (avatars / "labels.csv").write_bytes(good)
    run_here("data", "split", avatars, "--held-out", 6, "--out", held, "--seed", 1)
    assert len(_images(held)) == 6
    assert _labelled(avatars) == _images(avatars) and _labelled(held) == _images(held)
