"""Bad input, existing outputs, signals and full disks, for every command that is not training.

Each test runs the command the way a user does (`cli.main`, or a subprocess where a signal or
a resource limit is involved) on 16-px avatars and a tiny run, and checks what the user sees
(one line, the exit code) and what is on disk afterwards. docs/reliability.md tabulates them.
KID tests use a cheap feature extractor in place of Inception: what is tested is how folders
and caches are handled, not the network (tests/test_metrics.py tests that).
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, copy_run, run_main
from PIL import Image
from safetensors.torch import load_file

from animeddim import data as data_module
from animeddim import io as animeddim_io
from animeddim.checkpoint import load
from animeddim.cli import sampling as cli_sampling
from animeddim.run_folder import LOCK_NAME


class FakeExtractor:
    """Per-channel mean and std as 'features'; counts calls; `refuse` makes a call fail."""

    cache_token = "fake.pt:1"
    weights_id = "fake.pt sha256:000000000000"

    def __init__(self) -> None:
        self.calls = 0
        self.refuse = False

    def features(self, images_u8, protocol, batch_size=64, bf16=False):
        assert not self.refuse, "the network ran although the features were cached"
        self.calls += 1
        x = images_u8.double() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


@pytest.fixture
def fake(monkeypatch) -> FakeExtractor:
    extractor = FakeExtractor()
    monkeypatch.setattr(cli_sampling, "_extractor", lambda a: extractor)
    return extractor


@pytest.fixture(scope="module")
def run(trained_tiny, tmp_path_factory) -> Path:
    return copy_run(trained_tiny, tmp_path_factory.mktemp("faults") / "run")


@pytest.fixture
def unet_calls(monkeypatch) -> list[int]:
    """One entry per call of the network's forward pass: a test refusing before any work
    asserts it stays empty."""
    from animeddim.unet import UNet

    calls: list[int] = []
    forward = UNet.forward
    monkeypatch.setattr(UNet, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    return calls


_PROGRESS = re.compile(r".*:\s+\d+%\|.*")  # a tqdm bar: "sample:  50%|#####  | 1/2 ..."


# the caution on a KID or FID of fewer than 1,000 images (`metrics.few_images_note`), which
# every KID of these tests' few images carries: test_kid_and_evaluate_on_few_images_say_so
_FEW = re.compile(r"animeddim: warning: KID (and FID )?of .*, fewer than 1,000: .*")
_STAGE = re.compile(r"bench: measuring .*")  # bench's progress: a line as each measurement starts


def _lines(err: str) -> list[str]:
    """What stderr says, without the progress bars (tqdm redraws them with carriage returns),
    bench's stage lines and the caution on few images."""
    parts = [line.strip() for line in re.split(r"[\r\n]+", err)]
    return [x for x in parts if x and not any(p.fullmatch(x) for p in (_PROGRESS, _FEW, _STAGE))]


def _one_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    assert len(_lines(err)) == 1, err
    for n in needles:
        assert n in err, err


def _folder(d: Path, avatars: Path, n: int) -> Path:
    d.mkdir(parents=True)
    for f in sorted(avatars.glob("*.png"))[:n]:
        shutil.copy(f, d / f.name)
    return d


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# One line, never a traceback: kid / evaluate / steps


def _bad_folder(kind: str, d: Path, avatars: Path) -> tuple[Path, str]:
    if kind == "one image":
        return _folder(d, avatars, 1), "at least 2 images"
    if kind == "empty":
        d.mkdir()
        return d, ("at least 2 images", "no usable image")
    if kind == "missing":
        return d, "does not exist"
    _folder(d, avatars, 2)
    Image.new("RGB", (24, 12)).save(d / "zz-big.png")  # sizes as a photo's: width x height
    return d, f"differ in size: '{sorted(d.glob('*.png'))[0]}' is 16x16, '{d}/zz-big.png' is 24x12"


@pytest.mark.parametrize("kind", ["one image", "empty", "missing", "mixed sizes"])
def test_kid_evaluate_steps_on_a_bad_folder_are_one_line(
    kind, run, avatars16, tmp_path, capsys, fake
):
    bad, needle = _bad_folder(kind, tmp_path / "bad", avatars16)
    good = _folder(tmp_path / "good", avatars16, 3)
    cache = ["--cache-dir", tmp_path / "cache"]
    for argv in (
        ["kid", bad, good, *cache],
        ["kid", good, bad, "--protocol", "paper", *cache],
        ["evaluate", "--run", run, "--real", bad, "--n", 2, "--steps", 1, "--protocols", "paper",
         "--out", tmp_path / "e.json", *cache],
        ["evaluate", "--run", run, "--real", bad, "--n", 2, "--steps", 1, "--out",
         tmp_path / "e.json", *cache],
        ["steps", "--run", run, "--real", bad, "--n", 2, "--steps", 1, "--eta", 0, "--out",
         tmp_path / "st", *cache],
    ):  # fmt: skip
        if kind == "mixed sizes" and "--protocols" in argv:
            continue  # the paper protocol resizes every image to 75 px: sizes may differ
        rc, _, err = run_main(capsys, *argv)
        assert rc == 2, (argv, err)
        _one_line(err)
        assert any(w in err for w in ([needle] if isinstance(needle, str) else needle)), err
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "st").exists()


def _few(sets: str, fid: bool = True) -> str:
    """The caution on a KID (and FID) of fewer than 1,000 images, `sets` its counts."""
    fid_words = " and FID is biased upward (two sets of 1,000 avatars of one generator " \
        "measure FID 11.7 apart)" if fid else ""  # fmt: skip
    return (
        f"{'KID and FID' if fid else 'KID'} of {sets}, fewer than 1,000: KID's ± is then not "
        f"the spread between image sets (each subset of the smaller set is all of it){fid_words}"
        "; compare values at equal counts only, or measure 1,000 or more a side"
    )


def test_kid_and_evaluate_on_few_images_say_so(run, avatars16, tmp_path, capsys, fake):
    """`kid`, `evaluate` and `steps` against a few dozen images gave KID ± std and FID
    without a word, where KID's ± is then no spread between image sets (each subset of the
    smaller set is all of it) and FID is mostly bias. One line says so (once), and the JSON
    records it under "notes"; the values are unchanged, and 1,000 images a side say nothing."""
    from animeddim import metrics

    small, cache = _folder(tmp_path / "small", avatars16, 5), tmp_path / "cache"
    rc, stdout, err = run_main(capsys, "kid", small, avatars16, "--json", "--cache-dir", cache)
    assert rc == 0, err
    r, note = json.loads(stdout), _few(f"5 images in '{small}' and 24 images in '{avatars16}'")
    assert r["notes"] == [note]
    assert [x for x in err.splitlines() if "warning" in x] == [f"animeddim: warning: {note}"]
    f_a, f_b = (metrics.folder_features(d, fake, cache_dir=cache) for d in (small, avatars16))
    assert (r["kid_mean"], r["kid_std"]) == metrics.kid_standard(f_a, f_b)  # as computed
    assert r["fid"] == metrics.fid_from_features(f_a, f_b)
    argv = ["evaluate", "--run", run, "--real", avatars16, "--n", 3, "--steps", 1,
            "--protocols", "standard", "--cache-dir", cache]  # fmt: skip
    rc, _, err = run_main(capsys, *argv, "--out", tmp_path / "e.json")
    assert rc == 0, err
    note = _few("24 real images and 3 generated images")
    assert json.loads((tmp_path / "e.json").read_text())["notes"] == [note]
    assert err.count(note) == 1 and f"animeddim: warning: {note}" in err
    argv = ["steps", "--run", run, "--real", avatars16, "--n", 3, "--steps", "1,2", "--eta", 0,
            "--cache-dir", cache, "--out", tmp_path / "st"]  # fmt: skip
    rc, _, err = run_main(capsys, *argv)
    assert rc == 0, err
    note = _few("24 real images and 3 generated images per setting", fid=False)
    assert err.count(note) == 1
    # steps.md says it under the table too, as the JSON of kid and evaluate records it; the
    # CSV, which tools parse, does not
    table, below = (tmp_path / "st" / "steps.md").read_text().removesuffix("\n").split("\n\n")
    assert len(table.splitlines()) == 4 and below == f"Note: {note}."
    assert "fewer than" not in (tmp_path / "st" / "steps.csv").read_text()
    assert metrics.few_images_note([(1000, "real images"), (5000, "generated images")]) is None
    assert "999 generated images, fewer" in metrics.few_images_note(
        [(1000, "real images"), (999, "generated images")]
    )


def test_kid_says_whether_a_folder_is_missing_or_a_file(avatars16, tmp_path, capsys, fake):
    """`kid MISSING DIR` said "'MISSING' is not a folder", as for a file; it says which (so do
    `attributes train --data`/`--held-out` and `attributes coverage`)."""
    good = _folder(tmp_path / "good", avatars16, 3)
    (tmp_path / "notes.txt").write_text("a file")
    (tmp_path / "gone").symlink_to(tmp_path / "unmounted")
    for bad, said in [
        (tmp_path / "missing", f"'{tmp_path / 'missing'}' does not exist"),
        (tmp_path / "notes.txt", f"'{tmp_path / 'notes.txt'}' is a file, not a folder"),
        (tmp_path / "gone", f"'{tmp_path / 'gone'}' is a broken symbolic link (to "),
    ]:
        cache = ["--cache-dir", tmp_path / "cache"]
        for argv in (["kid", good, bad, *cache], ["kid", bad, good, *cache], ["attributes",
                     "coverage", bad, "--real", good], ["attributes", "train", "--data", bad,
                     "--out", tmp_path / "a.safetensors"]):  # fmt: skip
            rc, _, err = run_main(capsys, *argv)
            assert rc == 2, (argv, err)
            _one_line(err, said)
            assert "not a folder" not in err or "is a file" in err


def test_an_fid_that_rounds_to_zero_is_shown_as_0_not_minus_0(
    avatars16, tmp_path, capsys, fake, monkeypatch
):
    """`kid A A` printed `FID -0.000`: the FID of a folder against itself computes as
    -3.6e-12 (Inception's 2048-d features; a difference of traces in float64). Shown as 0.000
    by kid, as 0 in the report's tables (which showed -3.638e-12); the JSON and the report's
    CSV keep the value as computed, and a value below zero beyond rounding keeps its sign."""
    from animeddim.metrics import folders
    from animeddim.report.tables import Table, cell_text, to_html, to_markdown

    a = _folder(tmp_path / "a", avatars16, 3)
    cache = ["--cache-dir", tmp_path / "cache"]
    for fid, said in [(-3.637978807091713e-12, "FID 0.000 "), (-0.0004, "FID 0.000 ")]:
        monkeypatch.setattr(folders, "fid_from_features", lambda f1, f2, fid=fid: fid)
        rc, out, err = run_main(capsys, "kid", a, a, *cache)
        assert rc == 0, err
        assert said in out and "-0.000" not in out, out
        rc, out, err = run_main(capsys, "kid", a, a, "--json", *cache)
        assert rc == 0 and json.loads(out)["fid"] == fid, out
    table = Table(["FID", "KID"], [[-3.637978807091713e-12, -0.002], [-0.0, 12.5]], "c")
    assert "| 0 | -0.002 |" in to_markdown(table) and "| 0 | 12.5 |" in to_markdown(table)
    assert "<td>0</td><td>-0.002</td>" in to_html(table)
    assert [cell_text(v) for v in (-1e-6, 0.0, 2.5e-11)] == ["-1e-06", "0", "2.5e-11"]


