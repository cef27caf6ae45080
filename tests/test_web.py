"""The web app's request handlers and HTTP API, without a browser (tests/test_web_browser.py
drives the page in Chromium)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shlex
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

pytest.importorskip("starlette", reason="the web extra is not installed: pip install '.[web]'")
pytest.importorskip("httpx2", reason="the test extra is not installed: pip install '.[test]'")

from starlette.testclient import TestClient  # noqa: E402

from animeddim.apps.web import checks, handlers, jobs  # noqa: E402
from animeddim.apps.web.checks import Catalog, RequestError  # noqa: E402
from animeddim.apps.web.handlers import Engine  # noqa: E402
from animeddim.apps.web.server import create_app  # noqa: E402
from animeddim.cli import build_parser  # noqa: E402


@pytest.fixture(scope="module")
def runs(web_runs) -> Path:
    return web_runs


@pytest.fixture(scope="module")
def engine(runs) -> Engine:
    return Engine(Catalog([], runs), device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def client(engine, runs):
    with TestClient(create_app(engine, str(runs))) as c:
        yield c


def png_bytes(image: np.ndarray | Image.Image, fmt: str = "PNG") -> bytes:
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def stream(resp) -> list[dict]:
    return [json.loads(line) for line in resp.text.splitlines() if line]


def decode_data_url(url: str) -> Image.Image:
    import base64

    head, data = url.split(",", 1)
    assert head.startswith("data:image/")
    return Image.open(io.BytesIO(base64.b64decode(data)))


# --- choices and request checks -------------------------------------------------------------


def test_catalog_lists_runs_and_never_takes_a_path(runs):
    cat = Catalog(["avatars-64"], runs)
    ids = [c.id for c in cat.choices()]
    assert ids == ["avatars-64", "run:colours", "run:empty", "run:labelled", "run:tiny"]
    assert cat.get("run:tiny").path == runs / "tiny"
    for bad in (str(runs / "tiny"), "../tiny", "run:../tiny", "/etc/passwd", 3):
        with pytest.raises(RequestError, match="unknown model"):
            cat.get(bad)
    with pytest.raises(RequestError, match="no model given"):
        cat.get(None)
    with pytest.raises(RequestError, match="no checkpoint yet"):
        cat.get("run:empty")
    assert cat.get("run:empty", sample=False).has_metrics is False
    with pytest.raises(RequestError, match="shipped models are avatars-64, avatars-64-cond"):
        Catalog(["nope"], None)


def test_info_offers_the_shipped_conditional_model_with_its_guidance():
    """The shipped conditional model's attributes come from its config beside it and its
    guidance, sampler and steps fields start at what its file recommends."""
    from animeddim.checkpoint import recommended_attribute_guidance
    from animeddim.config import guidance_interval_text
    from animeddim.pipelines import (
        SampleSettings,
        default_edit_guidance,
        default_guidance,
        default_sampling,
        guidance_interval,
        load_for_sampling,
    )

    engine = Engine(Catalog(["avatars-64", "avatars-64-cond"], None), device="cpu")
    models = {m["id"]: m for m in engine.info()["models"]}
    assert models["avatars-64"]["vocabulary"] is None and models["avatars-64"]["guidance"] == 1
    cond = models["avatars-64-cond"]
    loaded = load_for_sampling(None, "avatars-64-cond", "cpu")[0]
    assert cond["vocabulary"] == {a: list(v) for a, v in loaded.config.model.vocabulary.items()}
    assert cond["guidance"] == default_guidance(loaded) > 1
    interval = guidance_interval(loaded, SampleSettings())  # the file's recommendation
    assert cond["guidance_interval"] == guidance_interval_text(interval)
    assert models["avatars-64"]["guidance_interval"] == "0,inf"
    assert cond["attribute_guidance"] == recommended_attribute_guidance(loaded.meta)
    assert models["avatars-64"]["attribute_guidance"] == {}
    assert cond["edit_guidance"] == default_edit_guidance(loaded)  # the Edit field's start
    assert models["avatars-64"]["edit_guidance"] == 1
    sampler, steps = default_sampling(loaded)  # the sampler and steps the file recommends
    assert cond["sampling"] == {"sampler": sampler, "steps": steps} and sampler != "ddim"
    assert models["avatars-64"]["sampling"] is None  # recommends none: the page's own
    n_images = int(loaded.config.data.fingerprint.split(":")[0])  # every labelled image
    assert loaded.attribute_rows is not None and len(loaded.attribute_rows) == n_images


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("steps", 0, "steps must be an integer from 1 to 250, got 0"),
        ("n", 10000, "images (n) must be an integer from 1 to 64, got 10000"),
        ("n", "2.5", "images (n) must be an integer"),
        ("seed", -1, "seed must be an integer from 0"),
        ("eta", "NaN", "eta must be a number from 0 to 1, got 'NaN'"),
        ("eta", "inf", "eta must be a number"),
        ("steps", "", "steps must be an integer"),
        ("steps", True, "steps must be an integer"),
        ("sampler", "euler", "sampler must be one of ddim, dpmpp-2m"),
        ("clip", "maybe", "clip must be default, on or off"),
    ],
)
def test_generate_refuses_bad_numbers_with_the_reason(runs, field, value, reason):
    cat = Catalog([], runs)
    body = {"model": "run:tiny", "sampler": "ddim", field: value}
    with pytest.raises(RequestError) as e:
        checks.parse_generate(body, cat)
    assert reason in str(e.value)


def test_generate_request_defaults_eta_rule_and_attributes(runs):
    cat = Catalog([], runs)
    req = checks.parse_generate({"model": "run:tiny"}, cat)
    assert (req.seed, req.n, req.steps, req.sampler, req.eta, req.clip) == (
        0,
        16,
        10,
        "dpmpp-2m",
        0.0,
        None,
    )
    with pytest.raises(RequestError, match="eta must be 0 for dpmpp-2m"):
        checks.parse_generate({"model": "run:tiny", "eta": 0.5}, cat)
    # "any" everywhere is unconditional; a value is kept (the model checks it when drawing)
    req = checks.parse_generate({"model": "run:tiny", "attributes": {"hair": "any"}}, cat)
    assert req.attributes == {}
    req = checks.parse_generate(
        {"model": "run:tiny", "attributes": {"hair": "red"}, "guidance": "3"}, cat
    )
    assert (req.attributes, req.guidance) == ({"hair": "red"}, 3.0)
    with pytest.raises(RequestError, match="guidance must be a number"):
        checks.parse_generate(
            {"model": "run:tiny", "attributes": {"hair": "red"}, "guidance": "nan"}, cat
        )
    # mix: the attributes not asked as the training labels have them; guidance counts then
    req = checks.parse_generate({"model": "run:tiny", "mix": "training", "guidance": "2"}, cat)
    assert (req.mix, req.attributes, req.guidance) == (True, {}, 2.0)
    assert "--attrs-from training --guidance 2" in checks.cli_command(req, "runs", "cpu", "auto")
    # weight 1 is said too: left out, the CLI would take a shipped file's recommended weight
    req = checks.parse_generate({"model": "run:tiny", "attributes": {"hair": "red"}}, cat)
    assert "--attr hair=red --guidance 1 --" in checks.cli_command(req, "runs", "cpu", "auto")
    # per-attribute weights: absent is the file's (None), '' or 'none' is none, else parsed
    assert req.attribute_guidance is None
    for raw, want in (("", {}), ("none", {}), ("hair=4, eyes=0.5", {"hair": 4.0, "eyes": 0.5})):
        body = {"model": "run:tiny", "attributes": {"hair": "red"}, "attribute_guidance": raw}
        req = checks.parse_generate(body, cat)
        assert req.attribute_guidance == want
        if not want:  # none, and a run recommends none: nothing to say
            assert "--attr-guidance" not in checks.cli_command(req, "runs", "cpu", "auto")
    assert "--guidance 1 --attr-guidance hair=4,eyes=0.5 --" in checks.cli_command(
        req, "runs", "cpu", "auto"
    )
    bad = (("hair=x", "NAME=W with W a number >= 0"), ("hair=25", "from 0 to 20"),
           (["hair=2"], "text like hair_len=11"), ("hair=1,hair=2", "given twice"))  # fmt: skip
    for raw, says in bad:
        body = {"model": "run:tiny", "attributes": {"hair": "red"}, "attribute_guidance": raw}
        with pytest.raises(RequestError, match=says):
            checks.parse_generate(body, cat)
    with pytest.raises(RequestError, match="mix must be 'none' or 'training', got 'prior'"):
        checks.parse_generate({"model": "run:tiny", "mix": "prior"}, cat)


def test_vocabulary_is_read_from_a_config_when_present():
    assert checks.vocabulary({"model": {"widths": [8]}}) is None
    vocab = {"hair_color": ["black", "red"], "glasses": ["no", "yes"]}
    assert checks.vocabulary({"model": {"vocabulary": vocab}}) == vocab
    assert checks.vocabulary({"vocabulary": vocab}) == vocab


def test_cli_command_for_shipped_and_run_models(runs):
    cat = Catalog(["avatars-64"], runs)
    req = checks.parse_generate(
        {
            "model": "avatars-64",
            "seed": 7,
            "n": 4,
            "steps": 12,
            "sampler": "ddim",
            "eta": 0.5,
            "clip": "on",
        },
        cat,
    )
    cmd = checks.cli_command(req, None, "auto", "auto")
    assert shlex.split(cmd) == [
        "animeddim", "sample", "--model", "avatars-64", "--n", "4", "--steps", "12",
        "--seed", "7", "--sampler", "ddim", "--eta", "0.5", "--clip-x0",
        "--grid", "grid.png", "--out", "samples/",
    ]  # fmt: skip
    req = checks.parse_generate({"model": "run:tiny", "clip": "off"}, cat)
    cmd = checks.cli_command(req, "my runs", "cpu", "fp32")
    assert "--run 'my runs/tiny'" in cmd and "--no-clip-x0" in cmd
    assert "--device cpu --precision fp32" in cmd


# --- uploads --------------------------------------------------------------------------------


def _bomb_png(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims width x height pixels."""
    raw = png_bytes(np.zeros((16, 16, 3), np.uint8))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    patched = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return raw[:8] + patched + raw[8 + 25 :]


