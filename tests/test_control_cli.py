"""`evaluate --attr` and `guidance` as a user runs them, on the tiny conditional model (the
features are a stand-in extractor's: tests/test_control.py measures with Inception)."""

from __future__ import annotations

import csv
import json
import re
import shutil

import pytest
from conftest import run_main
from test_command_faults import FakeExtractor

from animeddim import metrics
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
    assert r["attribute_guidance"] == {}  # none given, none stored
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
        (blue, cond_run, "colour=red", "has colour=red (its labels.csv colour values: 'blue')"),
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
    # the caution on KIDs of so few images, said once for each of the two KIDs of every w
    few = re.findall(r"animeddim: warning: (KID of [^;]*), fewer than 1,000", err)
    assert sorted(few) == [
        "KID of 48 real images with colour=red and 6 generated images per w",
        "KID of 96 real images and 6 generated images per w",
    ], err
    rows = list(csv.DictReader(open(out / "guidance.csv")))
    assert [r["guidance"] for r in rows] == ["0.0", "3.0"]
    assert float(rows[1]["accuracy_colour"]) > float(rows[0]["accuracy_colour"])
    assert {"kid_mean", "kid_std", "kid_asked_mean", "kid_asked_std"} <= set(rows[0])
    md = (out / "guidance.md").read_text()
    assert md.startswith("Guidance study: 6 generated images per w, 4 ")  # as below
    assert "| w | colour=red accuracy (ceiling 100.0%) |" in md
    assert md.splitlines()[2].endswith("| KID vs asked | ± std | s/image |")  # as the CSV
    # the caution under the table, one line each (the CSV, which tools parse, has none)
    _, table, below = md.removesuffix("\n").split("\n\n")
    assert table.splitlines()[-1].endswith(f"| {float(rows[1]['seconds_per_image']):.3f} |")
    sets = [[(96, "real images")], [(48, "real images with colour=red")]]
    notes = [metrics.few_images_note([*s, (6, "generated images per w")], fid=False) for s in sets]
    assert below.splitlines() == [f"Note: {note}." for note in notes]
    assert "fewer than" not in (out / "guidance.csv").read_text()
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
    # each bad list is named as typed, with --w (before: `--guidance must be a number >= 0,
    # got 'x'`, a flag guidance does not have; an empty item was dropped: 0,,3 ran 0 and 3;
    # a weight given twice was drawn and measured twice, two rows of it)
    for w in ("1,x", "0,nan", "0,,3", "0,3,", "", "-1"):
        rc, _, err = run_main(capsys, "guidance", "--real", cond_data, "--attr", "a=b", f"--w={w}")
        assert rc == 2 and err.startswith(
            "animeddim guidance: error: argument --w: --w needs comma-separated weights >= 0 "
            f"(e.g. 0,1,2,3,5), got {w!r}"
        ), err
    rc, _, err = run_main(capsys, "guidance", "--model", "avatars-64", "--real", cond_data,
                          "--attr", "colour=red", "--w", "0,3,0", "--out", "o")  # fmt: skip
    assert (rc, err) == (2, "animeddim: error: --w: 0 given more than once; give each once\n")


def _red_images(cond_data, folder, n):
    folder.mkdir()
    rows = [r for r in csv.DictReader(open(cond_data / "labels.csv")) if r["colour"] == "red"]
    for r in rows[:n]:
        shutil.copy(cond_data / r["file"], folder)
    return folder


def test_edit_reports_what_the_untouched_attributes_keep(
    cond_run, cond_data, cond_classifier, tmp_path, capsys
):
    import numpy as np

    from animeddim.attributes import classify, load_classifier
    from animeddim.data import load_folder

    images = _red_images(cond_data, tmp_path / "in", 6)
    out = tmp_path / "edited"
    rc, stdout, err = run_main(capsys, "edit", "--run", cond_run, "--images", images, "--set",
                               "colour=blue", "--steps", 10, "--out", out, "--classifier",
                               cond_classifier, "--device", "cpu")  # fmt: skip
    assert rc == 0, err
    summary = json.loads((out / "edit_summary.json").read_text())
    p = summary["preservation"]
    assert p["images"] == 6 and list(p["preserved"]) == ["band"]  # colour was set
    # the same judgement made by hand from the files written
    net, _ = load_classifier(cond_classifier)
    before = classify(net, np.asarray(load_folder(images, 16).images))
    after = classify(net, np.asarray(load_folder(out / "after", 16).images))
    band = list(net.config.vocab).index("band")
    assert p["preserved"]["band"] == float((before[:, band] == after[:, band]).mean())
    assert p["preserved_overall"] == p["preserved"]["band"]
    blue = net.config.vocab["colour"].index("blue")
    assert p["changed_to_value"]["colour"] == float((after[:, 0] == blue).mean()) >= 0.5
    assert (
        f"untouched attributes classified the same before and after: "
        f"{100 * p['preserved_overall']:.1f}% overall (band {100 * p['preserved']['band']:.1f}%)"
    ) in stdout
    assert "edits classified with the set colour: " in stdout