@pytest.mark.parametrize("kind", ["mixed sizes", "one usable", "unlabelled image"])
def test_evaluate_refuses_a_bad_real_folder_before_drawing(
    kind, run, avatars16, tmp_path, capsys, fake, monkeypatch, unet_calls
):
    # before: every image was drawn (minutes at --n 1000 on a CPU), then the folder refused
    calls = unet_calls
    real = _folder(tmp_path / "real", avatars16, 3)
    extra: list = []
    if kind == "mixed sizes":
        Image.new("RGB", (24, 24)).save(real / "zz-big.png")
        needle = "differ in size"
    elif kind == "one usable":
        for f in sorted(real.glob("*.png"))[1:]:
            f.unlink()
        extra, needle = ["--protocols", "paper"], "has 1 usable"
    else:
        rows = (avatars16 / "labels.csv").read_text().splitlines()
        names = {f.name for f in real.glob("*.png")}
        kept = [r for r in rows[1:] if r.split(",")[0] in names][:2]
        (real / "labels.csv").write_text("\n".join([rows[0], *kept]) + "\n")
        extra, needle = ["--protocols", "paper", "--coverage"], "has no label"
    out, drawn = tmp_path / "e.json", tmp_path / "drawn"
    argv = ["--real", real, "--n", 2, "--steps", 1, "--out", out, "--cache-dir", tmp_path / "c"]
    rc, _, err = run_main(capsys, "evaluate", "--run", run, *argv, *extra, "--samples-out", drawn)
    assert rc == 2, err
    _one_line(err, needle)
    assert not calls and not out.exists()
    assert not drawn.exists()  # its pending note, written first, is gone with the folder


def test_a_refused_call_removes_every_folder_its_samples_out_made(
    run, avatars16, tmp_path, capsys, fake
):
    """`--samples-out mine/a/b/c`, a and below new: the refused call removed only c, leaving
    mine/a/b behind. Every folder the call made goes, and only those (mine, there before,
    stays, empty)."""
    real = _folder(tmp_path / "real", avatars16, 3)
    Image.new("RGB", (24, 24)).save(real / "zz-big.png")  # two sizes: refused before drawing
    (tmp_path / "mine").mkdir()
    argv = ["--real", real, "--n", 2, "--steps", 1, "--out", tmp_path / "e.json"]
    drawn = tmp_path / "mine" / "a" / "b" / "c"
    rc, _, err = run_main(capsys, "evaluate", "--run", run, *argv, "--samples-out", drawn)
    assert rc == 2, err
    _one_line(err, "differ in size")
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


@pytest.mark.parametrize("command", ["evaluate", "steps"])
def test_fewer_than_two_generated_images_is_a_usage_error(command, run, avatars16, capsys):
    rc, _, err = run_main(capsys, command, "--run", run, "--real", avatars16, "--n", 1)
    assert rc == 2
    _one_line(err, "n must be >= 2, got 1")


def test_kid_skips_an_undecodable_file_with_one_note(avatars16, tmp_path, capsys, fake):
    d = _folder(tmp_path / "d", avatars16, 3)
    (d / "broken.png").write_bytes(b"not a png")
    cache = tmp_path / "cache"
    for _ in range(2):  # computed, then read from the cache: the same single note
        rc, out, err = run_main(capsys, "kid", d, d, "--json", "--cache-dir", cache)
        assert rc == 0, err
        assert json.loads(out)["n_a"] == 3
        assert _lines(err) == [
            f"note: skipped 1 of 4 files that could not be decoded: {d / 'broken.png'}: "
            "not an image (unrecognised format)"
        ]
    assert fake.calls == 1


def test_kid_skips_an_unreadable_file_and_a_broken_link(
    avatars16, tmp_path, capsys, fake, monkeypatch
):
    # before: exit 1, "Permission denied: FILE" (hashing it for the cache key), and the
    # broken link was left out without a word
    d = _folder(tmp_path / "d", avatars16, 3)
    locked = sorted(d.glob("*.png"))[0]
    (d / "zz-gone.png").symlink_to(tmp_path / "unmounted" / "x.png")
    real_open = open

    def deny(path, *args, **kwargs):  # root reads anything whatever the mode bits
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(animeddim_io, "open", deny, raising=False)
    monkeypatch.setattr(data_module, "open", deny, raising=False)
    rc, out, err = run_main(capsys, "kid", d, d, "--json", "--cache-dir", tmp_path / "c")
    assert rc == 0, err
    assert json.loads(out)["n_a"] == 2
    assert _lines(err) == [
        f"note: skipped 2 of 4 files that could not be decoded: {locked}: permission denied; "
        f"{d / 'zz-gone.png'}: broken symbolic link (to '{tmp_path / 'unmounted' / 'x.png'}')"
    ]


