"""Avatar labels, labels for any folder, the attribute classifier and coverage."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, run_here, run_main, shared_dir, tiny_config
from PIL import Image

from animeddim.attributes import (
    ClassifierConfig,
    ClassifierError,
    TrainSettings,
    accuracy,
    align_labels,
    classify,
    load_classifier,
    save_classifier,
    train_classifier,
)
from animeddim.avatar_labels import (
    AVATAR_ATTRIBUTES,
    avatar_options,
    avatar_vocabulary,
    forced_components,
    labels_from_options,
    resolved_options,
)
from animeddim.coverage import coverage_table, histogram, total_variation
from animeddim.data import DataError, load_folder
from animeddim.datasets import avatar_seed, generate_avatars
from animeddim.datasets import avatars as avatars_module
from animeddim.labels import NULL, LabelError, csv_labels, folder_labels, load_labels


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks train several times faster on one thread than on two busy ones; the
    commands run here (subprocesses) inherit OMP_NUM_THREADS."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "labels.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# --------------------------------------------------------------------------------------------
# Avatar labels


def test_avatar_labels_are_dicebears_resolved_options(avatars16: Path) -> None:
    rows = _rows(avatars16)
    assert [r["file"] for r in rows] == [f"avatar-{i:06d}.png" for i in range(24)]
    assert list(rows[0]) == ["file", *AVATAR_ATTRIBUTES, "forced"]
    vocab = avatar_vocabulary()
    for i, row in enumerate(rows):
        resolved = resolved_options(avatar_options(avatar_seed(0, i), 16))
        assert {a: row[a] for a in AVATAR_ATTRIBUTES} == labels_from_options(resolved)
        assert row["glasses"] == ("yes" if "glassesVariant" in resolved else "no")
        assert row["hair_color"] in vocab["hair_color"] and row["skin"] in vocab["skin"]
        assert row["hair_len"] == row["hair"][: len(row["hair_len"])]  # long07 -> long
        assert row["forced"] == ""
    # Read back through labels.py: codes index the vocabulary and give the CSV's values again.
    s = load_folder(avatars16, 16)
    labels = csv_labels(avatars16 / "labels.csv", avatars16, s.paths, vocab=vocab)
    assert labels.codes.shape == (24, len(AVATAR_ATTRIBUTES)) and (labels.codes >= 0).all()
    assert [labels.values(i) for i in range(24)] == [
        {a: r[a] for a in AVATAR_ATTRIBUTES} for r in rows
    ]


def test_balanced_forces_rare_components(tmp_path: Path) -> None:
    plain = generate_avatars(tmp_path / "plain", n=4, size=16, workers=1)
    forced = generate_avatars(tmp_path / "forced", n=4, size=16, workers=1, balanced=1.0)
    rows = _rows(forced)
    assert all(r["forced"] == "glasses+earrings+details" for r in rows)
    assert all(r["glasses"] == "yes" and r["details"] != "none" for r in rows)
    assert json.loads((forced / "manifest.json").read_text())["balanced"] == 1.0
    differ = 0
    for i, (p, f) in enumerate(zip(_rows(plain), rows, strict=True)):
        options = avatar_options(avatar_seed(0, i), 16, forced_components(0, i, 1.0))
        assert options["glassesProbability"] == 100 and options["detailsProbability"] == 100
        resolved = resolved_options(options)
        assert "glassesVariant" in resolved and "detailsVariant" in resolved
        # Forcing adds the component and leaves the rest of the face alone.
        assert {a: p[a] for a in ("hair", "hair_color", "skin", "mouth", "eyes")} == {
            a: f[a] for a in ("hair", "hair_color", "skin", "mouth", "eyes")
        }
        name = f"avatar-{i:06d}.png"
        changed = any(p[c] != f[c] for c in ("glasses", "earrings", "details"))
        assert changed != np.array_equal(_pixels(plain / name), _pixels(forced / name))
        differ += changed
    assert differ > 0
    # Each component is forced in about `share` of the avatars, independently and by seed.
    draws = [forced_components(7, i, 0.3) for i in range(600)]
    for c in ("glasses", "earrings", "details"):
        assert 0.24 < np.mean([c in d for d in draws]) < 0.36
    assert draws == [forced_components(7, i, 0.3) for i in range(600)]
    assert forced_components(7, 0, 0.0) == ()
    with pytest.raises(DataError, match="different avatar set"):
        generate_avatars(forced, n=4, size=16, workers=1)  # plain into a balanced folder


def test_old_avatar_folder_gains_labels_without_rendering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = generate_avatars(tmp_path / "a", n=3, size=16, workers=1)
    before = (out / "labels.csv").read_text()
    (out / "labels.csv").unlink()  # a set made before labels were written

    def refuse(*args: object) -> np.ndarray:
        raise AssertionError("rendered again")

    monkeypatch.setattr(avatars_module, "_render_avatar", refuse)
    generate_avatars(out, n=3, size=16, workers=1)
    assert (out / "labels.csv").read_text() == before


# --------------------------------------------------------------------------------------------
# Labels for any folder


def _write_png(path: Path, rgb: tuple[int, int, int] = (200, 10, 10), size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path)
    return path


def test_folder_labels(tmp_path: Path) -> None:
    for name in ("cats/a.png", "cats/b.png", "dogs/sub/c.png"):
        _write_png(tmp_path / name)
    paths = [str(p) for p in load_folder(tmp_path, 8).paths]
    labels = load_labels("folders", tmp_path, paths)
    assert labels.vocab == {"class": ("cats", "dogs")}
    assert labels.column("class").tolist() == [0, 0, 1]
    _write_png(tmp_path / "loose.png")
    paths = load_folder(tmp_path, 8).paths
    with pytest.raises(LabelError, match=r"1 image has no label.*loose\.png.*null"):
        folder_labels(tmp_path, paths)
    codes = folder_labels(tmp_path, paths, missing="null").column("class")
    assert codes.tolist() == [0, 0, 1, NULL]


def _csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_labels_and_their_errors(tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    for name in ("x.png", "y.png", "z.png"):
        _write_png(d / name)
    paths = load_folder(d, 8).paths
    good = _csv(tmp_path / "l.csv", "file,mood,hat\nx.png,happy,yes\ny.png,sad,no\nz.png,sad,yes\n")
    labels = csv_labels(good, d, paths)
    assert labels.vocab == {"mood": ("happy", "sad"), "hat": ("no", "yes")}
    assert labels.codes.tolist() == [[0, 1], [1, 0], [1, 1]]

    def err(text: str, match: str, **kw: object) -> None:
        with pytest.raises(LabelError, match=match):
            csv_labels(_csv(tmp_path / "bad.csv", text), d, paths, **kw)

    err("file,mood\nx.png,happy\ny.png,\nz.png,sad\n", r"bad\.csv' row 3 \(y\.png\).*mood.*empty")
    err("file,mood\nx.png,happy\ny.png,sad\n", r"no label.*z\.png")
    err(
        "file,mood\nx.png,happy\nx.png,sad\ny.png,a\nz.png,b\n", r"row 3.*already labelled in row 2"
    )
    err("file,mood\nx.png,happy,extra\n", r"row 2: 3 entries, the header has 2")
    err("file,mood\nw.png,happy\n", r"row 2: 'w\.png' is not a file")
    err("", "empty")
    err(
        "file,mood\nx.png,happy\ny.png,angry\nz.png,sad\n",
        r"row 3 \(y\.png\): unknown mood value 'angry'; known: 'happy', 'sad'",
        vocab={"mood": ("happy", "sad")},
    )
    # Unlabelled images are allowed when asked for, and get the null code.
    part = _csv(tmp_path / "p.csv", "file,mood\nx.png,happy\n")
    assert csv_labels(part, d, paths, missing="null").codes[:, 0].tolist() == [0, NULL, NULL]
    # A forced column (what --balanced forced) is a note, not an attribute.
    note = _csv(tmp_path / "n.csv", "file,mood,forced\nx.png,a,glasses\ny.png,b,\nz.png,b,\n")
    assert csv_labels(note, d, paths).attributes == ["mood"]


def test_an_empty_entry_is_null_under_missing_null_and_names_the_remedy_otherwise(
    tmp_path: Path,
) -> None:
    """Partially labelled data: under missing="null" an empty entry is NULL for that image and
    attribute only, its other labels kept (before: refused, even under missing="null"). Under
    the default it is still an error, which now says what to do."""
    from animeddim.labels import UNLABELLED_REMEDY, read_csv_rows

    d = tmp_path / "imgs"
    for name in ("x.png", "y.png", "z.png"):
        _write_png(d / name)
    paths = load_folder(d, 8).paths
    text = "file,mood,hat,pet\nx.png,happy,,\ny.png, ,no,\nz.png,sad,yes,\n"
    part = _csv(tmp_path / "p.csv", text)
    labels = csv_labels(part, d, paths, missing="null")
    assert labels.vocab == {"mood": ("happy", "sad"), "hat": ("no", "yes"), "pet": ()}
    assert labels.codes.tolist() == [[0, NULL, NULL], [NULL, 0, NULL], [1, 1, NULL]]
    assert labels.values(0) == {"mood": "happy", "hat": None, "pet": None}
    _, rows = read_csv_rows(part, missing="null")
    assert rows[1] == (3, "y.png", [None, "no", None])
    for kw, remedy in (({}, UNLABELLED_REMEDY), ({"remedy": "move them out"}, "move them out")):
        with pytest.raises(LabelError) as e:
            csv_labels(part, d, paths, **kw)
        assert str(e.value) == (
            f"labels file '{part}' row 2 (x.png): the value of 'hat', 'pet' is empty; fill it "
            f"in, or {remedy}"
        )
    with pytest.raises(LabelError, match=r"row 2 \(\?\): the file name is empty"):
        csv_labels(_csv(tmp_path / "f.csv", "file,mood\n,happy\n"), d, paths, missing="null")
    # Under a stored vocabulary (a model's) an empty entry is NULL too.
    got = csv_labels(part, d, paths, missing="null", vocab={"hat": ("yes", "no")})
    assert got.codes[:, 0].tolist() == [NULL, 1, 0]


def test_csv_values_are_kept_whole_and_rows_named_by_their_line(tmp_path: Path) -> None:
    """A quoted value keeps its line break, comma and unicode line separator (a spreadsheet
    writes them so); a BOM and CRLF are read; an error names the line a row starts on,
    counting blank lines."""
    d = tmp_path / "imgs"
    for name in ("x.png", "y.png", "z.png"):
        _write_png(d / name)
    paths = load_folder(d, 8).paths
    text = '\ufefffile,note\r\n\r\nx.png,"two\nlines"\r\ny.png,"a, b"\r\nz.png,"p\u2028q"\r\n'
    labels = csv_labels(_csv(tmp_path / "l.csv", text), d, paths)
    assert labels.vocab == {"note": ("a, b", "p\u2028q", "two\nlines")}
    assert labels.codes[:, 0].tolist() == [2, 0, 1]
    bad = '\ufefffile,note\r\n\r\nx.png,"two\nlines"\r\n\r\ny.png,\r\n'
    with pytest.raises(LabelError, match=r"row 6 \(y\.png\): the value of 'note' is empty"):
        csv_labels(_csv(tmp_path / "bad.csv", bad), d, paths)


# --------------------------------------------------------------------------------------------
# Classifier


def _toy_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, tuple[str, ...]]]:
    """16-px images: colour (3 values) of the background, and which half holds a white bar."""
    rng = np.random.default_rng(seed)
    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], np.uint8)
    colour, side = rng.integers(0, 3, n), rng.integers(0, 2, n)
    images = np.repeat(colours[colour][:, None, None, :], 16, 1).repeat(16, 2)
    for k in range(n):
        cols = slice(2, 6) if side[k] == 0 else slice(10, 14)
        images[k, 4:12, cols] = 255
    images = np.clip(images + rng.integers(-20, 20, images.shape), 0, 255).astype(np.uint8)
    vocab = {"colour": ("red", "green", "blue"), "bar": ("left", "right")}
    return images, np.stack([colour, side], 1), vocab


def test_classifier_learns_a_toy_set_and_round_trips(tmp_path: Path) -> None:
    images, codes, vocab = _toy_set(96, 0)
    codes[0, 1] = NULL  # an unlabelled entry is left out of the loss
    cfg = ClassifierConfig(image_size=16, widths=(8, 16, 16), final_stride=1)
    net, summary = train_classifier(
        images,
        codes,
        vocab,
        config=cfg,
        settings=TrainSettings(epochs=8, batch_size=16, flip=False),  # the bar is left/right
    )
    test_images, test_codes, _ = _toy_set(64, 1)
    acc = accuracy(classify(net, test_images), test_codes, vocab)
    assert acc["colour"] > 0.9 and acc["bar"] > 0.8  # chance: 1/3 and 1/2
    assert set(summary["val_accuracy"]) == {"colour", "bar"}
    path = save_classifier(tmp_path / "c.safetensors", net, {"training": summary})
    loaded, meta = load_classifier(path)
    assert loaded.config == net.config and meta["training"]["train_images"] == 86
    assert loaded.where.shape == (2, 4 * 4)  # 16 px, stem and one stride-2 stage: 4x4 map
    assert (classify(loaded, test_images) == classify(net, test_images)).mean() > 0.95
    with pytest.raises(ClassifierError, match="not an animeddim attribute classifier"):
        load_classifier(_csv(tmp_path / "x.safetensors", "nope"))


def _marked_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, tuple[str, ...]]]:
    """16-px images: a background colour (3 values), and whether a 2x2 mark sits beside the
    right "ear" (rows 10-11, cols 11-12) or, mirrored, beside the left one: a few pixels at a
    known place, like an avatar's earring."""
    rng = np.random.default_rng(seed)
    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], np.uint8)
    colour, mark, side = rng.integers(0, 3, n), rng.integers(0, 2, n), rng.integers(0, 2, n)
    images = np.repeat(colours[colour][:, None, None, :], 16, 1).repeat(16, 2)
    images = np.clip(images + rng.integers(-25, 25, images.shape), 0, 255).astype(np.uint8)
    for k in np.nonzero(mark)[0]:
        cols = slice(11, 13) if side[k] else slice(3, 5)
        images[k, 10:12, cols] = 250
    vocab = {"colour": ("red", "green", "blue"), "mark": ("no", "yes")}
    return images, np.stack([colour, mark], 1), vocab