def test_uploads_refused_with_a_message():
    face = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    cases = {
        "is empty": b"",
        "not an image": b"GIF? no: plain text pretending to be a picture",
        "only 1x1 pixels": png_bytes(np.zeros((1, 1, 3), np.uint8)),
        "limit is 16 megapixels": _bomb_png(5000, 5000),
        "decompression bomb": _bomb_png(50000, 50000),
        "limit is 8 MB": b"\x89PNG" + b"\0" * (checks.MAX_UPLOAD_BYTES + 1),
        "cannot be used": png_bytes(face)[:200],  # truncated
    }
    for reason, data in cases.items():
        with pytest.raises(RequestError, match=reason):
            checks.decode_upload(data, 16)


def test_uploads_converted_with_notes():
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 65536, (32, 48), dtype=np.uint16)
    im16 = Image.fromarray(wide)
    assert im16.mode.startswith("I")
    image, notes = checks.decode_upload(png_bytes(im16), 16)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert "16-bit image scaled to 8 bits" in notes and "cropped to its central square" in notes
    cmyk = Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).convert("CMYK")
    image, notes = checks.decode_upload(png_bytes(cmyk, "JPEG"), 16)
    assert image.shape == (16, 16, 3)
    assert notes == ["converted from CMYK to RGB", "resized from 20x20 to the model's 16x16"]


# --- the HTTP API ---------------------------------------------------------------------------


def test_page_and_info(client):
    page = client.get("/")
    assert page.status_code == 200 and "<title>animeddim</title>" in page.text
    assert "http://" not in page.text.replace("http://www.w3.org/2000/svg", "")  # nothing external
    info = client.get("/api/info").json()
    ids = [m["id"] for m in info["models"]]
    assert ids == ["run:colours", "run:empty", "run:labelled", "run:tiny"]
    vocab = {m["id"]: m["vocabulary"] for m in info["models"]}
    assert vocab["run:tiny"] is None and vocab["run:labelled"]["glasses"] == ["no", "yes"]
    assert vocab["run:colours"] == {"colour": ["blue", "red"], "band": ["bottom", "top"]}
    assert info["limits"]["n"] == [1, 64] and "dpmpp-2m" in info["samplers"]
    assert info["stochastic"] == ["ddim"] and info["sampler_help"]["ddim"].startswith("DDIM")


def test_generate_streams_progress_and_images_the_cli_reproduces(client, runs, tmp_path):
    body = {"model": "run:tiny", "seed": 3, "n": 5, "steps": 4, "sampler": "dpmpp-2m"}
    lines = stream(client.post("/api/generate", json=body))
    assert lines[0] == {"job": lines[0]["job"], "queued": 0}
    assert re.fullmatch("[0-9a-f]{16}", lines[0]["job"])
    progress = [m["progress"] for m in lines if "progress" in m]
    assert progress == [1, 2, 3, 4]
    assert {m["total"] for m in lines if "progress" in m} == {4}
    assert {m["unit"] for m in lines if "progress" in m} == {"denoising step"}
    result = lines[-1]["result"]
    assert result["names"] == [f"seed3-{i:06d}.png" for i in range(5)]
    web = [np.asarray(decode_data_url(u)) for u in result["images"]]
    assert all(im.shape == (16, 16, 3) for im in web)
    # run the command the page shows: it writes the same images and the same grid
    args = shlex.split(result["command"])
    assert args[:2] == ["animeddim", "sample"]
    args = [a.replace("samples/", str(tmp_path / "s")).replace("grid.png", str(tmp_path / "g.png"))
            for a in args[1:]]  # fmt: skip
    run_cli(*args)
    for i, im in enumerate(web):
        np.testing.assert_array_equal(
            im, np.asarray(Image.open(tmp_path / "s" / result["names"][i]))
        )
    np.testing.assert_array_equal(
        np.asarray(decode_data_url(result["grid"]).convert("RGB")),
        np.asarray(Image.open(tmp_path / "g.png").convert("RGB")),
    )