def test_truncated_feature_cache_is_detected_recomputed_and_replaced(
    avatars16, tmp_path, capsys, fake
):
    d = _folder(tmp_path / "d", avatars16, 4)
    cache = tmp_path / "cache"
    rc, first, _ = run_main(capsys, "kid", d, d, "--json", "--cache-dir", cache)
    assert rc == 0
    (entry,) = cache.iterdir()
    whole = entry.read_bytes()
    features = load_file(entry)["features"].clone()
    entry.write_bytes(whole[: len(whole) // 2])  # e.g. a full disk under an older version
    rc, second, err = run_main(capsys, "kid", d, d, "--json", "--cache-dir", cache)
    assert rc == 0 and json.loads(second) == json.loads(first)
    _one_line(err, "feature cache file", "is damaged", "computed again")
    assert torch.equal(load_file(entry)["features"], features)  # healed: a whole entry again
    fake.refuse = True  # and used from now on
    rc, third, err = run_main(capsys, "kid", d, d, "--json", "--cache-dir", cache)
    assert rc == 0 and json.loads(third) == json.loads(first) and _lines(err) == []


def test_unwritable_cache_dir_warns_and_computes_without_it(avatars16, tmp_path, capsys, fake):
    d = _folder(tmp_path / "d", avatars16, 3)
    rc, expected, _ = run_main(capsys, "kid", d, d, "--json", "--cache-dir", tmp_path / "ok")
    (tmp_path / "file").write_text("a file where the cache folder would go")
    # A path below a regular file cannot be created, by root either (chmod would not do).
    rc, out, err = run_main(capsys, "kid", d, d, "--json", "--cache-dir", tmp_path / "file" / "c")
    assert rc == 0 and json.loads(out) == json.loads(expected)
    _one_line(err, "warning: feature cache not written", "computed without it")


@pytest.mark.parametrize("command", ["kid", "evaluate", "steps"])
def test_inception_weights_that_are_not_torchscript_are_one_line(
    command, run, avatars16, tmp_path, capsys
):
    """--inception-weights FILE that is not TorchScript (a .safetensors, a text file) ended
    in a ValueError traceback, exit 1; now exit 2, one line naming the file."""
    weights = tmp_path / "inception.safetensors"
    weights.write_text("not TorchScript")
    out = tmp_path / "out"
    args = {
        "kid": ["kid", avatars16, avatars16],
        "evaluate": ["evaluate", "--run", run, "--real", avatars16, "--n", 2, "--out", out],
        "steps": ["steps", "--run", run, "--real", avatars16, "--n", 2, "--steps", 1,
                  "--out", out],
    }[command]  # fmt: skip
    rc, _, err = run_main(capsys, *args, "--inception-weights", weights)
    assert rc == 2, err
    _one_line(err, f"'{weights}' is not a TorchScript archive")
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# One line, never a traceback: interpolate


@pytest.mark.parametrize("kind", ["missing", "not an image", "a folder"])
def test_interpolate_from_a_bad_image_is_one_line(kind, run, avatars16, tmp_path, capsys):
    bad = {"missing": tmp_path / "nope.png", "a folder": avatars16}.get(kind, tmp_path / "t.png")
    if kind == "not an image":
        bad.write_text("text")
    good = next(avatars16.glob("*.png"))
    out = tmp_path / "ip" / "x.png"
    rc, _, err = run_main(capsys, "interpolate", "--run", run, "--images", good, bad, "--out", out)
    assert rc == 2
    _one_line(err, f"cannot interpolate from '{bad}'")
    assert not out.parent.exists()


# --------------------------------------------------------------------------------------------
# One line, never a traceback or a silent alias: seeds outside 0 .. 2**63 - 1


@pytest.mark.parametrize("seed", [-1, 2**63, 2**70])
@pytest.mark.parametrize(
    "command",
    ["sample", "evaluate", "steps", "interpolate", "report", "attributes train", "data avatars",
     "data split"],
)  # fmt: skip
def test_a_seed_outside_the_generator_range_is_one_line(
    command, seed, run, avatars16, tmp_path, capsys
):
    """Image i's generator is seeded (seed * stride + i + 1) mod 2**63: --seed -1 drew the
    images of 2**63 - 1 and 2**63 those of 0, silently; report and attributes train died
    with a traceback from torch. Every command refuses such a seed before writing: `data
    avatars` too (it rendered a set for -1), and `data split` (a traceback from numpy)."""
    out = tmp_path / "out"
    folder = _folder(tmp_path / "folder", avatars16, 4)
    args = {
        "sample": ["sample", "--run", run, "--n", 1, "--steps", 1, "--grid", out, "--seed", seed],
        "evaluate": ["evaluate", "--run", run, "--real", avatars16, "--n", 2, "--out", out,
                     "--seed", seed],
        "steps": ["steps", "--run", run, "--real", avatars16, "--n", 2, "--steps", 1,
                  "--out", out, "--seed", seed],
        "interpolate": ["interpolate", "--run", run, "--seeds", 0, seed, "--frames", 2,
                        "--steps", 1, "--out", out / "i.png"],
        "report": ["report", "--run", run, "--out", out, "--seed", seed],
        "attributes train": ["attributes", "train", "--data", avatars16, "--out",
                             out / "a.safetensors", "--seed", seed],
        "data avatars": ["data", "avatars", "--out", out, "--n", 2, "--size", 16, "--seed", seed],
        "data split": ["data", "split", folder, "--held-out", 1, "--out", out, "--seed", seed],
    }[command]  # fmt: skip
    rc, _, err = run_main(capsys, *args)
    assert rc == 2, err
    _one_line(err, "seed", str(seed))
    assert "2**63 - 1" in err or str(2**63 - 1) in err
    assert not out.exists() and len(list(folder.iterdir())) == 4


def test_seeds_in_range_draw_distinct_images(run, tmp_path, capsys):
    """The largest seed accepted is not an alias of another: it draws its own images."""
    grids = []
    for seed in (0, 2**63 - 1):
        grid = tmp_path / f"{seed}.png"
        rc, _, err = run_main(capsys, "sample", "--run", run, "--n", 2, "--steps", 1,
                              "--grid", grid, "--seed", seed)  # fmt: skip
        assert rc == 0, err
        grids.append(grid.read_bytes())
    assert grids[0] != grids[1]


@pytest.mark.parametrize("command", ["train", "attributes train"])
def test_a_folder_given_as_labels_file_is_one_line(command, avatars16, tmp_path, capsys):
    """`--labels DIR` (the folder that holds labels.csv) was exit 1 with `Is a directory:
    DIR`; now exit 2 naming the CSV to give, before any run folder or file is made."""
    out = tmp_path / "out"
    args = {
        "train": ["train", "--data", avatars16, "--out", out, "--labels", avatars16],
        "attributes train": ["attributes", "train", "--data", avatars16, "--labels", avatars16,
                             "--out", out / "a.safetensors"],
    }[command]  # fmt: skip
    rc, _, err = run_main(capsys, *args)
    assert rc == 2, err
    _one_line(err, f"labels file '{avatars16}' is a folder", str(avatars16 / "labels.csv"))
    assert not out.exists()


def test_an_unlabelled_real_image_names_a_remedy_the_command_has(avatars16, tmp_path, capsys):
    # before: "... or pass --labels-missing null", a flag attributes coverage does not have
    real = _folder(tmp_path / "real", avatars16, 3)
    rows = (avatars16 / "labels.csv").read_text().splitlines()
    (real / "labels.csv").write_text("\n".join(rows[:3]) + "\n")  # the third image unlabelled
    samples = _folder(tmp_path / "samples", avatars16, 2)
    out = tmp_path / "cov"
    rc, _, err = run_main(capsys, "attributes", "coverage", samples, "--real", real, "--out", out)
    assert rc == 2, err
    _one_line(err, "1 image has no label", "move such images out of the folder")
    assert "--labels-missing" not in err and not out.exists()


@pytest.mark.parametrize("lr", ["nan", "-1", "0", "inf", "1e400"])
def test_attributes_train_refuses_a_learning_rate_that_is_not_positive(
    lr, avatars16, tmp_path, capsys
):
    """nan and -1 died in torch's AdamW with a traceback; inf trained and saved a classifier
    whose weights were NaN, exit 0. Now: exit 2, one line, no file."""
    out = tmp_path / "a.safetensors"
    rc, _, err = run_main(capsys, "attributes", "train", "--data", avatars16, "--out", out,
                          "--epochs", 1, "--lr", lr)  # fmt: skip
    assert rc == 2, err
    _one_line(err, "--lr must be a finite number > 0, got")
    assert not out.exists() and not out.with_suffix(".json").exists()


@pytest.mark.parametrize(
    ("command", "damage"),
    [(c, d) for c in ("report", "train --resume") for d in ("config.json", "metrics.csv")]
    + [("report", "a file"), ("train --resume", "metrics row")],
)
def test_a_damaged_run_folder_is_one_line(command, damage, trained_tiny, tmp_path, capsys):
    """A config.json or metrics.csv that is not UTF-8 (a foreign or damaged file) ended
    report and train --resume in a UnicodeDecodeError traceback, and a metrics row whose
    epoch is not an integer ended --resume in a ValueError one; `report --run FILE` said
    the file did not exist. Now exit 2, one line naming the file; nothing is written."""
    run = copy_run(trained_tiny, tmp_path / "run")
    before = _files(run)
    target, says = run, None
    if damage == "a file":
        target, says = run / "config.json", f"is a file; give the run folder that holds it: '{run}'"
    elif damage == "metrics row":
        with open(run / "metrics.csv", "a") as f:
            f.write("x,y\n")
        before, says = _files(run), "metrics.csv' is damaged (a row without an integer epoch)"
    else:
        (run / damage).write_bytes(b"\xff\xfe\x00 not UTF-8")
        before, says = _files(run), f"cannot read '{run / damage}'"
    out = tmp_path / "report"
    args = ["report", "--run", target, "--out", out, "--steps", 1]
    if command != "report":
        # a resume with epochs to train (a finished run is refused before the folder's
        # files are read: test_nothing_left_to_train_is_said_before_the_data_is_read)
        args = ["train", "--resume", target, "--quiet", "--max-steps", 9, "--epochs", 3]
    rc, _, err = run_main(capsys, *args)
    assert rc == 2, err
    _one_line(err, says)
    after = _files(run)
    if command != "report":  # a resume records its resumable settings in config.json first
        for files in (before, after):
            files.pop("config.json", None)
    assert not out.exists() and after == before


def test_a_runs_checkpoints_folder_or_file_given_as_its_run_names_the_run_folder(
    run, avatars16, tmp_path, capsys, fake
):
    """`--run RUN/checkpoints` (before: `run folder 'RUN/checkpoints' holds no checkpoint
    (expected 'RUN/checkpoints/checkpoints/last.safetensors')`, or `no config.json and no
    metrics.csv` from report); a checkpoint file where a run folder is needed (before: `give
    --out DIR (no run folder to write into)` from steps and evaluate, `is a file; give its run
    folder` from report): one line naming the run folder to give, nothing written."""
    ckpts, last, out = run / "checkpoints", run / "checkpoints" / "last.safetensors", tmp_path / "o"
    before = _files(run)
    folder_cases = [
        ["sample", "--n", 1, "--steps", 1, "--grid", out / "g.png"],
        ["export", "--out", out / "m.safetensors"],
        ["evaluate", "--real", avatars16, "--n", 2, "--out", out / "e.json"],
        ["steps", "--real", avatars16, "--n", 2, "--steps", 1, "--out", out],
        ["interpolate", "--seeds", 1, 2, "--frames", 2, "--out", out / "i.png"],
        ["invert", "--images", avatars16, "--out", out],
        ["report", "--out", out],
    ]  # fmt: skip
    for argv in folder_cases:
        rc, _, err = run_main(capsys, *argv, "--run", ckpts)
        assert rc == 2, (argv, err)
        _one_line(err, f"'{ckpts}' is the checkpoints folder of a run, not a run folder; "
                  f"give the run folder '{run}'")  # fmt: skip
    rc, _, err = run_main(capsys, "train", "--resume", ckpts)
    assert rc == 2, err
    _one_line(err, f"'{ckpts}' is the checkpoints folder of a run, not a run folder; give the "
              f"run folder '{run}'")  # fmt: skip
    rc, _, err = run_main(capsys, "report", "--run", last, "--out", out)
    assert rc == 2, err
    _one_line(err, f"'{last}' is a file; give the run folder that holds it: '{run}'")
    file_cases = {  # they write into the run folder by default
        "--out FILE.json": ["evaluate", "--real", avatars16, "--n", 2],
        "--out DIR": ["steps", "--real", avatars16, "--n", 2, "--steps", 1],
    }
    for wanted, argv in file_cases.items():
        rc, _, err = run_main(capsys, *argv, "--run", last)
        assert rc == 2, (argv, err)
        _one_line(err, f"--run '{last}' is a file, so there is no run folder to write into: "
                  f"give {wanted}, or --run '{run}' (its run folder)")  # fmt: skip
    assert not out.exists() and _files(run) == before and fake.calls == 0


@pytest.mark.parametrize(
    "kind", ["missing", "no usable image", "an undecodable file", "a file not an image"]
)
def test_invert_of_bad_images_leaves_no_output_folder(kind, run, avatars16, tmp_path, capsys):
    """invert made OUT/reconstructions before reading --images: a missing folder, one of
    undecodable files or a file left an empty output folder behind the one-line error. (A
    file that is an image is inverted: test_invert_takes_one_image_file.)"""
    images = tmp_path / "images"
    said = str(images)
    if kind == "no usable image":
        images.mkdir()
        (images / "zero.png").write_bytes(b"")
        (images / "text.png").write_text("not a png")
    elif kind == "an undecodable file":
        images = tmp_path / "text.png"
        images.write_text("not a png")
        said = f"no usable image in '{images}': not an image (unrecognised format)"
    elif kind == "a file not an image":
        images = tmp_path / "notes.txt"
        images.write_text("a note")
        said = f"'{images}' is not an image file: images have the extensions .png, .jpg"
    out = tmp_path / "inverted"
    rc, _, err = run_main(capsys, "invert", "--run", run, "--images", images, "--steps", 1,
                          "--out", out)  # fmt: skip
    assert rc == 2, err
    _one_line(err, said)
    assert not out.exists()


def test_invert_takes_one_image_file(run, avatars16, tmp_path, capsys):
    """`invert --images FILE` refused a single image (`edit`: tests/test_control_cli.py
    ::test_edit_takes_one_image_file); one image is inverted as a folder holding only it: its
    reconstruction named by its name, its path in latents.safetensors."""
    from safetensors import safe_open

    face = tmp_path / "in" / "face.jpg"
    face.parent.mkdir()
    Image.open(next(avatars16.glob("*.png"))).convert("RGB").save(face)
    (tmp_path / "in" / "other.png").write_bytes(b"not read: only the file given is")
    out = tmp_path / "inverted"
    rc, stdout, err = run_main(capsys, "invert", "--run", run, "--images", face, "--steps", 2,
                               "--out", out)  # fmt: skip
    assert rc == 0, err
    assert "skipped" not in err and "warning" not in err, err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "latents.safetensors",
        "reconstructions/face.png",
        "side-by-side.png",
    ]
    assert f"{face}: PSNR " in stdout and "over 1 image " in stdout
    with safe_open(out / "latents.safetensors", "pt") as f:
        assert json.loads(f.metadata()["paths"]) == [str(face)]
        assert f.get_tensor("latents").shape[0] == 1
    assert Image.open(out / "side-by-side.png").size == (16, 32)
    rc, _, err = run_main(capsys, "invert", "--run", run, "--images", face, "--out", face)
    assert rc == 2
    _one_line(err, "inside the --images file")
    # a path that is neither: not called an image folder, since a file may have been meant
    rc, _, err = run_main(capsys, "invert", "--run", run, "--images", tmp_path / "in" / "fcae.jpg",
                          "--out", tmp_path / "x")  # fmt: skip
    assert rc == 2
    _one_line(err, "fcae.jpg' does not exist (an image file or folder)")


@pytest.mark.parametrize("minutes", ["0", "-1", "nan", "inf"])
def test_tour_refuses_training_minutes_that_are_not_positive_up_front(minutes, tmp_path, capsys):
    """--train-minutes 0 trained 100 epochs with no time limit (training's 0); nan, inf and
    -1 were refused by the training config only at step 4 of 5, minutes in. Now: exit 2,
    one line, before the tour times the machine or writes anything."""
    out = tmp_path / "tour"
    rc, _, err = run_main(capsys, "tour", "--out", out, "--train-minutes", minutes)
    assert rc == 2, err
    _one_line(err, "--train-minutes must be a number > 0, got")
    assert not out.exists()
    (tmp_path / "file").write_text("the user's file")
    rc, _, err = run_main(capsys, "tour", "--quick", "--out", tmp_path / "file")
    assert rc == 2
    _one_line(err, "is a file; give a folder")


# --------------------------------------------------------------------------------------------
# Never overwrite or mix


def test_export_never_replaces_the_runs_checkpoints_and_needs_force_elsewhere(
    run, tmp_path, capsys
):
    last = run / "checkpoints" / "last.safetensors"
    before = last.read_bytes()
    for out in (last, run / "checkpoints" / "new.safetensors"):
        for force in ([], ["--force"]):
            rc, _, err = run_main(capsys, "export", "--run", run, "--out", out, *force)
            assert rc == 2, err
            _one_line(err, str(out))
    assert last.read_bytes() == before and not (run / "checkpoints" / "new.safetensors").exists()
    other = tmp_path / "small.safetensors"
    other.write_bytes(b"the user's file")
    rc, _, err = run_main(capsys, "export", "--run", run, "--out", other)
    assert rc == 2 and other.read_bytes() == b"the user's file"
    _one_line(err, f"--out '{other}' already exists; use --force")
    rc, _, err = run_main(capsys, "export", "--run", run, "--out", other, "--force")
    assert rc == 0 and load(other)[1]["kind"] == "ema-weights"


def test_model_takes_a_file_as_run_does_and_an_unknown_name_is_one_line(run, tmp_path, capsys):
    """`--model` takes a shipped name or what `--run` takes: the same file draws the same
    images either way; a name that is neither is exit 2 naming both kinds."""
    small = tmp_path / "small.safetensors"
    assert run_main(capsys, "export", "--run", run, "--out", small)[0] == 0
    drawn = {}
    for flag in ("--run", "--model"):
        out = tmp_path / flag.strip("-")
        rc, _, err = run_main(capsys, "sample", flag, small, "--n", 2, "--steps", 2, "--out", out)
        assert rc == 0, err
        drawn[flag] = [(out / p).read_bytes() for p in sorted(os.listdir(out))]
    assert len(drawn["--run"]) == 2 and drawn["--model"] == drawn["--run"]
    rc, _, err = run_main(capsys, "sample", "--model", tmp_path / "nope.safetensors", "--n", 1,
                          "--out", tmp_path / "x")  # fmt: skip
    assert rc == 2 and not (tmp_path / "x").exists()
    _one_line(err, "shipped models are avatars-64, avatars-64-cond; otherwise give a run folder")
    # an empty value is an error, never the default model or the working folder
    for flag, cmd in (("--model", "sample"), ("--run", "sample"), ("--run", "export")):
        out = ["--out", tmp_path / ("x.safetensors" if cmd == "export" else "x")]
        rc, _, err = run_main(
            capsys, cmd, flag, " ", *out, *(["--n", 1] if cmd == "sample" else [])
        )
        assert (
            rc == 2 and not (tmp_path / "x").exists() and not (tmp_path / "x.safetensors").exists()
        )
        _one_line(err, "empty")


def test_an_output_under_a_file_is_refused_before_any_work(
    run, avatars16, tmp_path, capsys, fake, monkeypatch, unet_calls
):
    # before: the drawing ran, then the mkdir failed with exit 1, "File exists: notes.txt"
    calls = unet_calls
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's notes")
    tiny = ["--image-size", 16, "--widths", "8,16", "--block-depth", 1, "--no-kid"]
    draw = ["--run", run, "--n", 2, "--steps", 1]
    cases = [
        ["sample", *draw, "--out", notes / "s"],
        ["sample", *draw, "--grid", notes / "deeper" / "g.png"],
        ["evaluate", *draw, "--real", avatars16, "--out", notes / "e.json"],
        ["evaluate", *draw, "--real", avatars16, "--out", tmp_path / "e.json",
         "--samples-out", notes / "s"],
        ["interpolate", "--run", run, "--seeds", 1, 2, "--frames", 2, "--out", notes / "i.gif"],
        ["invert", "--run", run, "--images", avatars16, "--out", notes / "inv"],
        ["export", "--run", run, "--out", notes / "x.safetensors"],
        ["report", "--run", run, "--out", notes / "r"],
        ["train", "--data", avatars16, "--out", notes / "run", *tiny],
        ["data", "avatars", "--out", notes / "av", "--n", 2, "--size", 16],
        ["data", "prepare", avatars16, "--out", notes / "p", "--size", 16],
    ]  # fmt: skip
    for argv in cases:
        rc, _, err = run_main(capsys, *argv)
        assert rc == 2, (argv, err)
        _one_line(err, "cannot be created", f"'{notes}' is a file, not a folder")
    assert notes.read_text() == "the user's notes" and not calls and fake.calls == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_sample_into_earlier_samples_is_refused_and_force_replaces_them_all(
    run, avatars16, tmp_path, capsys
):
    out = tmp_path / "s"
    out.mkdir()
    for i in range(4):  # earlier samples of another (32-px) model
        Image.new("RGB", (32, 32), (i, 0, 0)).save(out / f"seed0-{i:06d}.png")
    before = _files(out)
    base = ["sample", "--run", run, "--steps", 1, "--out", out]
    rc, _, err = run_main(capsys, *base, "--n", 2)
    assert rc == 2 and _files(out) == before
    _one_line(err, "already holds earlier outputs", "--force")
    rc, _, err = run_main(capsys, *base, "--n", 2, "--force")
    assert rc == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["seed0-000000.png", "seed0-000001.png"]  # none of the four is left
    assert {Image.open(out / n).size for n in names} == {(16, 16)}
    # images that are not samples are never mixed with samples, --force or not
    shutil.copy(next(avatars16.glob("*.png")), out / "mine.png")
    rc, _, err = run_main(capsys, *base, "--n", 1, "--force")
    assert rc == 2 and (out / "mine.png").exists() and len(list(out.iterdir())) == 3
    _one_line(err, "not samples", "mine.png")


def test_sample_grid_and_trajectory_are_refused_when_they_exist_or_coincide(run, tmp_path, capsys):
    grid = tmp_path / "g.png"
    grid.write_bytes(b"keep")
    base = ["sample", "--run", run, "--n", 1, "--steps", 1]
    for argv, needle in (
        ([*base, "--grid", grid], "already exists"),
        ([*base, "--trajectory", grid], "already exists"),
        ([*base, "--grid", tmp_path / "a.png", "--trajectory", tmp_path / "a.png"], "same file"),
    ):
        rc, _, err = run_main(capsys, *argv)
        assert rc == 2
        _one_line(err, needle)
    assert grid.read_bytes() == b"keep" and not (tmp_path / "a.png").exists()
    rc, _, err = run_main(capsys, *base, "--grid", grid, "--force")
    assert rc == 0 and Image.open(grid).size == (16, 16)


def test_steps_evaluate_interpolate_report_refuse_existing_outputs(
    run, avatars16, tmp_path, capsys, fake
):
    steps_dir = tmp_path / "st"
    steps_dir.mkdir()
    (steps_dir / "steps.csv").write_text("earlier study\n")
    ev = tmp_path / "ev.json"
    ev.write_text("{}")
    ip = tmp_path / "ip.png"
    ip.with_suffix(".gif").write_bytes(b"earlier gif")
    rep = tmp_path / "rep"
    rep.mkdir()
    (rep / "report.md").write_text("earlier report")
    real = ["--real", avatars16, "--n", 2]
    cases = [
        (["steps", "--run", run, *real, "--steps", 1, "--eta", 0, "--out", steps_dir], "steps.csv"),
        (["evaluate", "--run", run, *real, "--steps", 1, "--out", ev], str(ev)),
        (["interpolate", "--run", run, "--seeds", 1, 2, "--frames", 2, "--steps", 1, "--out", ip],
         str(ip.with_suffix(".gif"))),
        (["report", "--run", run, "--out", rep, "--steps", 1], "report.md"),
    ]  # fmt: skip
    before = _files(tmp_path)
    for argv, needle in cases:
        rc, _, err = run_main(capsys, *argv)
        assert rc == 2, err
        _one_line(err, needle, "--force")
    assert _files(tmp_path) == before and fake.calls == 0  # refused before any work
    for argv, _ in cases:
        rc, _, err = run_main(capsys, *argv, "--force")
        assert rc == 0, err
    assert "steps" in (steps_dir / "steps.csv").read_text() and "kid_mean" in ev.read_text()
    assert ip.with_suffix(".gif").read_bytes()[:3] == b"GIF" and ip.is_file()
    assert "animeddim report" in (rep / "report.md").read_text()


def test_a_report_stopped_before_its_end_is_written_again_without_force(
    run, tmp_path, capsys, monkeypatch
):
    """Ctrl-C (or a kill) while `report` writes left part of a report, and the same command
    again was refused: `already holds earlier outputs (fig1-forward-run.png and 5 more); use
    --force`. A report being written leaves a note in --out until its page is written; with
    the note there the next call replaces the unfinished report without --force. A whole
    report is refused as before, also after a `--force` call that failed before writing."""
    from animeddim.report import page

    rep, note = tmp_path / "rep", tmp_path / "rep" / ".animeddim-report-pending"
    args = ["report", "--run", run, "--out", rep, "--steps", 1]
    real_plot = page.plot_losses

    def ctrl_c(*args, **kwargs):  # as the SIGINT handler does, once Fig. 1 and the tables are
        raise KeyboardInterrupt

    monkeypatch.setattr(page, "plot_losses", ctrl_c)
    rc, _, err = run_main(capsys, *args)
    assert rc == 130 and not (rep / "report.md").exists()
    assert "table1.md" in _files(rep) and "fig1-forward-run.png" in _files(rep)
    noted = note.is_file()
    monkeypatch.setattr(page, "plot_losses", real_plot)
    rc, _, err = run_main(capsys, *args)
    assert rc == 0, err  # before: 2, "already holds earlier outputs (...); use --force"
    assert noted
    _one_line(err, f"note: '{rep}' holds a report stopped before its end: written again")
    assert "animeddim report" in (rep / "report.md").read_text() and not note.exists()
    whole = _files(rep)
    assert "fig4-losses.png" in whole

    rc, _, err = run_main(capsys, *args)  # a whole report: --force, as before
    assert rc == 2 and _files(rep) == whole
    _one_line(err, "already holds earlier outputs", "--force")
    rc, _, err = run_main(capsys, "report", "--run", tmp_path / "nope", "--out", rep, "--force")
    assert rc == 2 and "does not exist" in err and _files(rep) == whole  # nothing started
    rc, _, err = run_main(capsys, *args)
    assert rc == 2 and "--force" in err

    # --force stopped part-way leaves a mix of two reports; the next call leaves one
    (rep / "fig3-kid.png").write_bytes(whole["fig4-losses.png"])  # of a run with KID
    monkeypatch.setattr(page, "plot_losses", ctrl_c)
    rc, _, err = run_main(capsys, *args, "--force")
    assert rc == 130 and note.is_file() and (rep / "fig3-kid.png").is_file()
    monkeypatch.setattr(page, "plot_losses", real_plot)
    rc, _, err = run_main(capsys, *args)
    assert rc == 0, err
    assert sorted(_files(rep)) == sorted(whole)  # the earlier report's fig3-kid.png is gone


def test_evaluate_default_names_never_collide(run, avatars16, capsys, fake, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")
    before = set(run.glob("eval-*.json"))
    for _ in range(2):
        rc, _, err = run_main(capsys, "evaluate", "--run", run, "--real", avatars16, "--n", 2,
                           "--steps", 1, "--protocols", "standard")  # fmt: skip
        assert rc == 0, err
    made = sorted(p.name for p in set(run.glob("eval-*.json")) - before)
    assert made == ["eval-20260101-000000-2.json", "eval-20260101-000000.json"]


def test_a_file_output_ending_in_a_slash_is_refused_before_any_work(
    run, avatars16, tmp_path, capsys, fake, monkeypatch, unet_calls
):
    """`--out models/` for a file output (before: the slash was dropped, so `export` wrote
    the file `models`, `evaluate` the file `results`, `attributes train` `cls` and
    `cls.json`, `interpolate` `interp.png` and `interp.gif` beside the folder meant; exit 0)."""
    calls = unet_calls
    here = tmp_path / "here"
    here.mkdir()
    cases = [
        ["export", "--run", run, "--out", f"{here}/models/"],
        ["evaluate", "--run", run, "--real", avatars16, "--n", 2, "--steps", 1, "--out",
         f"{here}/results/"],
        ["interpolate", "--run", run, "--seeds", 1, 2, "--frames", 2, "--out", f"{here}/interp/"],
        ["attributes", "train", "--data", avatars16, "--out", f"{here}/cls/", "--epochs", 1],
    ]  # fmt: skip
    for argv in cases:
        rc, _, err = run_main(capsys, *argv)
        assert rc == 2, (argv, err)
        _one_line(err, f"--out '{argv[-1] if argv[-2] == '--out' else argv[-3]}' ends in '/', "
                  "which names a folder; give a file name (e.g. '")  # fmt: skip
    for flag in ("--grid", "--trajectory"):  # before: sample wrote g.png beside g.png/
        rc, _, err = run_main(capsys, "sample", "--run", run, "--n", 2, "--steps", 1, flag,
                              f"{here}/g.png/")  # fmt: skip
        assert rc == 2, err
        _one_line(err, f"{flag} '{here}/g.png/' ends in '/', which names a folder")
    assert not list(here.iterdir()) and not calls and fake.calls == 0


def test_a_file_output_that_is_only_an_extension_is_refused_before_any_work(
    run, avatars16, tmp_path, capsys, fake, monkeypatch, unet_calls
):
    """`--grid .png`, `--out .gif`: a name that is only an extension (before: `sample` said
    `name it .png` of '.png', `interpolate` wrote the hidden files '.gif.png' and
    '.gif.gif', `export` a hidden '.safetensors'; exit 0)."""
    calls = unet_calls
    here = tmp_path / "here"
    here.mkdir()
    cases = [
        ["export", "--run", run, "--out", f"{here}/.safetensors"],
        ["evaluate", "--run", run, "--real", avatars16, "--n", 2, "--steps", 1, "--out",
         f"{here}/.json"],
        ["interpolate", "--run", run, "--seeds", 1, 2, "--frames", 2, "--out", f"{here}/.gif"],
        ["attributes", "train", "--data", avatars16, "--out", f"{here}/.pt", "--epochs", 1],
        ["sample", "--run", run, "--n", 2, "--steps", 1, "--grid", f"{here}/.png"],
        ["sample", "--run", run, "--n", 2, "--steps", 1, "--trajectory", f"{here}/.png"],
    ]  # fmt: skip
    for argv in cases:
        at = next(i for i, v in enumerate(argv) if str(v).startswith(str(here)))
        flag, value = argv[at - 1], argv[at]
        rc, _, err = run_main(capsys, *argv)
        assert rc == 2, (argv, err)
        name = Path(value).name
        _one_line(err, f"{flag} '{value}' is only an extension, with no name before it",
                  f"give a name (e.g. '{here}/NAME{name}')")  # fmt: skip
    assert not list(here.iterdir()) and not calls and fake.calls == 0


def test_outputs_inside_a_folder_read_as_images_are_refused(
    trained_tiny, avatars16, tmp_path, capsys, fake
):
    """`steps --out` inside `--real`, `report --out` inside a run's data folder, `train
    --out` inside `--eval-real` (before: steps.png, the report's figures, the run's grids
    were written among the images: the next `kid`/`steps` on the folder failed on a plot of
    another size, and the run's own resume was refused, `images in 'REAL' differ in size:
    ... 'REAL/run/reference.png' is 16x128`; a paper-protocol KID, which resizes, would have
    counted them)."""
    data = tmp_path / "data"
    shutil.copytree(avatars16, data)
    run = copy_run(trained_tiny, tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    cfg["data"]["path"] = cfg["data"]["abs_path"] = str(data)
    (run / "config.json").write_text(json.dumps(cfg))
    before = _files(data)
    tiny = ["--image-size", 16, "--widths", "8,16", "--block-depth", 1, "--no-kid"]
    cases = [
        (["steps", "--run", run, "--real", data, "--n", 2, "--steps", 1, "--eta", 0, "--out",
          data], "is inside the --real folder"),
        (["steps", "--run", run, "--real", data, "--n", 2, "--steps", 1, "--eta", 0, "--out",
          data / "study"], "is inside the --real folder"),
        (["report", "--run", run, "--out", data / "report", "--steps", 1],
         f"is inside the data folder '{data}'; run '{run}' trained on it"),
        (["train", "--data", avatars16, "--out", data / "run", *tiny, "--batch-size", 6,
          "--eval-every", 1, "--eval-real", data], "lies inside --eval-real"),
    ]  # fmt: skip
    for argv, message in cases:
        rc, _, err = run_main(capsys, *argv)
        assert rc == 2, (argv, err)
        _one_line(err, message)
        assert _files(data) == before and fake.calls == 0


def test_interpolate_never_writes_over_its_input_image(run, avatars16, tmp_path, capsys):
    x = tmp_path / "x.png"
    shutil.copy(next(avatars16.glob("*.png")), x)
    before = x.read_bytes()
    y = next(avatars16.glob("*.png"))
    rc, _, err = run_main(
        capsys, "interpolate", "--run", run, "--images", x, y, "--out", x, "--force"
    )
    assert rc == 2 and x.read_bytes() == before
    _one_line(err, "same file")


def test_invert_refuses_earlier_outputs_and_inputs_never_share_an_output(
    run, avatars16, tmp_path, capsys
):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    srcs = sorted(avatars16.glob("*.png"))
    shutil.copy(srcs[0], images / "a.png")
    Image.open(srcs[1]).convert("RGB").save(images / "a.jpg")  # same stem, another file
    shutil.copy(srcs[2], images / "sub" / "a.png")  # same name, another folder
    out = tmp_path / "inv"
    argv = ["invert", "--run", run, "--images", images, "--steps", 2, "--out", out]
    rc, _, err = run_main(capsys, *argv)
    assert rc == 0, err
    recon = sorted(str(p.relative_to(out / "reconstructions")) for p in out.rglob("*.png")
                   if "reconstructions" in p.parts)  # fmt: skip
    assert len(recon) == 3, recon  # three inputs, three reconstructions
    (out / "reconstructions" / "stale.png").write_bytes(b"from an earlier image set")
    before = _files(out)
    rc, _, err = run_main(capsys, *argv)
    assert rc == 2 and _files(out) == before
    _one_line(err, "already holds earlier outputs", "--force")
    rc, _, err = run_main(capsys, *argv, "--force")
    assert rc == 0 and not (out / "reconstructions" / "stale.png").exists()
    rc, _, err = run_main(capsys, "invert", "--run", run, "--images", images, "--out", images / "o")
    assert rc == 2
    _one_line(err, "inside the --images folder")


# --------------------------------------------------------------------------------------------
# Signals: SIGTERM is handled like Ctrl-C


def _default_sigint() -> None:
    """In the child: Ctrl-C as in a terminal. Test runners' workers (pytest-xdist) may ignore
    SIGINT, and an ignored signal is inherited: Python would then never raise
    KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _popen(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "animeddim", *map(str, args)]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=_default_sigint,
    )  # fmt: skip


def _wait_for(cond, timeout: float = 240) -> None:
    t = time.monotonic()
    while not cond():
        assert time.monotonic() - t < timeout, "timed out"
        time.sleep(0.1)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_training_saves_a_checkpoint_then_resume_finishes(
    sig, code, avatars16, tmp_path
):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"model": TINY_MODEL}))
    data = _folder(tmp_path / "data", avatars16, 24)
    (data / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    # so many epochs that it is still training when the signal comes, however loaded the machine
    p = _popen("train", "--data", data, "--out", out, "--config", cfg, "--image-size", 16,
               "--batch-size", 6, "--epochs", 100_000, "--checkpoint-every", 1, "--no-kid",
               "--quiet", "--device", "cpu", "--precision", "fp32",
               "--val-fraction", 0.25)  # fmt: skip
    _wait_for(lambda: (out / "checkpoints" / "last.safetensors").exists())
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == code, stderr
    assert "Traceback" not in stderr and "Warning" not in stderr
    # the skip note prints once (no raw warning with a source line before it)
    assert (stdout + stderr).count("skipped 1 of 25 files") == 1, (stdout, stderr)
    saved = [line for line in stdout.splitlines() if line.startswith("interrupted: checkpoint")]
    assert len(saved) == 1, stdout
    step = load(out / "checkpoints" / "last.safetensors")[1]["step"]
    assert f"saved at step {step};" in saved[0] and step >= 1
    # no temporary file left (the run folder's lock file stays, released)
    assert not [f for f in out.rglob(".*") if f.is_file() and f.name != LOCK_NAME]
    r = subprocess.run([sys.executable, "-m", "animeddim", "train", "--resume", str(out),
                        "--quiet", "--max-steps", str(step + 1)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert load(out / "checkpoints" / "last.safetensors")[1]["step"] > step


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_sampling_keeps_the_images_drawn_so_far(sig, code, run, tmp_path):
    """Ctrl-C or SIGTERM of a long `sample --out` kept nothing (the images were held until
    the end). Each batch is written as soon as it is drawn: the images drawn before the
    signal stay, are the ones an uninterrupted call draws, and one line says so."""
    out = tmp_path / "s"
    args = ["sample", "--run", run, "--n", 100000, "--steps", 2, "--batch-size", 2,
            "--device", "cpu", "--no-compile"]  # fmt: skip
    p = _popen(*args, "--out", out)
    _wait_for(lambda: len(list(out.glob("seed*.png"))) >= 4)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == code, stderr
    assert "Traceback" not in stderr and "interrupted" not in stderr, stderr
    kept = sorted(out.glob("seed*.png"))
    said = [line for line in stdout.splitlines() if line.startswith("interrupted:")]
    assert said == [
        f"interrupted: {len(kept)} of 100000 images kept in {str(out)!r}; the same command "
        f"again goes on from there (draws the other {100000 - len(kept)})"
    ], stdout
    assert [f.name for f in kept] == [f"seed0-{i:06d}.png" for i in range(len(kept))]
    assert not [f for f in out.iterdir() if f.name.startswith(".") and "tmp" in f.name]
    assert (out / ".animeddim-sample-pending.json").is_file()
    # the same images as a call that was not stopped (image i depends on the seed and i only)
    rc = subprocess.run([sys.executable, "-m", "animeddim", *map(str, args[:3]), "--n",
                         str(len(kept)), *map(str, args[5:]), "--out", str(tmp_path / "whole")],
                        capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rc.returncode == 0, rc.stderr
    assert _files(tmp_path / "whole") == {f.name: f.read_bytes() for f in kept}


def _stop_at_write(monkeypatch, writes: int, files: int = 0) -> None:
    """Ctrl-C (KeyboardInterrupt, as the SIGINT handler raises) at the `writes`-th batch
    written by `sample --out`, after `files` of its PNGs are written (a kill mid-batch)."""
    from animeddim import io as animeddim_io

    real, calls = animeddim_io.save_pngs, []

    def save_pngs(images, folder, names):
        calls.append(names)
        if len(calls) == writes:
            real(images[:files], folder, names[:files])
            raise KeyboardInterrupt
        return real(images, folder, names)

    monkeypatch.setattr(animeddim_io, "save_pngs", save_pngs)


@pytest.mark.parametrize("files", [0, 1], ids=["between-batches", "mid-batch"])
def test_a_stopped_sample_goes_on_and_equals_an_uninterrupted_one(
    run, tmp_path, capsys, monkeypatch, files
):
    """The same command again after Ctrl-C keeps the images there, draws the rest, and ends
    with the files (PNGs and grid) an uninterrupted call writes, byte for byte, also when a
    batch was cut short (a kill while it was written)."""
    base = ["sample", "--run", run, "--n", 7, "--steps", 2, "--eta", 0.5, "--batch-size", 2]
    rc, _, err = run_main(capsys, *base, "--out", tmp_path / "whole", "--grid", tmp_path / "w.png")
    assert rc == 0, err
    whole = _files(tmp_path / "whole")
    out, grid = tmp_path / "s", tmp_path / "g.png"
    argv = [*base, "--out", out, "--grid", grid]
    with monkeypatch.context() as m:
        _stop_at_write(m, 3, files)  # two batches written, the third stopped
        rc, stdout, err = run_main(capsys, *argv)
    assert rc == 130, err
    assert f"interrupted: {4 + files} of 7 images kept in {str(out)!r}" in stdout
    assert not grid.exists() and len(list(out.glob("*.png"))) == 4 + files
    rc, stdout, err = run_main(capsys, *argv)
    assert rc == 0, err  # before: 2, "already holds earlier outputs ...; use --force"
    assert f"note: {str(out)!r} holds {4 + files} of 7 images of this sample" in err
    assert f"{3 - files} images, 2 ddim steps" in stdout  # the rest only
    assert _files(out) == whole  # the note is gone: a whole set, refused as before
    assert grid.read_bytes() == (tmp_path / "w.png").read_bytes()
    rc, _, err = run_main(capsys, *argv)
    assert rc == 2
    _one_line(err, "already holds earlier outputs", "--force")


def test_a_stopped_sample_is_not_mixed_with_other_settings(run, tmp_path, capsys, monkeypatch):
    """The same folder with other settings: refused in one line naming each difference and
    the remedies, nothing touched; --force replaces the unfinished images, all of them."""
    out = tmp_path / "s"
    base = ["sample", "--run", run, "--n", 6, "--batch-size", 2, "--out", out]
    with monkeypatch.context() as m:
        _stop_at_write(m, 2)
        rc, _, err = run_main(capsys, *base, "--steps", 2)
    assert rc == 130, err
    before = _files(out)
    for other, named in (
        (["--steps", 3], "steps 2 there, 3 now"),
        (["--steps", 2, "--seed", 1], "seed 0 there, 1 now"),
        (["--steps", 2, "--n", 8], "n 6 there, 8 now"),
        (["--steps", 2, "--eta", 1], "eta 0.0 there, 1.0 now"),
        (["--steps", 2, "--sampler", "dpmpp-2m"], 'sampler "ddim" there, "dpmpp-2m" now'),
    ):
        rc, _, err = run_main(capsys, *base, *other)
        assert rc == 2, err
        _one_line(err, f"--out {str(out)!r} holds the unfinished samples of other settings",
                  named, "give another --out, or use --force to replace them")  # fmt: skip
        assert _files(out) == before
    exported = tmp_path / "m.safetensors"  # another model file
    assert run_main(capsys, "export", "--run", run, "--out", exported)[0] == 0
    rc, _, err = run_main(capsys, *base, "--steps", 2, "--run", exported)
    assert rc == 2 and _files(out) == before
    _one_line(err, 'other settings (model "sha256:')
    rc, _, err = run_main(capsys, *base, "--steps", 3, "--force")
    assert rc == 0, err
    rc, _, err = run_main(capsys, *base[:-2], "--steps", 3, "--out", tmp_path / "fresh")
    assert rc == 0, err
    assert _files(out) == _files(tmp_path / "fresh")


_TIMES = {"seconds", "generate_seconds", "standard_seconds", "date"}


def _measured(path: Path) -> dict:
    """An evaluation's JSON without its timings and date."""
    r = json.loads(path.read_text())
    r["paper"] = {k: v for k, v in r["paper"].items() if k != "seconds"}
    return {k: v for k, v in r.items() if k not in _TIMES}


@pytest.mark.parametrize("files", [0, 1], ids=["between-batches", "mid-batch"])
def test_a_stopped_evaluate_goes_on_and_equals_an_uninterrupted_one(
    run, avatars16, tmp_path, capsys, monkeypatch, fake, files
):
    """Ctrl-C while `evaluate --samples-out` draws (at its third batch of 2, after `files`
    of its PNGs) keeps the batches drawn, and one line says so; the same command again drew
    them all, and only with --force. It now goes on as `sample --out` does: it keeps the
    images there, draws only the others, then measures, and its JSON (KID, FID, paper KID)
    and folder are those of an uninterrupted call; other settings are refused in one line
    naming each difference."""
    from animeddim.pipelines import core

    base = ["evaluate", "--run", run, "--real", avatars16, "--n", 7, "--steps", 2,
            "--batch-size", 2, "--protocols", "standard,paper"]  # fmt: skip
    whole = tmp_path / "whole"
    rc, _, err = run_main(capsys, *base, "--out", tmp_path / "w.json", "--samples-out", whole)
    assert rc == 0, err
    out, result = tmp_path / "s", tmp_path / "e.json"
    argv = [*base, "--out", result, "--samples-out", out]
    with monkeypatch.context() as m:
        _stop_at_write(m, 3, files)  # two batches written, the third stopped
        rc, stdout, err = run_main(capsys, *argv)
    assert rc == 130 and "Traceback" not in err, err
    said = [line for line in stdout.splitlines() if line.startswith("interrupted:")]
    assert said == [
        f"interrupted: {4 + files} of 7 samples kept in {str(out)!r}, nothing measured; the "
        f"same command again goes on from there (draws the other {3 - files}, then measures)"
    ], stdout
    assert not result.exists()
    kept = {name: data for name, data in _files(out).items() if name.endswith(".png")}
    assert kept == {k: v for k, v in _files(whole).items() if k in kept} and len(kept) == 4 + files
    before = _files(out)
    rc, _, err = run_main(capsys, *base, "--steps", 3, "--out", result, "--samples-out", out)
    assert rc == 2 and _files(out) == before
    _one_line(err, f"--samples-out {str(out)!r} holds the unfinished samples of other settings",
              "steps 2 there, 3 now", "give another --samples-out")  # fmt: skip
    real, drawn = core.generate, []

    def generate(*a, **k):  # counts the images drawn
        drawn.append(k["n"])
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(core, "generate", generate)
        rc, stdout, err = run_main(capsys, *argv)
    assert rc == 0, err  # before: 2, "already holds earlier outputs ...; use --force"
    said = f"note: {str(out)!r} holds {4 + files} of 7 samples of this evaluation, stopped "
    assert f"{said}before its end: drawing the other {3 - files}, then measuring all 7" in err
    assert sum(drawn) == 3 - files  # the others only
    assert _files(out) == _files(whole)  # the note is gone: a whole set, refused as before
    assert _measured(result) == _measured(tmp_path / "w.json")  # KID, FID, paper KID
    rc, _, err = run_main(capsys, *argv, "--out", tmp_path / "again.json")
    assert rc == 2
    _one_line(err, "already holds earlier outputs", "--force")


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_a_stop_after_the_last_sample_says_that_none_is_left_to_draw(
    run, avatars16, tmp_path, capsys, monkeypatch, command
):
    """A stop once every image was written (evaluate measuring, sample before its grid)
    said the same command would draw 'the other 0': `sample` said so on stopping, and both
    on going on ('drawing the other 0, then measuring all 7'). They say what is left."""
    out = tmp_path / "s"
    if command == "sample":
        argv = ["sample", "--out", out, "--grid", tmp_path / "g.png"]
        stopped, going_on = "images kept", "7 of 7 images of this sample, stopped before its end"
        left, doing = "(none left to draw)", "none left to draw"
    else:
        argv = ["evaluate", "--real", avatars16, "--protocols", "standard",
                "--out", tmp_path / "e.json", "--samples-out", out]  # fmt: skip
        stopped, going_on = (
            "samples kept",
            "7 of 7 samples of this evaluation, stopped before its end",
        )
        left, doing = "(measures)", "measuring them"
    argv += ["--run", run, "--n", 7, "--steps", 2, "--batch-size", 2]
    with monkeypatch.context() as m:
        _stop_at_write(m, 4, 1)  # the last batch (one image) written whole, then Ctrl-C
        rc, stdout, err = run_main(capsys, *argv)
    assert rc == 130 and len(list(out.glob("*.png"))) == 7, err
    said = [line for line in stdout.splitlines() if line.startswith("interrupted:")]
    assert len(said) == 1 and f"7 of 7 {stopped}" in said[0] and said[0].endswith(left), said
    rc, stdout, err = run_main(capsys, *argv)
    assert rc == 0, err
    assert f"note: {str(out)!r} holds {going_on}: {doing}\n" in err, err


def test_kept_samples_a_process_cannot_read_are_refused_before_any_drawing(tmp_path):
    """Each process reads the kept samples of its own block (`evaluate --samples-out` going
    on under torchrun); one that cannot (a folder not shared by the nodes) is refused in one
    line naming the folder and the remedy, before any image is drawn."""
    from animeddim.data import DataError
    from animeddim.pipelines.folder import Kept, draw_blocks

    names = [f"seed0-{i:06d}.png" for i in range(4)]
    Image.new("RGB", (8, 8)).save(tmp_path / names[0])
    drawn = []

    def make(count, first):
        drawn.append((first, count))
        return torch.zeros(count, 8, 8, 3, dtype=torch.uint8)

    part, every = draw_blocks(make, 4, 2, kept=Kept(tmp_path, names, frozenset({0})))
    assert drawn == [(1, 1), (2, 2)] and len(part) == 4 and len(every) == 4  # 0 read back
    drawn.clear()
    with pytest.raises(DataError) as e:
        draw_blocks(make, 4, 2, kept=Kept(tmp_path, names, frozenset({0, 1})))
    assert drawn == []
    assert str(e.value) == (
        f"{str(tmp_path)!r} holds 2 images of a stopped call that process 0 cannot read "
        f"(e.g. {names[1]}: a folder not shared by the nodes); go on in processes that share "
        "it (one node, or without torchrun), or give another folder"
    )


def test_sample_names_past_a_million_are_recognised_as_samples(tmp_path):
    """Image 1,000,000 and on is named with seven digits or more (seed0-1000000.png), which
    the pattern that finds earlier samples (six digits) did not match: such files were
    refused as 'images that are not samples' even with --force, and a stopped job's images
    there were not found. Names and pattern agree for any index; six-digit names stay."""
    from animeddim import outputs

    indices = [0, 999_999, 1_000_000, 12_345_678, 10**12]
    names = [outputs.sample_names(3, 1, i)[0] for i in indices]
    assert names[:3] == ["seed3-000000.png", "seed3-999999.png", "seed3-1000000.png"]
    assert all(outputs.SAMPLE_NAME.fullmatch(n) for n in names), names
    assert outputs.SAMPLE_NAME.fullmatch("colour-red-seed3-1000000.png")  # --grid-by
    for other in ("seed3-0000001.png", "seed3-00001.png", "seed3-1000000.jpg"):
        assert not outputs.SAMPLE_NAME.fullmatch(other), other  # never written by sample
    out = tmp_path / "s"
    out.mkdir()
    for name in names[1:3]:
        Image.new("RGB", (8, 8)).save(out / name)
    with pytest.raises(outputs.OutputExists, match="already holds earlier outputs"):
        outputs.sample_folder(out, force=False)
    assert sorted(p.name for p in outputs.sample_folder(out, force=True)) == sorted(names[1:3])
    (out / outputs.SAMPLE_PENDING).write_text(json.dumps({"settings": {"n": 1}}))
    with pytest.raises(outputs.OutputExists, match="unfinished samples of other settings"):
        outputs.resumable_samples(out, {"n": 2}, force=False)


# --------------------------------------------------------------------------------------------
# Full disk: every output is written under a temporary name and renamed


class _FullDisk:
    """A file whose writes store half their bytes, then fail with ENOSPC."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _full_disk(monkeypatch) -> None:
    real_open = open

    def full_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return _FullDisk(f) if "w" in mode else f

    monkeypatch.setattr(animeddim_io, "open", full_open, raising=False)


@pytest.mark.parametrize(
    "command",
    ["sample --out", "sample --grid", "export", "interpolate", "invert", "evaluate", "steps",
     "report"],
)  # fmt: skip
def test_full_disk_is_one_line_naming_the_users_file_and_leaves_no_partial_file(
    command, run, avatars16, tmp_path, capsys, monkeypatch, fake
):
    out = tmp_path / "out"
    few = _folder(tmp_path / "few", avatars16, 2)
    argv = {
        "sample --out": ["sample", "--run", run, "--n", 2, "--steps", 1, "--out", out / "a"],
        "sample --grid": ["sample", "--run", run, "--n", 2, "--steps", 1, "--grid", out / "g.png"],
        "export": ["export", "--run", run, "--out", out / "e.safetensors"],
        "interpolate": ["interpolate", "--run", run, "--seeds", 1, 2, "--frames", 2, "--steps", 1,
                        "--out", out / "x.png"],
        "invert": ["invert", "--run", run, "--images", few, "--steps", 1, "--out", out],
        "evaluate": ["evaluate", "--run", run, "--real", few, "--n", 2, "--steps", 1, "--out",
                     out / "e.json", "--cache-dir", tmp_path / "cache"],
        "steps": ["steps", "--run", run, "--real", few, "--n", 2, "--steps", 1, "--eta", 0,
                  "--out", out, "--cache-dir", tmp_path / "cache"],
        "report": ["report", "--run", run, "--out", out, "--steps", 1],
    }[command]  # fmt: skip
    run_main(capsys, "kid", few, few, "--cache-dir", tmp_path / "cache")  # cache written before
    _full_disk(monkeypatch)
    rc, _, err = run_main(capsys, *argv)
    assert rc == 1, err
    _one_line(err, "No space left on device: ")
    named = Path(err.strip().rsplit(": ", 1)[1])
    if command == "sample --out":  # its first file is the hidden note: the folder is named,
        # and every folder made for it goes (before: out/a was left, empty, and out with it)
        assert named == out / "a" and not out.exists(), err
    else:
        assert not named.name.startswith(".") and named.parent == out or out in named.parents, err
        assert not named.exists()  # neither empty nor half a file under the final name
    left = [p for p in tmp_path.rglob("*") if p.is_file() and ".tmp" in p.name]
    assert not left, left
    if out.exists():  # what was written before the disk filled up is whole
        for p in out.rglob("*"):
            assert not p.is_file() or p.stat().st_size > 0, p


class _FillsUp(_FullDisk):
    """A file on a disk that fills up as a real one does under Python's buffered writer: the
    first write of a large block stores half of it and fails with ENOSPC; the small writes
    after it are taken into the buffer without an error."""

    failed = False

    def write(self, data):
        if self.failed or len(data) < 4096:
            return self._f.write(data)
        self.failed = True
        super().write(data)


def test_a_full_disk_under_torch_save_is_one_line_naming_the_file(
    avatars16, tmp_path, capsys, monkeypatch
):
    """`attributes train` keeps its training state after each epoch with `torch.save`, whose
    writer, once the disk had failed it, raised a RuntimeError of its own from its clean-up
    (`unexpected pos 704 vs 598`) over the OSError (before: a traceback; `torch.jit.save` in
    `write_inception_fp16` did the same)."""
    real_open = open

    def full_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return _FillsUp(f) if "w" in mode else f

    monkeypatch.setattr(animeddim_io, "open", full_open, raising=False)
    out = tmp_path / "out" / "a.safetensors"
    rc, _, err = run_main(capsys, "attributes", "train", "--data", avatars16, "--out", out,
                          "--epochs", 1, "--image-size", 16)  # fmt: skip
    assert rc == 1, err
    _one_line(err, f"No space left on device: {out.parent / '.a.safetensors'}")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no state, no temporary file


def test_file_size_limit_in_a_real_process_leaves_no_partial_file(run, tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the write (EFBIG), as a full disk would."""

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))

    out = tmp_path / "s"
    p = subprocess.run(
        [sys.executable, "-m", "animeddim", "sample", "--run", str(run), "--n", "2", "--steps",
         "1", "--out", str(out), "--grid", str(tmp_path / "g.png")],
        capture_output=True, text=True, timeout=300, preexec_fn=limit,
    )  # fmt: skip
    assert p.returncode == 1
    _one_line(p.stderr, "File too large: ", str(tmp_path))
    assert ".tmp" not in p.stderr
    assert not [f for f in tmp_path.rglob("*") if f.is_file()]


def test_data_avatars_on_a_full_disk_names_its_note_and_leaves_none(tmp_path):
    """`data avatars` writes a note of its arguments first; under a 50-byte file-size limit
    the kernel refuses the rest of that write, as a full disk does (before: `File too large`
    naming no file, and the 50 bytes written left in the folder as its note, unreadable)."""
    folder = tmp_path / "avatars"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (50, 50))

    argv = ["data", "avatars", "--out", str(folder), "--n", "2", "--size", "16", "--workers", "1"]
    p = subprocess.run([sys.executable, "-m", "animeddim", *argv], capture_output=True, text=True,
                       timeout=300, preexec_fn=limit)  # fmt: skip
    assert p.returncode == 1
    _one_line(p.stderr, f"File too large: {folder / '.animeddim-pending.json'}")
    assert not list(folder.iterdir())