def test_crop_branch_reads_a_small_mark_on_either_side_and_init_keeps_the_rest(
    tmp_path: Path,
) -> None:
    import torch

    images, codes, vocab = _marked_set(256, 0)
    test_images, test_codes, _ = _marked_set(128, 1)
    base_cfg = ClassifierConfig(image_size=16, widths=(8, 16, 16), final_stride=1)
    settings = TrainSettings(epochs=6, batch_size=32, blur=0.0, shift=1)
    base, _ = train_classifier(images, codes, vocab, config=base_cfg, settings=settings)
    crop_cfg = replace(base_cfg, crops={"mark": (8, 9, 6, 6)}, crop_widths=(8, 16))
    net, summary = train_classifier(
        images, codes, vocab, config=crop_cfg, settings=settings, init=base
    )
    assert summary["trained"] == ["mark"] and summary["kept"] == ["colour"]
    assert net.config.crops == {"mark": (8, 9, 6, 6)} and net.config.crop_mirror
    # The mark is read on either side, and mirrored images read the same.
    for x in (test_images, test_images[:, :, ::-1].copy()):
        assert accuracy(classify(net, x), test_codes, vocab)["mark"] > 0.95
    # --init kept the trunk: the colour logits are the base classifier's (up to the rounding
    # of a pooling product over one attribute fewer).
    x = torch.as_tensor(test_images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        assert torch.allclose(net(x)["colour"], base(x)["colour"], atol=1e-5, rtol=0)
        assert set(net(x, only=["mark"])) == {"mark"}
    path = save_classifier(tmp_path / "c.safetensors", net, {"training": summary})
    loaded, meta = load_classifier(path)
    assert meta["version"] == 2 and loaded.config == net.config
    assert (classify(loaded, test_images) == classify(net, test_images)).mean() > 0.97
    assert load_classifier(save_classifier(tmp_path / "b.safetensors", base, {}))[1]["version"] == 1
    with pytest.raises(ClassifierError, match="nothing to train"):
        train_classifier(images, codes, vocab, config=crop_cfg, settings=settings, init=net)
    with pytest.raises(ClassifierError, match="inside the 16-px image"):
        train_classifier(
            images, codes, vocab, config=replace(base_cfg, crops={"mark": (12, 9, 6, 6)})
        )
    with pytest.raises(ClassifierError, match="crop for 'nose': no such attribute"):
        train_classifier(
            images, codes, vocab, config=replace(base_cfg, crops={"nose": (8, 9, 6, 6)})
        )


def test_blur_augmentation() -> None:
    import torch

    from animeddim.attributes import _gaussian_blur

    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    x[2] = 0.25
    y = _gaussian_blur(x, torch.tensor([0.0, 1.0, 1.0]))
    assert torch.equal(y[0], x[0])  # sigma 0: unchanged
    assert torch.allclose(y[2], x[2])  # a flat image stays flat
    assert y[1].std() < 0.6 * x[1].std()  # noise is smoothed


def test_flip_augmentation_mirrors_about_half_and_nothing_else() -> None:
    import torch

    from animeddim.attributes import _augment

    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = TrainSettings(shift=0, noise=0.0, blur=0.0)
    y = _augment(x, plain, torch.Generator().manual_seed(1))
    mirrored = torch.tensor([torch.equal(y[i], x[i].flip(-1)) for i in range(64)])
    kept = torch.tensor([torch.equal(y[i], x[i]) for i in range(64)])
    assert bool((mirrored ^ kept).all())  # each image is one or the other, unchanged otherwise
    assert 16 < int(mirrored.sum()) < 48
    off = _augment(x, replace(plain, flip=False), torch.Generator().manual_seed(1))
    assert torch.equal(off, x)


def test_align_labels_maps_values_by_name() -> None:
    from animeddim.labels import Labels

    labels = Labels({"c": ("b", "a")}, np.array([[0], [1], [NULL]]))
    assert align_labels(labels, {"c": ("a", "b", "z")})[:, 0].tolist() == [1, 0, NULL]
    with pytest.raises(ClassifierError, match="does not know the value"):
        align_labels(labels, {"c": ("a",)})


# --------------------------------------------------------------------------------------------
# Coverage maths


def test_histogram_and_total_variation_by_hand() -> None:
    assert histogram(np.array([0, 0, 1, NULL]), 3).tolist() == pytest.approx([2 / 3, 1 / 3, 0])
    assert total_variation([0.5, 0.5, 0.0], [0.0, 0.5, 0.5]) == pytest.approx(0.5)
    assert total_variation([1, 0], [0, 1]) == 1 and total_variation([0.3, 0.7], [0.3, 0.7]) == 0
    vocab = {"skin": ("light", "dark"), "glasses": ("no", "yes")}
    real = np.array([[0, 0], [1, 0], [1, 1], [1, 0]])  # dark 75%, glasses 25%
    samples = np.array([[0, 0], [0, 0], [0, 0], [1, 0]])  # dark 25%, glasses 0%
    real_pred = np.array([[0, 0], [1, 0], [0, 1], [1, 0]])  # dark 50%, glasses 25%
    t = coverage_table(vocab, real, samples, real_pred)
    assert t["skin"]["real"] == [0.25, 0.75] and t["skin"]["samples"] == [0.75, 0.25]
    assert t["skin"]["tv"] == pytest.approx(0.5) and t["skin"]["tv_floor"] == pytest.approx(0.25)
    assert t["glasses"]["tv"] == pytest.approx(0.25) and t["glasses"]["tv_floor"] == 0


# --------------------------------------------------------------------------------------------
# Commands


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> tuple[Path, Path]:
    root = shared_dir(tmp_path_factory, "attr", _labelled_avatars)
    return root / "train", root / "real"


def _labelled_avatars(root: Path) -> Path:
    run_here(
        "data",
        "avatars",
        "--out",
        str(root / "train"),
        "--n",
        "24",
        "--size",
        "16",
        "--workers",
        "1",
        "--balanced",
        "0.5",
    )
    run_here(
        "data",
        "avatars",
        "--out",
        str(root / "real"),
        "--n",
        "12",
        "--size",
        "16",
        "--seed",
        "1",
        "--workers",
        "1",
    )
    return root


def test_attributes_train_and_coverage_commands(labelled: tuple[Path, Path], tmp_path: Path):
    train_dir, real = labelled
    rows = _rows(train_dir)
    assert any(r["forced"] for r in rows) and any(not r["forced"] for r in rows)
    clf = tmp_path / "clf.safetensors"
    p = run_here(
        "attributes",
        "train",
        "--data",
        str(train_dir),
        "--held-out",
        str(real),
        "--image-size",
        "16",
        "--epochs",
        "2",
        "--out",
        str(clf),
    )
    assert "held out accuracy: hair_color" in p.stdout
    info = json.loads(clf.with_suffix(".json").read_text())
    assert set(info["held_out_accuracy"]) == set(AVATAR_ATTRIBUTES)
    assert set(info["held_out_accuracy_mirrored"]) == set(AVATAR_ATTRIBUTES)
    assert info["settings"]["flip"] is True
    assert info["held_out_images"] == 12 and info["train_images"] + info["val_images"] == 24
    out = tmp_path / "cov"
    p = run_here(
        "attributes",
        "coverage",
        str(real),
        "--real",
        str(real),
        "--classifier",
        str(clf),
        "--out",
        str(out),
    )
    assert "hair_color" in p.stdout and "floor" in p.stdout
    result = json.loads((out / "coverage.json").read_text())
    skin = result["attributes"]["skin"]
    # The real folder against itself: the samples' histogram is the classified real one.
    assert skin["samples"] == skin["real_classified"] and skin["tv"] == skin["tv_floor"]
    real_skin = [r["skin"] for r in _rows(real)]
    assert skin["real"] == [real_skin.count(v) / 12 for v in skin["values"]]
    assert (out / "coverage.png").stat().st_size > 0 and "| skin |" in (
        out / "coverage.md"
    ).read_text()
    with open(out / "coverage.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == sum(len(v) for v in avatar_vocabulary().values())
    again = ["attributes", "coverage", str(real), "--real", str(real), "--classifier", str(clf)]
    p = run_here(*again, "--out", str(out), check=False)
    assert p.returncode == 2 and "already holds earlier outputs (coverage.csv and 3 more); use " \
        "--force" in p.stderr  # fmt: skip
    (out / "coverage.json").unlink()  # any one of its files is an earlier coverage
    p = run_here(*again, "--out", str(out), check=False)
    assert p.returncode == 2 and "(coverage.csv and 2 more)" in p.stderr
    p = run_here(*again, "--out", str(real / "cov"), check=False)
    assert p.returncode == 2 and "is inside the samples folder" in p.stderr
    run_here(*again, "--out", str(out), "--force")
    assert (out / "coverage.json").is_file()
    p = run_here("attributes", "train", "--data", str(train_dir), "--out", str(tmp_path / "c.json"),
                check=False)  # fmt: skip
    assert p.returncode == 2 and "--out and its accuracy JSON name the same file" in p.stderr


def test_attributes_train_crop_from_init_command(labelled: tuple[Path, Path], tmp_path: Path):
    train_dir, real = labelled
    common = ["--data", str(train_dir), "--held-out", str(real), "--epochs", "1"]
    base = tmp_path / "base.safetensors"
    run_here("attributes", "train", *common, "--image-size", "16", "--out", str(base))
    out = tmp_path / "ear.safetensors"
    run_here(
        "attributes", "train", *common, "--init", str(base), "--crop", "earrings=5,9,8,6",
        "--out", str(out),
    )  # fmt: skip
    before, after = (json.loads(f.with_suffix(".json").read_text()) for f in (base, out))
    assert after["trained"] == ["earrings"] and after["init"] == str(base)
    assert after["config"]["crops"] == {"earrings": [5, 9, 8, 6]}
    for what in ("held_out_accuracy", "held_out_accuracy_mirrored"):
        kept = {k: v for k, v in before[what].items() if k != "earrings"}
        assert {k: after[what][k] for k in kept} == kept  # what was kept reads the same
    assert load_classifier(out)[0].config.crops == {"earrings": (5, 9, 8, 6)}
    bad = {
        "earrings=1,2,3": "expected ATTR=TOP,LEFT,HEIGHT,WIDTH in whole pixels",
        "earrings=a,b,c,d": "expected ATTR=TOP,LEFT,HEIGHT,WIDTH",
        "nose=0,0,8,8": "crop for 'nose': no such attribute",
        "earrings=10,10,8,8": "must be a region of at least 4x4 pixels inside the 16-px image",
    }
    for spec, message in bad.items():
        p = run_here("attributes", "train", *common, "--init", str(base), "--crop", spec,
                     "--out", str(tmp_path / "x.safetensors"), check=False)  # fmt: skip
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, spec
    p = run_here("attributes", "train", *common, "--init", str(base),
                 "--out", str(tmp_path / "x.safetensors"), check=False)  # fmt: skip
    assert p.returncode == 2 and "give a --crop to train" in p.stderr
    p = run_here("attributes", "train", *common, "--init", str(tmp_path / "none.safetensors"),
                 "--crop", "earrings=5,9,8,6", "--out", str(tmp_path / "x.safetensors"),
                 check=False)  # fmt: skip
    assert p.returncode == 2 and "does not exist" in p.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_attributes_command_errors(labelled: tuple[Path, Path], tmp_path: Path) -> None:
    train_dir, _ = labelled
    bare = tmp_path / "bare"
    _write_png(bare / "a.png")
    p = run_cli("attributes", "coverage", str(bare), "--real", str(bare), check=False)
    assert p.returncode == 2 and "has no labels.csv" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("attributes", "train", "--data", str(bare), check=False)
    assert p.returncode == 2 and "labels file" in p.stderr and "does not exist" in p.stderr
    p = run_here(
        "attributes",
        "coverage",
        str(bare),
        "--real",
        str(train_dir),
        "--classifier",
        str(tmp_path / "none.safetensors"),
        check=False,
    )
    assert p.returncode == 2 and "does not exist" in p.stderr
    p = run_here("data", "avatars", "--out", str(tmp_path / "x"), "--balanced", "2", check=False)
    assert p.returncode == 2 and "balanced must be in [0, 1]" in p.stderr


@pytest.mark.parametrize(
    "header",
    [
        "folder",
        {"version": 1},  # no config
        [1, 2],  # not an object
        {"version": 1, "config": {"image_size": "x", "widths": [8, 16]}, "vocab": {}},
        {"version": "two", "config": {}, "vocab": {}},
    ],
)
def test_a_classifier_that_is_a_folder_or_has_a_damaged_header_is_one_line(
    header, labelled: tuple[Path, Path], tmp_path: Path
) -> None:
    """A folder was reported as "does not exist"; a header without its config, or with a
    field of the wrong type, died with a KeyError, AttributeError or ValueError traceback."""
    import json

    import torch
    from safetensors.torch import save_file

    from animeddim.attributes import FORMAT

    train_dir, _ = labelled
    if header == "folder":
        classifier, needle = tmp_path / "run", "is a folder; give the classifier file"
        classifier.mkdir()
    else:
        classifier, needle = tmp_path / "c.safetensors", "has a damaged animeddim-attributes header"
        save_file({"w": torch.zeros(2)}, classifier, metadata={FORMAT: json.dumps(header)})
    out = tmp_path / "cov"
    p = run_here("attributes", "coverage", str(train_dir), "--real", str(train_dir),
                 "--classifier", str(classifier), "--out", str(out), check=False)  # fmt: skip
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not out.exists()


def test_evaluate_reports_coverage(
    labelled: tuple[Path, Path], tmp_path: Path, fast_inception, monkeypatch
) -> None:
    from animeddim.cli import sampling as cli_sampling
    from animeddim.train import train

    if fast_inception is None:
        pytest.skip("FID Inception weights not installed")
    monkeypatch.setattr(cli_sampling, "_extractor", lambda a: fast_inception)  # loaded once
    train_dir, real = labelled
    run = tmp_path / "run"
    train(tiny_config(train_dir, epochs=1), run, progress=False, log=lambda s: None)
    clf = tmp_path / "clf.safetensors"
    run_here(
        "attributes",
        "train",
        "--data",
        str(train_dir),
        "--image-size",
        "16",
        "--epochs",
        "1",
        "--out",
        str(clf),
    )
    out = tmp_path / "eval.json"
    p = run_here(
        "evaluate",
        "--run",
        str(run),
        "--real",
        str(real),
        "--n",
        "6",
        "--steps",
        "2",
        "--protocols",
        "standard",
        "--out",
        str(out),
        "--coverage",
        str(clf),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--samples-out",
        str(tmp_path / "drawn"),
    )
    assert "coverage: 6 generated vs 12 real images" in p.stdout
    ev = json.loads(out.read_text())
    assert ev["coverage"]["n_samples"] == 6 and "kid_mean" in ev
    assert set(ev["coverage"]["attributes"]) == set(AVATAR_ATTRIBUTES)
    assert (tmp_path / "eval-coverage" / "coverage.md").is_file()
    # the samples it kept are the ones it judged: judged again, the same histograms
    drawn = sorted(p.name for p in (tmp_path / "drawn").iterdir())
    assert drawn == [f"seed0-{i:06d}.png" for i in range(6)]
    run_here("attributes", "coverage", str(tmp_path / "drawn"), "--real", str(real),
             "--classifier", str(clf), "--out", str(tmp_path / "again"))  # fmt: skip
    again = json.loads((tmp_path / "again" / "coverage.json").read_text())
    for a, entry in ev["coverage"]["attributes"].items():
        assert again["attributes"][a]["samples"] == entry["samples"], a
    # a second evaluation into the same folder is refused before it draws, unless --force
    p = run_here("evaluate", "--run", str(run), "--real", str(real), "--n", "6", "--steps",
                 "2", "--protocols", "standard", "--out", str(tmp_path / "e2.json"),
                 "--samples-out", str(tmp_path / "drawn"), check=False)  # fmt: skip
    assert p.returncode == 2 and "--samples-out" in p.stderr and "--force" in p.stderr
    assert not (tmp_path / "e2.json").exists()
    p = run_here("evaluate", "--run", str(run), "--real", str(real), "--n", "2", "--steps",
                 "2", "--protocols", "standard", "--out", str(tmp_path / "e3.json"),
                 "--samples-out", str(real / "sub"), check=False)  # fmt: skip
    assert p.returncode == 2 and "inside the --real folder" in p.stderr


def test_attributes_train_on_class_folders_and_a_csv(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for k in range(12):
        for cls, rgb in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
            noisy = np.clip(np.array(rgb) + rng.integers(-30, 30, (16, 16, 3)), 0, 255)
            path = tmp_path / "imgs" / cls / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(noisy.astype(np.uint8)).save(path)
    clf = tmp_path / "c.safetensors"
    common = ["--image-size", "16", "--epochs", "4", "--batch-size", "8"]
    run_here(
        "attributes",
        "train",
        "--data",
        str(tmp_path / "imgs"),
        "--labels",
        "folders",
        *common,
        "--out",
        str(clf),
    )
    info = json.loads(clf.with_suffix(".json").read_text())
    assert list(info["val_accuracy"]) == ["class"] and info["train_images"] == 22
    assert load_classifier(clf)[0].config.vocab == {"class": ("blue", "red")}
    bad = _csv(tmp_path / "bad.csv", "file,colour\nred/0.png,red\nblue/0.png,\n")
    p = run_here(
        "attributes",
        "train",
        "--data",
        str(tmp_path / "imgs"),
        "--labels",
        str(bad),
        *common,
        "--out",
        str(tmp_path / "d.safetensors"),
        check=False,
    )
    assert p.returncode == 2 and "row 3 (blue/0.png): the value of 'colour' is empty" in p.stderr
    assert not (tmp_path / "d.safetensors").exists()

    # Partially labelled: an empty entry is left out of that attribute's loss only.
    def partial(empty_column: str) -> Path:
        rows = [f"{c}/{k}.png,{c if k % 4 else ''},{'dark' if k % 2 else ''}{empty_column}"
                for k in range(12) for c in ("red", "blue")]  # fmt: skip
        header = "file,colour,shade" + ",unused" * bool(empty_column)
        return _csv(tmp_path / "part.csv", header + "\n" + "\n".join(rows) + "\n")

    args = ["attributes", "train", "--data", str(tmp_path / "imgs"), "--labels",
            str(tmp_path / "part.csv"), "--labels-missing", "null", *common, "--out",
            str(tmp_path / "e.safetensors")]  # fmt: skip
    part = partial(",")
    p = run_here(*args, check=False)
    assert p.returncode == 2
    assert (
        f"attribute unused has no value in any row of '{part}': there is nothing to learn; "
        "fill it in, or remove the column"
    ) in p.stderr
    partial("")
    run_here(*args)
    vocab = load_classifier(tmp_path / "e.safetensors")[0].config.vocab
    assert vocab == {"colour": ("blue", "red"), "shade": ("dark",)}


def _red_and_blue_training(tmp_path: Path) -> list:
    """`attributes train` of 6 red and 6 blue 16-px images in class folders, 4 epochs of 3
    steps (batch 4), without its --out."""
    for k in range(6):
        for cls, rgb in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
            _write_png(tmp_path / "imgs" / cls / f"{k}.png", rgb, size=16)
    return ["attributes", "train", "--data", tmp_path / "imgs", "--labels", "folders",
            "--image-size", "16", "--epochs", "4", "--batch-size", "4"]  # fmt: skip


@pytest.mark.parametrize("stop", ["Ctrl-C", "SIGTERM"])
def test_attributes_train_stopped_says_on_its_own_line_that_nothing_was_saved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    """Ctrl-C (or SIGTERM) while `attributes train` trains (before: `animeddim: interrupted`
    glued to the end of the progress bar's line, '... loss=0.693]animeddim: interrupted',
    saying nothing of the classifier). The bar is closed first; the message is a line of its
    own saying that nothing was written and how to go on; exit 130 (143)."""
    import animeddim.attributes as attributes_mod
    from animeddim.interrupts import Terminated

    argv = _red_and_blue_training(tmp_path)
    real, calls = attributes_mod._augment, []

    def augment(*args):  # the third optimiser step is where the signal lands
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt if stop == "Ctrl-C" else Terminated()
        return real(*args)

    monkeypatch.setattr(attributes_mod, "_augment", augment)
    clf = tmp_path / "c.safetensors"
    rc, out, err = run_main(capsys, *argv, "--out", clf)
    word = "interrupted" if stop == "Ctrl-C" else "terminated (SIGTERM)"
    assert rc == (130 if stop == "Ctrl-C" else 143) and not out
    *bar, last = err.rstrip("\n").split("\n")
    assert last == (
        f"animeddim: {word}: nothing saved (stopped in the first epoch; {clf} was not "
        "written); run the same command again to train it"
    )
    assert "classifier:" in bar[-1] and "2/" in bar[-1]  # the bar, ended where it stopped
    assert not clf.exists() and not clf.with_suffix(".json").exists()


def test_attributes_train_stopped_after_an_epoch_goes_on_to_the_same_classifier(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after some epochs of `attributes train` kept nothing (the classifier is
    written once training ends). The training state is kept after each epoch, beside --out;
    the same command again goes on from the last epoch to the weights an uninterrupted call
    trains, then removes it. A state of other options is not gone on from."""
    import animeddim.attributes as attributes_mod
    from animeddim.attributes_cli import pending_path

    args = _red_and_blue_training(tmp_path)
    whole = tmp_path / "whole.safetensors"
    assert run_main(capsys, *args, "--out", whole)[0] == 0
    real, calls = attributes_mod._augment, []

    def augment(*a):  # 3 steps an epoch: the signal lands in the third epoch
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(*a)

    clf = tmp_path / "c.safetensors"
    with monkeypatch.context() as m:
        m.setattr(attributes_mod, "_augment", augment)
        rc, _, err = run_main(capsys, *args, "--out", clf)
    pending = pending_path(clf)
    assert rc == 130 and not clf.exists() and pending.is_file()
    assert err.rstrip("\n").split("\n")[-1] == (
        f"animeddim: interrupted: the training so far is kept (epoch 2 of 4, in {pending}); "
        "run the same command again to go on from there"
    )
    rc, _, err = run_main(capsys, *args, "--out", clf)
    assert rc == 0, err
    assert f"note: going on from epoch 2 of 4 ({pending})" in err and not pending.exists()
    a, b = load_classifier(whole)[0].state_dict(), load_classifier(clf)[0].state_dict()
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)

    with monkeypatch.context() as m:  # stopped again, then other options: from the start
        calls.clear()
        m.setattr(attributes_mod, "_augment", augment)
        assert run_main(capsys, *args, "--out", tmp_path / "d.safetensors")[0] == 130
    rc, _, err = run_main(capsys, *args, "--seed", 1, "--out", tmp_path / "d.safetensors")
    assert rc == 0 and "holds the training of other images or options" in err, err


def test_a_stop_as_an_epochs_state_is_kept_names_that_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C landing just as the first epoch's training state is renamed into place (before:
    the stop's line said 'nothing saved (stopped in the first epoch ...)' while the state of
    epoch 1 was there, and the next call went on from it): the state is kept and the epoch it
    holds counted together, so the line names epoch 1."""
    import os
    import signal

    import animeddim.io as io_mod
    from animeddim.attributes_cli import pending_path

    args = _red_and_blue_training(tmp_path)
    real = io_mod.fsync_dir

    def fsync_dir(folder):  # called once the state is renamed into place
        real(folder)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(io_mod, "fsync_dir", fsync_dir)
    clf = tmp_path / "c.safetensors"
    rc, _, err = run_main(capsys, *args, "--out", clf)
    assert rc == 130 and pending_path(clf).is_file(), err
    assert err.rstrip("\n").split("\n")[-1] == (
        f"animeddim: interrupted: the training so far is kept (epoch 1 of 4, in "
        f"{pending_path(clf)}); run the same command again to go on from there"
    )


def test_a_foreign_file_under_the_pending_name_is_trained_over(tmp_path, capsys):
    """A file at the training state's name that torch loads but that is no state of ours (a
    list) ended attributes train in an AttributeError traceback; it is trained over, with
    the note that says so."""
    import torch

    from animeddim.attributes_cli import pending_path

    args = _red_and_blue_training(tmp_path)
    clf = tmp_path / "c.safetensors"
    torch.save([1, 2, 3], pending_path(clf))
    rc, _, err = run_main(capsys, *args, "--out", clf)
    assert rc == 0, err
    assert "holds the training of other images or options: training from the start" in err
    assert clf.is_file() and not pending_path(clf).exists()
