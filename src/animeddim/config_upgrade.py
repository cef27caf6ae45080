"""Settings written by an earlier animeddim (a run's config.json, a checkpoint, an exported
model, a config file) in today's layout, before `config` checks them."""

from __future__ import annotations

from typing import Any

from .config import IMAGE_CHANNELS, ConfigError

# The train settings every animeddim wrote into config.json, checkpoints and exported models
# before train.loss existed (its default was then the MAE; since 2026-12-07 it is the MSE).
_SAVED_BEFORE_LOSS = frozenset(
    "epochs batch_size learning_rate weight_decay ema_decay seed device precision compile "
    "checkpoint_every keep_checkpoints kid kid_steps kid_images nan_policy log_every "
    "max_steps time_limit_minutes init".split()
)


def upgrade(d: Any) -> Any:
    """A settings dict of an earlier animeddim (config.json, checkpoint, config file) in
    today's layout: `data.image_size` is `model.image_size`; `model.channels` (always 3,
    nothing honoured another value) is gone; a whole train section without `loss` was
    trained with the MAE. Anything else is left to `config_fields.build` to judge."""
    if not isinstance(d, dict):
        return d
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    data, model = d.get("data"), d.get("model")
    if isinstance(data, dict) and "image_size" in data:
        size = data.pop("image_size")
        if not isinstance(model, dict):
            model = d["model"] = {} if model is None else model
        if isinstance(model, dict):
            if "image_size" in model and model["image_size"] != size:
                raise ConfigError(
                    f"data.image_size ({size!r}) differs from model.image_size "
                    f"({model['image_size']!r}): give one image_size (model.image_size)"
                )
            model["image_size"] = size
    train = d.get("train")
    if isinstance(train, dict) and "loss" not in train and _SAVED_BEFORE_LOSS <= train.keys():
        # A whole train section written by animeddim before train.loss existed (a run's
        # config.json, a checkpoint, an exported model): it was trained with the MAE, the
        # default then. A partial section (a config file) takes today's default.
        train["loss"] = "mae"
    if isinstance(model, dict) and "channels" in model:
        c = model.pop("channels")
        if c != IMAGE_CHANNELS:
            raise ConfigError(
                f"invalid model.channels = {c!r}: animeddim trains on RGB images; "
                "remove the setting (it is no longer one)"
            )
    return d