def test_evaluate_coverage_refuses_earlier_coverage_files(run, avatars16, tmp_path, capsys, fake):
    (tmp_path / "coverage.json").write_text("{}")
    argv = ["evaluate", "--run", run, "--real", avatars16, "--n", 2, "--steps", 1, "--out",
            tmp_path / "e.json", "--coverage"]  # fmt: skip
    rc, _, err = run_main(capsys, *argv)
    assert rc == 2 and (tmp_path / "coverage.json").read_text() == "{}"
    _one_line(err, "coverage.json", "--force")
    assert not (tmp_path / "e.json").exists() and fake.calls == 0


def test_evaluate_notes_a_skipped_real_image_once(run, avatars16, tmp_path, capsys, fake):
    real = _folder(tmp_path / "real", avatars16, 4)
    (real / "broken.png").write_bytes(b"not a png")
    rc, _, err = run_main(capsys, "evaluate", "--run", run, "--real", real, "--n", 2, "--steps", 1,
                       "--out", tmp_path / "e.json", "--cache-dir", tmp_path / "c")  # fmt: skip
    assert rc == 0, err  # both protocols read the folder: the note still prints once
    assert _lines(err) == [
        f"note: skipped 1 of 5 files that could not be decoded: {real / 'broken.png'}: "
        "not an image (unrecognised format)"
    ]


