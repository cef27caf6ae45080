"""Conditional sampling: asked attributes -> codes, classifier-free guidance, attribute grids
and editing one attribute of existing images (DDIM inversion under their own labels, then
regeneration under the changed ones)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (
    LoadedModel,
    recommended_attribute_guidance,
    recommended_edit_guidance,
    recommended_guidance,
    recommended_guidance_interval,
)
from ..conditioning import NULL, UnknownAttribute, check_attribute, encode
from ..diffusion.generation import denormalize
from ..diffusion.guidance import guided
from ..diffusion.inversion import ddim_invert
from ..diffusion.samplers import sample
from ..io import save_grid, save_pngs, write_text_atomic
from ..labels import quoted
from ..words import counted
from .core import (
    Progress,
    SampleSettings,
    _counter,
    check_codes,
    check_count,
    check_guidance,
    check_loaded,
    check_settings,
    draw,
    sampling_net,
)
from .latents import _load_images, _normalised, reconstruction_names

EDIT_SUMMARY = "edit_summary.json"
EDIT_NAMES = ("grid.png", EDIT_SUMMARY)  # besides everything in after/ and pairs/


def vocabulary(loaded: LoadedModel) -> dict[str, list[str]]:
    """attribute -> values the model can be asked ({} for an unconditional model).

    :raises TypeError: `loaded` not a loaded model (`core.check_loaded`)."""
    return {a: list(v) for a, v in check_loaded(loaded).config.model.vocabulary.items()}


def default_guidance(loaded: LoadedModel) -> float:
    """The guidance weight conditional sampling uses unless told: the one stored in an
    exported file (`animeddim export --guidance`), else 1 (plain conditional)."""
    return recommended_guidance(loaded.meta)


def default_edit_guidance(loaded: LoadedModel) -> float:
    """The guidance weight `edit` regenerates with unless told: the file's edit weight
    (`animeddim export --edit-guidance`), else its sampling weight (`default_guidance`)."""
    return recommended_edit_guidance(loaded.meta)


def guidance_interval(loaded: LoadedModel, s: SampleSettings) -> tuple[float, float]:
    """The noise levels (lo, hi] in sigma = noise/signal rate where guidance applies: the
    settings' own, else the one stored in an exported file (`export --guidance-interval`),
    else every level."""
    return s.guidance_interval or recommended_guidance_interval(loaded.meta)


def attribute_guidance(loaded: LoadedModel, s: SampleSettings, guidance: float) -> dict[str, float]:
    """The per-attribute guidance weights (attribute -> w_a) sampling at weight `guidance`
    uses: the settings' own, else the ones an exported file recommends if `guidance` is the
    file's weight (they go together), else none; a w_a equal to `guidance` changes nothing
    and is left out.

    :raises UnknownAttribute: a weighted attribute the model does not know, listing the known.
    """
    weights = s.attribute_guidance
    if weights is None:
        same = guidance == recommended_guidance(loaded.meta)
        weights = recommended_attribute_guidance(loaded.meta) if same else {}
    for name in weights:
        check_attribute(vocabulary(loaded), name)
    return {a: w for a, w in weights.items() if w != guidance}


def guidance_words(loaded: LoadedModel, s: SampleSettings, guidance: float) -> str:
    """What conditional sampling at weight `guidance` does, in words: 'guidance 8 at noise
    levels sigma in (1, inf], hair_len at 11' (what the CLI prints before drawing)."""
    from ..config import GUIDE_ALWAYS, guidance_interval_words

    weights = attribute_guidance(loaded, s, guidance)
    text = f"guidance {guidance:g}" + (" (plain conditional)" if guidance == 1.0 else "")
    interval = guidance_interval(loaded, s)
    if interval != GUIDE_ALWAYS and (guidance != 1.0 or weights):
        text += f" at {guidance_interval_words(interval)}"
    return text + "".join(f", {a} at {w:g}" for a, w in weights.items())


def attribute_indices(loaded: LoadedModel, weights: Mapping[str, float]) -> dict[int, float]:
    """attribute -> w_a as column of the codes -> w_a (`diffusion.guidance.Guided`)."""
    names = list(vocabulary(loaded))
    return {names.index(a): w for a, w in weights.items()}


