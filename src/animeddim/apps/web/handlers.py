"""What the web app does, without HTTP: model choices, request checks, uploads, jobs.

Every function here takes plain values (dicts from a form or JSON body, upload bytes) and
returns JSON-able dicts; `server` only moves them over HTTP. The model work goes through
`animeddim.pipelines`. A request names a model by the id shown in the page, never by a path.
"""

from __future__ import annotations

import base64
import csv
import io
import math
import shlex
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ... import pipelines
from ...diffusion.samplers import SAMPLERS
from ...io import png_bytes, save_png, tile
from ...pretrained import SHIPPED

# One list of limits: the server checks them and the page shows them.
LIMITS: dict[str, tuple[float, float]] = {
    "seed": (0, 2**31 - 1),
    "n": (1, 64),
    "steps": (1, 250),
    "eta": (0.0, 1.0),
    "frames": (2, 32),
    "seed_b": (0, 2**31 - 1),
    "guidance": (0.0, 20.0),
}
LABELS = {"n": "images (n)", "seed_b": "seed B"}  # the page's words where they differ
DEFAULTS = {"seed": 0, "n": 16, "steps": 10, "sampler": "dpmpp-2m", "eta": 0.0, "frames": 12}
MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MAX_UPLOAD_PIXELS = 4096 * 4096
MIN_UPLOAD_SIDE = 16
CACHED_MODELS = 2  # prepared networks kept in memory


class RequestError(ValueError):
    """A request the page must refuse; the message is shown to the user as is."""


class Stopped(Exception):
    """The client went away: the job stops at its next network evaluation."""


# --- model choices ------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """A model or run folder the page offers. `path` never leaves the server."""

    id: str
    label: str
    kind: str  # "shipped" | "run"
    path: Path
    can_sample: bool
    has_metrics: bool


class Catalog:
    """The shipped models plus the run folders directly under `runs_dir` (rescanned on use,
    so a run started after the server appears)."""

    def __init__(self, shipped: list[str], runs_dir: Path | None):
        unknown = [m for m in shipped if m not in SHIPPED]
        if unknown:
            raise RequestError(
                f"unknown model {unknown[0]!r}: shipped models are {', '.join(sorted(SHIPPED))}"
            )
        self.shipped, self.runs_dir = shipped, runs_dir

    def choices(self) -> list[Choice]:
        from ...pretrained import pretrained_path

        out = [
            Choice(m, f"{m} (shipped)", "shipped", pretrained_path(m), True, False)
            for m in self.shipped
        ]
        if self.runs_dir is not None and self.runs_dir.is_dir():
            for d in sorted(p for p in self.runs_dir.iterdir() if p.is_dir()):
                ckpt = (d / "checkpoints" / "last.safetensors").is_file()
                metrics = (d / "metrics.csv").is_file()
                if ckpt or metrics or (d / "config.json").is_file():
                    out.append(Choice(f"run:{d.name}", f"{d.name} (run)", "run", d, ckpt, metrics))
        return out

    def get(self, choice_id: Any, *, sample: bool = True) -> Choice:
        for c in self.choices():
            if c.id == choice_id:
                if sample and not c.can_sample:
                    raise RequestError(f"run {c.id[4:]!r} has no checkpoint yet")
                return c
        names = ", ".join(c.id for c in self.choices() if c.can_sample or not sample)
        raise RequestError(f"unknown model {str(choice_id)[:80]!r}: choose one of {names}")


def vocabulary(config: dict[str, Any]) -> dict[str, list[str]] | None:
    """attribute -> values of a conditional model, read from its stored config; None for an
    unconditional one."""
    for section in (config, *(config.get(k) or {} for k in ("model", "data", "cond"))):
        vocab = section.get("vocabulary") if isinstance(section, dict) else None
        if isinstance(vocab, dict) and vocab:
            return {str(k): [str(v) for v in vals] for k, vals in vocab.items()}
    return None