def test_generate_with_the_training_mix_is_what_the_cli_draws(client, tmp_path):
    """ "The rest as in the training data": image i gets row i of the run's labels with the
    asked colour set in every row, as `sample --attrs-from training --attr` draws it."""
    body = {"model": "run:colours", "seed": 1, "n": 3, "steps": 3, "sampler": "dpmpp-2m",
            "attributes": {"band": "top", "colour": "any"}, "mix": "training",
            "guidance": "2", "attribute_guidance": "band=5"}  # fmt: skip
    result = stream(client.post("/api/generate", json=body))[-1]["result"]
    args = shlex.split(result["command"])
    assert (
        "--attrs-from training --attr band=top --guidance 2 --attr-guidance band=5"
        in (result["command"])
    )
    args = [a.replace("samples/", str(tmp_path / "s")).replace("grid.png", str(tmp_path / "g.png"))
            for a in args[1:]]  # fmt: skip
    run_cli(*args)
    for i, url in enumerate(result["images"]):
        np.testing.assert_array_equal(
            np.asarray(decode_data_url(url)),
            np.asarray(Image.open(tmp_path / "s" / result["names"][i])),
        )
    r = client.post("/api/generate", json={"model": "run:tiny", "mix": "training"})
    assert "the model is unconditional" in stream(r)[-1]["error"]


def test_bad_requests_answered_and_server_keeps_serving(client):
    r = client.post("/api/generate", json={"model": "run:tiny", "steps": 0})
    assert r.status_code == 400 and "steps must be an integer from 1 to 250" in r.json()["error"]
    r = client.post(
        "/api/generate", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    r = client.post("/api/invert", data={"model": "run:tiny", "steps": "3"},
                    files={"face": ("x.png", b"not an image at all", "image/png")})  # fmt: skip
    assert stream(r)[-1] == {
        "error": "this file is not an image that can be read (PNG, JPEG, WebP, ...)"
    }
    r = client.post("/api/invert", data={"model": "run:tiny", "steps": "3"})
    assert r.status_code == 400 and "choose an image file" in r.json()["error"]
    big = b"\x89PNG" + bytes(checks.MAX_UPLOAD_BYTES + 10)
    r = client.post("/api/invert", data={"model": "run:tiny"}, files={"face": ("big.png", big)})
    assert "the limit is 8 MB" in stream(r)[-1]["error"]  # read, then refused
    huge = big + bytes(checks.MAX_UPLOAD_BYTES)
    r = client.post("/api/invert", data={"model": "run:tiny"}, files={"face": ("huge.png", huge)})
    assert r.status_code == 400 and "the limit is 8 MB" in r.json()["error"]  # not even read
    r = client.post(
        "/api/invert",
        content=iter([b"--x\r\n", b"endless"]),  # chunked: no Content-Length
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert r.status_code == 400 and "Content-Length" in r.json()["error"]
    r = client.post("/api/interpolate", data={"model": "run:tiny", "frames": "1"})
    assert r.status_code == 400 and "frames must be an integer from 2 to 32" in r.json()["error"]
    assert client.get("/api/status").json()["running"] is False
    assert client.get("/api/info").status_code == 200


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"attributes": ["hair"]}, "attributes must be a JSON object of attribute names to values"),
        ({"attributes": "hair=red"}, "attributes must be a JSON object"),
        ({"attributes": 3}, "attributes must be a JSON object"),
        ({"sampler": ["ddim"]}, "sampler must be one of ddim, dpmpp-2m"),
        ({"sampler": {"name": "ddim"}}, "sampler must be one of ddim, dpmpp-2m"),
        ({"seed": -1}, "seed must be an integer from 0 to 2147483647, got -1"),
        ({"seed": 10**400}, "seed must be an integer from 0 to 2147483647, got 10000"),
    ],
)
def test_generate_refuses_fields_of_the_wrong_type_with_400(client, fields, reason):
    """A field of the wrong JSON type was a 500 (TypeError, AttributeError); the limits read
    2.14748e+09 and a 400-digit seed was echoed whole."""
    r = client.post("/api/generate", json={"model": "run:tiny", "n": 1, "steps": 1, **fields})
    assert r.status_code == 400 and reason in r.json()["error"]
    assert len(r.json()["error"]) < 200


def test_generate_refuses_deep_and_large_bodies_with_400(client):
    """JSON nested thousands deep was a 500 (RecursionError); a body of any size was read
    whole into memory. Both are a 400 now, a large one before it is all read."""
    json_type = {"content-type": "application/json"}
    deep = b"[" * 20000 + b"]" * 20000
    r = client.post("/api/generate", content=deep, headers=json_type)
    assert r.status_code == 400 and r.json()["error"] == "the request body is not JSON"
    big = b'{"model": "run:tiny", "pad": "' + b"x" * 2**20 + b'"}'
    r = client.post("/api/generate", content=big, headers=json_type)
    assert r.status_code == 400 and "too large; the limit is 64 kB" in r.json()["error"]
    chunked = iter([b'{"model": "run:tiny", "pad": "', b"x" * 2**17, b'"}'])  # no length
    r = client.post("/api/generate", content=chunked, headers=json_type)
    assert r.status_code == 400 and "too large" in r.json()["error"]
    assert client.get("/api/status").json()["running"] is False


def test_invert_gives_reconstruction_and_psnr(client, avatars16):
    face = sorted(avatars16.glob("*.png"))[0].read_bytes()
    lines = stream(client.post("/api/invert", data={"model": "run:tiny", "steps": "5"},
                               files={"face": ("face.png", face, "image/png")}))  # fmt: skip
    # 5 DDIM steps back (10 fixed-point iterations at the start, 2 evaluations per later
    # step) and 5 forward: 23 network evaluations, each one reported
    assert [m["progress"] for m in lines if "progress" in m] == list(range(1, 24))
    assert {m["total"] for m in lines if "progress" in m} == {23}
    r = lines[-1]["result"]
    assert decode_data_url(r["reconstruction"]).size == (16, 16)
    assert math.isfinite(r["psnr_db"]) and r["psnr_db"] > 5 and r["notes"] == []


def _red_face(cond_data) -> bytes:
    import csv as csv_

    rows = csv_.DictReader(open(cond_data / "labels.csv"))
    return (cond_data / next(r["file"] for r in rows if r["colour"] == "red")).read_bytes()


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"model": "run:tiny"}, "run:tiny is unconditional: it has no attributes to edit"),
        ({"changes": "{}"}, "choose a new value for at least one attribute (all are 'keep')"),
        ({"changes": '{"colour": "keep"}'}, "all are 'keep'"),
        ({"changes": "[1]"}, "changes must be a JSON object of attribute names to values"),
        ({"changes": "{oops"}, "changes must be a JSON object"),
        ({"changes": '{"colour": 3}'}, "changes must be a JSON object"),
        (
            {"changes": '{"colour": "green"}'},
            "the model knows no colour value 'green'; known colour values: 'blue', 'red'",
        ),  # fmt: skip
        ({"changes": '{"hat": "yes"}'}, "the model knows no attribute 'hat'; known attributes"),
        ({"guidance": "nan"}, "guidance must be a number from 0 to 20, got 'nan'"),
        ({"guidance": "-1"}, "guidance must be a number from 0 to 20, got '-1'"),
        ({"steps": "0"}, "steps must be an integer from 1 to 250, got '0'"),
    ],
)
def test_edit_refuses_bad_values_with_the_reason(client, cond_data, fields, reason):
    body = {"model": "run:colours", "steps": "4", "changes": '{"colour": "blue"}', **fields}
    r = client.post("/api/edit", data=body, files={"face": ("f.png", _red_face(cond_data))})
    assert r.status_code == 400 and reason in r.json()["error"]


def test_edit_without_a_face_or_with_a_non_image(client):
    body = {"model": "run:colours", "changes": '{"colour": "blue"}'}
    r = client.post("/api/edit", data=body)
    assert r.status_code == 400 and "choose an image file to edit" in r.json()["error"]
    lines = stream(client.post("/api/edit", data=body, files={"face": ("f.png", b"no image")}))
    assert "not an image" in lines[-1]["error"]