def test_edit_takes_the_whole_data_sets_labels_for_a_few_of_its_images(
    cond_run, cond_data, tmp_path, capsys
):
    """`edit --labels data/labels.csv --images some/` refused the data set's own labels file
    ("'x.png' is not a file in 'some/'") for listing the images not copied; the rows of the
    images given are used, the others counted in a warning."""
    images = _red_images(cond_data, tmp_path / "in", 2)
    out = tmp_path / "edited"
    rc, _, err = run_main(capsys, "edit", "--run", cond_run, "--images", images, "--labels",
                          cond_data / "labels.csv", "--set", "colour=blue", "--steps", 4,
                          "--out", out, "--device", "cpu")  # fmt: skip
    assert rc == 0, err
    rows = sum(1 for _ in csv.DictReader(open(cond_data / "labels.csv")))
    assert (
        f"labels file '{cond_data / 'labels.csv'}': {rows - 2} of its {rows} rows name files "
        f"not in '{images}' and were not used"
    ) in err
    assert len(list((out / "after").glob("*.png"))) == 2
    from animeddim.labels import LabelError, csv_labels

    with pytest.raises(LabelError, match="is not a file in"):  # training keeps the typo check
        csv_labels(cond_data / "labels.csv", images, sorted(p.name for p in images.iterdir()))


def test_edit_labels_naming_none_of_the_images_is_an_error_not_a_warning(tmp_path):
    """Rows for other images are ignored with a warning; a file none of whose rows names an
    image given (here every name carries the folder: 'img/a.png') left every image unlabelled
    with only that warning, and edit went on from null source codes. It is refused, naming a
    row."""
    from PIL import Image

    from animeddim.labels import LabelError, csv_labels

    (tmp_path / "img").mkdir()
    for f in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / f)
    labels = tmp_path / "labels.csv"
    labels.write_text("file,colour\nimg/a.png,red\nimg/b.png,blue\n")
    paths = [tmp_path / "img" / f for f in ("a.png", "b.png")]
    with pytest.raises(LabelError, match=r"none of its rows names an image in .* \(row 2: 'img/a"):
        csv_labels(labels, tmp_path / "img", paths, missing="null", others="ignore")
    labels.write_text("file,colour\na.png,red\nc.png,blue\n")  # one of two: used, with a warning
    with pytest.warns(UserWarning, match="1 of its 2 rows name files not in"):
        got = csv_labels(labels, tmp_path / "img", paths, missing="null", others="ignore")
    assert got.vocab["colour"] == ("blue", "red") and got.codes[:, 0].tolist() == [1, -1]


def test_edit_force_rules(cond_run, cond_data, tmp_path, capsys):
    images = _red_images(cond_data, tmp_path / "in", 3)
    out = tmp_path / "edited"
    args = ["edit", "--run", cond_run, "--images", images, "--set", "colour=blue",
            "--steps", 3, "--out", out, "--device", "cpu"]  # fmt: skip
    rc, stdout, err = run_main(capsys, *args)
    assert rc == 0, err
    # the shipped avatar classifier knows neither colour nor band
    assert "preservation not measured" in stdout
    assert "preservation" not in json.loads((out / "edit_summary.json").read_text())
    files = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    assert len(files) == 3 + 3 + 2  # after/, pairs/, grid.png and edit_summary.json
    rc, _, err = run_main(capsys, *args)
    assert rc == 2 and "already holds earlier outputs" in err and "--force" in err
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == files
    first = sorted(images.iterdir())[0]
    first.unlink()  # the next edit has two images: nothing of the third may be left
    rc, _, err = run_main(capsys, *args, "--force")
    assert rc == 0, err
    assert sorted(f.name for f in (out / "after").iterdir()) == sorted(
        f.name for f in images.iterdir()
    )
    assert not (out / "pairs" / first.name).exists()
    rc, _, err = run_main(capsys, "edit", "--run", cond_run, "--images", images, "--set",
                          "colour=blue", "--out", images / "edits")  # fmt: skip
    assert rc == 2 and "is inside the --images folder" in err
    rc, _, err = run_main(capsys, *args, "--batch-size", 0)
    assert rc == 2 and "batch-size must be an integer >= 1, got '0'" in err