def guided_net(loaded: LoadedModel, net: Any, s: SampleSettings, guidance: float) -> Any:
    """`net` under classifier-free guidance at weight `guidance`, in the settings' (or the
    file's) interval and with their per-attribute weights (`attribute_guidance`)."""
    weights = attribute_indices(loaded, attribute_guidance(loaded, s, guidance))
    return guided(net, guidance, guidance_interval(loaded, s), weights)


def guided_calls(loaded: LoadedModel, s: SampleSettings, guidance: float) -> int:
    """Network evaluations per image and step of guided sampling (for `sampling_net`)."""
    extra = attribute_guidance(loaded, s, guidance)
    return 1 if guidance == 1.0 and not extra else 2 + len(extra)


def attribute_codes(loaded: LoadedModel, asked: Mapping[str, str]) -> torch.Tensor | None:
    """The [A] codes of `asked` (attribute -> value); None when nothing is asked.

    :raises UnknownAttribute: naming the attribute or value and listing the known ones.
        TypeError: `asked` not a mapping (a string such as "glasses=yes").
    """
    _check_values(asked, "asked attributes")
    if not asked:
        return None
    return encode(vocabulary(loaded), asked)


def _check_values(values: Any, name: str) -> None:
    """TypeError unless `values` is None or a mapping attribute -> value (a string such as
    "glasses=yes", as the CLI writes it, failed in an AttributeError inside `encode`)."""
    if values is not None and not isinstance(values, Mapping):
        raise TypeError(
            f"{name} must be a dict of attribute -> value (e.g. {{'glasses': 'yes'}}), "
            f"got {values!r}"
        )


def draw_conditional(
    loaded: LoadedModel,
    n: int,
    s: SampleSettings,
    asked: Mapping[str, str] | None = None,
    guidance: float = 1.0,
    first_index: int = 0,
    progress: Progress | None = None,
    net: Any = None,
) -> torch.Tensor:
    """`draw` under the asked attributes with classifier-free guidance weight `guidance`:
    uint8 [n x H x W x C]; nothing asked is unconditional sampling (guidance unused).

    :param net: the `sampling_net` to guide (made for this call when None).
    :raises ConfigError: guidance not a number >= 0 (`check_guidance`), or as `draw`."""
    loaded, guidance = check_loaded(loaded), check_guidance(guidance)
    codes = attribute_codes(loaded, asked)
    if codes is None:
        return draw(loaded, n, s, first_index, net=net, progress=progress)
    return draw_per_image(loaded, n, s, codes[None], guidance, first_index, progress, net)


def draw_per_image(
    loaded: LoadedModel,
    n: int,
    s: SampleSettings,
    codes: torch.Tensor,
    guidance: float = 1.0,
    first_index: int = 0,
    progress: Progress | None = None,
    net: Any = None,
) -> torch.Tensor:
    """`draw` where image i (of first_index .. first_index + n - 1) is asked the codes of
    row i mod R of `codes` ([R x A], e.g. `codes_from_labels`), with classifier-free
    guidance weight `guidance`: uint8 [n x H x W x C].

    :raises ConfigError, TypeError: codes not an integer tensor [R x A] the model takes
        (`check_codes`), guidance not a number >= 0, or as `draw`."""
    loaded, s, n = check_loaded(loaded), check_settings(s), check_count(n, "n", 0)
    check_codes(loaded, codes, "codes")
    guidance = check_guidance(guidance)
    calls = guided_calls(loaded, s, guidance)
    net = guided_net(
        loaded,
        net if net is not None else sampling_net(loaded, s, calls * n * s.steps),
        s,
        guidance,
    )
    cond = per_image_codes(codes, n, first_index).to(s.device).contiguous()
    return draw(loaded, n, s, first_index, net=net, progress=progress, cond=cond)


def per_image_codes(codes: torch.Tensor, n: int, first_index: int = 0) -> torch.Tensor:
    """The [n x A] codes images first_index .. first_index + n - 1 are asked: row i mod R of
    the [R x A] `codes`."""
    return codes[torch.arange(first_index, first_index + n) % len(codes)]