def test_edit_turns_a_red_face_blue_beside_its_reconstruction(client, cond_data):
    body = {"model": "run:colours", "steps": "20", "changes": '{"colour": "blue", "band": "keep"}'}
    face = _red_face(cond_data)
    lines = stream(client.post("/api/edit", data=body, files={"face": ("red.png", face)}))
    # 20 steps back (10 + 19 * 2 evaluations), 20 forward as it was, 20 under the change
    assert [m["progress"] for m in lines if "progress" in m] == list(range(1, 89))
    r = lines[-1]["result"]
    assert r["changes"] == {"colour": "blue"} and r["steps"] == 20
    original, recon, edited = (
        np.asarray(decode_data_url(r[k]), float) for k in ("original", "reconstruction", "edited")
    )
    assert original.shape == recon.shape == edited.shape == (16, 16, 3)
    assert np.array_equal(original, np.asarray(Image.open(io.BytesIO(face)), float))
    red, blue = (recon[..., 0].mean(), recon[..., 2].mean()), (edited[..., 0].mean(),
                                                              edited[..., 2].mean())  # fmt: skip
    assert red[0] > red[1] + 40, red  # the reconstruction stays red ...
    assert blue[1] > blue[0] + 40, blue  # ... the edit is blue
    assert r["psnr_db"] > 10


def test_interpolate_from_seeds_and_from_faces(client, avatars16):
    r = stream(client.post("/api/interpolate",
                           data={"model": "run:tiny", "seed": "1", "seed_b": "2", "frames": "5",
                                 "steps": "3", "sampler": "ddim"}))[-1]["result"]  # fmt: skip
    assert decode_data_url(r["strip"]).size == (5 * 16, 16) and r["frames"] == 5
    gif = decode_data_url(r["gif"])
    assert gif.format == "GIF" and gif.n_frames == 8  # there and back
    faces = sorted(avatars16.glob("*.png"))[:2]
    files = {"face_a": ("a.png", faces[0].read_bytes()), "face_b": ("b.png", faces[1].read_bytes())}
    r = stream(client.post("/api/interpolate", data={"model": "run:tiny", "frames": "3",
                                                     "steps": "2"}, files=files))[-1]  # fmt: skip
    assert decode_data_url(r["result"]["strip"]).size == (3 * 16, 16)
    one = {"face_a": files["face_a"]}
    r = client.post("/api/interpolate", data={"model": "run:tiny", "frames": "3"}, files=one)
    assert r.status_code == 400 and "upload two faces" in r.json()["error"]


def test_watch_a_run(client):
    r = client.get("/api/run", params={"id": "run:tiny"}).json()
    assert r["series"]["epoch"] == [1.0, 2.0]
    assert all(v is not None and v > 0 for v in r["series"]["val_noise_loss"])
    assert r["latest_sample"]["name"] == "epoch-0002.png"
    assert decode_data_url(r["latest_sample"]["url"]).size[0] > 16
    assert client.get("/api/run", params={"id": "/tmp"}).status_code == 400
    assert client.get("/api/run", params={"id": "run:empty"}).json()["latest_sample"] is None


def test_a_model_is_prepared_once_per_checkpoint_version(engine, runs):
    import os

    choice = engine.catalog.get("run:tiny")
    first = engine.prepared(choice)
    assert engine.prepared(choice) is first  # the next request reuses it
    ckpt = runs / "tiny" / "checkpoints" / "last.safetensors"
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # training wrote a new one
    again = engine.prepared(choice)
    assert again is not first and engine.prepared(choice) is again
    assert len(engine._models) <= handlers.CACHED_MODELS


def test_a_damaged_checkpoint_is_a_message(runs, tmp_path):
    import shutil

    shutil.copytree(runs / "tiny", tmp_path / "broken")
    (tmp_path / "broken" / "checkpoints" / "last.safetensors").write_bytes(b"not a checkpoint")
    eng = Engine(Catalog([], tmp_path), device="cpu", precision="fp32")
    with pytest.raises(RequestError, match="run:broken cannot be loaded"):
        eng.prepared(eng.catalog.get("run:broken"))


def test_a_stopped_job_does_no_more_work(engine, runs):
    import threading

    req = checks.parse_generate({"model": "run:tiny", "n": 2, "steps": 50}, engine.catalog)
    stop = threading.Event()
    seen = []

    def report(done, total):
        seen.append(done)
        if done == 3:
            stop.set()

    with pytest.raises(handlers.Stopped):
        engine.generate(req, handlers.Progress(1, report, stop), None)
    assert seen == [1, 2, 3]


# --- the command ----------------------------------------------------------------------------