def test_edit_refuses_an_attribute_the_model_lacks_before_saying_what_it_draws(
    cond_run, web_runs, cond_data, tmp_path, capsys
):
    """`edit --run UNCONDITIONAL --set glasses=yes` printed `regenerating with guidance 1
    (plain conditional)` on stdout, then refused: as if the edit had begun. An attribute or
    value the model lacks is refused with nothing on stdout."""
    red = sorted(_red_images(cond_data, tmp_path / "red", 1).iterdir())[0]
    for run, change, said in (
        (web_runs / "tiny", "colour=blue", "the model is unconditional: it knows no attributes"),
        (cond_run, "colour=green", "the model knows no colour value 'green'"),
        (cond_run, "hat=yes", "the model knows no attribute 'hat'"),
    ):
        out = tmp_path / "edited"
        rc, stdout, err = run_main(capsys, "edit", "--run", run, "--images", red, "--set",
                                   change, "--steps", 2, "--out", out)  # fmt: skip
        assert (rc, stdout) == (2, ""), (stdout, err)
        assert err.startswith(f"animeddim: error: {said}") and len(err.splitlines()) == 1, err
        assert not out.exists()


def test_edit_of_images_that_share_a_name_writes_each(cond_run, cond_data, tmp_path, capsys):
    """a.png, a.jpg and sub/a.png were all written as after/a.png: one edit kept, two lost."""
    from PIL import Image

    red = _red_images(cond_data, tmp_path / "red", 3)
    images = tmp_path / "in"
    (images / "sub").mkdir(parents=True)
    first, second, third = sorted(red.iterdir())
    shutil.copy(first, images / "a.png")
    shutil.copy(second, images / "sub" / "a.png")
    Image.open(third).convert("RGB").save(images / "a.jpg", quality=95)
    out = tmp_path / "edited"
    rc, _, err = run_main(capsys, "edit", "--run", cond_run, "--images", images, "--set",
                          "colour=blue", "--steps", 2, "--out", out, "--device", "cpu")  # fmt: skip
    assert rc == 0, err
    for part in ("after", "pairs"):
        written = sorted(f.relative_to(out / part).as_posix() for f in (out / part).rglob("*.png"))
        assert written == ["a.jpg.png", "a.png.png", "sub/a.png"], part
    assert json.loads((out / "edit_summary.json").read_text())["images"] == 3


def test_edit_takes_one_image_file(cond_run, cond_data, tmp_path, capsys):
    """`edit --images FILE` refused a single image ("is not a folder"); it is edited as a
    folder holding only it would be: after/NAME.png, pairs/NAME.png, its labels found by its
    name in --labels (the labels.csv of its folder, whose other rows name the other files)."""
    red = sorted(_red_images(cond_data, tmp_path / "red", 1).iterdir())[0]
    for images, more in [(red, []), (cond_data / red.name, ["--labels", cond_data / "labels.csv"])]:
        out = tmp_path / f"edited-{len(more)}"
        rc, _, err = run_main(capsys, "edit", "--run", cond_run, "--images", images, "--set",
                              "colour=blue", "--steps", 2, "--out", out, "--device", "cpu",
                              *more)  # fmt: skip
        assert rc == 0, err
        for part in ("after", "pairs"):
            assert [f.name for f in (out / part).rglob("*.png")] == [red.name], part
        summary = json.loads((out / "edit_summary.json").read_text())
        assert summary["images"] == 1
        assert "warning" not in err.lower(), err  # the other rows name files in its folder


