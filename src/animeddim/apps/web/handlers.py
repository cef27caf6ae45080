"""What the web app does, without HTTP: the jobs (generate, interpolate, invert, edit) and
a run's curves.

Every function here takes plain values (dicts from a form or JSON body, upload bytes) and
returns JSON-able dicts; `server` only moves them over HTTP. Requests are checked in
`checks`; the model work goes through `animeddim.pipelines`.
"""

from __future__ import annotations

import base64
import csv
import math
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ... import pipelines
from ...diffusion.samplers import SAMPLERS
from ...io import png_bytes, save_png, tile
from .checks import (
    DEFAULTS,
    LIMITS,
    MAX_UPLOAD_BYTES,
    Catalog,
    Choice,
    GenerateRequest,
    RequestError,
    choice_attribute_guidance,
    choice_edit_guidance,
    choice_guidance,
    choice_sampling,
    choice_vocabulary,
    cli_command,
    decode_upload,
    number,
    parse_changes,
    sampler_fields,
    shipped_meta,
)

CACHED_MODELS = 2  # prepared networks kept in memory


class Stopped(Exception):
    """The job was asked to stop (Stop, its client gone past the grace period, the server
    stopping): it stops at its next network evaluation."""


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
            entry["vocabulary"] = choice_vocabulary(c)
            meta = shipped_meta(c)
            entry["guidance"], entry["guidance_interval"] = choice_guidance(meta)
            entry["attribute_guidance"] = choice_attribute_guidance(meta)
            entry["edit_guidance"] = choice_edit_guidance(meta)
            entry["sampling"] = choice_sampling(meta)
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

            if req.attribute_guidance is not None:  # else the file's, with its weight
                s = replace(s, attribute_guidance=req.attribute_guidance)
            try:
                if req.mix:  # image i: row i of the training labels, the asked values set
                    codes = pipelines.rows_from(loaded, "training", req.attributes)
                else:
                    codes = pipelines.attribute_codes(loaded, req.attributes)[None]
                pipelines.attribute_guidance(loaded, s, req.guidance)  # names it knows
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
        frames = number(body, "frames", int)
        steps = number(body, "steps", int)
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
                seeds = (number(body, "seed", int), number(body, "seed_b", int, default=1))
                sampler, eta, clip = sampler_fields({**body, "eta": 0})
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
                "frames": frames,
                "notes": notes,
            }

    def invert(self, body: dict[str, Any], upload: bytes, progress: Progress) -> dict[str, Any]:
        choice = self.catalog.get(body.get("model"))
        steps = number(body, "steps", int)
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
        steps = number(body, "steps", int)
        guidance = number(body, "guidance", float, default=1.0)
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


# --- watching a run -----------------------------------------------------------------------


def run_summary(catalog: Catalog, choice_id: Any) -> dict[str, Any]:
    """A run folder's curves (per epoch: train/validation noise loss, paper-protocol KID, the
    standard KID of `train --eval-every`) and its latest sample grid, for the page to draw."""
    choice = catalog.run(choice_id)
    names = ("epoch", "train_noise_loss", "val_noise_loss", "kid", "standard_kid")
    series: dict[str, list] = {k: [] for k in names}
    try:
        with open(choice.path / "metrics.csv", newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                for k in series:
                    series[k].append(_float_or_none(row.get(k)))
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError, csv.Error) as e:  # named, not the server's path
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise RequestError(f"the metrics.csv of {choice.id} cannot be read: {why}") from None
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
