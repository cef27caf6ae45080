"""What a web request may ask, checked before it waits in the queue: the model choices,
the fields' limits, the attribute changes of an edit, and uploaded images.

Every function takes plain values (dicts from a form or JSON body, upload bytes); a bad
request raises RequestError with the words the page shows. A request names a model by the id
shown in the page, never by a path.
"""

from __future__ import annotations

import io
import math
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...conditioning import attribute_weights_text
from ...diffusion.samplers import SAMPLERS
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


class RequestError(ValueError):
    """A request the page must refuse; the message is shown to the user as is."""


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
        if choice_id is None or choice_id == "":
            raise RequestError(f"no model given: choose one of {names}")
        raise RequestError(f"unknown model {str(choice_id)[:80]!r}: choose one of {names}")

    def run(self, choice_id: Any) -> Choice:
        """The run folder `choice_id` names, for watching; the error lists the runs only."""
        runs = [c for c in self.choices() if c.kind == "run"]
        for c in runs:
            if c.id == choice_id:
                return c
        if choice_id in self.shipped:
            raise RequestError(f"{choice_id} is a shipped model, not a run folder")
        if not runs:
            raise RequestError("there is no run folder to watch: start the server with --runs DIR")
        names = ", ".join(c.id for c in runs)
        if choice_id is None or choice_id == "":
            raise RequestError(f"no run given: choose one of {names}")
        raise RequestError(f"unknown run {str(choice_id)[:80]!r}: choose one of {names}")


def vocabulary(config: dict[str, Any]) -> dict[str, list[str]] | None:
    """attribute -> values of a conditional model, read from its stored config; None for an
    unconditional one."""
    for section in (config, *(config.get(k) or {} for k in ("model", "data", "cond"))):
        vocab = section.get("vocabulary") if isinstance(section, dict) else None
        if isinstance(vocab, dict) and vocab:
            return {str(k): [str(v) for v in vals] for k, vals in vocab.items()}
    return None


def choice_vocabulary(c: Choice) -> dict[str, list[str]] | None:
    import json

    cfg = c.path / "config.json" if c.kind == "run" else c.path.with_suffix(".config.json")
    try:
        return vocabulary(json.loads(cfg.read_text(encoding="utf-8")))
    except (OSError, ValueError, AttributeError):
        return None


def shipped_meta(c: Choice) -> dict[str, Any] | None:
    """The header of a shipped model's file (its recommendations: `choice_guidance`,
    `choice_sampling`), read once; None for other models or an unreadable file."""
    from ...checkpoint import CheckpointError, read_meta

    if c.kind != "shipped":
        return None
    try:
        return read_meta(c.path)
    except CheckpointError:
        return None


def choice_guidance(meta: dict[str, Any] | None) -> tuple[float, str]:
    """The guidance weight and interval ('LO,HI' in sigma) a shipped model's file recommends
    (`export --guidance`, `--guidance-interval`; `meta` from `shipped_meta`), else 1 at every
    noise level."""
    from ...checkpoint import CheckpointError, recommended_guidance
    from ...checkpoint import recommended_guidance_interval as interval
    from ...config import GUIDE_ALWAYS, guidance_interval_text

    if meta is not None:
        try:
            return recommended_guidance(meta), guidance_interval_text(interval(meta))
        except CheckpointError:
            pass
    return 1.0, guidance_interval_text(GUIDE_ALWAYS)


def _recommended(meta: dict[str, Any] | None, read: Any, default: Any) -> Any:
    """`read(meta)` (a `checkpoint.recommended_*`), else `default` for no file or an
    unusable recommendation (the page keeps its own)."""
    from ...checkpoint import CheckpointError

    try:
        return read(meta) if meta is not None else default
    except CheckpointError:
        return default


def choice_edit_guidance(meta: dict[str, Any] | None) -> float:
    """The guidance weight a shipped model's file recommends for edits (`export
    --edit-guidance`, else its `--guidance`), else 1."""
    from ...checkpoint import recommended_edit_guidance

    return _recommended(meta, recommended_edit_guidance, 1.0)


def choice_attribute_guidance(meta: dict[str, Any] | None) -> dict[str, float]:
    """The per-attribute guidance weights a shipped model's file recommends with its weight
    (`export --attr-guidance`), else {}: sampling at the file's weight uses them."""
    from ...checkpoint import recommended_attribute_guidance

    return _recommended(meta, recommended_attribute_guidance, {})


