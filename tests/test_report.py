"""Report: every figure and table of the paper written from tiny run folders on disk."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import copy_run
from PIL import Image

from animeddim.config import RunConfig
from animeddim.report import ReportError, cell_text, write_report
from animeddim.run_folder import DASH, RunFiles, sanitise, unique_names

KIDS = [0.5, 0.25]  # per-epoch paper KID written into the second run's metrics.csv
STEPS = 3  # DDIM steps of the report's reverse figure and sample grids: tiny and fast


def _metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _write_json(path: Path, d: dict, mtime: float) -> None:
    path.write_text(json.dumps(d))
    os.utime(path, (mtime, mtime))  # explicit times: "newest" must not depend on write speed


@pytest.fixture(scope="session")
def runs(trained_tiny, tmp_path_factory) -> tuple[Path, Path]:
    """Run A: 2 epochs, no KID. Run B ("run b!"): A plus KID, three evals and a steps study."""
    root = tmp_path_factory.mktemp("report-runs")
    a = copy_run(trained_tiny, root / "run-a")
    b = root / "run b!"
    shutil.copytree(a, b)
    rows = _metrics(b)
    for r, kid in zip(rows, KIDS, strict=True):
        r["kid"] = str(kid)
    with open(b / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    standard = {"protocol": "standard", "kid_std": 0.004, "fid": 45.6, "n": 100, "steps": 20}
    standard |= {"eta": 0.0, "checkpoint": str(b / "checkpoints/last.safetensors"), "seconds": 1.5}
    _write_json(b / "eval-old.json", {**standard, "kid_mean": 0.9, "fid": 99.0}, 1_000_000)
    drawn = {"sampler": "dpmpp-2m", "clip_x0": True, "real": "/data/flowers-held-out"}
    _write_json(b / "eval-new.json", {**standard, **drawn, "kid_mean": 0.123}, 2_000_000)
    # The newest file of all uses the paper protocol: Table I must still show the standard one.
    _write_json(b / "eval-paper.json", {"protocol": "paper", "kid_mean": 0.2, "n": 6}, 3_000_000)
    with open(b / "steps.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["steps", "eta", "sampler", "kid_mean", "kid_std", "seconds_per_image"])
        for eta in (0.0, 1.0):
            for steps in (5, 10, 50):
                w.writerow([steps, eta, "ddim", 1.0 / steps + eta, 0.01, 0.002 * steps])
    return a, b


@pytest.fixture(scope="session")
def report(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "out"
    page = write_report(list(runs), out, seed=0, steps=STEPS)
    assert page == out / "report.md"
    return out


def test_every_file_is_written_and_images_open(report):
    expected = ["report.md", "report.html", "table1.md", "table1.csv", "fig3-kid.png"]
    expected += ["fig4-losses.png", "steps-table.md", "steps-table.csv", "fig-steps.png"]
    for name in ("run-a", "run-b"):
        expected += [f"fig1-forward-{name}.png", f"fig1-reverse-{name}.png"]
        expected += [f"samples-{name}.png", f"table2-{name}.md", f"table2-{name}.csv"]
    for f in expected:
        assert (report / f).is_file(), f
    for png in report.glob("*.png"):
        with Image.open(png) as im:
            im.load()
            if png.name.startswith("samples-"):
                assert im.size == (8 * 16, 4 * 16)  # 4 x 8 grid of 16-px images
            else:
                assert im.size[0] >= 400 and im.size[1] >= 150, (png.name, im.size)
    # Fig. 1 forward: 1 clean + 7 times, so the strip is much wider than tall.
    with Image.open(report / "fig1-forward-run-a.png") as im:
        assert im.size[0] > 4 * im.size[1]


def test_table2_has_one_row_per_epoch_with_the_run_numbers(report, runs):
    for run, name, kids in ((runs[0], "run-a", [None, None]), (runs[1], "run-b", KIDS)):
        metrics = _metrics(run)
        with open(report / f"table2-{name}.csv", newline="") as f:
            table = list(csv.DictReader(f))
        assert [int(r["Epoch"]) for r in table] == [1, 2]
        for row, m, kid in zip(table, metrics, kids, strict=True):
            assert float(row["Noise Loss"]) == pytest.approx(float(m["val_noise_loss"]))
            assert float(row["Image Loss"]) == pytest.approx(float(m["val_image_loss"]))
            assert (row["KID"] == "") if kid is None else float(row["KID"]) == pytest.approx(kid)
        md = (report / f"table2-{name}.md").read_text()
        assert "paper protocol" in md and "validation objective (the run's --loss)" in md
        lines = [ln for ln in md.splitlines() if re.match(r"\| \d+ \|", ln)]
        assert len(lines) == 2
        if kids[0] is None:
            assert all(f"| {DASH} |" in ln for ln in lines)


def test_table1_one_row_per_run_with_newest_standard_eval(report, runs):
    with open(report / "table1.csv", newline="") as f:
        a, b = list(csv.DictReader(f))
    assert (a["Run"], b["Run"]) == ("run-a", "run-b")
    data_path = json.loads((runs[0] / "config.json").read_text())["data"]["path"]
    assert a["Dataset"] == b["Dataset"] == Path(data_path).name
    last = _metrics(runs[0])[-1]
    assert int(a["Epochs"]) == 2
    assert float(a["Noise Loss"]) == pytest.approx(float(last["val_noise_loss"]))
    assert float(a["Image Loss"]) == pytest.approx(float(last["val_image_loss"]))
    assert a["KID (paper)"] == a["KID (standard)"] == a["FID (standard)"] == ""
    assert float(b["KID (paper)"]) == KIDS[-1]
    assert float(b["KID (standard)"]) == 0.123  # eval-new.json, not the older or paper one
    assert float(b["KID std (standard)"]) == 0.004
    assert float(b["FID (standard)"]) == 45.6
    assert (int(b["n"]), int(b["Steps"])) == (100, 20)
    # What drew the samples and what they were compared with stand beside the numbers.
    assert (b["Sampler"], b["Real"]) == ("dpmpp-2m, x0 clipped", "data/flowers-held-out")
    md = (report / "table1.md").read_text()
    assert "0.123 ± 0.004" in md and "| run-a |" in md and DASH in md
    assert "DDIM steps" not in md and "the given sampler, steps and eta" in md
    page = (report / "report.md").read_text()
    assert (
        "| eval-new.json | standard | 0.123 | 0.004 | 45.6 | 100 | dpmpp-2m, x0 clipped |" in page
    )
    assert "| eval-old.json | standard | 0.9 | 0.004 | 99 | 100 | – | 20 | 0 | – |" in page


def test_pages_show_every_image_and_the_paper_headings(report):
    pngs = {p.name for p in report.glob("*.png")}
    page = (report / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page
    assert set(re.findall(r'<img src="([^"]+)"', page)) == pngs
    md = (report / "report.md").read_text()
    assert set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)) == pngs
    for heading in ("Fig. 1.", "Fig. 3.", "Fig. 4.", "Table I.", "Table II."):
        assert f"## {heading}" in md and f"<h2>{heading}" in page
    for said in ("paper protocol", "torch-fidelity", "Protocol 'paper'", "eval-new.json"):
        assert said in md
    assert "0.2" in (report / "steps-table.md").read_text()  # 1/5 steps, eta 0


def test_no_kid_no_checkpoint_and_determinism(report, runs, tmp_path):
    # A run without KID values: no Fig. 3, and the page says why.
    out = tmp_path / "a"
    write_report([runs[0]], out, seed=0, steps=STEPS)
    assert not (out / "fig3-kid.png").exists() and not (out / "steps-table.md").exists()
    assert "no Fig. 3" in (out / "report.md").read_text()
    # Seeded sampling: the same grid as in the two-run report, byte for byte.
    same = (out / "samples-run-a.png").read_bytes() == (report / "samples-run-a.png").read_bytes()
    assert same
    # Without a checkpoint the last training grid is copied and Fig. 1 becomes a note.
    bare = tmp_path / "bare"
    shutil.copytree(runs[0], bare, ignore=shutil.ignore_patterns("checkpoints"))
    write_report([bare], tmp_path / "b", steps=STEPS)
    copied = (tmp_path / "b" / "samples-bare.png").read_bytes()
    assert copied == (bare / "samples" / "epoch-0002.png").read_bytes()
    assert not (tmp_path / "b" / "fig1-reverse-bare.png").exists()
    assert "No usable checkpoint" in (tmp_path / "b" / "report.md").read_text()


def test_the_standard_kid_of_eval_every_gets_its_own_figure(runs, tmp_path):
    """`train --eval-every` writes a standard KID column to metrics.csv; the report drew it
    nowhere. A run that has it gets fig3-standard-kid.png; one without it, none."""
    run = copy_run(runs[0], tmp_path / "evald")
    rows = _metrics(run)
    for r, kid in zip(rows, (0.04, 0.03), strict=True):
        r["standard_kid"] = str(kid)
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out"
    write_report([run, runs[0]], out, seed=0, steps=STEPS)
    with Image.open(out / "fig3-standard-kid.png") as im:
        assert im.size[0] > 100
    md = (out / "report.md").read_text()
    assert "## Standard KID during training" in md and "fig3-standard-kid.png" in md
    write_report([runs[0]], tmp_path / "plain", seed=0, steps=STEPS)
    assert not (tmp_path / "plain" / "fig3-standard-kid.png").exists()
    assert "Standard KID during training" not in (tmp_path / "plain" / "report.md").read_text()


def test_bad_run_folders_raise_report_error_naming_them(runs, tmp_path):
    with pytest.raises(ReportError, match="nowhere"):
        write_report([tmp_path / "nowhere"], tmp_path / "out")
    half = tmp_path / "half"
    shutil.copytree(runs[0], half, ignore=shutil.ignore_patterns("metrics.csv"))
    with pytest.raises(ValueError, match=r"half.*metrics\.csv"):
        write_report([runs[0], half], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # all folders are read before anything is written


def test_one_run_folder_may_be_given_alone(runs, tmp_path):
    """write_report("runs/a", out) iterated the string: "'r' is not an animeddim run folder"."""
    with pytest.raises(ReportError, match="nowhere"):
        write_report(str(tmp_path / "nowhere"), tmp_path / "out")
    page = write_report(str(runs[0]), tmp_path / "one", steps=1)
    assert "run-a" in page.read_text() and (tmp_path / "one" / "table2-run-a.md").is_file()


def test_a_run_given_twice_is_refused_before_anything_is_written(runs, tmp_path):
    """`report --run r --run r` (or `r` and `./r/`, or a link to it) wrote the run's figures
    and tables twice, the second copy as run `r-2`, and Table I showed it as two runs."""
    a = runs[0]
    (tmp_path / "link").symlink_to(a)
    other = a / ".." / a.name  # Path keeps "..": another spelling of the same folder
    for twice, spelt in (
        ([a, runs[1], a], ""),
        ([a, other], f" (as {str(a)!r} and {str(other)!r})"),
        ([a, tmp_path / "link"], f" (as {str(a)!r} and {str(tmp_path / 'link')!r})"),
    ):
        with pytest.raises(ReportError) as e:
            write_report(twice, tmp_path / "out", steps=1)
        assert (
            str(e.value)
            == f"run folder {str(twice[-1])!r} is given twice{spelt}; give each run once"
        )
    assert not (tmp_path / "out").exists()


def test_a_run_trained_on_a_folder_whose_name_is_not_utf8_gets_its_report(runs, tmp_path):
    """Data in a folder named in Latin-1 (b'caf\\xe9', from an old archive or a Windows share)
    trained, sampled and resumed, but `report` ended in a UnicodeEncodeError traceback when
    it wrote the tables, after the figures; they now hold the name as the file system does."""
    run = copy_run(runs[0], tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    try:
        data = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9"))
        data.symlink_to(cfg["data"]["abs_path"], target_is_directory=True)
    except (OSError, UnicodeError):
        pytest.skip("this file system takes UTF-8 names only")
    cfg["data"]["path"] = cfg["data"]["abs_path"] = str(data)
    (run / "config.json").write_text(json.dumps(cfg))
    page = write_report([run], tmp_path / "out", steps=1)
    assert page.is_file()
    assert b"caf\xe9" in (tmp_path / "out" / "table1.csv").read_bytes()


def test_cells_and_names():
    assert [cell_text(v) for v in (None, "", 0.123456, 3, "x")] == [DASH, DASH, "0.1235", "3", "x"]
    assert sanitise("run b!") == "run-b" and sanitise("..") == "run"
    assert unique_names([Path("/x/run"), Path("/y/run"), Path("/z/run")]) == [
        "run",
        "run-2",
        "run-3",
    ]


def test_the_dataset_column_names_the_training_folder():
    def dataset(path: str, abs_path: str) -> str:
        cfg = RunConfig()
        cfg.data.path, cfg.data.abs_path = path, abs_path
        return RunFiles(Path("run"), "run", cfg, []).dataset

    assert dataset("data/anime-faces", "/home/me/data/anime-faces") == "anime-faces"
    assert dataset(".", "/home/me/data/celeba-hq") == "celeba-hq"  # trained from inside it
    # `data flowers102 --out data/flowers` puts the images in data/flowers/images.
    assert dataset("data/flowers/images", "/home/me/data/flowers/images") == "flowers/images"
    assert dataset("danbooru", "") == "danbooru"  # a config without the absolute path


def test_a_conditional_run_gets_an_attribute_grid(cond_run, tmp_path):
    import numpy as np

    from animeddim import pipelines
    from animeddim.io import tile

    out = tmp_path / "report"
    write_report([cond_run], out, seed=3, steps=STEPS)
    md = (out / "report.md").read_text()
    for attr, values in (("colour", "blue, red"), ("band", "bottom, top")):
        grid = np.asarray(Image.open(out / f"samples-run-by-{attr}.png"))
        assert f"By {attr}: rows {values} (top to bottom)" in md
        assert f"samples-run-by-{attr}.png" in (out / "report.html").read_text()
        # the grid is `sample --grid-by` of the same settings
        loaded = pipelines.load_for_sampling(cond_run, None, "cpu")[0]
        s = pipelines.resolve_settings("cpu", "fp32", steps=STEPS, sampler="ddim", seed=3)
        images, _ = pipelines.attribute_grid(loaded, attr, 8, s)
        assert np.array_equal(grid, tile(images.numpy(), 8))


def test_attribute_grids_of_names_alike_get_files_of_their_own(tmp_path, monkeypatch):
    """'hair color' and 'hair/color' were both written as samples-run-by-hair_color.png, the
    second grid over the first ('Hair_color' too, on a disk that ignores case). Names alike
    now each get a digest of their own; other names keep the plain file name."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from animeddim import pipelines
    from animeddim.report.page import _attribute_grids, grid_file_names

    vocab = {"hair color": ("a", "b"), "hair/color": ("c",), "Hair_color": ("d",), "mouth": ("e",)}

    def grid(loaded, attr, seeds, s):  # each attribute's grid its own shade
        shade = 40 * (1 + list(vocab).index(attr))
        return torch.full((len(vocab[attr]) * seeds, 8, 8, 3), shade, dtype=torch.uint8), []

    monkeypatch.setattr(pipelines, "vocabulary", lambda loaded: vocab)
    monkeypatch.setattr(pipelines, "attribute_grid", grid)
    blocks = _attribute_grids(SimpleNamespace(name="run"), None, tmp_path, 0, 2, "cpu")
    names = [b[1] for b in blocks if b[0] == "img"]
    assert len({n.casefold() for n in names}) == 4
    assert names[3] == "samples-run-by-mouth.png"
    for name in names[:3]:
        assert re.fullmatch(r"samples-run-by-[hH]air_color-[0-9a-f]{8}\.png", name), name
    for k, name in enumerate(names):
        assert np.asarray(Image.open(tmp_path / name)).max() == 40 * (k + 1)
    # The same file names whatever the order, and a plain name that is another's suffixed
    # one is told apart.
    again = grid_file_names("run", list(reversed(vocab)))
    assert again == dict(zip(vocab, names, strict=True))
    suffixed = names[0][len("samples-run-by-") : -len(".png")]
    both = grid_file_names("run", ["hair color", "hair/color", suffixed])
    assert len(set(both.values())) == 3
