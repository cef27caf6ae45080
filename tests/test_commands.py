"""Every user-facing command, run the way a user runs it, on a tiny run."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from conftest import copy_run, run_cli, run_here, run_main
from PIL import Image
from safetensors import safe_open

from animeddim import metrics
from animeddim.cli import sampling as cli_sampling

try:
    metrics.find_inception_weights()
    HAVE_WEIGHTS = True
except metrics.InceptionWeightsMissing:
    HAVE_WEIGHTS = False
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="FID Inception weights not installed")


@pytest.fixture(scope="module")
def tiny_run(trained_tiny, tmp_path_factory):
    return copy_run(trained_tiny, tmp_path_factory.mktemp("cmds") / "run")


def test_sample_trajectory_and_sampler(tiny_run, tmp_path):
    traj = tmp_path / "traj.png"
    grid = tmp_path / "g.png"
    p = run_cli(
        "sample",
        "--run",
        str(tiny_run),
        "--n",
        "3",
        "--steps",
        "4",
        "--grid",
        str(grid),
        "--trajectory",
        str(traj),
        "--sampler",
        "dpmpp-2m",
    )
    assert "sample" in p.stderr and "trajectory" in p.stderr  # their progress bars
    w, h = Image.open(traj).size
    assert (w, h) == (4 * 16, 4 * 2 * 16)  # 4 steps as columns; x_t and x0 rows per image
    p = run_cli(
        "sample",
        "--run",
        str(tiny_run),
        "--grid",
        str(grid),
        "--sampler",
        "dpmpp-2m",
        "--eta",
        "1",
        check=False,
    )
    assert p.returncode == 2 and "deterministic" in p.stderr


def test_sampling_with_no_model_named_says_it_uses_the_shipped_one(tiny_run, tmp_path):
    # A user of their own data who forgets --run gets the avatar model: they are told so.
    p = run_here("sample", "--n", "1", "--steps", "1", "--grid", str(tmp_path / "a.png"))
    assert "using the shipped model avatars-64" in p.stderr and "--run RUN" in p.stderr
    for source in (["--run", str(tiny_run)], ["--model", "avatars-64"]):
        p = run_here(
            "sample",
            *source,
            "--n",
            "1",
            "--steps",
            "1",
            "--grid",
            str(tmp_path / "b.png"),
            "--force",
        )
        assert "shipped model" not in p.stderr


def test_invert_and_interpolate(tiny_run, avatars16, tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for f in sorted(avatars16.glob("*.png"))[:2]:
        (imgs / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "inv"
    p = run_here(
        "invert", "--run", str(tiny_run), "--images", str(imgs), "--steps", "5", "--out", str(out)
    )
    assert "mean PSNR" in p.stdout and "invert" in p.stderr
    with safe_open(str(out / "latents.safetensors"), "pt") as f:
        assert f.get_tensor("latents").shape == (2, 3, 16, 16)
    assert len(list((out / "reconstructions").glob("*.png"))) == 2
    assert Image.open(out / "side-by-side.png").size == (2 * 16, 2 * 16)
    p = run_here(
        "interpolate",
        "--run",
        str(tiny_run),
        "--seeds",
        "1",
        "2",
        "--frames",
        "5",
        "--steps",
        "3",
        "--out",
        str(tmp_path / "interp.gif"),
    )
    assert Image.open(tmp_path / "interp.png").size == (5 * 16, 16)
    assert "interpolate" in p.stderr
    gif = Image.open(tmp_path / "interp.gif")
    assert gif.n_frames == 8  # there and back: 5 + 3
    run_here(
        "interpolate",
        "--run",
        str(tiny_run),
        "--images",
        *map(str, sorted(imgs.glob("*.png"))),
        "--frames",
        "3",
        "--steps",
        "4",
        "--out",
        str(tmp_path / "i2.png"),
    )
    assert Image.open(tmp_path / "i2.png").size == (3 * 16, 16)
    for extra in (["--sampler", "dpmpp-2m"], ["--clip-x0"]):  # refused before any work
        rc, _, err = run_main(
            capsys, "interpolate", "--run", tiny_run, "--images", *sorted(imgs.glob("*.png")),
            "--out", tmp_path / "i3.png", *extra,
        )  # fmt: skip
        assert rc == 2 and "unclipped DDIM" in err, extra


def test_invert_edit_and_interpolate_note_images_smaller_than_the_model_once(
    tiny_run, cond_run, tmp_path, capsys
):
    """`invert`, `edit` and `interpolate --images` read their images at the model's size and
    enlarged those smaller to it, blurring them, without a word (where `train` and `data
    prepare` name them). Each says so in one note per call, in their words, the smallest
    named; images at least as large as the model get none."""
    faces = tmp_path / "faces"
    faces.mkdir()
    for name, size in (("a.png", (12, 8)), ("b.png", (20, 20)), ("c.png", (10, 14))):
        Image.new("RGB", size, (200, 40, 40)).save(faces / name)
    many = (
        "note: 2 images smaller than 16x16 (the centred square of each) were enlarged to it, "
        "blurring them (the smallest: a.png, 12x8); 16x16 is the model's size: images at "
        "least that large stay sharp"
    )

    def notes(err: str) -> list[str]:
        return [line for line in err.splitlines() if "smaller than" in line]

    rc, _, err = run_main(capsys, "invert", "--run", tiny_run, "--images", faces, "--steps", 2,
                          "--out", tmp_path / "inv")  # fmt: skip
    assert rc == 0 and notes(err) == [many], err
    rc, _, err = run_main(capsys, "edit", "--run", cond_run, "--images", faces, "--set",
                          "colour=blue", "--steps", 2, "--out", tmp_path / "ed")  # fmt: skip
    assert rc == 0 and notes(err) == [many], err
    ends = [faces / "a.png", faces / "b.png"]
    rc, _, err = run_main(capsys, "interpolate", "--run", tiny_run, "--images", *ends,
                          "--frames", 2, "--steps", 2, "--out", tmp_path / "i.png")  # fmt: skip
    assert rc == 0 and notes(err) == [
        f"note: 1 image smaller than 16x16 (its centred square) was enlarged to it, blurring "
        f"it ({ends[0]}, 12x8); 16x16 is the model's size: images at least that large stay sharp"
    ], err
    rc, _, err = run_main(capsys, "interpolate", "--run", tiny_run, "--images", ends[1],
                          faces / "c.png", "--frames", 2, "--steps", 2,
                          "--out", tmp_path / "j.png")  # fmt: skip
    assert rc == 0 and len(notes(err)) == 1 and f"({faces / 'c.png'}, 10x14)" in err, err
    rc, _, err = run_main(capsys, "invert", "--run", tiny_run, "--images", ends[1], "--steps", 2,
                          "--out", tmp_path / "inv-b")  # fmt: skip
    assert rc == 0 and notes(err) == [], err


def test_interpolate_steps_default_to_20_from_seeds_and_50_from_images(
    tiny_run, avatars16, tmp_path, capsys, monkeypatch
):
    from animeddim import pipelines

    seen = []

    def record(loaded, out, *, settings, invert_steps, images=None, **_):
        seen.append(invert_steps if images else settings.steps)
        return out, out

    monkeypatch.setattr(pipelines, "interpolate", record)
    ends = sorted(avatars16.glob("*.png"))[:2]
    for i, given in enumerate([["--seeds", 1, 2], ["--images", *ends]]):
        rc, _, err = run_main(capsys, "interpolate", "--run", tiny_run, *given,
                              "--out", tmp_path / f"i{i}.png")  # fmt: skip
        assert rc == 0, err
    assert seen == [20, 50]  # as --help says


def test_report_command(tiny_run, tmp_path):
    out = tmp_path / "rep"
    p = run_cli("report", "--run", str(tiny_run), "--out", str(out), "--steps", "3")
    assert (out / "report.html").is_file() and (out / "fig4-losses.png").is_file()
    assert "report:" in p.stdout
    p = run_cli("report", "--run", str(tmp_path / "missing"), "--out", str(out), "--force",
                check=False)  # fmt: skip
    assert p.returncode == 2 and "does not exist" in p.stderr


@needs_weights
def test_kid_evaluate_and_steps(tiny_run, avatars16, tmp_path, fast_inception, monkeypatch, capsys):
    # In this process through the CLI's entry point, with the real Inception loaded once (the
    # --inception-weights path and its error: test_missing_weights_is_a_clear_error).
    monkeypatch.setattr(cli_sampling, "_extractor", lambda a: fast_inception)
    cache = tmp_path / "cache"
    rc, stdout, err = run_main(capsys, "kid", avatars16, avatars16, "--json", "--cache-dir", cache)
    assert rc == 0, err
    r = json.loads(stdout)
    assert "features (first folder)" in err
    # A set against itself: only the estimator's O(1/m) term (the diagonal of K_xy) remains.
    assert r["protocol"] == "standard" and abs(r["kid_mean"]) < 0.05
    out = tmp_path / "eval.json"
    rc, _, err = run_main(
        capsys, "evaluate", "--run", tiny_run, "--real", avatars16, "--n", "8", "--steps", "2",
        "--out", out, "--cache-dir", cache,
    )  # fmt: skip
    assert rc == 0, err
    assert "features (generated)" in err and "paper KID" in err
    ev = json.loads(out.read_text())
    for k in (
        "protocol",
        "kid_mean",
        "kid_std",
        "fid",
        "n",
        "steps",
        "eta",
        "checkpoint",
        "seconds",
        "sampler",
        "clip_x0",
        "weights",
    ):
        assert k in ev, k
    assert ev["clip_x0"] is False  # DDIM as in the paper
    assert ev["protocol"] == "standard" and ev["n"] == 8 and ev["steps"] == 2
    assert ev["paper"]["protocol"] == "paper"
    # Untrained-ish model vs real avatars: clearly worse than the real set against itself.
    assert ev["kid_mean"] > 10 * abs(r["kid_mean"])
    rc, _, err = run_main(
        capsys, "steps", "--run", tiny_run, "--real", avatars16, "--n", "2", "--steps", "1,2",
        "--eta", "0,1", "--samplers", "ddim,dpmpp-2m,dpmpp-2m-logsnr,unipc", "--cache-dir", cache,
    )  # fmt: skip
    assert rc == 0, err
    rows = list(csv.DictReader(open(tiny_run / "steps.csv")))
    assert {(r["sampler"], r["clip_x0"], r["eta"], r["steps"]) for r in rows} == {
        ("ddim", "False", "0.0", "1"),
        ("ddim", "False", "0.0", "2"),
        ("ddim", "False", "1.0", "1"),
        ("ddim", "False", "1.0", "2"),
        ("dpmpp-2m", "True", "0.0", "1"),
        ("dpmpp-2m", "True", "0.0", "2"),
        ("dpmpp-2m-logsnr", "True", "0.0", "1"),
        ("dpmpp-2m-logsnr", "True", "0.0", "2"),
        ("unipc", "True", "0.0", "1"),
        ("unipc", "True", "0.0", "2"),
    }
    assert "ddim eta 1, 2 steps: sample" in err  # a progress bar per setting
    assert "| 2 | dpmpp-2m | yes | 0 |" in (tiny_run / "steps.md").read_text()
    assert (tiny_run / "steps.png").is_file()


def test_missing_weights_is_a_clear_error(avatars16, tmp_path):
    p = run_cli(
        "kid",
        str(avatars16),
        str(avatars16),
        "--inception-weights",
        str(tmp_path / "nope.pt"),
        check=False,
    )
    assert p.returncode == 2 and "nope.pt" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("kid", str(avatars16), str(avatars16), "--inception-weights", str(tmp_path),
                check=False)  # fmt: skip
    assert p.returncode == 2 and "is a folder, not a file" in p.stderr, p.stderr


def test_export_then_sample_from_the_small_file(tiny_run, tmp_path):
    import torch

    from animeddim.checkpoint import load, load_model

    out = tmp_path / "small.safetensors"
    run_here("export", "--run", str(tiny_run), "--out", str(out))
    tensors, meta = load(out)
    assert meta["kind"] == "ema-weights"
    assert not any(k.startswith(("model.", "optim.")) for k in tensors)
    assert tensors["ema.stem.weight"].dtype == torch.float16
    full = load_model(tiny_run).model.state_dict()
    small = load_model(out).model.state_dict()
    for k in full:
        torch.testing.assert_close(small[k], full[k], atol=1e-3, rtol=1e-3)
    run_here(
        "sample", "--run", str(out), "--n", "2", "--steps", "2", "--grid", str(tmp_path / "g.png")
    )


def test_progress_bar_opens_once_per_stage_run(monkeypatch):
    """A stage's repeated final report does not reopen its bar; the same stage started
    again (the next setting of a study) gets a new one."""
    import tqdm

    from animeddim.cli import common

    opened = []
    real = tqdm.tqdm
    monkeypatch.setattr(tqdm, "tqdm", lambda **kw: opened.append(kw["desc"]) or real(**kw))
    monkeypatch.setattr(common, "_is_main", lambda: True)
    bars = common._Bars()
    for done in (0, 5, 10, 10):  # the last: "skipped files count as done"
        bars("features (real)", done, 10)
    for done in (0, 10):
        bars("features (real)", done, 10)
    bars("sampling", 0, 4)
    bars.close()
    assert opened == ["features (real)", "features (real)", "sampling"]


@needs_weights
def test_train_eval_every_measures_what_evaluate_measures(
    avatars16, tmp_path, fast_inception, monkeypatch, capsys
):
    """train --eval-every: the standard KID at every N-th epoch and the last, written to
    metrics.csv and kept as best-standard-kid; the last value is what `evaluate` reports for
    the run's last checkpoint with the same samples (seed, sampler, steps, count)."""
    monkeypatch.setattr(metrics, "InceptionFeatures", lambda *a, **k: fast_inception)
    monkeypatch.setattr(cli_sampling, "_extractor", lambda a: fast_inception)
    run, cache = tmp_path / "run", tmp_path / "cache"
    model = [
        "--image-size",
        "16",
        "--widths",
        "8,16",
        "--block-depth",
        "1",
        "--embedding-dims",
        "8",
    ]
    rc, out, err = run_main(
        capsys, "train", "--data", avatars16, "--out", run, *model, "--precision", "fp32",
        "--epochs", "3", "--batch-size", "6", "--no-kid", "--quiet", "--eval-every", "2",
        "--eval-real", avatars16, "--eval-images", "6", "--eval-steps", "2",
    )  # fmt: skip
    assert rc == 0, err
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    measured = [r["standard_kid"] for r in rows]
    assert measured[0] == "" and measured[1] != "" and measured[2] != ""  # epochs 2 and 3
    assert "standard KID" in out
    best = run / "checkpoints" / "best-standard-kid.safetensors"
    assert best.is_file()
    from animeddim import checkpoint as ckpt

    kept = min(float(v) for v in measured[1:])
    assert ckpt.load(best)[1]["best_standard_kid"] == pytest.approx(kept, rel=1e-5)
    ev_json = tmp_path / "eval.json"
    rc, _, err = run_main(
        capsys, "evaluate", "--run", run, "--real", avatars16, "--n", "6", "--steps", "2",
        "--sampler", "dpmpp-2m", "--seed", str(0x5EED), "--precision", "fp32", "--no-compile",
        "--device", "cpu", "--protocols", "standard", "--out", ev_json, "--cache-dir", cache,
    )  # fmt: skip
    assert rc == 0, err
    ev = json.loads(ev_json.read_text())
    assert ev["kid_mean"] == pytest.approx(float(measured[2]), rel=1e-5)
    # A run stopped early (here by --max-steps at the end of epoch 1) measures its last epoch.
    rc, _, err = run_main(
        capsys, "train", "--data", avatars16, "--out", tmp_path / "short", *model, "--precision",
        "fp32", "--epochs", "5", "--max-steps", "3", "--batch-size", "6", "--no-kid", "--quiet",
        "--eval-every", "2", "--eval-real", avatars16, "--eval-images", "6", "--eval-steps", "2",
    )  # fmt: skip
    assert rc == 0, err
    rows = list(csv.DictReader(open(tmp_path / "short" / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1"] and rows[0]["standard_kid"] != ""
    # An --eval-real folder KID cannot read is refused before the run folder is made.
    (tmp_path / "empty").mkdir()
    rc, _, err = run_main(
        capsys, "train", "--data", avatars16, "--out", tmp_path / "refused", *model,
        "--eval-every", "1", "--eval-real", tmp_path / "empty", "--batch-size", "6", "--quiet",
    )  # fmt: skip
    assert rc == 2 and "--eval-real" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "refused").exists()


def test_sample_says_when_its_rate_includes_compilation():
    """`sample --compile` printed '(0.16 images/s)' for 2 images: the seconds of the first
    call's compilation, not the sampler's speed. The line says when they are included (an
    explicit --compile, or a job large enough to compile by default)."""
    from animeddim.cli.sampling import drawn_line
    from animeddim.pipelines import SampleSettings

    def rate(n, steps, compile):
        line = drawn_line(n, SampleSettings(steps=steps, compile=compile), 2.0)
        return line[line.index("(") :]

    assert rate(4, 2, True) == "(2.00 images/s, compilation included)"
    assert rate(4, 2, False) == "(2.00 images/s)"
    assert rate(4, 2, None) == "(2.00 images/s)"  # 8 image-steps: not compiled by default


def test_an_option_a_command_lacks_is_said_by_that_command(capsys):
    """`animeddim kid A B --batch-size 8` said `animeddim: error: unrecognized arguments:
    --batch-size 8 (see animeddim --help)`, pointing to the help that lists the commands but
    not their options; the command's own parser says it, naming its own help."""
    for argv, prog, extra in (
        (["kid", "a", "b", "--batch-size", "8"], "animeddim kid", "--batch-size 8"),
        (["sample", "--n", "2", "extra"], "animeddim sample", "extra"),
        (
            ["attributes", "train", "--data", "d", "--bogus"],
            "animeddim attributes train",
            "--bogus",
        ),
        (["data", "avatars", "--out", "x", "--nn", "3"], "animeddim data avatars", "--nn 3"),
        (["--bogus", "sample"], "animeddim", "--bogus"),
    ):
        rc, out, err = run_main(capsys, *argv)
        assert (rc, out) == (2, ""), err
        assert err == f"{prog}: error: unrecognized arguments: {extra} (see {prog} --help)\n"


def test_data_avatars_and_tour_refuse_sizes_they_cannot_use_up_front(tmp_path, capsys):
    """`data avatars --size 5000` ended in DiceBear's `OptionsValidationError: Invalid
    options: /size maximum` traceback (it draws 1..4096 px), leaving its folder behind;
    `tour --eval-n 1` timed the machine, rendered avatars and sampled a grid, then failed
    at its evaluation (`n must be an integer >= 2`); one avatar was said as `1 avatars`."""
    out = tmp_path / "big"
    rc, _, err = run_main(capsys, "data", "avatars", "--out", out, "--n", 1, "--size", 5000)
    assert rc == 2 and err == (
        "animeddim data avatars: error: argument --size: size must be in 8..4096, got 5000 "
        "(see animeddim data avatars --help)\n"
    )
    assert not out.exists()
    rc, _, err = run_main(capsys, "tour", "--out", tmp_path / "tour", "--eval-n", 1)
    assert rc == 2 and "argument --eval-n: eval-n must be >= 2, got 1" in err
    assert not (tmp_path / "tour").exists()
    rc, stdout, err = run_main(capsys, "data", "avatars", "--out", out, "--n", 1, "--size", 8)
    assert rc == 0 and stdout.startswith(f"1 avatar (8px, seed 0) in {out} ("), err


def test_an_archive_given_where_a_folder_of_images_goes_says_how_to_make_one(
    tiny_run, tmp_path, capsys
):
    """`train --data faces.zip` (the archive `data prepare` reads) said `'faces.zip' is not
    a folder (expected a folder of images)`, `kid` `is a file, not a folder`, and `evaluate
    --real faces.zip` `real-image folder 'faces.zip' does not exist`, which it did."""
    import tarfile
    import zipfile

    folder = tmp_path / "faces"
    folder.mkdir()
    Image.new("RGB", (16, 16), "red").save(folder / "a.png")
    zipped, tarred = tmp_path / "faces.zip", tmp_path / "faces.tar.gz"
    with zipfile.ZipFile(zipped, "w") as z:
        z.write(folder / "a.png", "a.png")
    with tarfile.open(tarred, "w:gz") as t:
        t.add(folder / "a.png", "a.png")
    hint = (
        "is an archive, not a folder: make a folder of its images with `animeddim data "
        "prepare {} --out DIR` (or unpack it) and give that folder\n"
    )
    for archive in (zipped, tarred):
        said = f"'{archive}' " + hint.format(archive)
        rc, _, err = run_main(capsys, "train", "--data", archive, "--out", tmp_path / "r")
        assert (rc, err) == (2, f"animeddim: error: {said}")
        assert not (tmp_path / "r").exists()
        rc, _, err = run_main(capsys, "kid", archive, folder)
        assert (rc, err) == (2, f"animeddim: error: {said}")
    args = ["--run", tiny_run, "--real", zipped, "--n", 2, "--steps", 2, "--out", tmp_path / "e"]
    rc, _, err = run_main(capsys, "evaluate", *args)
    assert (rc, err) == (2, f"animeddim: error: real-image folder '{zipped}' {hint.format(zipped)}")
    rc, _, err = run_main(capsys, "kid", folder / "a.png", folder)  # a file that is no archive
    assert (rc, err) == (2, f"animeddim: error: '{folder / 'a.png'}' is a file, not a folder\n")


def test_serve_runs_given_an_archive_is_told_to_unpack_it_not_to_prepare_images(tmp_path):
    """A .zip of run folders given to `serve --runs` was told to make a folder of its images
    with `data prepare`, the remedy for an archive of images, which would turn the runs'
    sample grids into a dataset; it is told to unpack it."""
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "runs" / "r1" / "config.json").write_text("{}")
    archive = shutil.make_archive(str(tmp_path / "runs"), "zip", tmp_path / "runs")
    p = run_cli("serve", "--runs", archive, check=False)
    assert (p.returncode, p.stderr) == (
        2,
        f"animeddim: error: --runs '{archive}' is an archive, not a folder: unpack it and give "
        "the folder it holds\n",
    )