# --- request checks -----------------------------------------------------------------------


def _number(body: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    raw = body.get(name, default if default is not None else DEFAULTS.get(name))
    lo, hi = LIMITS[name]
    word = "an integer" if kind is int else "a number"
    shown = LABELS.get(name, name)
    try:
        if isinstance(raw, bool) or raw is None or str(raw).strip() == "":
            raise ValueError
        value = float(raw)
        if kind is int:
            if not value.is_integer():
                raise ValueError
            value = int(value)
    except (TypeError, ValueError, OverflowError):
        raise RequestError(f"{shown} must be {word} from {lo:g} to {hi:g}, got {raw!r}") from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise RequestError(f"{shown} must be {word} from {lo:g} to {hi:g}, got {raw!r}")
    return value


def _sampler(body: dict[str, Any]) -> tuple[str, float, bool | None]:
    sampler = body.get("sampler", DEFAULTS["sampler"])
    if sampler not in SAMPLERS:
        raise RequestError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    eta = _number(body, "eta", float)
    if eta != 0 and not SAMPLERS[sampler].stochastic:
        raise RequestError(f"eta must be 0 for {sampler} (it is deterministic); use ddim for eta")
    clip = body.get("clip", "default")
    if clip not in ("default", "on", "off"):
        raise RequestError(f"clip must be default, on or off, got {clip!r}")
    return sampler, eta, {"default": None, "on": True, "off": False}[clip]


@dataclass
class GenerateRequest:
    model: Choice
    seed: int
    n: int
    steps: int
    sampler: str
    eta: float
    clip: bool | None
    attributes: dict[str, str] = field(default_factory=dict)
    guidance: float = 1.0
    mix: bool = False  # the attributes not asked are drawn as the training labels have them


def parse_generate(body: dict[str, Any], catalog: Catalog) -> GenerateRequest:
    """Check a Generate request; RequestError names the first bad field."""
    model = catalog.get(body.get("model"))
    sampler, eta, clip = _sampler(body)
    req = GenerateRequest(
        model=model,
        seed=_number(body, "seed", int),
        n=_number(body, "n", int),
        steps=_number(body, "steps", int),
        sampler=sampler,
        eta=eta,
        clip=clip,
    )
    attrs = {k: v for k, v in (body.get("attributes") or {}).items() if v not in ("", "any")}
    mix = body.get("mix", "none")
    if mix not in ("none", "training"):
        raise RequestError(f"mix must be 'none' or 'training', got {str(mix)[:40]!r}")
    req.mix = mix == "training"
    if attrs:  # checked against the loaded model's vocabulary when it is drawn
        req.attributes = {str(k): str(v) for k, v in attrs.items()}
    if attrs or req.mix:
        req.guidance = _number(body, "guidance", float, default=1.0)
    return req


def check_interpolate(body: dict[str, Any], uploads: int, catalog: Catalog) -> None:
    """Refuse a bad Interpolate request before it waits in the queue."""
    catalog.get(body.get("model"))
    _number(body, "frames", int)
    _number(body, "steps", int)
    if uploads not in (0, 2):
        raise RequestError("upload two faces, or none to use the two seeds")
    if not uploads:
        _number(body, "seed", int)
        _number(body, "seed_b", int, default=1)
        _sampler({**body, "eta": 0})


def check_invert(body: dict[str, Any], uploads: int, catalog: Catalog) -> None:
    """Refuse a bad Invert request before it waits in the queue."""
    catalog.get(body.get("model"))
    _number(body, "steps", int)
    if uploads != 1:
        raise RequestError("choose an image file to invert")


KEEP = "keep"  # the page's choice for an attribute an edit leaves as it is


def parse_changes(raw: Any, vocab: dict[str, list[str]] | None, model_id: str) -> dict[str, str]:
    """The attributes an Edit request changes (a JSON object attribute -> value; "keep" or ""
    leaves one as it is), checked against the model's vocabulary."""
    import json

    from ...conditioning import UnknownAttribute, encode

    if not vocab:
        raise RequestError(f"{model_id} is unconditional: it has no attributes to edit")
    try:
        changes = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        changes = None
    if not isinstance(changes, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in changes.items()
    ):
        raise RequestError("changes must be a JSON object of attribute names to values")
    changes = {k: v for k, v in changes.items() if v not in ("", KEEP)}
    if not changes:
        raise RequestError("choose a new value for at least one attribute (all are 'keep')")
    try:
        encode(vocab, changes)
    except UnknownAttribute as e:
        raise RequestError(str(e)) from None
    return changes


def check_edit(body: dict[str, Any], uploads: int, catalog: Catalog) -> dict[str, str]:
    """Refuse a bad Edit request before it waits in the queue; the changes it asks for."""
    choice = catalog.get(body.get("model"))
    _number(body, "steps", int)
    _number(body, "guidance", float, default=1.0)
    if uploads != 1:
        raise RequestError("choose an image file to edit")
    return parse_changes(body.get("changes"), _choice_vocabulary(choice), choice.id)


def cli_command(req: GenerateRequest, runs_arg: str | None, device: str, precision: str) -> str:
    """The `animeddim sample` command that writes the same images (and grid)."""
    if req.model.kind == "shipped":
        src = ["--model", req.model.id]
    else:
        src = ["--run", str(Path(runs_arg or ".") / req.model.id[4:])]
    args = ["animeddim", "sample", *src, "--n", str(req.n), "--steps", str(req.steps)]
    args += ["--seed", str(req.seed), "--sampler", req.sampler]
    if req.eta:
        args += ["--eta", f"{req.eta:g}"]
    if req.clip is not None:
        args.append("--clip-x0" if req.clip else "--no-clip-x0")
    if req.mix:
        args += ["--attrs-from", "training"]
    for k, v in req.attributes.items():
        args += ["--attr", f"{k}={v}"]
    if (req.attributes or req.mix) and req.guidance != 1.0:
        args += ["--guidance", f"{req.guidance:g}"]
    if device != "auto":
        args += ["--device", device]
    if precision != "auto":
        args += ["--precision", precision]
    args += ["--grid", "grid.png", "--out", "samples/"]
    return shlex.join(args)


# --- uploads ------------------------------------------------------------------------------


def decode_upload(data: bytes, size: int) -> tuple[np.ndarray, list[str]]:
    """An uploaded face -> uint8 [size x size x 3] (central square, resized) and notes for the
    user about what was converted. RequestError for anything unusable."""
    from PIL import Image, UnidentifiedImageError

    from ...data import BadImage, load_image

    if not data:
        raise RequestError("the file is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        mb = MAX_UPLOAD_BYTES // 2**20
        raise RequestError(f"the file is {len(data):,} bytes; the limit is {mb} MB")
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            (w, h), mode, fmt = im.size, im.mode, im.format
    except Image.DecompressionBombError:
        raise RequestError("the image is far too large (decompression bomb?)") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise RequestError(
            "this file is not an image that can be read (PNG, JPEG, WebP, ...)"
        ) from None
    if w * h > MAX_UPLOAD_PIXELS:
        raise RequestError(f"the image is {w}x{h} pixels; the limit is 16 megapixels")
    if min(w, h) < MIN_UPLOAD_SIDE:
        raise RequestError(
            f"the image is only {w}x{h} pixels; give one of at least "
            f"{MIN_UPLOAD_SIDE}x{MIN_UPLOAD_SIDE}"
        )
    with tempfile.TemporaryDirectory(prefix="animeddim-upload-") as tmp:
        path = Path(tmp) / f"upload.{(fmt or 'img').lower()}"
        path.write_bytes(data)
        try:
            image = load_image(path, size)
        except BadImage as e:
            raise RequestError(f"this image cannot be used: {e}") from None
    notes = []
    if mode == "CMYK":
        notes.append("converted from CMYK to RGB")
    elif mode.startswith("I"):
        notes.append("16-bit image scaled to 8 bits")
    if w != h:
        notes.append("cropped to its central square")
    if (w, h) != (size, size):
        notes.append(f"resized from {w}x{h} to the model's {size}x{size}")
    return image, notes


# --- jobs ---------------------------------------------------------------------------------


def png_data_url(pixels: np.ndarray) -> str:
    """uint8 [H x W x C] pixels as a data: URL (the page needs no files from the server)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(pixels)).decode()


def _file_data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


class Progress:
    """Counts network evaluations of one job; raises Stopped once `stop` is set."""

    def __init__(self, total: int, report: Callable[[int, int], None], stop: threading.Event):
        self.total, self.done, self.report, self.stop = max(total, 1), 0, report, stop
        self.unit = "network evaluation"  # what is counted, in the page's words

    def __call__(self, batch: int) -> None:
        if self.stop.is_set():
            raise Stopped
        self.done += 1
        self.report(min(self.done, self.total), self.total)


class Engine:
    """Loads and prepares each model once (per checkpoint version) and runs the jobs.
    Not thread-safe: the server calls it from one worker thread."""

    def __init__(self, catalog: Catalog, device: str = "auto", precision: str = "auto"):
        self.catalog, self.device_arg, self.precision_arg = catalog, device, precision
        self.base = pipelines.resolve_settings(device, precision, compile=False)
        self._models: dict[tuple, tuple[Any, torch.nn.Module]] = {}

    def prepared(self, choice: Choice):
        """(LoadedModel, prepared sampling network), cached by checkpoint file version."""
        from ...checkpoint import resolve

        f = choice.path if choice.kind == "shipped" else resolve(choice.path)
        st = f.stat()
        key = (choice.id, st.st_mtime_ns, st.st_size)
        if key not in self._models:
            from ...checkpoint import CheckpointError

            try:
                loaded = pipelines.open_model(f, self.base.device)
            except CheckpointError as e:
                raise RequestError(f"{choice.id} cannot be loaded: {e}") from None
            net = pipelines.sampling_net(loaded, self.base, 0)
            while len(self._models) >= CACHED_MODELS:
                self._models.pop(next(iter(self._models)))
            self._models[key] = (loaded, net)
        return self._models[key]

    def warm_up(self, choice: Choice) -> float:
        """Load, prepare and run the model once so the first request is warm; seconds."""
        t = time.perf_counter()
        loaded, net = self.prepared(choice)
        pipelines.draw(loaded, 16, replace(self.base, steps=2, sampler="dpmpp-2m"), net=net)
        return time.perf_counter() - t

    def info(self) -> dict[str, Any]:
        models = []
        for c in self.catalog.choices():
            entry = {"id": c.id, "label": c.label, "kind": c.kind, "can_sample": c.can_sample}
            entry["has_metrics"] = c.has_metrics
            entry["vocabulary"] = _choice_vocabulary(c)
            entry["guidance"], entry["guidance_interval"] = _choice_guidance(c)
            models.append(entry)
        return {
            "models": models,
            "samplers": list(SAMPLERS),
            "sampler_help": {k: v.help for k, v in SAMPLERS.items()},
            "stochastic": [k for k, v in SAMPLERS.items() if v.stochastic],
            "limits": {k: list(v) for k, v in LIMITS.items()},
            "defaults": DEFAULTS,
            "max_upload_mb": MAX_UPLOAD_BYTES // 2**20,
            "device": str(self.base.device),
            "precision": self.base.precision,
        }

    def generate(self, req: GenerateRequest, progress: Progress, runs_arg: str | None) -> dict:
        loaded, net = self.prepared(req.model)
        s = replace(self.base, seed=req.seed, steps=req.steps, sampler=req.sampler, eta=req.eta)
        s = replace(s, clip=req.clip)
        progress.total = math.ceil(req.n / s.batch_size) * req.steps
        progress.unit = "denoising step" if req.n <= s.batch_size else "network evaluation"
        t = time.perf_counter()
        observed = pipelines.observed(net, progress)
        if req.attributes or req.mix:
            from ...conditioning import UnknownAttribute

            try:
                if req.mix:  # image i: row i of the training labels, the asked values set
                    codes = pipelines.rows_from(loaded, "training", req.attributes)
                else:
                    codes = pipelines.attribute_codes(loaded, req.attributes)[None]
            except UnknownAttribute as e:
                raise RequestError(str(e)) from None
            # guided: both halves in one evaluation
            images = pipelines.draw_per_image(loaded, req.n, s, codes, req.guidance, net=observed)
        else:
            images = pipelines.draw(loaded, req.n, s, net=observed)
        seconds = time.perf_counter() - t
        pixels = images.numpy()
        return {
            "images": [png_data_url(im) for im in pixels],
            "names": [f"seed{req.seed}-{i:06d}.png" for i in range(req.n)],
            "grid": png_data_url(tile(pixels, cols=min(8, req.n))),  # as `sample --grid`
            "command": cli_command(req, runs_arg, self.device_arg, self.precision_arg),
            "seconds": round(seconds, 2),
        }

    def interpolate(
        self, body: dict[str, Any], uploads: list[bytes], progress: Progress
    ) -> dict[str, Any]:
        choice = self.catalog.get(body.get("model"))
        frames = _number(body, "frames", int)
        steps = _number(body, "steps", int)
        loaded, net = self.prepared(choice)
        size = loaded.config.model.image_size
        notes: list[str] = []
        with tempfile.TemporaryDirectory(prefix="animeddim-web-") as tmp:
            kw: dict[str, Any]
            if uploads:
                if len(uploads) != 2:
                    raise RequestError("upload two faces, or none to use the two seeds")
                paths = []
                for k, data in enumerate(uploads):
                    image, why = decode_upload(data, size)
                    notes += [f"face {k + 1}: {w}" for w in why]
                    paths.append(Path(tmp) / f"face{k}.png")
                    save_png(paths[-1], image)
                kw = {"images": tuple(paths), "invert_steps": steps}
                progress.total = 2 * pipelines.invert_evaluations(steps) + steps
                s = self.base
            else:
                seeds = (_number(body, "seed", int), _number(body, "seed_b", int, default=1))
                sampler, eta, clip = _sampler({**body, "eta": 0})
                s = replace(self.base, steps=steps, sampler=sampler, clip=clip)
                kw = {"seeds": seeds}
                progress.total = math.ceil(frames / s.batch_size) * steps
            obs = replace(loaded, model=pipelines.observed(net, progress))
            strip, gif = pipelines.interpolate(
                obs, Path(tmp) / "interpolation", frames=frames, settings=s, **kw
            )
            return {
                "strip": _file_data_url(strip, "image/png"),
                "gif": _file_data_url(gif, "image/gif"),
                "notes": notes,
            }

    def invert(self, body: dict[str, Any], upload: bytes, progress: Progress) -> dict[str, Any]:
        choice = self.catalog.get(body.get("model"))
        steps = _number(body, "steps", int)
        loaded, net = self.prepared(choice)
        image, notes = decode_upload(upload, loaded.config.model.image_size)
        progress.total = pipelines.invert_evaluations(steps) + steps
        with tempfile.TemporaryDirectory(prefix="animeddim-web-") as tmp:
            src = Path(tmp) / "in"
            src.mkdir()
            save_png(src / "face.png", image)
            obs = replace(loaded, model=pipelines.observed(net, progress))
            r = pipelines.invert(obs, src, Path(tmp) / "out", steps=steps, settings=self.base)
            recon = Path(tmp) / "out" / "reconstructions" / "face.png"
            return {
                "original": png_data_url(image),
                "reconstruction": _file_data_url(recon, "image/png"),
                "psnr_db": round(r["mean_psnr_db"], 2),
                "steps": steps,
                "notes": notes,
            }

    def edit(self, body: dict[str, Any], upload: bytes, progress: Progress) -> dict[str, Any]:
        """Invert an uploaded face under no attributes, then decode its noise twice: as it
        was (the reconstruction) and under the changed attributes (the edit)."""
        from ...conditioning import NULL
        from ...diffusion.inversion import psnr

        choice = self.catalog.get(body.get("model"))
        steps = _number(body, "steps", int)
        guidance = _number(body, "guidance", float, default=1.0)
        loaded, net = self.prepared(choice)
        changes = parse_changes(body.get("changes"), pipelines.vocabulary(loaded), choice.id)
        image, notes = decode_upload(upload, loaded.config.model.image_size)
        source = torch.full((1, len(pipelines.vocabulary(loaded))), NULL, dtype=torch.long)
        target = pipelines.edit_codes(loaded, source, changes)
        progress.total = pipelines.invert_evaluations(steps) + 2 * steps
        obs = replace(loaded, model=pipelines.observed(net, progress))
        real = torch.from_numpy(image.copy())[None]
        recon, edited = pipelines.regenerate(
            obs, real, source, [source, target], steps=steps, guidance=guidance,
            settings=self.base,
        )  # fmt: skip
        return {
            "original": png_data_url(image),
            "reconstruction": png_data_url(recon[0].numpy()),
            "edited": png_data_url(edited[0].numpy()),
            "psnr_db": round(float(psnr(real, recon)[0]), 2),
            "changes": changes,
            "guidance": guidance,
            "steps": steps,
            "notes": notes,
        }


def _choice_vocabulary(c: Choice) -> dict[str, list[str]] | None:
    import json

    cfg = c.path / "config.json" if c.kind == "run" else c.path.with_suffix(".config.json")
    try:
        return vocabulary(json.loads(cfg.read_text(encoding="utf-8")))
    except (OSError, ValueError, AttributeError):
        return None


def _choice_guidance(c: Choice) -> tuple[float, str]:
    """The guidance weight and interval ('LO,HI' in sigma) a shipped model's file recommends
    (`export --guidance`, `--guidance-interval`), else 1 at every noise level."""
    from ...checkpoint import CheckpointError, read_meta, recommended_guidance
    from ...checkpoint import recommended_guidance_interval as interval
    from ...config import GUIDE_ALWAYS, guidance_interval_text

    if c.kind == "shipped":
        try:
            meta = read_meta(c.path)
            return recommended_guidance(meta), guidance_interval_text(interval(meta))
        except CheckpointError:
            pass
    return 1.0, guidance_interval_text(GUIDE_ALWAYS)


# --- watching a run -----------------------------------------------------------------------


def run_summary(catalog: Catalog, choice_id: Any) -> dict[str, Any]:
    """A run folder's curves (per epoch: train/validation noise loss, paper-protocol KID)
    and its latest sample grid, for the page to draw."""
    choice = catalog.get(choice_id, sample=False)
    if choice.kind != "run":
        raise RequestError(f"{choice.id} is a shipped model, not a run folder")
    series: dict[str, list] = {"epoch": [], "train_noise_loss": [], "val_noise_loss": [], "kid": []}
    try:
        with open(choice.path / "metrics.csv", newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                for k in series:
                    series[k].append(_float_or_none(row.get(k)))
    except FileNotFoundError:
        pass
    samples = sorted((choice.path / "samples").glob("epoch-*.png"))
    latest = None
    if samples:
        try:
            latest = {"name": samples[-1].name, "url": _file_data_url(samples[-1], "image/png")}
        except OSError:  # rotated away between listing and reading
            latest = None
    return {"id": choice.id, "series": series, "latest_sample": latest}


def _float_or_none(s: str | None) -> float | None:
    try:
        v = float(s) if s not in (None, "") else None
    except ValueError:
        return None
    return v if v is not None and math.isfinite(v) else None