def codes_from_labels(loaded: LoadedModel, path: str | Path) -> torch.Tensor:
    """[R x A] codes of the R rows of a labels CSV (file, then attribute columns; e.g. the
    labels.csv of `animeddim data avatars`), in the model's attributes: columns the model
    does not know are left out, and an attribute the file lacks, or a row leaves empty (a
    partially labelled training set), stays null.

    :raises LabelError: an unreadable or malformed file (`labels.read_csv_rows`).
    :raises UnknownAttribute: an unconditional model, a file with none of its attributes or
        no rows, or a value the model does not know (naming the row).
    """
    from ..labels import canonical, read_csv_rows

    vocab = vocabulary(loaded)
    if not vocab:
        raise UnknownAttribute(f"the model is unconditional: it cannot be asked for '{path}'")
    # names in NFC, the model's as it was written; an empty entry is None: not asked
    names, rows = read_csv_rows(path, vocab, missing="null")
    spelled = {canonical(n): n for n in vocab}
    names = [spelled.get(n, n) for n in names]
    if not any(name in vocab for name in names):
        raise UnknownAttribute(
            f"labels file '{path}' has none of the model's attributes ({quoted(vocab)}); "
            f"its columns: {quoted(names)}"
        )
    if not rows:
        raise UnknownAttribute(f"labels file '{path}' has no rows")
    out = []
    for line, file, values in rows:
        asked = {a: v for a, v in zip(names, values, strict=True) if a in vocab and v is not None}
        try:
            out.append(encode(vocab, asked))
        except UnknownAttribute as e:
            raise UnknownAttribute(f"labels file '{path}' row {line} ({file}): {e}") from None
    return torch.stack(out)


TRAINING = "training"  # `--attrs-from training`: the model's own training labels


def training_rows(loaded: LoadedModel) -> torch.Tensor:
    """[R x A] codes of the model's training labels: those stored in an exported file
    (`checkpoint.export_weights`), else the rows of the labels CSV its config names (one an
    older run kept relative is read where `train --resume` reads it), or for
    `--labels folders` the class of each image in a subfolder of its training folder.

    :raises UnknownAttribute: an unconditional model, or none of these is there.
    """
    from ..labels import FOLDERS
    from ..resume_labels import recorded_place

    if not vocabulary(loaded):
        raise UnknownAttribute("the model is unconditional: it has no training attributes")
    if loaded.attribute_rows is not None:
        return loaded.attribute_rows
    data = loaded.config.data  # abs_path: where it trained, whatever the working directory
    labels, root = data.labels, Path(data.abs_path or data.path)
    if labels not in ("", FOLDERS) and not Path(labels).is_absolute():
        # kept as given by a run from before labels files were recorded by their place:
        # relative to the directory it started in, found as train --resume finds it
        labels = recorded_place(labels, data.path, data.abs_path) or labels
    if labels == FOLDERS and (data.abs_path or data.path) and root.is_dir():
        return _folder_rows(loaded, root)
    if labels and labels != FOLDERS and Path(labels).is_file():
        return codes_from_labels(loaded, labels)
    where = f"training folder ('{root}')" if labels == FOLDERS else f"labels file ({labels})"
    raise UnknownAttribute(
        f"'{loaded.path}' holds no training labels and its {where} is not at hand: give "
        "--attrs-from FILE.csv"
    )


def _folder_rows(loaded: LoadedModel, root: Path) -> torch.Tensor:
    """[R x 1] codes of the R images in class subfolders of a `--labels folders` model's
    training folder (those outside one were trained unlabelled: no row)."""
    from ..data import find_images
    from ..labels import FOLDER_ATTRIBUTE, LabelError, canonical, folder_labels

    try:
        got = folder_labels(root, find_images(root), missing="null")
    except LabelError as e:  # no class subfolder left
        raise UnknownAttribute(f"training folder: {e}") from None
    known = {canonical(v): k for k, v in enumerate(vocabulary(loaded)[FOLDER_ATTRIBUTE])}
    found = got.vocab[FOLDER_ATTRIBUTE]
    new = [v for v in found if v not in known]
    if new:
        raise UnknownAttribute(
            f"training folder '{root}' has {counted(len(new), 'class folder')} {quoted(new)} "
            f"the model does not know; known class values: {quoted(known)}"
        )
    column = got.column(FOLDER_ATTRIBUTE)
    remap = torch.tensor([known[v] for v in found], dtype=torch.long)
    return remap[torch.from_numpy(column[column != NULL])][:, None]