def choice_sampling(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """{"sampler", "steps"} a shipped model's file recommends (`export --sampler --steps`;
    `meta` from `shipped_meta`), else None (the page keeps its own)."""
    from ...checkpoint import CheckpointError, recommended_sampling

    if meta is not None:
        try:
            pair = recommended_sampling(meta)
        except CheckpointError:
            return None
        if pair is not None:
            return {"sampler": pair[0], "steps": pair[1]}
    return None


# --- request checks -----------------------------------------------------------------------


def _limit(x: float) -> str:
    """A limit as the user types it: 2147483647, not 2.14748e+09; 1, not 1.0."""
    return str(x) if isinstance(x, int) else f"{x:g}"


def _echo(raw: Any) -> str:
    """A field's value quoted back to the user, cut short when it is long."""
    text = repr(raw)
    return text if len(text) <= 60 else f"{text[:57]}..."


def number(body: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    raw = body.get(name, default if default is not None else DEFAULTS.get(name))
    lo, hi = LIMITS[name]
    word = "an integer" if kind is int else "a number"
    shown = LABELS.get(name, name)
    why = f"{shown} must be {word} from {_limit(lo)} to {_limit(hi)}, got {_echo(raw)}"
    try:
        if isinstance(raw, bool) or raw is None or str(raw).strip() == "":
            raise ValueError
        value = float(raw)
        if kind is int:
            if not value.is_integer():
                raise ValueError
            value = int(value)
    except (TypeError, ValueError, OverflowError):
        raise RequestError(why) from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise RequestError(why)
    return value


def sampler_fields(body: dict[str, Any]) -> tuple[str, float, bool | None]:
    sampler = body.get("sampler", DEFAULTS["sampler"])
    if not isinstance(sampler, str) or sampler not in SAMPLERS:  # a list is not hashable
        raise RequestError(f"sampler must be one of {', '.join(SAMPLERS)}, got {_echo(sampler)}")
    eta = number(body, "eta", float)
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
    # attribute -> its own guidance weight (`--attr-guidance`); None: the file's with its w
    attribute_guidance: dict[str, float] | None = None


def parse_generate(body: dict[str, Any], catalog: Catalog) -> GenerateRequest:
    """Check a Generate request; RequestError names the first bad field."""
    model = catalog.get(body.get("model"))
    sampler, eta, clip = sampler_fields(body)
    req = GenerateRequest(
        model=model,
        seed=number(body, "seed", int),
        n=number(body, "n", int),
        steps=number(body, "steps", int),
        sampler=sampler,
        eta=eta,
        clip=clip,
    )
    asked = body.get("attributes") or {}
    if not isinstance(asked, dict):
        raise RequestError(
            f"attributes must be a JSON object of attribute names to values, got {_echo(asked)}"
        )
    attrs = {k: v for k, v in asked.items() if v not in ("", "any")}
    mix = body.get("mix", "none")
    if mix not in ("none", "training"):
        raise RequestError(f"mix must be 'none' or 'training', got {str(mix)[:40]!r}")
    req.mix = mix == "training"
    if attrs:  # checked against the loaded model's vocabulary when it is drawn
        req.attributes = {str(k): str(v) for k, v in attrs.items()}
    if attrs or req.mix:
        req.guidance = number(body, "guidance", float, default=1.0)
        req.attribute_guidance = attribute_weights(body.get("attribute_guidance"))
    return req


def attribute_weights(raw: Any) -> dict[str, float] | None:
    """The per-attribute weights field ('hair_len=11', '' or 'none': none; absent: the
    file's with its weight), each weight in the guidance field's range; the names are
    checked against the model when it is drawn."""
    from ...conditioning import parse_attribute_weights
    from ...config import ConfigError

    if raw is None:
        return None
    lo, hi = LIMITS["guidance"]
    try:
        if not isinstance(raw, str) or len(raw) > 400:
            raise ConfigError(f"per-attribute weights are text like hair_len=11, got {raw!r:.60}")
        weights = parse_attribute_weights(raw)
    except ConfigError as e:
        raise RequestError(str(e)) from None
    for name, w in weights.items():
        if not lo <= w <= hi:
            raise RequestError(f"the weight of {name} must be from {lo:g} to {hi:g}, got {w:g}")
    return weights


def check_interpolate(body: dict[str, Any], uploads: int, catalog: Catalog) -> None:
    """Refuse a bad Interpolate request before it waits in the queue."""
    catalog.get(body.get("model"))
    number(body, "frames", int)
    number(body, "steps", int)
    if uploads not in (0, 2):
        raise RequestError("upload two faces, or none to use the two seeds")
    if not uploads:
        number(body, "seed", int)
        number(body, "seed_b", int, default=1)
        sampler_fields({**body, "eta": 0})


def check_invert(body: dict[str, Any], uploads: int, catalog: Catalog) -> None:
    """Refuse a bad Invert request before it waits in the queue."""
    catalog.get(body.get("model"))
    number(body, "steps", int)
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
    number(body, "steps", int)
    number(body, "guidance", float, default=1.0)
    if uploads != 1:
        raise RequestError("choose an image file to edit")
    return parse_changes(body.get("changes"), choice_vocabulary(choice), choice.id)


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
    if req.attributes or req.mix:  # always given: left out, the CLI takes the file's weight
        args += ["--guidance", f"{req.guidance:g}"]
        weights = req.attribute_guidance  # said when some, or 'none' against the file's
        if weights or (weights == {} and choice_attribute_guidance(shipped_meta(req.model))):
            args += ["--attr-guidance", attribute_weights_text(weights)]
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
