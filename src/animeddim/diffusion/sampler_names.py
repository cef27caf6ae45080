"""The samplers' names and what the command line and the checks know of each, without torch.

`samplers.SAMPLERS` (the registry: functions and time grids) is built from this table and
refuses to import when the two name different samplers, so they cannot drift apart. The
command line reads its choices and help from here, so `animeddim --help` imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplerInfo:
    """What is known of a sampler without running it.

    :param stochastic: whether eta > 0 is allowed (otherwise eta must be 0).
    :param clip_x0: whether x0_hat is clipped to the data range by default.
    :param help: one line for the CLI's help.
    """

    stochastic: bool
    clip_x0: bool
    help: str


# On the shipped avatars-64 model clipping lowered standard KID for every sampler
# (docs/sampling.md); DDIM's default stays the paper's unclipped Algorithm 1.
SAMPLER_INFO: dict[str, SamplerInfo] = {
    "ddim": SamplerInfo(
        stochastic=True,
        clip_x0=False,
        help="DDIM (the paper's Algorithm 1; eta 0 deterministic, eta 1 DDPM-like)",
    ),
    "dpmpp-2m": SamplerInfo(
        stochastic=False,
        clip_x0=True,
        help="DPM-Solver++(2M), 2nd order, on DDIM's time grid",
    ),
    "dpmpp-2m-logsnr": SamplerInfo(
        stochastic=False,
        clip_x0=True,
        help="DPM-Solver++(2M) with steps uniform in log-SNR",
    ),
    "unipc": SamplerInfo(
        stochastic=False,
        clip_x0=True,
        help="UniPC-bh2 (order 2, data prediction) on DDIM's time grid",
    ),
}
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLER_INFO)


def sampler_help() -> str:
    """'name: help; ...' for every sampler (the CLI's --sampler help)."""
    return "; ".join(f"{name}: {info.help}" for name, info in SAMPLER_INFO.items())


def clipped_by_default() -> tuple[str, ...]:
    """The samplers that clip x0_hat unless told otherwise."""
    return tuple(name for name, info in SAMPLER_INFO.items() if info.clip_x0)