@pytest.mark.parametrize("channels", [1, 4])
def test_config_with_other_image_channels_is_one_line(channels, avatars16, tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": {**TINY_MODEL, "channels": channels}}))
    out = tmp_path / "run"
    rc, _, err = run_main(capsys, "train", "--data", avatars16, "--out", out, "--config", cfg,
                       "--no-kid", "--quiet", "--device", "cpu")  # fmt: skip
    assert rc == 2
    _one_line(err, f"model.channels = {channels}")
    assert not out.exists()


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_more_images_than_memory_holds_are_refused_up_front(
    command, run, avatars16, tmp_path, capsys
):
    """--n whose images cannot be held until they are written: one line with the largest
    --n that fits, before drawing (before: hours of drawing, then out of memory, nothing
    written)."""
    out = tmp_path / "out"
    n = 10**12  # 16 px: 1.5 PB
    args = {
        "sample": ["sample", "--run", run, "--n", n, "--steps", 1, "--grid", out / "g.png"],
        "evaluate": ["evaluate", "--run", run, "--real", avatars16, "--n", n, "--out", out],
    }[command]
    rc, _, err = run_main(capsys, *args)
    assert rc == 2, err
    _one_line(err, f"--n {n} images of 16x16 px need", "GiB are available", "draw at most about")
    assert not out.exists()


def test_sample_out_refuses_more_images_than_their_names_fit_up_front(
    run, tmp_path, capsys, monkeypatch
):
    """`sample --out` writes each batch as it is drawn, so only --grid is checked against the
    memory its images take; but it lists the file names of all --n first, and a count whose
    names no memory holds (--n 10**12: 150 TB) took every byte of memory before the first
    image. Memory for the names of 100 images: --n 101 is refused in one line, nothing made."""
    monkeypatch.setattr(
        cli_sampling, "available_memory", lambda: 100 * cli_sampling.SAMPLE_NAME_BYTES
    )
    out = tmp_path / "s"
    rc, _, err = run_main(capsys, "sample", "--run", run, "--n", 101, "--steps", 1, "--out", out)
    assert rc == 2, err
    _one_line(err, "--n 101 images of 16x16 px need", "(their file names alone)",
              "draw at most about 100 per call")  # fmt: skip
    assert not out.exists()


def test_steps_refuses_more_images_than_memory_holds_up_front(
    run, avatars16, tmp_path, capsys, fake, monkeypatch
):
    """steps --n whose images cannot be held (each setting draws --n, holds them, then
    measures them) drew for hours before running out of memory; sample and evaluate refused
    it up front. Memory for 100 images of 16 px: --n 101 is refused, before any feature."""
    monkeypatch.setattr(cli_sampling, "available_memory", lambda: 2 * 100 * 16 * 16 * 3)
    out = tmp_path / "st"
    rc, _, err = run_main(capsys, "steps", "--run", run, "--real", avatars16, "--n", 101,
                          "--steps", 1, "--eta", 0, "--out", out)  # fmt: skip
    assert rc == 2, err
    _one_line(err, "--n 101 images of 16x16 px need", "draw at most about 100 per call")
    assert not out.exists() and fake.calls == 0


def test_steps_refuses_a_deterministic_sampler_without_eta_0(
    run, avatars16, tmp_path, capsys, fake
):
    """A deterministic sampler runs at eta 0 only: `steps --samplers ddim,unipc --eta 0.5,1`
    measured ddim alone and `--samplers dpmpp-2m --eta 0.5` nothing at all (exit 0, a
    steps.csv of its header only, an empty table and plot). Refused, naming the sampler and
    the eta to add, before any feature is computed."""
    out = tmp_path / "st"
    for samplers, etas in (("ddim,unipc", "0.5,1"), ("dpmpp-2m", "0.5")):
        rc, _, err = run_main(capsys, "steps", "--run", run, "--real", avatars16, "--n", 2,
                              "--steps", 1, "--eta", etas, "--samplers", samplers,
                              "--out", out)  # fmt: skip
        assert rc == 2, err
        sampler = samplers.split(",")[-1]
        _one_line(err, f"{sampler} is deterministic", f"etas {etas} have no 0",
                  f"--eta 0,{etas.split(',')[0]}", f"leave {sampler} out")  # fmt: skip
        assert not out.exists() and fake.calls == 0
    rc, _, err = run_main(capsys, "steps", "--run", run, "--real", avatars16, "--n", 2,
                          "--steps", 1, "--eta", "0.5,0", "--samplers", "ddim,unipc",
                          "--out", out)  # fmt: skip
    assert rc == 0, err
    rows = (out / "steps.csv").read_text().splitlines()[1:]
    assert sorted(r.split(",")[1:3] for r in rows) == [
        ["0.0", "ddim"], ["0.0", "unipc"], ["0.5", "ddim"]
    ]  # fmt: skip


def test_interpolate_refuses_more_frames_than_memory_holds_up_front(
    run, tmp_path, capsys, monkeypatch
):
    """interpolate --frames 10**9 (16 px) ended in a RuntimeError traceback from the
    allocator (its noises are interpolated at once, in float64: 40 bytes per value), and a
    count that just fits drew for hours first. Refused up front, with the most that fit."""
    out = tmp_path / "ip.png"
    args = ["interpolate", "--run", run, "--seeds", 1, 2, "--steps", 1, "--out", out]
    rc, _, err = run_main(capsys, *args, "--frames", 10**9)
    assert rc == 2, err
    _one_line(err, f"--frames {10**9} of 16x16 px need", "GiB are available", "at most about")
    monkeypatch.setattr(cli_sampling, "available_memory", lambda: 40 * 100 * 16 * 16 * 3)
    rc, _, err = run_main(capsys, *args, "--frames", 101)
    assert rc == 2, err
    _one_line(err, "--frames 101 of 16x16 px need", "give at most about 100 frames")
    assert not out.exists() and not out.with_suffix(".gif").exists()
    rc, _, err = run_main(capsys, *args, "--frames", 100)
    assert rc == 0, err


def test_a_grid_named_other_than_png_is_refused(run, tmp_path, capsys):
    """--grid/--trajectory g.jpg wrote PNG bytes under a .jpg name (exit 0); now one line."""
    for flag, name in (("--grid", "g.jpg"), ("--trajectory", "t.txt"), ("--grid", "grid")):
        rc, _, err = run_main(capsys, "sample", "--run", run, "--n", 1, "--steps", 1, flag,
                              tmp_path / name)  # fmt: skip
        assert rc == 2, err
        _one_line(err, flag, "written as PNG; name it .png")
        assert not (tmp_path / name).exists()


def test_a_sigterm_whose_raise_was_swallowed_ends_at_the_next_progress_update(monkeypatch):
    """Python swallows an exception raised where it cannot propagate (a __del__, a callback
    from C). In one suite run `sample --n 100000` drew on for minutes after its SIGTERM
    (cause not confirmed: a raise swallowed so fits); a SIGTERM seen is now raised again at
    the next progress update."""
    from animeddim import cli
    from animeddim.cli.common import _Bars
    from animeddim.interrupts import Terminated
    from animeddim.interrupts import seen as _signals_seen

    class Swallows:
        def __del__(self):
            cli._on_sigterm(signal.SIGTERM, None)  # raised inside __del__: ignored

    swallowed = []  # what Python hands its "Exception ignored in ..." hook
    monkeypatch.setattr(sys, "unraisablehook", swallowed.append)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        Swallows()  # collected at once: the raise goes to the hook and the code goes on
        assert [u.exc_type for u in swallowed] == [Terminated]
        assert signal.SIGTERM in _signals_seen
        with pytest.raises(Terminated):
            _Bars()("sample", 1, 10)
    finally:
        _signals_seen.clear()
        signal.signal(signal.SIGTERM, previous)
    _Bars()("sample", 10, 10)  # no signal: no raise


def test_a_list_with_an_empty_item_is_refused_not_shortened(capsys, tmp_path):
    """`--widths 8,,16` trained a 2-level network without a word (the empty item dropped);
    which number was meant cannot be known, so any list option with an empty item is refused."""
    for argv, flag in (
        (["train", "--widths", "8,,16", "--out", tmp_path / "r"], "--widths"),
        (["train", "--widths", "8,16,", "--out", tmp_path / "r"], "--widths"),
        (["steps", "--steps", "5,,10"], "--steps"),
        (["steps", "--eta", "0,,1"], "--eta"),
    ):
        rc, _, err = run_main(capsys, *argv)
        assert rc == 2, err
        _one_line(err, f"argument {flag}: expected comma-separated", repr(argv[2]))
    assert not (tmp_path / "r").exists()


def test_a_setting_listed_twice_or_one_end_given_twice_is_refused(
    run, avatars16, tmp_path, capsys, fake
):
    """`steps --steps 2,1,2` (or an eta, a sampler twice) measured that setting twice and wrote
    two rows of it; `evaluate --protocols standard,standard` likewise; `interpolate --seeds 1 1`
    (or one image twice) wrote 16 identical frames without a word. Each is one line, exit 2,
    before any work."""
    out = tmp_path / "st"
    for flag, value, named in (("--steps", "2,1,2", "--steps: 2"),
                               ("--eta", "0,0.5,0.0,0.5", "--eta: 0, 0.5"),
                               ("--samplers", "ddim,unipc,ddim", "--samplers: ddim")):  # fmt: skip
        rc, _, err = run_main(capsys, "steps", "--run", run, "--real", avatars16, "--n", 2,
                              flag, value, "--out", out)  # fmt: skip
        assert rc == 2, err
        _one_line(err, f"{named} given more than once")
        assert not out.exists() and fake.calls == 0
    rc, _, err = run_main(capsys, "evaluate", "--run", run, "--real", avatars16, "--n", 2,
                          "--protocols", "standard,standard", "--out", out / "e.json")  # fmt: skip
    assert rc == 2, err
    _one_line(err, "--protocols: standard given more than once")
    image = next(Path(avatars16).glob("*.png"))
    for ends, named in ((("--seeds", 1, 1), "--seeds 1 1"),
                        (("--images", image, Path(avatars16) / ".." / Path(avatars16).name /
                          image.name), "twice")):  # fmt: skip
        rc, _, err = run_main(capsys, "interpolate", "--run", run, *ends, "--frames", 2,
                              "--out", out / "ip")  # fmt: skip
        assert rc == 2, err
        _one_line(err, named, "every frame would be one image")
        assert not out.exists()


@pytest.mark.parametrize(
    ("error", "where"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0)"), "GPU"),
        (
            RuntimeError(
                "DefaultCPUAllocator: can't allocate memory: you tried to allocate 6e11 "
                "bytes. Error code 12 (Cannot allocate memory)"
            ),
            "host",
        ),  # fmt: skip
    ],
)
def test_running_out_of_memory_is_one_line_naming_the_batch_size(
    run, tmp_path, capsys, monkeypatch, error, where
):
    """A --batch-size too large for the GPU ended in torch's OutOfMemoryError traceback (and
    the CPU allocator's RuntimeError likewise): now one line naming the memory and the option
    that needs less of it, exit 1, no output written."""

    def draw(*args, **kwargs):
        raise error

    from animeddim import distributed

    monkeypatch.setattr(distributed, "shard_images", draw)  # imported by sample when it runs
    out = tmp_path / "s"
    rc, _, err = run_main(capsys, "sample", "--run", run, "--n", 2, "--out", out)
    assert rc == 1, err
    _one_line(err, f"out of {where} memory", str(error).splitlines()[0][:60], "--batch-size")
    assert not out.exists() or not any(out.iterdir())