def test_serve_without_the_extra_says_how_to_install_it():
    code = (
        "import sys; sys.modules['starlette'] = None\n"
        "from animeddim.cli import main\nsys.exit(main(['serve']))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "pip install 'animeddim[web]'" in p.stderr and "Traceback" not in p.stderr


def test_serve_refuses_a_missing_runs_folder(tmp_path):
    """A missing --runs folder was reported as "is not a folder", as a file is: it says which."""
    p = run_cli("serve", "--runs", str(tmp_path / "nope"), check=False)
    assert p.returncode == 2, p.stderr
    assert p.stderr == f"animeddim: error: --runs '{tmp_path / 'nope'}' does not exist\n"
    (tmp_path / "runs.txt").write_text("")
    p = run_cli("serve", "--runs", str(tmp_path / "runs.txt"), check=False)
    assert p.returncode == 2, p.stderr
    assert p.stderr.endswith(f"--runs '{tmp_path / 'runs.txt'}' is a file, not a folder\n")


def test_serve_refuses_a_run_folder_given_as_runs(tmp_path):
    """`serve --runs runs/a` (the run itself, not the folder of runs) offered no run: its
    subfolders hold none, and Watch a run said `start the server with --runs DIR`, which
    the user had done. It is refused, naming the folder to give."""
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    p = run_cli("serve", "--runs", str(run), check=False)
    assert (p.returncode, p.stderr) == (
        2,
        f"animeddim: error: --runs '{run}' is a run folder; give the folder that holds it "
        f"(--runs '{tmp_path / 'runs'}'): the run folders directly under it are offered\n",
    )


# --- a live server, as a user starts it ------------------------------------------------------


def _open_stream(url: str, body: dict, path: str = "/api/generate"):
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    return conn, resp


def _status(url: str) -> dict:
    from urllib.request import urlopen

    with urlopen(url + "/api/status", timeout=30) as r:
        return json.loads(r.read())


def _follow(url: str, job_id: str):
    """GET /api/job?id=JOB_ID, the stream left open: (connection, response)."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("GET", "/api/job?id=" + job_id)
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    return conn, resp


def _stop(url: str, job_id: str) -> dict:
    """POST /api/stop for `job_id`; its JSON answer."""
    from urllib.request import Request, urlopen

    body = json.dumps({"job": job_id}).encode()
    req = Request(url + "/api/stop", body, {"Content-Type": "application/json"})
    with urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _gone(url: str, job_id: str) -> bool:
    """Whether /api/job answers 404 for `job_id` (stopped, delivered, or never known)."""
    from urllib.error import HTTPError
    from urllib.request import urlopen

    try:
        urlopen(f"{url}/api/job?id={job_id}", timeout=30).close()
    except HTTPError as e:
        return e.code == 404 and json.loads(e.read())["error"].startswith(f"no job {job_id}: ")
    return False


def _until(resp, key: str) -> dict:
    """The next line of a job's stream that holds `key`."""
    while True:
        line = resp.readline()
        assert line, f"the stream ended before a line with {key!r}"
        msg = json.loads(line)
        if key in msg:
            return msg


def _wait(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@contextlib.contextmanager
def _serving(app):
    """`app` served by uvicorn on a free loopback port in this process, stopping as `serve`
    stops it; yields its URL."""
    import threading

    import uvicorn

    from animeddim.apps.web import bind

    sock = bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    app.state.stopping = lambda: srv.should_exit
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture
def paced(monkeypatch):
    """Every network evaluation 50 ms longer: a job of 250 steps lasts over 12 s, time enough
    to leave it and come back; it stops within one evaluation when asked."""
    call = handlers.Progress.__call__

    def slower(self, batch: int) -> None:
        time.sleep(0.05)
        call(self, batch)

    monkeypatch.setattr(handlers.Progress, "__call__", slower)


LONG = {"model": "run:tiny", "n": 1, "steps": 250, "sampler": "ddim"}  # paced: 12.5 s at least
SHORT = {"model": "run:tiny", "n": 2, "steps": 3, "sampler": "dpmpp-2m"}


def _unfollowed(app, *job_ids: str) -> bool:
    """Whether the server has seen every client of these jobs go (read from the test thread)."""
    live = dict(app.state.jobs.jobs)
    return all(not live[j].attached for j in job_ids)


def test_a_job_runs_on_when_its_client_leaves_and_a_reattach_follows_it(engine, paced):
    """A page reloaded mid-job lost it: the job stopped as its stream ended. It now runs on;
    GET /api/job?id= follows it again from where it is (its queue position, its latest
    progress, then its result), a second client takes it over, and POST /api/stop stops it."""
    app = create_app(engine)
    with _serving(app) as url:
        before = _status(url)
        conn_a, resp_a = _open_stream(url, LONG)
        first = json.loads(resp_a.readline())
        a = first["job"]
        assert first == {"job": a, "queued": 0} and re.fullmatch("[0-9a-f]{16}", a)
        seen = _until(resp_a, "progress")["progress"]
        conn_b, resp_b = _open_stream(url, SHORT)
        b = json.loads(resp_b.readline())["job"]
        conn_a.close()  # a reload while A runs and B waits behind it
        conn_b.close()
        _wait(lambda: _unfollowed(app, a, b))
        job_a = app.state.jobs.jobs[a]
        _wait(lambda: (job_a.latest or {}).get("progress", 0) >= seen + 3)  # A runs on, unfollowed
        assert _status(url)["running"] and _status(url)["stopped"] == before["stopped"]

        conn_a, resp_a = _follow(url, a)
        assert json.loads(resp_a.readline()) == {"job": a, "queued": 0}
        latest = json.loads(resp_a.readline())  # where it is now, not from the start
        assert latest["progress"] >= seen + 3 and latest["total"] == 250, latest
        conn_b, resp_b = _follow(url, b)
        assert json.loads(resp_b.readline()) == {"job": b, "queued": 1}
        conn_a2, resp_a2 = _follow(url, a)  # another page: it takes A over
        assert json.loads(resp_a2.readline()) == {"job": a, "queued": 0}
        assert _until(resp_a, "error") == {"error": jobs.TAKEN_OVER}
        assert _stop(url, a) == {"job": a, "stopped": True}
        assert _until(resp_a2, "error") == {"error": jobs.STOPPED}
        lines = [json.loads(x) for x in resp_b.read().splitlines()]  # B runs now
        for conn in (conn_a, conn_a2, conn_b):
            conn.close()
        assert [m["progress"] for m in lines if "progress" in m] == [1, 2, 3], lines
        assert len(lines[-1]["result"]["images"]) == 2
        assert _gone(url, a) and _gone(url, b)  # stopped; delivered
        after = _status(url)
    assert after["stopped"] == before["stopped"] + 1
    assert after["completed"] == before["completed"] + 1 and after["failed"] == before["failed"]


def test_a_job_that_ends_unfollowed_keeps_its_result_for_a_reattach(engine, paced, monkeypatch):
    """A job that ends while nobody follows it keeps its result until a reattach takes it (or
    KEEP_RESULT_S passes); only the newest KEEP_RESULTS such results are kept."""
    monkeypatch.setattr(jobs, "KEEP_RESULTS", 1)
    app = create_app(engine)
    with _serving(app) as url:
        before = _status(url)
        conn_a, resp_a = _open_stream(url, LONG)
        a = json.loads(resp_a.readline())["job"]
        ids = []
        for seed in (1, 2):  # queued behind A; their clients leave
            conn, resp = _open_stream(url, {**SHORT, "seed": seed})
            ids.append(json.loads(resp.readline())["job"])
            conn.close()
        _wait(lambda: _unfollowed(app, *ids))
        assert _stop(url, a) == {"job": a, "stopped": True}
        assert _until(resp_a, "error") == {"error": jobs.STOPPED}
        conn_a.close()
        _wait(lambda: _status(url)["completed"] == before["completed"] + 2)
        assert _gone(url, ids[0])  # the older result made room for the newer
        conn, resp = _follow(url, ids[1])
        lines = [json.loads(x) for x in resp.read().splitlines()]
        conn.close()
        assert lines[0] == {"job": ids[1], "queued": 0}
        assert lines[-1]["result"]["names"] == ["seed2-000000.png", "seed2-000001.png"]
        assert _gone(url, ids[1])  # delivered


def test_one_job_at_a_time_and_a_job_nobody_follows_is_stopped_after_the_grace(engine, paced):
    """One job runs at a time (the next waits behind it). A job whose client left without
    stopping it runs on for the grace period (`job_grace_s`, 20 s by default: time for a
    reload), then stops at its next network evaluation, queued or running, so an abandoned
    job does not hold the worker."""
    app = create_app(engine, job_grace_s=1.0)
    with _serving(app) as url:
        before = _status(url)
        conn_a, resp_a = _open_stream(url, LONG)
        a = json.loads(resp_a.readline())["job"]
        _until(resp_a, "progress")
        conn_b, resp_b = _open_stream(url, LONG)
        first = json.loads(resp_b.readline())
        b = first["job"]
        assert first == {"job": b, "queued": 1}  # waits behind the running job
        left = time.monotonic()
        conn_b.close()  # leaves while queued: its job never starts
        conn_a.close()  # leaves while running
        _wait(lambda: _status(url)["stopped"] == before["stopped"] + 2)
        assert time.monotonic() - left >= 1.0  # not before the grace
        now = _status(url)
        assert now["completed"] == before["completed"] and now["waiting"] == 0
        assert not now["running"] and _gone(url, a) and _gone(url, b)
        conn, resp = _open_stream(url, {"model": "run:tiny", "n": 2, "steps": 2})
        last = [json.loads(x) for x in resp.read().splitlines()][-1]
        conn.close()
        assert len(last["result"]["images"]) == 2  # and the server still serves


def _refused(url: str, path: str, body: dict) -> tuple[int, str]:
    """POST `body` as JSON to `path`, expecting a refusal: (status, its error)."""
    from urllib.error import HTTPError
    from urllib.request import Request, urlopen

    req = Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        urlopen(req, timeout=30).close()
    except HTTPError as e:
        return e.code, json.loads(e.read())["error"]
    raise AssertionError(f"{path} was not refused")


def test_a_job_named_by_its_client_is_followed_by_that_id_and_one_given_up_on_is_refused(
    engine, paced, monkeypatch
):
    """The page names each job itself (`?job=ID`) and keeps the id before it sends the request,
    so a reload in the moment before the stream's first line comes still finds the job. An id
    in use is refused (409), and so is one asked for (followed, stopped) before its job came:
    the page that asked has moved on, and the job would run unfollowed for the grace."""
    monkeypatch.setattr(jobs, "GIVEN_UP_KEPT", 3)
    app = create_app(engine)
    named = "00000000000000a1"
    with _serving(app) as url:
        before = _status(url)
        conn_a, resp_a = _open_stream(url, LONG, "/api/generate?job=" + named)
        assert json.loads(resp_a.readline()) == {"job": named, "queued": 0}
        _until(resp_a, "progress")
        code, error = _refused(url, "/api/generate?job=" + named, SHORT)
        assert code == 409 and error.startswith(f"job id {named} is in use, or was followed or ")
        for bad in ("xyz", "00000000000000A1", "", "0" * 17):
            code, error = _refused(url, "/api/generate?job=" + bad, SHORT)
            assert (code, error) == (400, "a job id is 16 hexadecimal digits, as the first line "
                                     f"of a job's stream gives it; got {bad!r}")  # fmt: skip
        conn, resp = _follow(url, named)  # a reload's page follows it by the name it chose
        assert json.loads(resp.readline()) == {"job": named, "queued": 0}
        assert _until(resp_a, "error") == {"error": jobs.TAKEN_OVER}
        assert _stop(url, named) == {"job": named, "stopped": True}
        for c in (conn, conn_a):
            c.close()
        # followed, or stopped, before its request came: the job is refused when it comes
        followed, stopped = "00000000000000b2", "00000000000000c3"
        assert _gone(url, followed)
        assert _refused(url, "/api/stop", {"job": stopped})[0] == 404
        for name in (followed, stopped):
            code, error = _refused(url, "/api/generate?job=" + name, SHORT)
            assert code == 409 and "the job is not started" in error, error
        for k in range(3):  # the ids given up on are kept GIVEN_UP_KEPT at most, newest
            assert _gone(url, f"00000000000000d{k}")
        assert list(app.state.jobs.given_up) == [f"00000000000000d{k}" for k in range(3)]
        _wait(lambda: not _status(url)["running"])  # the stop takes effect at its next step
        after = _status(url)
    assert after == {**before, "stopped": before["stopped"] + 1}  # none of the refused ran
    assert app.state.jobs.submitted == 1


def test_a_job_id_unknown_or_not_one_is_refused_with_the_reason(client):
    """/api/job and /api/stop name a job by the id its stream began with: none, one that is
    not an id, or one the server does not hold (delivered, stopped, expired) is refused
    with the reason; /api/stop takes JSON from this server's own page only."""
    before = client.get("/api/status").json()
    r = client.get("/api/job")
    assert r.status_code == 400
    assert r.json() == {"error": "no job given: send its id, the first line of its stream"}
    for bad in ("xyz", "../../etc/passwd", "0123456789ABCDEF", "0" * 17, "\x00" * 16, "a" * 5000):
        for r in (client.get("/api/job", params={"id": bad}),
                  client.post("/api/stop", json={"job": bad})):  # fmt: skip
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"] == (
                "a job id is 16 hexadecimal digits, as the first line of a job's stream gives "
                f"it; got {bad[:40]!r}"
            )
    for body in ({"job": 5}, {"job": ["0" * 16]}, {"job": None}, {}):
        r = client.post("/api/stop", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"].startswith(("a job id is", "no job given")), r.text
    unknown = "0123456789abcdef"
    for r in (client.get("/api/job", params={"id": unknown}),
              client.post("/api/stop", json={"job": unknown})):  # fmt: skip
        assert r.status_code == 404
        assert r.json()["error"] == (
            f"no job {unknown}: it was stopped, it ended and its result was delivered (or kept "
            f"over 5 minutes), the server was restarted, or its request (?job={unknown}) did "
            "not reach the server, and is refused should it come now; start it again"
        )
    r = client.post("/api/stop", content=json.dumps({"job": unknown}),
                    headers={"content-type": "text/plain"})  # fmt: skip
    assert r.status_code == 415
    r = client.post("/api/stop", json={"job": unknown}, headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and "this server's own page" in r.json()["error"]
    lines = stream(client.post("/api/generate", json={"model": "run:tiny", "n": 1, "steps": 1}))
    assert "result" in lines[-1]
    assert client.get("/api/job", params={"id": lines[0]["job"]}).status_code == 404  # delivered
    after = client.get("/api/status").json()
    assert after == {**before, "completed": before["completed"] + 1}


def test_a_request_addressed_to_another_name_is_a_403(web_server):
    """DNS rebinding: a page of another site whose domain is made to resolve to 127.0.0.1
    reaches the server under that domain's name, and could read its answers (a run's curves,
    images). A server on a loopback address answers only to local names."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(web_server)

    def get(host: str) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        conn.request("GET", "/api/info", headers={"Host": host})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        conn.close()
        return resp.status, body

    for host in (f"evil.example:{u.port}", "evil.example", f"127.0.0.1.evil.example:{u.port}"):
        status, body = get(host)
        assert status == 403, (host, body)
        assert body["error"] == (
            "this server answers to localhost and loopback addresses (127.0.0.1, ::1) only; the "
            f"request was addressed to {host!r} (to answer to that name too, behind a reverse "
            "proxy: serve --allow-host NAME)"
        )
    for host in (f"127.0.0.1:{u.port}", f"localhost:{u.port}", f"[::1]:{u.port}", "LocalHost"):
        status, body = get(host)
        assert status == 200 and "models" in body, (host, body)


def test_every_loopback_address_is_a_local_name(engine):
    """`serve --host 127.0.0.2` (any of 127.0.0.0/8 is loopback) printed its address and then
    refused it with a 403: only the literals 127.0.0.1 and ::1 were local names. An address
    literal cannot come from DNS rebinding, so every loopback one is served; names are not."""
    app = create_app(engine, local_names_only=True)
    with TestClient(app) as c:
        for host in ("127.0.0.2:7860", "127.255.0.9", "[0:0:0:0:0:0:0:1]:7860", "app.localhost"):
            r = c.get("/api/info", headers={"host": host})
            assert r.status_code == 200 and "models" in r.json(), (host, r.text)
        for host in ("127.0.0.2.evil.example", "128.0.0.1:7860", "[::2]:7860", "localhost.evil"):
            r = c.get("/api/info", headers={"host": host})
            assert r.status_code == 403 and repr(host) in r.json()["error"], (host, r.text)


def test_allow_host_serves_a_reverse_proxys_name_and_its_pages_posts(engine):
    """Behind a reverse proxy the loopback-only checks refused everything: a proxy passing its
    own Host got 403s from the Host check, one rewriting Host to 127.0.0.1 got them on every
    post (the page's Origin names the proxy). `serve --allow-host NAME` admits that name."""
    app = create_app(engine, local_names_only=True, allowed_hosts=("Proxy.Example",))
    job = {"model": "run:tiny", "n": 1, "steps": 1}
    with TestClient(app) as c:
        assert c.get("/api/info", headers={"host": "proxy.example"}).status_code == 200
        r = c.get("/api/info", headers={"host": "other.example"})
        assert r.status_code == 403 and "serve --allow-host NAME" in r.json()["error"]
        for host in ("proxy.example", "127.0.0.1:7860"):  # Host passed on, or rewritten
            r = c.post("/api/generate", json=job,
                       headers={"host": host, "origin": "https://proxy.example"})  # fmt: skip
            assert r.status_code == 200 and "result" in stream(r)[-1], (host, r.text)
        foreign = {"host": "127.0.0.1:7860", "origin": "https://evil.example"}
        r = c.post("/api/generate", json=job, headers=foreign)
        assert r.status_code == 403 and "this server's own page" in r.json()["error"]


def test_allow_host_takes_a_host_name_only(capsys):
    from animeddim.cli import main

    for bad in ("http://proxy.example", "proxy.example:443", "", "a b"):
        with pytest.raises(SystemExit) as e:
            main(["serve", "--allow-host", bad])
        assert e.value.code == 2
        assert "is not a host name (give it without scheme or port: example.org)" in (
            capsys.readouterr().err
        )
    args = build_parser().parse_args(["serve", "--allow-host", "Proxy.Example", "--allow-host",
                                      "::1"])  # fmt: skip
    assert args.allow_hosts == ["proxy.example", "::1"]


def test_a_malformed_host_or_origin_is_a_403_not_a_500(engine):
    """A Host or Origin with an unclosed IPv6 bracket made urlsplit raise: a 500 in plain
    text and a traceback in the server's terminal. Each is now refused like any other."""
    app = create_app(engine, local_names_only=True)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/api/info", headers={"host": "[::1"})
        assert r.status_code == 403 and "addressed to '[::1'" in r.json()["error"], r.text
        r = c.post("/api/generate", json={}, headers={"host": "localhost", "origin": "http://[::1"})
        assert r.status_code == 403, r.text
        assert r.json()["error"] == (
            "jobs are taken only from this server's own page; this request came from a page at "
            "'http://[::1'"
        )


def test_serve_warns_off_loopback_and_refuses_a_taken_port():
    import socket

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen(1)
        port = s.getsockname()[1]
        p = run_cli("serve", "--host", "0.0.0.0", "--port", str(port), check=False)
    assert p.returncode == 2
    assert "warning: serving on 0.0.0.0" in p.stderr
    assert f"port {port} on 0.0.0.0 is in use: choose another with --port" in p.stderr


def test_serve_refuses_a_host_it_cannot_listen_on_in_one_line():
    """`serve --host` given a URL, `host:port` or nothing, or an address that is not this
    machine's: a URL or an unknown name ended in `animeddim: error: Name or service not
    known` (exit 1, naming neither the host nor the remedy), an address of another machine
    in `Cannot assign requested address`, and an empty host listened on every interface."""
    for host in ("http://localhost:7860", "localhost:7860", "", " "):
        p = run_cli("serve", "--host", host, "--port", "0", check=False)
        assert p.returncode == 2, p.stderr
        assert p.stderr.strip().splitlines()[-1] == (
            f"animeddim serve: error: argument --host: {host!r} is not an address to listen "
            "on: give an address or name of this machine alone, without scheme or port "
            "(127.0.0.1: this machine only; 0.0.0.0: every network interface); the port goes "
            "in --port (see animeddim serve --help)"
        )
    # 192.0.2.1 is an address for documentation (RFC 5737): no machine has it
    for host in ("nosuch.invalid", "192.0.2.1"):  # the resolver's words for why vary
        p = run_cli("serve", "--host", host, "--port", "0", check=False)
        assert p.returncode == 2, p.stderr
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith(
            f"animeddim: error: --host '{host}' is not an address of this machine ("
        ), last
        assert last.endswith(
            "give one of its own, 127.0.0.1 (this machine only) or 0.0.0.0 (every network "
            "interface)"
        ), last
        assert "Traceback" not in p.stderr
    parser = build_parser()
    assert parser.parse_args(["serve", "--host", "[::1]"]).host == "::1"
    assert parser.parse_args(["serve", "--host", "0.0.0.0"]).host == "0.0.0.0"


def test_watch_a_run_shows_the_standard_kid_of_eval_every(runs, tmp_path):
    """A run trained with --eval-every has a standard_kid column; the watch API gives it as
    its own curve (None on the epochs it was not measured), and none for runs without."""
    from conftest import copy_run

    from animeddim.run_folder import METRIC_COLUMNS, append_metrics

    assert "standard_kid" in METRIC_COLUMNS
    run = copy_run(runs / "tiny", tmp_path / "runs" / "tiny")
    (run / "metrics.csv").unlink()
    for epoch, value in ((1, None), (2, 0.0123)):
        append_metrics(run, {"epoch": epoch, "step": 3 * epoch, "standard_kid": value})
    r = handlers.run_summary(Catalog([], tmp_path / "runs"), "run:tiny")
    assert r["series"]["epoch"] == [1.0, 2.0] and r["series"]["standard_kid"] == [None, 0.0123]
    plain = handlers.run_summary(Catalog([], runs), "run:tiny")["series"]
    assert plain["standard_kid"] == [None, None]


def test_watch_a_run_whose_metrics_are_damaged_is_a_400_naming_the_file(engine, runs, tmp_path):
    """metrics.csv that is not UTF-8 (or is a folder) was a 500 "Internal Server Error" in
    plain text, which the page showed as "the server cannot be reached"."""
    from conftest import copy_run

    copy_run(runs / "tiny", tmp_path / "latin1")
    (tmp_path / "latin1" / "metrics.csv").write_bytes(b"epoch,train_noise_loss\n1,\xff\xfe\n")
    copy_run(runs / "tiny", tmp_path / "folder")
    (tmp_path / "folder" / "metrics.csv").unlink()
    (tmp_path / "folder" / "metrics.csv").mkdir()
    app = create_app(Engine(Catalog([], tmp_path), device="cpu", precision="fp32"))
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/api/run", params={"id": "run:latin1"})
        assert r.status_code == 400
        assert r.json()["error"].startswith(
            "the metrics.csv of run:latin1 cannot be read: 'utf-8' codec can't decode byte 0xff"
        )
        assert str(tmp_path) not in r.json()["error"]  # a path never leaves the server
        r = c.get("/api/run", params={"id": "run:folder"})
        assert r.status_code == 400
        assert r.json()["error"] == "the metrics.csv of run:folder cannot be read: Is a directory"


@pytest.mark.parametrize(("sig", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_stopping_the_server_mid_job_ends_the_stream_with_a_reason_and_no_traceback(
    web_runs, sig, code
):
    """Ctrl-C (or SIGTERM) of `animeddim serve` while a page streamed a job printed a
    58-line uvicorn traceback ("Cancel 1 running task(s), timeout graceful shutdown
    exceeded") and the page said "network error"; the stream now ends with the reason."""
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "animeddim", "serve", "--model", "avatars-64",
         "--runs", str(web_runs), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        for line in proc.stdout:
            if "ready at " in line:
                url = line.split("ready at ", 1)[1].split()[0].rstrip("/")
                break
        long = {"model": "avatars-64", "n": 64, "steps": 250, "sampler": "ddim"}
        conn, resp = _open_stream(url, long)
        while "progress" not in json.loads(resp.readline()):
            pass  # the job runs
        proc.send_signal(getattr(signal, sig))
        last = [json.loads(x) for x in resp.read().splitlines()][-1]
        conn.close()
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert last == {"error": "the server is stopping (Ctrl-C or a signal): the job was ended; "
                    "start it again and retry"}, out  # fmt: skip
    assert proc.returncode == code, out
    assert "Traceback" not in out and "ERROR" not in out, out


def test_a_job_stopped_after_its_stream_ended_logs_nothing():
    """A stream that ends first (the client left, the server stops) never read its job's
    Stopped; once the future was collected asyncio logged "Future exception was never
    retrieved" with a traceback, which once failed the SIGTERM test above."""
    import asyncio
    import gc
    import threading

    from animeddim.apps.web.handlers import Stopped
    from animeddim.apps.web.jobs import JobQueue

    logged = []

    def stopped_job() -> dict:
        raise Stopped

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: logged.append(ctx))
        done = threading.Event()
        fut = JobQueue().submit(stopped_job, threading.Event())
        fut.add_done_callback(lambda f: done.set())
        while not done.is_set():
            await asyncio.sleep(0.01)
        del fut  # never awaited, as by a stream that has ended
        gc.collect()
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert logged == []


def test_a_body_that_never_all_arrives_is_a_408_not_a_connection_held_for_ever(engine):
    """A client announcing more body than it sends (Content-Length 200, part of it sent) held
    its connection, and a task of the server, for ever. After the body timeout it gets a 408
    naming it; nothing is queued. A live server: the test client sends whole bodies only."""
    import http.client
    import socket
    import threading

    import uvicorn

    from animeddim.apps.web import bind

    app = create_app(engine, body_timeout_s=0.5)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        port = sock.getsockname()[1]
        part = '--x\r\nContent-Disposition: form-data; name="model"\r\n\r\nrun:'
        cases = (("/api/generate", "application/json", '{"model": "run:'),
                 ("/api/invert", "multipart/form-data; boundary=x", part))  # fmt: skip
        for path, ctype, sent in cases:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                c.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}"
                          f"\r\nContent-Length: 200\r\n\r\n{sent}".encode())  # fmt: skip
                answer = http.client.HTTPResponse(c)
                answer.begin()
                body = json.loads(answer.read())
            assert answer.status == 408, body
            assert body == {"error": "the request body did not all arrive within 0.5 s"}
        assert app.state.queue.status()["waiting"] == 0
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_body_of_the_wrong_content_type_is_a_415_naming_it(client):
    """JSON sent to a form endpoint was read as an empty form ("unknown model 'None'"), and
    Generate read JSON under any Content-Type (text/plain: what another site's page may post
    without asking). Both are a 415 naming the type to send; nothing is queued."""
    before = client.get("/api/status").json()
    body = json.dumps({"model": "run:tiny", "n": 1, "steps": 1})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": ctype} if ctype else {}
        r = client.post("/api/generate", content=body, headers=headers)
        assert r.status_code == 415, (ctype, r.text)
        shown = repr(ctype) if ctype else "none"
        assert r.json()["error"] == (
            "send the request as JSON (Content-Type: application/json); "
            f"the Content-Type was {shown}"
        )
    for path in ("/api/invert", "/api/interpolate", "/api/edit"):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 415, (path, r.text)
        assert r.json()["error"] == (
            "send the fields and files as a form (multipart/form-data, as the page does); "
            "the Content-Type was 'application/json'"
        )
    r = client.post("/api/generate", content=body,
                    headers={"content-type": "Application/JSON; charset=utf-8"})  # fmt: skip
    assert r.status_code == 200 and "result" in stream(r)[-1]
    after = client.get("/api/status").json()
    assert after["completed"] == before["completed"] + 1 and after["failed"] == before["failed"]


def test_a_job_posted_by_another_sites_page_is_a_403(client, avatars16):
    """A page of any site the user visits could post a form to 127.0.0.1 and start jobs
    (invert, interpolate, edit take plain multipart forms). A browser names the posting
    page's origin: one other than this server's own is refused before anything is queued;
    clients that send no Origin (curl, scripts) are served as before."""
    before = client.get("/api/status").json()
    face = sorted(avatars16.glob("*.png"))[0].read_bytes()
    for origin in ("http://evil.example", "http://testserver:8080", "null"):
        r = client.post("/api/invert", data={"model": "run:tiny", "steps": "2"},
                        files={"face": ("f.png", face)}, headers={"origin": origin})  # fmt: skip
        assert r.status_code == 403, (origin, r.text)
        assert r.json()["error"] == (
            "jobs are taken only from this server's own page; this request came from a "
            f"page at {origin!r}"
        )
        r = client.post("/api/generate", json={"model": "run:tiny"}, headers={"origin": origin})
        assert r.status_code == 403 and "this server's own page" in r.json()["error"]
    assert client.get("/api/status").json() == before  # nothing queued
    r = client.post("/api/generate", json={"model": "run:tiny", "n": 1, "steps": 1},
                    headers={"origin": "http://testserver"})  # fmt: skip
    assert r.status_code == 200 and "result" in stream(r)[-1]  # its own page


def test_an_unknown_or_missing_run_or_model_lists_what_can_be_chosen(client, runs):
    """/api/run without an id said "unknown model 'None'" and offered the shipped models,
    which it then refused ("... is a shipped model, not a run folder"); a request without a
    model said "unknown model 'None'"."""
    cases = {
        None: "no run given: choose one of run:colours, run:empty, run:labelled, run:tiny",
        "run:nope": "unknown run 'run:nope': choose one of run:colours, run:empty, "
        "run:labelled, run:tiny",
        "../tiny": "unknown run '../tiny': choose one of run:colours",
    }
    for run_id, reason in cases.items():
        r = client.get("/api/run", params={"id": run_id} if run_id else {})
        assert r.status_code == 400 and r.json()["error"].startswith(reason), r.json()
    cat = Catalog(["avatars-64"], None)
    with pytest.raises(RequestError, match="^avatars-64 is a shipped model, not a run folder$"):
        cat.run("avatars-64")
    with pytest.raises(RequestError, match="^there is no run folder to watch: start the server"):
        cat.run("run:tiny")
    r = client.post("/api/generate", json={"n": 1})
    assert r.status_code == 400
    assert r.json()["error"] == "no model given: choose one of run:colours, run:labelled, run:tiny"


def test_an_unknown_api_path_or_method_is_json_naming_what_exists(client):
    """Under /api/ an unknown path or a method a route does not take was Starlette's plain
    text ("Not Found", "Method Not Allowed"), unlike every other refusal of the API."""
    endpoints = ("/api/info, /api/status, /api/generate, /api/interpolate, /api/invert, "
                 "/api/edit, /api/job, /api/stop, /api/run")  # fmt: skip
    for path in ("/api/", "/api/jobs/42", "/api/%2e%2e/etc/passwd", "/api/cancel?id=x"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert r.json()["error"].startswith("no API endpoint '/api/") and endpoints in r.text
    r = client.delete("/api/generate")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json() == {"error": "DELETE is not accepted by /api/generate; send POST"}
    r = client.get("/api/generate")
    assert r.json()["error"] == "GET is not accepted by /api/generate; send POST"
    r = client.put("/api/info")
    assert r.status_code == 405  # Starlette lists the methods in no fixed order
    assert r.json()["error"] in [f"PUT is not accepted by /api/info; send {m}"
                                 for m in ("GET, HEAD", "HEAD, GET")]  # fmt: skip
    assert client.get("/nope").text == "Not Found"  # outside the API: as before
    assert client.options("/").status_code == 405
