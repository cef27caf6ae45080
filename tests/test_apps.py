"""The programs on top of the API, run as a user runs them: the guided tour and bench."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli

from animeddim.apps.bench import format_table
from animeddim.apps.tour import EVAL_BUDGET_S, plan_for


def test_tour_quick_mode_runs_end_to_end(tmp_path):
    out = tmp_path / "tour"
    p = run_cli("tour", "--quick", "--out", str(out), timeout=900)
    assert "scaled: quick mode" in p.stdout and "done in" in p.stdout
    summary = json.loads((out / "demo-summary.json").read_text())
    assert summary["plan"]["eval_n"] == 10
    for key in ("grid", "report", "report_html"):
        assert Path(summary[key]).is_file(), key
    assert (out / "short-run" / "metrics.csv").is_file()
    assert (out / "report" / "table1.md").is_file()


def test_demo_is_the_tour():
    assert "--quick" in run_cli("demo", "--help").stdout


def test_tour_scales_to_the_machine():
    fast = plan_for(sample_rate=2000, train_rate=500, train_minutes=3, eval_n=300)
    assert (fast.sampler, fast.steps, fast.eval_n, fast.train_avatars) == ("ddim", 20, 300, 2000)
    assert not fast.scaled
    slow = plan_for(sample_rate=10, train_rate=8, train_minutes=3, eval_n=300)
    assert (slow.sampler, slow.steps) == ("dpmpp-2m", 10)
    assert slow.eval_n * slow.steps / 10 <= EVAL_BUDGET_S or slow.eval_n == 100
    assert slow.train_avatars < 2000 and len(slow.scaled) == 3
    assert all("this machine" in s or "samples" in s for s in slow.scaled)


def test_bench_command_at_tiny_sizes():
    args = ["bench", "--image-size", "16", "--batch-size", "4", "--iters", "1", "--device", "cpu"]
    p = run_cli(*args, "--no-compile", "--no-kid", "--json")
    r = json.loads(p.stdout)
    assert r["image_size"] == 16 and r["batch_size"] == 4
    for path in ("baseline", "tuned"):
        assert r[path]["train_images_per_s"] > 0 and r[path]["sample_images_per_s"] > 0
        shares = r["peak_share"][path]
        assert set(shares) == {
            f"{w}_of_{op}" for w in ("train", "sample") for op in ("matmul", "conv_fwd_bwd")
        }
        assert all(s > 0 for s in shares.values())
    assert "fp32" in r["peak"] and all(v > 0 for v in r["peak"]["fp32"].values())
    # the share is the path's own GFLOP/s over the peak in the path's precision
    peak = r["peak"][r["tuned"]["precision"]]["conv_fwd_bwd_gflop_per_s"]
    expected = r["tuned"]["train_gflop_per_s"] / peak
    assert abs(r["peak_share"]["tuned"]["train_of_conv_fwd_bwd"] - expected) < 1e-9
    table = format_table(r)  # what bench prints without --json
    assert "| training images/s |" in table and "chip peak GFLOP/s" in table
    assert "share of the fp32 peak: training" in table
    assert r["sample_batch_size"] == 4 and r["sampler"] == "ddim" and r["sample_steps"] == 20
    assert "sampling images/s (20 ddim steps, batch 4)" in table
    # minutes on a slow CPU: each measurement is said as it starts (before: nothing until the end)
    said = [line for line in p.stderr.splitlines() if line.startswith("bench: measuring ")]
    assert [line.split(" measuring ")[1].split(" ")[0] for line in said] == [
        "baseline", "tuned", "data"
    ], p.stderr  # fmt: skip


def test_bench_samples_its_own_batch_with_any_sampler():
    """--sample-batch-size, --sampler and --steps set what the sampling rate measures; the
    data pipeline is also measured from a cache on the device (here the CPU)."""
    args = ["bench", "--image-size", "16", "--batch-size", "4", "--iters", "1", "--device", "cpu"]
    extra = ["--sample-batch-size", "6", "--sampler", "dpmpp-2m", "--steps", "3"]
    p = run_cli(*args, *extra, "--compile-mode", "reduce-overhead", "--no-compile", "--no-kid",
                "--json")  # fmt: skip
    r = json.loads(p.stdout)
    assert (r["batch_size"], r["sample_batch_size"]) == (4, 6)
    assert (r["sampler"], r["sample_steps"], r["compile_mode"]) == (
        "dpmpp-2m",
        3,
        "reduce-overhead",
    )
    assert r["data_pipeline_on_device_images_per_s"] > 0
    assert "sampling images/s (3 dpmpp-2m steps, batch 6)" in format_table(r)
    bad = run_cli(*args, "--sampler", "euler", check=False)
    assert bad.returncode == 2 and "invalid choice: 'euler'" in bad.stderr


def test_the_tours_copy_of_the_shipped_model_is_whole_or_absent_on_a_full_disk(tmp_path):
    """Under a 100 KB file-size limit (the kernel refuses the write, as on a full disk) the
    tour's copy of the shipped weights (4 MB) stopped part-way and left its first 100 KB
    under the final name, a checkpoint the report could not read; each file the tour copies
    or writes is now whole or absent."""
    import resource
    import subprocess
    import sys

    out = tmp_path / "out"
    code = (
        "from pathlib import Path\n"
        "from animeddim.apps.tour import _shipped_run_folder\n"
        f"_shipped_run_folder(Path({str(out)!r}), Path({str(tmp_path / 'none.png')!r}))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)),
    )
    assert p.returncode != 0 and "File too large" in p.stderr, p.stderr
    assert not [f for f in out.rglob("*") if f.is_file()]
