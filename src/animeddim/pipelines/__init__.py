"""The Python API every front end calls (the CLI, a web app): model + data + metrics.

Modules: `core` (loading, settings, progress, drawing), `evaluation` (KID/FID, the steps
study), `conditional` (attributes, guidance, editing), `control` (attribute accuracy, the
guidance study), `latents` (inversion, interpolation, trajectories); everything is importable
from `animeddim.pipelines`.


1. `load_for_sampling` loads a model once (a run folder, checkpoint, exported file or a
   shipped model by name);
2. `resolve_settings` checks and resolves how to sample (sampler, eta, clipping, precision)
   into a plain `SampleSettings`;
3. each long operation -- `draw`, `evaluate`, `steps_study`, `invert`, `interpolate`,
   `trajectory`, `draw_conditional`, `attribute_grid`, `edit`, `regenerate` -- take the loaded model
   and the settings, writes its files and returns a
   JSON-able summary (every KID/FID number beside the name of its protocol), and reports
   progress through an optional `Progress` callback.

Plain functions and dataclasses: no argparse, no HTTP, no printing (except `steps_study`'s
`log`).
"""

from .conditional import (
    attribute_codes,
    attribute_grid,
    attribute_guidance,
    codes_from_labels,
    default_edit_guidance,
    default_guidance,
    draw_conditional,
    draw_per_image,
    edit,
    edit_codes,
    guidance_interval,
    guidance_words,
    regenerate,
    rows_from,
    training_rows,
    vocabulary,
)
from .control import (
    GUIDANCE_NAMES,
    ControlTarget,
    MixTarget,
    attribute_accuracy,
    control_target,
    guidance_study,
    mix_accuracy,
    mix_target,
    real_features,
)
from .core import (
    DEFAULT_SAMPLING,
    Progress,
    SampleSettings,
    check_seed,
    default_sampling,
    draw,
    invert_evaluations,
    load_for_sampling,
    observed,
    open_model,
    resolve_settings,
    sampling_net,
)
from .evaluation import STEPS_COLUMNS, evaluate, steps_study, write_steps
from .latents import ReverseSteps, interpolate, invert, reverse_steps, shown_steps, trajectory

__all__ = [
    "DEFAULT_SAMPLING",
    "default_sampling",
    "GUIDANCE_NAMES",
    "ControlTarget",
    "MixTarget",
    "attribute_accuracy",
    "control_target",
    "mix_accuracy",
    "mix_target",
    "guidance_study",
    "STEPS_COLUMNS",
    "Progress",
    "ReverseSteps",
    "SampleSettings",
    "check_seed",
    "attribute_codes",
    "attribute_grid",
    "draw",
    "codes_from_labels",
    "default_guidance",
    "default_edit_guidance",
    "guidance_interval",
    "guidance_words",
    "attribute_guidance",
    "draw_conditional",
    "draw_per_image",
    "edit",
    "edit_codes",
    "evaluate",
    "interpolate",
    "invert",
    "invert_evaluations",
    "load_for_sampling",
    "observed",
    "open_model",
    "real_features",
    "regenerate",
    "rows_from",
    "training_rows",
    "resolve_settings",
    "reverse_steps",
    "sampling_net",
    "shown_steps",
    "steps_study",
    "trajectory",
    "vocabulary",
    "write_steps",
]