def test_grid_by_pngs_are_named_by_value_and_seed(cond_run, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    out, one = tmp_path / "grid", tmp_path / "red"
    args = ["sample", "--run", cond_run, "--n", 2, "--steps", 3, "--seed", 5, "--device", "cpu"]
    rc, stdout, err = run_main(capsys, *args, "--grid-by", "colour", "--out", out)
    assert rc == 0, err
    assert sorted(f.name for f in out.iterdir()) == [
        "colour-blue-seed5-000000.png", "colour-blue-seed5-000001.png",
        "colour-red-seed5-000000.png", "colour-red-seed5-000001.png",
    ]  # fmt: skip
    assert "4 images in" in stdout
    assert "4 images, 3 ddim steps" in stdout  # two values x --n 2, not --n alone
    # colour-red-seed5-000001.png is image 1 of seed 5 drawn with colour=red
    rc, _, err = run_main(capsys, *args, "--attr", "colour=red", "--out", one)
    assert rc == 0, err
    for i in (0, 1):
        a = np.asarray(Image.open(out / f"colour-red-seed5-{i:06d}.png"))
        b = np.asarray(Image.open(one / f"seed5-{i:06d}.png"))
        assert np.array_equal(a, b)
    rc, _, err = run_main(capsys, *args, "--grid-by", "colour", "--out", out)
    assert rc == 2 and "already holds earlier outputs" in err
    rc, _, err = run_main(capsys, *args, "--grid-by", "band", "--out", out, "--force")
    assert rc == 0, err
    assert sorted(f.name for f in out.iterdir())[0] == "band-bottom-seed5-000000.png"
    assert len(list(out.iterdir())) == 4  # the colour grid's files are gone


def test_grid_names_say_value_and_seed():
    from animeddim.conditional_cli import grid_names

    assert grid_names("hair_color", ["#ab2a18", "#0e0e0e"], 3, 1) == [
        "hair_color-ab2a18-seed3-000000.png",
        "hair_color-0e0e0e-seed3-000000.png",
    ]
    assert grid_names("cls", ["a b", "a_b"], 0, 1) == [
        "cls-00_a_b-seed0-000000.png",
        "cls-01_a_b-seed0-000000.png",
    ]


def test_guidance_without_attributes_is_refused_not_ignored(cond_data, tmp_path, capsys):
    out = tmp_path / "s"
    rc, _, err = run_main(capsys, "sample", "--model", "avatars-64", "--out", out, "--n", 1,
                          "--guidance", 3)  # fmt: skip
    assert (
        rc == 2
        and "--guidance 3 needs --attr NAME=VALUE, --grid-by NAME or --attrs-from FILE.csv" in err
    )
    rc, _, err = run_main(capsys, "evaluate", "--model", "avatars-64", "--real", cond_data,
                          "--n", 2, "--guidance", 2, "--out", tmp_path / "e.json")  # fmt: skip
    assert rc == 2 and "--guidance 2 needs --attr NAME=VALUE" in err
    assert not out.exists() and not (tmp_path / "e.json").exists()


def test_attrs_from_gives_image_i_the_attributes_of_row_i(cond_run, tmp_path, capsys):
    """Each image is drawn exactly as `--attr` with its row's values would draw it (rows
    cycle; a column the model does not know is left out); bad files are one-line errors."""
    import numpy as np
    from PIL import Image

    labels = tmp_path / "labels.csv"
    labels.write_text("file,colour,note_col\na.png,red,x\nb.png,blue,y\nc.png,blue,z\n")
    args = ["sample", "--run", cond_run, "--steps", 3, "--seed", 2, "--device", "cpu"]
    out = tmp_path / "mix"
    rc, stdout, err = run_main(capsys, *args, "--n", 4, "--attrs-from", labels, "--out", out)
    assert rc == 0, err
    assert "3 rows of" in stdout
    for colour in ("red", "blue"):
        rc, _, err = run_main(capsys, *args, "--n", 4, "--attr", f"colour={colour}",
                              "--out", tmp_path / colour)  # fmt: skip
        assert rc == 0, err
    for i, colour in enumerate(["red", "blue", "blue", "red"]):
        got = np.asarray(Image.open(out / f"seed2-{i:06d}.png"))
        want = np.asarray(Image.open(tmp_path / colour / f"seed2-{i:06d}.png"))
        assert np.array_equal(got, want), i
    bad = {
        "file,colour\na.png,green\n": "row 2 (a.png): the model knows no colour value 'green'",
        "file,shape\na.png,round\n": "has none of the model's attributes ('colour', 'band')",
        "file,colour\n": "has no rows",
        # no file column: colour would be read as file names and left out unsaid
        "colour,band\nred,x\n": "its first column is the file column, but it is named 'colour'",
    }
    for text, message in bad.items():
        labels.write_text(text)
        rc, _, err = run_main(capsys, *args, "--n", 1, "--attrs-from", labels,
                              "--out", tmp_path / "bad")  # fmt: skip
        assert rc == 2 and message in err, err
        assert not (tmp_path / "bad").exists()
    rc, _, err = run_main(capsys, *args, "--n", 1, "--attrs-from", labels, "--grid-by",
                          "colour", "--out", tmp_path / "bad")  # fmt: skip
    assert rc == 2 and "without --grid-by" in err
    # an --attr is set in every row: rows (red), (blue) with colour=red are all red
    labels.write_text("file,colour\na.png,red\nb.png,blue\n")
    rc, stdout, err = run_main(capsys, *args, "--n", 2, "--attrs-from", labels, "--attr",
                               "colour=red", "--out", tmp_path / "all-red")  # fmt: skip
    assert rc == 0, err
    assert "2 rows of" in stdout and ", colour=red in every row" in stdout
    for i in range(2):
        got = np.asarray(Image.open(tmp_path / "all-red" / f"seed2-{i:06d}.png"))
        want = np.asarray(Image.open(tmp_path / "red" / f"seed2-{i:06d}.png"))
        assert np.array_equal(got, want), i


def test_evaluate_attrs_from_reports_accuracy_per_attribute_and_value(
    cond_run, cond_data, cond_classifier, tmp_path, capsys, fake
):
    out = tmp_path / "eval.json"
    args = _common(cond_run, cond_data, cond_classifier) + ["--protocols", "standard"]
    rc, stdout, err = run_main(capsys, "evaluate", *args, "--n", 6, "--guidance", 3,
                               "--attrs-from", cond_data / "labels.csv", "--out", out)  # fmt: skip
    assert rc == 0, err
    r = json.loads(out.read_text())
    m = r["attributes_from"]
    assert r["guidance"] == 3.0 and m["rows"] == 96 and "kid_mean" in r
    assert r["guidance_interval"] == "0,inf"  # every step: no interval given or stored
    colour = m["attributes"]["colour"]
    assert colour["n"] == 6 and list(colour["per_value"]) == ["red"]  # rows 0-5 are red
    assert (
        f"attribute accuracy colour: {100 * colour['accuracy']:.1f}% of 6 samples, "
        f"{100 * colour['mean_per_value']:.1f}% averaged over its 1 value (lowest red"
    ) in stdout
    assert "the classifier's own validation accuracy on real images: 100.0%" in stdout
    both = tmp_path / "both.json"  # an --attr is set in every row, and judged so
    rc, _, err = run_main(capsys, "evaluate", *args, "--n", 2, "--attr", "colour=blue",
                          "--attrs-from", cond_data / "labels.csv", "--out", both)  # fmt: skip
    assert rc == 0, err
    m = json.loads(both.read_text())["attributes_from"]["attributes"]["colour"]
    assert m["n"] == 2 and list(m["per_value"]) == ["blue"]


def test_attrs_from_training_draws_the_models_own_training_labels(
    cond_run, cond_data, web_runs, tmp_path, capsys
):
    """An export keeps the codes of its training labels: `--attrs-from training` then draws
    exactly what `--attrs-from` the labels CSV draws, from the file alone (and from the run
    folder, through its config, while the CSV is at hand)."""
    import numpy as np
    from PIL import Image

    from animeddim import pipelines

    exported = tmp_path / "cond.safetensors"
    rc, stdout, err = run_main(capsys, "export", "--run", cond_run, "--out", exported)
    assert rc == 0, err
    assert "with the 96 rows of its training labels (sample --attrs-from training)" in stdout
    loaded = pipelines.load_for_sampling(exported, None, "cpu")[0]
    want = pipelines.codes_from_labels(loaded, cond_data / "labels.csv")
    assert loaded.attribute_rows is not None
    assert loaded.attribute_rows.dtype == want.dtype and loaded.attribute_rows.equal(want)
    moved = tmp_path / "moved.safetensors"
    shutil.copy(exported, moved)
    args = ["sample", "--steps", 3, "--seed", 1, "--n", 3, "--device", "cpu"]
    outs = {}
    cases = [("csv", exported, cond_data / "labels.csv"), ("file", moved, "training"),
             ("run", cond_run, "training")]  # fmt: skip
    for name, source, attrs in cases:
        outs[name] = tmp_path / name
        rc, stdout, err = run_main(capsys, *args, "--run", source, "--attrs-from", attrs,
                                   "--out", outs[name])  # fmt: skip
        assert rc == 0, err
    assert "96 rows of the model's training labels" in stdout
    for i in range(3):
        png = f"seed1-{i:06d}.png"
        pixels = [np.asarray(Image.open(outs[k] / png)) for k in ("csv", "file")]
        assert np.array_equal(*pixels), i
    assert (outs["run"] / "seed1-000000.png").is_file()  # the run's EMA net: other weights
    rc, _, err = run_main(capsys, *args, "--run", web_runs / "tiny", "--attrs-from", "training",
                          "--out", tmp_path / "bad")  # fmt: skip
    assert rc == 2 and "the model is unconditional" in err and not (tmp_path / "bad").exists()


def test_an_exports_recommended_guidance_is_conditional_samplings_default(
    cond_run, web_runs, tmp_path, capsys
):
    import numpy as np
    from PIL import Image

    plain, guided = tmp_path / "plain.safetensors", tmp_path / "guided.safetensors"
    assert run_main(capsys, "export", "--run", cond_run, "--out", plain)[0] == 0
    rc, stdout, err = run_main(capsys, "export", "--run", cond_run, "--out", guided,
                               "--guidance", 2.5)  # fmt: skip
    assert rc == 0, err
    assert "recommended guidance 2.5: conditional sampling's default" in stdout
    args = ["sample", "--steps", 3, "--seed", 4, "--n", 2, "--device", "cpu"]
    runs = {"default": (guided, []), "explicit": (plain, ["--guidance", 2.5]),
            "one": (guided, ["--guidance", 1])}  # fmt: skip
    for name, (model, extra) in runs.items():
        rc, _, err = run_main(capsys, *args, "--run", model, "--attr", "colour=red", *extra,
                              "--out", tmp_path / name)  # fmt: skip
        assert rc == 0, err
    png = [{k: np.asarray(Image.open(tmp_path / k / f"seed4-{i:06d}.png")) for k in runs}
           for i in range(2)]  # fmt: skip
    assert all(np.array_equal(p["default"], p["explicit"]) for p in png)
    assert not all(np.array_equal(p["default"], p["one"]) for p in png)  # given: it wins
    # unconditional sampling from it is not refused: the default only guides conditions
    rc, _, err = run_main(capsys, *args, "--run", guided, "--out", tmp_path / "uncond")
    assert rc == 0, err
    rc, _, err = run_main(capsys, "export", "--run", web_runs / "tiny", "--out",
                          tmp_path / "u.safetensors", "--guidance", 2)  # fmt: skip
    assert rc == 2 and "is unconditional, it has nothing to guide" in err
    assert not (tmp_path / "u.safetensors").exists()


def _exports(cond_run, tmp_path, capsys, *options):
    """The run exported plainly, and with a recommended guidance 3 and `options`: the two
    paths and what the second export printed."""
    plain, rec = tmp_path / "plain.safetensors", tmp_path / "rec.safetensors"
    assert run_main(capsys, "export", "--run", cond_run, "--out", plain)[0] == 0
    rc, stdout, err = run_main(capsys, "export", "--run", cond_run, "--out", rec,
                               "--guidance", 3, *options)  # fmt: skip
    assert rc == 0, err
    return plain, rec, stdout


def test_an_exports_guidance_interval_is_samplings_default_and_bad_ones_are_refused(
    cond_run, tmp_path, capsys
):
    import numpy as np
    from PIL import Image

    plain, limited, stdout = _exports(cond_run, tmp_path, capsys, "--guidance-interval", "1,inf")
    assert "recommended guidance 3, at noise levels sigma in (1, inf]" in stdout
    args = ["sample", "--steps", 4, "--seed", 4, "--n", 2, "--device", "cpu", "--attr",
            "colour=red"]  # fmt: skip
    runs = {"default": (limited, []),
            "explicit": (plain, ["--guidance", 3, "--guidance-interval", "1,inf"]),
            "always": (limited, ["--guidance-interval", "0,inf"])}  # fmt: skip
    for name, (model, extra) in runs.items():
        rc, _, err = run_main(capsys, *args, "--run", model, *extra, "--out", tmp_path / name)
        assert rc == 0, err
    png = [{k: np.asarray(Image.open(tmp_path / k / f"seed4-{i:06d}.png")) for k in runs}
           for i in range(2)]  # fmt: skip
    assert all(np.array_equal(p["default"], p["explicit"]) for p in png)
    assert not all(np.array_equal(p["default"], p["always"]) for p in png)  # given: it wins
    # an interval without a weight to place, or without conditions, or malformed: refused
    rc, _, err = run_main(capsys, "export", "--run", cond_run, "--out", tmp_path / "x.safetensors",
                          "--guidance-interval", "1,inf")  # fmt: skip
    assert rc == 2 and "--guidance-interval needs --guidance W" in err
    assert not (tmp_path / "x.safetensors").exists()
    rc, _, err = run_main(capsys, "sample", "--run", limited, "--n", 1, "--out", tmp_path / "u",
                          "--guidance-interval", "1,inf")  # fmt: skip
    assert rc == 2 and "--guidance-interval 1,inf needs --attr NAME=VALUE" in err
    for bad, says in (("3,1", "needs 0 <= LO < HI"), ("1", "is LO,HI in sigma")):
        rc, _, err = run_main(capsys, *args, "--run", limited, "--guidance-interval", bad,
                              "--out", tmp_path / "bad")  # fmt: skip
        assert rc == 2 and says in err, err
    assert not (tmp_path / "u").exists() and not (tmp_path / "bad").exists()


def test_an_exports_recommended_sampler_and_steps_are_samplings_default(
    trained_tiny, tmp_path, capsys
):
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file, save_file

    from animeddim.checkpoint import CheckpointError, load_model, read_meta
    from animeddim.pipelines import default_sampling

    plain, rec = tmp_path / "plain.safetensors", tmp_path / "rec.safetensors"
    assert run_main(capsys, "export", "--run", trained_tiny, "--out", plain)[0] == 0
    rc, stdout, err = run_main(capsys, "export", "--run", trained_tiny, "--out", rec,
                               "--sampler", "dpmpp-2m-logsnr", "--steps", 3)  # fmt: skip
    assert rc == 0, err
    assert "recommended sampling: 3 dpmpp-2m-logsnr steps (the default for this file)" in stdout
    args = ["sample", "--seed", 2, "--n", 2, "--device", "cpu", "--precision", "fp32"]
    runs = {"default": (rec, []), "explicit": (plain, ["--sampler", "dpmpp-2m-logsnr",
            "--steps", 3]), "plain": (plain, []), "ddim": (rec, ["--sampler", "ddim"]),
            "ddim20": (plain, ["--sampler", "ddim", "--steps", 20]),
            "eta": (rec, ["--eta", 1]), "eta-ddim": (plain, ["--eta", 1]),
            "steps5": (rec, ["--steps", 5]),
            "logsnr5": (plain, ["--sampler", "dpmpp-2m-logsnr", "--steps", 5])}  # fmt: skip
    for name, (model, extra) in runs.items():
        rc, stdout, err = run_main(capsys, *args, "--run", model, *extra, "--out", tmp_path / name)
        assert rc == 0, err
        # what it says is what it did: the file's sampler, or the DDIM an --eta keeps
        if name == "default":
            assert "2 images, 3 dpmpp-2m-logsnr steps, eta 0, x0 clipped: " in stdout
        if name == "eta":
            assert "2 images, 20 ddim steps, eta 1: " in stdout
    png = {k: [np.asarray(Image.open(tmp_path / k / f"seed2-{i:06d}.png")) for i in range(2)]
           for k in runs}  # fmt: skip

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(png[a], png[b], strict=True))

    assert same("default", "explicit") and not same("default", "plain")
    assert same("ddim", "ddim20")  # another sampler: its own default of 20 steps
    assert same("eta", "eta-ddim")  # --eta 1 alone keeps DDIM, the sampler that takes it
    assert same("steps5", "logsnr5")  # --steps alone: the file's sampler
    assert default_sampling(load_model(rec)) == ("dpmpp-2m-logsnr", 3)
    assert default_sampling(load_model(plain)) == ("ddim", 20) and "sampler" not in read_meta(plain)
    # half a recommendation, an unknown sampler or a damaged stored one: refused, nothing written
    rc, _, err = run_main(capsys, "export", "--run", trained_tiny, "--out",
                          tmp_path / "half.safetensors", "--sampler", "ddim")  # fmt: skip
    assert rc == 2 and "--sampler and --steps go together" in err
    assert not (tmp_path / "half.safetensors").exists()
    tensors, meta = load_file(rec), json.loads(read_raw_meta(rec))
    meta["sampling_steps"] = 0
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad, {"animeddim": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="stored sampling recommendation is unusable"):
        default_sampling(load_model(bad))
    rc, _, err = run_main(capsys, *args, "--run", bad, "--out", tmp_path / "b")
    assert rc == 2 and "sampling recommendation is unusable" in err and "steps 0" in err
    assert not (tmp_path / "b").exists()


