"""Counts in messages: one helper says them, and the messages that said "1 images" use it."""

from __future__ import annotations

from conftest import run_cli

from animeddim.words import counted


def test_counted_says_one_in_the_singular_and_any_other_count_in_the_plural():
    assert counted(1, "image") == "1 image"
    assert [counted(n, "image") for n in (0, 2, 64)] == ["0 images", "2 images", "64 images"]
    assert counted(1, "ddim step") == "1 ddim step"
    assert counted(3, "ddim step") == "3 ddim steps"
    assert (counted(1, "batch", "batches"), counted(2, "batch", "batches")) == (
        "1 batch",
        "2 batches",
    )


def test_sample_of_one_image_says_one_image(tmp_path):
    """`sample --n 1 --steps 1` said "1 images in OUT" and "1 images, 1 ddim steps"."""
    out = tmp_path / "one"
    p = run_cli("sample", "--model", "avatars-64", "--n", "1", "--steps", "1", "--sampler",
                "ddim", "--out", str(out), "--device", "cpu")  # fmt: skip
    assert f"1 image in {out}\n" in p.stdout, p.stdout
    assert "1 image, 1 ddim step, eta 0: " in p.stdout, p.stdout
    assert "images," not in p.stdout and "images in" not in p.stdout