def test_bench_out_of_memory_names_the_image_size(capsys, monkeypatch):
    """`bench --image-size 100000` ran out of memory and said a smaller --batch-size would
    need less, where one image alone is 112 GiB: the message names --image-size, and
    --batch-size only where a smaller batch can help."""
    from animeddim.apps import bench

    def measure(*args, **kwargs):  # the allocator's error for the first batch of images
        raise RuntimeError(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 7680000000000 "
            "bytes. Error code 12 (Cannot allocate memory)"
        )

    monkeypatch.setattr(bench, "run_path", measure)
    monkeypatch.setattr(cli_sampling, "available_memory", lambda: 64 * 2**30)
    batch_hint = "a smaller --batch-size (images per forward pass) needs less"
    rc, _, err = run_main(capsys, "bench", "--image-size", 100000, "--device", "cpu")
    assert rc == 1, err
    _one_line(err, "out of host memory", "a smaller --image-size needs less (one 100000x100000 "
              "px image is 111.8 GiB as float32 before the network, so a smaller --batch-size "
              "cannot help")  # fmt: skip
    assert batch_hint not in err
    rc, _, err = run_main(capsys, "bench", "--image-size", 64, "--batch-size", 1,
                          "--device", "cpu")  # fmt: skip
    assert rc == 1, err
    _one_line(err, "a smaller --image-size needs less (one 64x64 px image is 0.0 GiB")
    rc, _, err = run_main(capsys, "bench", "--image-size", 64, "--device", "cpu")
    assert rc == 1, err
    _one_line(err, "a smaller --image-size (memory goes with the square of the size) or "
              "--batch-size (images per forward pass) needs less")  # fmt: skip