def read_raw_meta(path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()["animeddim"]


def test_per_attribute_guidance_from_the_command_line_and_from_an_export(
    cond_run, tmp_path, capsys
):
    import numpy as np
    from PIL import Image

    from animeddim.checkpoint import read_meta

    plain, rec, stdout = _exports(cond_run, tmp_path, capsys, "--attr-guidance", "band=6")
    assert "recommended guidance 3, band=6" in stdout
    assert read_meta(rec)["attribute_guidance"] == "band=6"
    args = ["sample", "--steps", 4, "--seed", 4, "--n", 2, "--device", "cpu", "--precision",
            "fp32", "--attr", "colour=red", "--attr", "band=top"]  # fmt: skip
    runs = {"default": (rec, []),  # the file's weight, and with it the file's band=6
            "same w": (rec, ["--guidance", 3]),
            "explicit": (plain, ["--guidance", 3, "--attr-guidance", "band=6"]),
            "none": (rec, ["--attr-guidance", "none"]),
            "w alone": (plain, ["--guidance", 3]),
            "other w": (rec, ["--guidance", 2]),
            "w 2 alone": (plain, ["--guidance", 2])}  # fmt: skip
    said = {}
    for name, (model, extra) in runs.items():
        rc, said[name], err = run_main(capsys, *args, "--run", model, *extra, "--out",
                                       tmp_path / name)  # fmt: skip
        assert rc == 0, err
    assert "guidance 3, band at 6\n" in said["default"]  # what it did, said before drawing
    assert "guidance 3\n" in said["none"] and "guidance 2\n" in said["other w"]
    png = {k: np.stack([np.asarray(Image.open(tmp_path / k / f"seed4-00000{i}.png"))
                        for i in range(2)]) for k in runs}  # fmt: skip
    assert np.array_equal(png["default"], png["explicit"])
    assert np.array_equal(png["same w"], png["explicit"])
    assert np.array_equal(png["none"], png["w alone"])  # 'none' drops the file's weights
    assert not np.array_equal(png["default"], png["w alone"])  # band=6 draws otherwise
    assert np.array_equal(png["other w"], png["w 2 alone"])  # they go with the file's w only
    # bad values: one line, exit 2, nothing written
    for extra, says in ((["--attr-guidance", "shape=4"], "knows no attribute 'shape'"),
                        (["--attr-guidance", "band=-1"], "NAME=W with W a number >= 0"),
                        (["--attr-guidance", "band"], "got 'band'"),
                        (["--attr-guidance", "band=2,band=3"], "band is given twice")):  # fmt: skip
        rc, _, err = run_main(capsys, *args, "--run", plain, *extra, "--out", tmp_path / "bad")
        assert rc == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()
    rc, _, err = run_main(capsys, "sample", "--run", plain, "--n", 1, "--out", tmp_path / "u",
                          "--attr-guidance", "band=6")  # fmt: skip
    assert rc == 2 and "--attr-guidance band=6 needs --attr NAME=VALUE" in err
    unknown = "per-attribute guidance for shape: the model knows colour, band"
    for extra, says in ((["--attr-guidance", "band=6"], "--attr-guidance needs --guidance W"),
                        (["--guidance", 3, "--attr-guidance", "shape=6"], unknown)):  # fmt: skip
        rc, _, err = run_main(capsys, "export", "--run", cond_run, "--out",
                              tmp_path / "x.safetensors", *extra)  # fmt: skip
        assert rc == 2 and says in err, err
        assert not (tmp_path / "x.safetensors").exists()


def test_an_exports_edit_guidance_is_edits_default(cond_run, cond_data, tmp_path, capsys):
    import numpy as np

    from animeddim.data import load_folder

    plain, rec, stdout = _exports(cond_run, tmp_path, capsys, "--edit-guidance", 1.5)
    assert "recommended guidance for edits 1.5: edit's default" in stdout
    images = _red_images(cond_data, tmp_path / "in", 3)
    args = ["edit", "--images", images, "--set", "colour=blue", "--steps", 6, "--device", "cpu",
            "--precision", "fp32"]  # fmt: skip
    runs = {"default": (rec, []), "explicit": (plain, ["--guidance", 1.5]),
            "sampling w": (plain, ["--guidance", 3])}  # fmt: skip
    for name, (model, extra) in runs.items():
        rc, _, err = run_main(capsys, *args, "--run", model, *extra, "--out", tmp_path / name)
        assert rc == 0, err
    after = {k: np.asarray(load_folder(tmp_path / k / "after", 16).images) for k in runs}
    assert np.array_equal(after["default"], after["explicit"])
    assert not np.array_equal(after["default"], after["sampling w"])
    rc, _, err = run_main(capsys, "export", "--run", cond_run, "--out", tmp_path / "x.safetensors",
                          "--edit-guidance", 2)  # fmt: skip
    assert rc == 2 and "--edit-guidance needs --guidance W" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_an_unusable_stored_weight_is_one_line_naming_it(cond_run, cond_data, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    _, rec, _ = _exports(cond_run, tmp_path, capsys, "--edit-guidance", 2)
    tensors, meta = load_file(rec), json.loads(read_raw_meta(rec))
    images = _red_images(cond_data, tmp_path / "in", 2)
    for key, raw, command in (("edit_guidance", "lots", ["edit", "--images", images, "--set",
                                                         "colour=blue", "--steps", 3]),
                              ("guidance", -3, ["sample", "--n", 1, "--steps", 2, "--attr",
                                                "colour=red"])):  # fmt: skip
        bad = tmp_path / f"bad-{key}.safetensors"
        save_file(tensors, bad, {"animeddim": json.dumps({**meta, key: raw})})
        out = tmp_path / f"out-{key}"
        rc, _, err = run_main(capsys, *command, "--run", bad, "--device", "cpu", "--out", out)
        says = f"the stored {key.replace('_', ' ')} weight is unusable: {raw!r}"
        assert rc == 2 and says in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_evaluate_attr_skips_unusable_real_images_with_the_asked_values(
    cond_run, cond_data, cond_classifier, tmp_path, capsys, fake
):
    """A labelled real image that cannot be decoded (a broken link, a damaged file) is left
    out of the real features with a note; the asked images' features, computed apart then,
    loaded every labelled file and died on it with exit 1."""
    import os

    real = tmp_path / "real"
    shutil.copytree(cond_data, real)
    os.symlink(tmp_path / "gone.png", real / "zz-broken.png")
    (real / "zz-damaged.png").write_bytes(b"\x89PNG not really")
    with open(real / "labels.csv", "a") as f:
        f.write("zz-broken.png,red,top\nzz-damaged.png,red,top\n")
    out = tmp_path / "eval.json"
    args = _common(cond_run, real, cond_classifier)
    args += ["--n", 4, "--attr", "colour=red", "--protocols", "standard", "--out", out]
    rc, stdout, err = run_main(capsys, "evaluate", *args)
    assert rc == 0, err
    assert "zz-broken.png: broken symbolic link" in err and "zz-damaged.png" in err
    r = json.loads(out.read_text())
    assert r["attributes_asked"]["n_real"] == 48 and r["n_real"] == 96
    # the same asked KID as against the folder without the two unusable files
    clean = tmp_path / "clean.json"
    args = _common(cond_run, cond_data, cond_classifier)
    args += ["--n", 4, "--attr", "colour=red", "--protocols", "standard", "--out", clean]
    rc, _, err = run_main(capsys, "evaluate", *args)
    assert rc == 0, err
    c = json.loads(clean.read_text())["attributes_asked"]
    assert r["attributes_asked"]["kid_mean"] == pytest.approx(c["kid_mean"], abs=1e-12)
