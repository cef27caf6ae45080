"""`evaluate --attr` and `guidance` as a user runs them, on the tiny conditional model (the
features are a stand-in extractor's: tests/test_control.py measures with Inception)."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from conftest import run_main
from test_command_faults import FakeExtractor

from animeddim.cli import sampling as cli_sampling


@pytest.fixture
def fake(monkeypatch) -> FakeExtractor:
    extractor = FakeExtractor()
    monkeypatch.setattr(cli_sampling, "_extractor", lambda a: extractor)
    return extractor


def _common(run, real, classifier):
    return ["--run", run, "--real", real, "--classifier", classifier, "--steps", 4,
            "--device", "cpu", "--precision", "fp32"]  # fmt: skip


def test_evaluate_attr_reports_accuracy_and_kid_against_the_asked_images(
    cond_run, cond_data, cond_classifier, tmp_path, capsys, fake
):
    out = tmp_path / "eval.json"
    args = _common(cond_run, cond_data, cond_classifier)
    args += ["--n", 8, "--attr", "colour=red", "--guidance", 3, "--protocols", "standard"]
    rc, stdout, err = run_main(capsys, "evaluate", *args, "--out", out)
    assert rc == 0, err
    r = json.loads(out.read_text())
    c = r["attributes_asked"]
    assert c["asked"] == {"colour": "red"} and r["guidance"] == 3.0
    assert c["n_real"] == 48 and c["classifier_accuracy"] == {"colour": 1.0}
    assert c["accuracy"]["colour"] >= 0.75  # guidance 3 draws red
    assert c["kid_mean"] != r["kid_mean"]  # against the red images, not all of them
    assert (
        f"attribute accuracy colour=red: {100 * c['accuracy']['colour']:.1f}% of the samples "
        "(the classifier's own validation accuracy on real images: 100.0%)"
    ) in stdout
    assert "against the 48 real images with colour=red:" in stdout


def test_evaluate_attr_errors_are_one_line_and_write_nothing(
    cond_run, cond_data, cond_classifier, web_runs, tmp_path, capsys, fake
):
    bare = tmp_path / "bare"
    shutil.copytree(cond_data, bare)
    (bare / "labels.csv").unlink()
    blue = tmp_path / "blue"
    blue.mkdir()
    rows = [r for r in csv.DictReader(open(cond_data / "labels.csv")) if r["colour"] == "blue"]
    for r in rows:
        shutil.copy(cond_data / r["file"], blue)
    (blue / "labels.csv").write_text("file,colour\n" + "".join(f"{r['file']},blue\n" for r in rows))
    cases = [
        (cond_data, web_runs / "tiny", "colour=red", "the model is unconditional"),
        (bare, cond_run, "colour=red", "has no labels.csv"),
        (blue, cond_run, "colour=red", "has colour=red (its labels.csv colour values: blue)"),
        (cond_data, cond_run, "colour=green", "the model knows no colour value 'green'"),
        (cond_data, cond_run, "colour", "--attr 'colour': expected NAME=VALUE"),
    ]
    for real, run, attr, needle in cases:
        out = tmp_path / "eval.json"
        args = ["--run", run, "--real", real, "--classifier", cond_classifier, "--steps", 2]
        rc, _, err = run_main(capsys, "evaluate", *args, "--n", 4, "--attr", attr, "--out", out)
        assert rc == 2 and needle in err, (needle, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not out.exists() and fake.calls == 0  # refused before any work


def test_guidance_study_table_progress_and_force(
    cond_run, cond_data, cond_classifier, tmp_path, capsys, fake
):
    out = tmp_path / "study"
    args = [*_common(cond_run, cond_data, cond_classifier), "--attr", "colour=red",
            "--w", "0,3", "--n", 6, "--out", out]  # fmt: skip
    rc, stdout, err = run_main(capsys, "guidance", *args)
    assert rc == 0, err
    assert "w 3: sample" in err and "w 3: features" in err  # a progress bar per stage
    assert "guidance study (2 weights, 6 images each" in stdout
    rows = list(csv.DictReader(open(out / "guidance.csv")))
    assert [r["guidance"] for r in rows] == ["0.0", "3.0"]
    assert float(rows[1]["accuracy_colour"]) > float(rows[0]["accuracy_colour"])
    assert {"kid_mean", "kid_std", "kid_asked_mean", "kid_asked_std"} <= set(rows[0])
    md = (out / "guidance.md").read_text()
    assert "| w | colour=red accuracy (ceiling 100.0%) |" in md
    before = (out / "guidance.csv").read_bytes()
    calls = fake.calls
    rc, _, err = run_main(capsys, "guidance", *args)
    assert rc == 2 and "already holds earlier outputs (guidance.csv and 1 more)" in err
    assert fake.calls == calls and (out / "guidance.csv").read_bytes() == before
    rc, _, err = run_main(capsys, "guidance", *args, "--force")
    assert rc == 0, err
    again = list(csv.DictReader(open(out / "guidance.csv")))
    for r in (*rows, *again):
        del r["seconds_per_image"]
    assert again == rows  # the same seeds, the same table


def test_guidance_needs_a_place_to_write_and_a_weight(cond_data, capsys):
    rc, _, err = run_main(capsys, "guidance", "--model", "avatars-64", "--real", cond_data,
                          "--attr", "colour=red")  # fmt: skip
    assert rc == 2 and "give --out DIR" in err
    rc, _, err = run_main(capsys, "guidance", "--real", cond_data, "--attr", "a=b", "--w", "1,x")
    assert rc == 2 and "--guidance must be a number >= 0, got 'x'" in err