def rows_from(
    loaded: LoadedModel, source: str | Path, asked: Mapping[str, str] | None = None
) -> torch.Tensor:
    """`codes_from_labels` of a CSV, or `training_rows` for the word "training", with the
    `asked` attributes (attribute -> value) set in every row."""
    rows = training_rows(loaded) if str(source) == TRAINING else codes_from_labels(loaded, source)
    fixed = attribute_codes(loaded, asked or {})
    if fixed is None:
        return rows
    keep = fixed == NULL
    return torch.where(keep[None], rows, fixed[None])


def attribute_grid(
    loaded: LoadedModel,
    attribute: str,
    seeds: int,
    s: SampleSettings,
    asked: Mapping[str, str] | None = None,
    guidance: float = 1.0,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """One row per value of `attribute`, one column per image index 0 .. seeds - 1 (the same
    starting noises in every row): uint8 [values * seeds x H x W x C] and the row values."""
    _, values = grid_rows(loaded, attribute, asked)
    rows = []
    done = _counter(progress, "grid", len(values))
    for value in values:
        row = {**(asked or {}), attribute: value}
        rows.append(draw_conditional(loaded, seeds, s, row, guidance))
        done(1)
    return torch.cat(rows), values


def grid_rows(
    loaded: LoadedModel, attribute: str, asked: Mapping[str, str] | None = None
) -> tuple[torch.Tensor, list[str]]:
    """The [V x A] codes of a grid by `attribute` (row r asks its r-th value, and `asked`)
    and the V values.

    :raises UnknownAttribute: an attribute the model does not know, or one `asked` sets."""
    vocab = vocabulary(loaded)
    check_attribute(vocab, attribute)
    if asked and attribute in asked:
        raise UnknownAttribute(f"--grid-by {attribute} and --attr {attribute}=... both set it")
    values = list(vocab[attribute])
    codes = [attribute_codes(loaded, {**(asked or {}), attribute: v}) for v in values]
    return torch.stack(codes), values


def _image_codes(
    loaded: LoadedModel, folder: Path, paths: list[str], labels: str | None
) -> torch.Tensor:
    """[N x A] codes of the images from a labels CSV ('folders' or a path), else all null."""
    vocab = vocabulary(loaded)
    if labels is None:
        return torch.full((len(paths), len(vocab)), NULL, dtype=torch.long)
    from ..labels import FOLDERS, canonical, csv_labels, load_labels

    if labels == FOLDERS:
        got = load_labels(labels, folder, paths, missing="null", vocab=None)
    else:  # a whole data set's labels.csv may serve a few of its images
        got = csv_labels(labels, folder, paths, missing="null", others="ignore")
    codes = torch.full((len(paths), len(vocab)), NULL, dtype=torch.long)
    for a, name in enumerate(vocab):
        column = canonical(name)  # the labels' names are NFC; the model's as it was written
        if column not in got.vocab:
            continue
        known = [canonical(v) for v in vocab[name]]
        for n, c in enumerate(got.column(column).tolist()):
            if c == NULL:
                continue
            value = canonical(got.vocab[column][c])
            if value not in known:
                raise UnknownAttribute(
                    f"{paths[n]}: the model knows no {name} value {value!r}; known: {quoted(known)}"
                )
            codes[n, a] = known.index(value)
    return codes


@torch.no_grad()
def regenerate(
    loaded: LoadedModel,
    real_u8: torch.Tensor,
    source: torch.Tensor,
    targets: list[torch.Tensor],
    *,
    steps: int,
    guidance: float = 1.0,
    settings: SampleSettings,
    progress: Progress | None = None,
) -> list[torch.Tensor]:
    """DDIM-invert uint8 [N x H x W x C] images under their [N x A] `source` codes, then
    regenerate with DDIM from the same noise under each [N x A] code tensor of `targets`
    (guidance weight `guidance`): one uint8 [N x H x W x C] tensor per target.

    :param progress: told ("edit", images done, N) after each batch.
    :raises ConfigError: steps not an integer >= 1, guidance not a number >= 0.
    """
    loaded, settings = check_loaded(loaded), check_settings(settings)
    steps, guidance = check_count(steps, "steps"), check_guidance(guidance)
    cfg = loaded.config
    net = guided_net(loaded, loaded.model, settings, guidance)
    out: list[list[torch.Tensor]] = [[] for _ in targets]
    done = _counter(progress, "edit", len(real_u8))
    for i in range(0, len(real_u8), settings.batch_size):
        j = i + settings.batch_size
        x0 = _normalised(loaded, real_u8[i:j], settings.device)
        with settings.autocast():
            z = ddim_invert(loaded.model, x0, steps, cfg.schedule, cond=source[i:j].to(x0.device))
            for k, target in enumerate(targets):
                cond = target[i:j].to(x0.device)
                plain = bool((cond == NULL).all())  # nothing asked: guidance changes nothing
                x = sample(loaded.model if plain else net, z, steps, cfg.schedule, cond=cond)
                out[k].append(denormalize(x.float(), loaded.mean, loaded.std).cpu())
        done(len(x0))
    return [torch.cat(parts) for parts in out]


def edit_codes(
    loaded: LoadedModel, source: torch.Tensor, changes: Mapping[str, str]
) -> torch.Tensor:
    """[N x A] codes: `source` with the attributes of `changes` set (the others kept).

    :raises UnknownAttribute: no change, or an attribute or value the model does not know.
        TypeError: `changes` not a mapping.
    """
    _check_values(changes, "changes")
    if not changes:
        raise UnknownAttribute("give at least one --set NAME=VALUE")
    change = encode(vocabulary(loaded), changes)
    return torch.where(change >= 0, change.expand_as(source), source)


@torch.no_grad()
def edit(
    loaded: LoadedModel,
    images: str | Path,
    out: str | Path,
    changes: Mapping[str, str],
    *,
    steps: int = 50,
    guidance: float = 1.0,
    labels: str | None = None,
    settings: SampleSettings,
    classifier: Any = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Change attributes of the images of a folder (or of one image file, as a folder holding
    only it): DDIM-invert each under its own labels (`labels`: a CSV or 'folders'; None: all
    null), regenerate with DDIM from the same noise under the labels with `changes` applied.

    Writes out/after/*.png, out/pairs/*.png (before | after; each named as `invert` names
    its reconstructions: the path below `images`, .png), out/grid.png (originals above,
    edits below) and out/edit_summary.json, the summary it returns.

    :param classifier: an attribute classifier: the summary then says how many untouched
        attributes it classifies the same before and after (`control.edit_preservation`).
    :raises ConfigError: steps not an integer >= 1, guidance not a number >= 0 (before any
        image is read); UnknownAttribute: a change the model cannot make.
    """
    loaded, settings = check_loaded(loaded), check_settings(settings)
    steps, guidance = check_count(steps, "steps"), check_guidance(guidance)
    out = Path(out)
    none = torch.empty(0, len(vocabulary(loaded)), dtype=torch.long)
    edit_codes(loaded, none, changes)  # checked before any image is read
    real_u8, paths, root = _load_images(images, loaded.config.model.image_size)
    source = _image_codes(loaded, root, paths, labels)
    target = edit_codes(loaded, source, changes)
    (edited,) = regenerate(
        loaded,
        real_u8,
        source,
        [target],
        steps=steps,
        guidance=guidance,
        settings=settings,
        progress=progress,
    )
    names = reconstruction_names(paths, root)  # a.png, a.jpg, sub/a.png: three files
    save_pngs(edited, out / "after", names)
    pairs = torch.cat([real_u8, edited], dim=2)  # side by side: [N x H x 2W x C]
    save_pngs(pairs, out / "pairs", names)
    save_grid(torch.cat([real_u8, edited]), out / "grid.png", cols=len(real_u8))
    summary: dict[str, Any] = {
        "images": len(paths),
        "changes": dict(changes),
        "steps": steps,
        "guidance": guidance,
        "labels": labels,
        "out": str(out),
    }
    if classifier is not None:
        from .control import edit_preservation

        summary["preservation"] = edit_preservation(classifier, real_u8, edited, changes)
    write_text_atomic(out / EDIT_SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary
