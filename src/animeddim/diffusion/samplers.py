"""Reverse diffusion from noise to images: plain sampler functions and their one registry.

Every sampler has the same signature (k-diffusion's ``sample_*`` functions and EDM's
``edm_sampler`` are the model)::

    fn(model, initial_noise, times, schedule, *, eta, generators, callback, x0_range, cond)

- ``times``: the S network-evaluation times, [S] float64 decreasing from t = 1 (its time
  grid, from the registry entry's ``grid``); the sampler evaluates the network exactly S
  times and returns its last data prediction x0_hat, because the schedule's clean end
  t = 0 still has noise_rate = sqrt(1 - max_signal_rate**2) (0.31 by default): the state
  x_t itself is never noise free.
- ``cond``: conditioning, passed unchanged to every network call ``model(x_t,
  noise_variances, cond)``, as k-diffusion's ``extra_args``; a sampler never looks at it.
- ``x0_range``: clip each x0_hat to the data's range before it is used (static
  thresholding, as DDPM's sampler (Ho et al. 2020) clips x0 to [-1, 1] and DPM-Solver++
  (Lu et al. 2022) pairs its data prediction with thresholding); None: no clipping.
  Images lie in [0, 1] before normalisation, so the range is per channel
  [(0 - mean) / std, (1 - mean) / std] (`data_range`).

`SAMPLERS` maps each name to a `SamplerSpec` (function, time grid, whether eta > 0 is
allowed, default clipping, help text); config checks and the eta rules read it. A new
sampler is one function, its entry in `_FUNCTIONS` (function, time grid) and its entry in
`sampler_names.SAMPLER_INFO` (eta, clipping, help: what the CLI reads without importing
torch); the registry refuses to import when the two name different samplers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..config import ScheduleConfig, as_integer
from ..words import counted
from .sampler_names import SAMPLER_INFO
from .sampler_names import sampler_help as sampler_help  # the CLI reads it from there
from .schedule import log_snr, predict_x0, rates, time_of_log_snr

# (noisy_images [N x C x H x W], noise_variances [N], cond) -> predicted noise [N x C x H x W]
Denoiser = Callable[..., torch.Tensor]
# callback(step, t, noisy_images, pred_images), called once per network evaluation
StepCallback = Callable[[int, float, torch.Tensor, torch.Tensor], None]
# (low, high): per-channel [C] bounds of x0_hat in normalised space (`data_range`)
X0Range = tuple[torch.Tensor, torch.Tensor]


def data_range(mean: torch.Tensor, std: torch.Tensor) -> X0Range:
    """The normalised images' range: pixels in [0, 1] map to [(0 - mean)/std, (1 - mean)/std].

    :param mean: [C] per-channel mean of the training images (in [0, 1] units).
    :param std: [C] per-channel std.
    :return: (low, high), each [C] float32.
    """
    mean, std = mean.float().flatten(), std.float().flatten()
    return (0.0 - mean) / std, (1.0 - mean) / std


def clip_x0(images: torch.Tensor, x0_range: X0Range | None) -> torch.Tensor:
    """Clamp [N x C x H x W] images channel-wise to `x0_range` (unchanged when None)."""
    if x0_range is None:
        return images
    low, high = (b.to(images).view(1, -1, 1, 1) for b in x0_range)
    return images.clamp(low, high)


# --- time grids ---------------------------------------------------------------------------


def ddim_times(steps: int, schedule: ScheduleConfig | None = None) -> torch.Tensor:
    """DDIM's grid (Algorithm 1): t_i = 1 - i/S for i = 0 .. S-1, the last 1/S.

    :return: [S] float64 times, decreasing, first exactly 1.0.
    """
    return 1.0 - torch.arange(steps, dtype=torch.float64) / steps


def logsnr_times(steps: int, schedule: ScheduleConfig) -> torch.Tensor:
    """S times uniform in lambda from t = 1 to t = 0 (the DPM-Solver paper's grid).

    With the trigonometric schedule lambda changes fastest near t = 1, so this grid spends
    most of its evaluations at high noise and leaves one coarse step for the last 15% of t.

    :return: [S] float64 times, decreasing, first exactly 1.0, last exactly 0.0 (S >= 2).
    """
    ends = torch.tensor([1.0, 0.0], dtype=torch.float64)
    lam_first, lam_last = log_snr(ends, schedule).tolist()
    times = time_of_log_snr(
        torch.linspace(lam_first, lam_last, steps, dtype=torch.float64), schedule
    )
    times[0] = 1.0
    if steps > 1:
        times[-1] = 0.0
    return times


def _call(model: Denoiser, x: torch.Tensor, sigma: float, cond: Any) -> torch.Tensor:
    """eps_hat = network(x_t, noise_rate^2, cond), as float32 [N x C x H x W]."""
    variances = torch.full((x.shape[0],), sigma**2, device=x.device)
    return model(x, variances, cond).float()


# --- samplers -----------------------------------------------------------------------------


def randn_per_image(
    generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device | str
) -> torch.Tensor:
    """Stack one standard-normal draw of `shape` from each generator: [N x *shape]."""
    draws = [torch.randn(tuple(shape), generator=g) for g in generators]
    return torch.stack(draws).to(device)


def ddim_sigma(eta: float, a: float, a_next: float) -> float:
    """Song et al. 2021, eq. 16: sigma = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a'), with
    a = alpha_t = signal_rate^2 now and a' at the next (less noisy) time."""
    return eta * math.sqrt((1 - a_next) / (1 - a)) * math.sqrt(1 - a / a_next)


def ddim_sample(
    model: Denoiser,
    initial_noise: torch.Tensor,
    times: torch.Tensor,
    schedule: ScheduleConfig,
    *,
    eta: float = 0.0,
    generators: Sequence[torch.Generator] | None = None,
    callback: StepCallback | None = None,
    x0_range: X0Range | None = None,
    cond: Any = None,
) -> torch.Tensor:
    """DDIM reverse process (Algorithm 1, part 2) over `times` (usually `ddim_times`).

    :param model: the denoiser; called as model(x_t, noise variances, cond).
    :param initial_noise: [N x C x H x W] standard normal x_T.
    :param times: [S] decreasing evaluation times, S >= 1.
    :param eta: 0 gives deterministic DDIM; 1 the DDPM-like stochastic sampler.
    :param generators: one per image; needed when eta > 0.
    :param x0_range: clip each x0_hat to these bounds (None: no clipping); the noise
        direction is then re-derived from the clipped x0_hat, eps_hat = (x_t - signal_rate
        x0_hat) / noise_rate, so that x_t = signal_rate x0_hat + noise_rate eps_hat holds.
    :param cond: conditioning, passed unchanged to every network call.
    :return: [N x C x H x W] the final predicted clean images x0_hat (normalised space).
    """
    if eta > 0 and generators is None:
        raise ValueError("eta > 0 needs one random generator per image")
    signal_rates, noise_rates = (r.tolist() for r in rates(times, schedule))
    steps = len(signal_rates)
    noisy_images = pred_images = initial_noise
    for s in range(steps):
        # 1. eps_hat = network(x_t, noise_rate^2); x0_hat = (x_t - noise_rate eps_hat) / signal_rate
        sr, nr = signal_rates[s], noise_rates[s]
        pred_noises = _call(model, noisy_images, nr, cond)
        pred_images = predict_x0(noisy_images, pred_noises, sr, nr)
        if x0_range is not None:
            pred_images = clip_x0(pred_images, x0_range)
            pred_noises = (noisy_images - sr * pred_images) / nr
        if callback is not None:
            callback(s, float(times[s]), noisy_images, pred_images)
        if s == steps - 1:
            break
        # 2. x_{t'} = signal_rate' x0_hat + sqrt(1 - a' - sigma^2) eps_hat + sigma z
        #    (Song et al. 2021, eq. 12; sigma = 0 for eta = 0: x_{t'} = signal' x0 + noise' eps)
        next_sr, next_nr = signal_rates[s + 1], noise_rates[s + 1]
        if eta > 0:
            a, a_next = sr**2, next_sr**2
            sigma = ddim_sigma(eta, a, a_next)
            direction = math.sqrt(max(1 - a_next - sigma**2, 0.0))
            z = randn_per_image(generators, noisy_images.shape[1:], noisy_images.device)
            noisy_images = next_sr * pred_images + direction * pred_noises + sigma * z
        else:
            noisy_images = next_sr * pred_images + next_nr * pred_noises
    return pred_images


def dpmpp_2m_sample(
    model: Denoiser,
    initial_noise: torch.Tensor,
    times: torch.Tensor,
    schedule: ScheduleConfig,
    *,
    eta: float = 0.0,
    generators: Sequence[torch.Generator] | None = None,
    callback: StepCallback | None = None,
    x0_range: X0Range | None = None,
    cond: Any = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), data-prediction form.

    alpha_t = signal_rate, sigma_t = noise_rate, lambda_t = log(alpha_t / sigma_t). The S
    evaluation times t_0 = 1 > t_1 > ... > t_{S-1} come from the grid (DDIM's, last 1/S,
    or uniform in lambda down to t = 0); the steps h_i = lambda_{i+1} - lambda_i need not be
    equal. Algorithm 2 runs M = S - 1 steps from t_0 to t_{S-1} (first order at the first
    step, second-order multistep after), and the S-th evaluation gives the returned data
    prediction x0_hat(x_{t_{S-1}}), as DDIM returns its last x0_hat. Equivalently, the
    result is a last first-order step to lambda = +inf (sigma = 0), as k-diffusion's
    ``sample_dpmpp_2m`` ends. With S = 1 this is one DDIM step. Deterministic: eta and
    generators are accepted for the common signature and must be 0 / unused.

    :param times: [S] decreasing evaluation times, S >= 1.
    :param callback: called once per evaluation with (i, t_i, x_{t_i}, x0_hat_i).
    :param x0_range: clip each data prediction x0_hat to these bounds before it enters the
        update (static thresholding); None: no clipping.
    :param cond: conditioning, passed unchanged to every network call.
    :return: [N x C x H x W] the final predicted clean images x0_hat (normalised space).
    """
    steps = len(times)
    alphas, sigmas = rates(times, schedule)
    lambdas = torch.log(alphas / sigmas)
    noisy_images = pred_images = initial_noise
    prev_pred_images: torch.Tensor | None = None
    h_prev = 0.0
    for i in range(steps):
        # 1. x_theta(x_{t_i}, t_i) = (x_{t_i} - sigma_i eps_hat) / alpha_i, eps_hat from the network
        pred_noises = _call(model, noisy_images, float(sigmas[i]), cond)
        pred_images = (noisy_images - float(sigmas[i]) * pred_noises) / float(alphas[i])
        pred_images = clip_x0(pred_images, x0_range)
        if callback is not None:
            callback(i, float(times[i]), noisy_images, pred_images)
        if i == steps - 1:
            break
        # 2. h_{i+1} = lambda_{t_{i+1}} - lambda_{t_i}  (float64)
        h = float(lambdas[i + 1] - lambdas[i])
        if prev_pred_images is None:
            # Algorithm 2, line 3: the first step is first order (DPM-Solver++1 = DDIM).
            d = pred_images
        else:
            # Algorithm 2, lines 5-6: r = h_{i} / h_{i+1};
            # D = (1 + 1/(2r)) x_theta(x_{t_i}) - 1/(2r) x_theta(x_{t_{i-1}})
            r = h_prev / h
            d = (1.0 + 0.5 / r) * pred_images - (0.5 / r) * prev_pred_images
        # Algorithm 2, line 7: x_{t_{i+1}} = (sigma_{i+1} / sigma_i) x_{t_i}
        #                                     - alpha_{i+1} (exp(-h_{i+1}) - 1) D
        noisy_images = (
            float(sigmas[i + 1] / sigmas[i]) * noisy_images
            - float(alphas[i + 1] * math.expm1(-h)) * d
        )
        prev_pred_images, h_prev = pred_images, h
    return pred_images


def unipc_sample(
    model: Denoiser,
    initial_noise: torch.Tensor,
    times: torch.Tensor,
    schedule: ScheduleConfig,
    *,
    eta: float = 0.0,
    generators: Sequence[torch.Generator] | None = None,
    callback: StepCallback | None = None,
    x0_range: X0Range | None = None,
    cond: Any = None,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023, "UniPC"), variant bh2, order 2, data prediction.

    alpha = signal_rate, sigma = noise_rate, lambda = log(alpha / sigma), m_i = x0_hat at
    t_i (clipped to `x0_range`). Each step t_{i-1} -> t_i, h = lambda_i - lambda_{i-1}:

    1. predictor (UniP, Algorithm 2): x_i = (sigma_i / sigma_{i-1}) x_{i-1}
       - alpha_i (e^{-h} - 1) m_{i-1} - alpha_i B(h) rho_p D_1, with B(h) = e^{-h} - 1 (bh2),
       D_1 = (m_{i-2} - m_{i-1}) / r, r = (lambda_{i-2} - lambda_{i-1}) / h and rho_p = 1/2
       (order 2; the first step, with no m_{i-2}, is first order = DDIM);
    2. the network at the predicted x_i gives m_i, used both by the corrector and as the
       next step's model value, so the corrector costs no evaluation;
    3. corrector (UniC, Algorithm 1): x_i^c = (sigma_i / sigma_{i-1}) x_{i-1}
       - alpha_i (e^{-h} - 1) m_{i-1} - alpha_i B(h) (rho_c1 D_1 + rho_c2 (m_i - m_{i-1})),
       rho_c solving R rho = b, R = [[1, 1], [r, 1]], b_k = k! h' phi_{k+1}(h') / B(h) with
       h' = -h (`_unipc_rhos_c`, as the reference code's ``multistep_uni_pc_bh_update``);
       rho_c = 1/2 at the first step.

    The S evaluations are at `times`; like `dpmpp_2m_sample` it returns the last data
    prediction m_{S-1} (a final first-order step to sigma = 0), so the last step needs no
    corrector. Deterministic: eta and generators are accepted for the common signature.

    :param times: [S] decreasing evaluation times, S >= 1.
    :param callback: called once per evaluation with (i, t_i, x_{t_i}, m_i).
    :param cond: conditioning, passed unchanged to every network call.
    :return: [N x C x H x W] the final predicted clean images x0_hat (normalised space).
    """
    steps = len(times)
    alphas, sigmas = (r.tolist() for r in rates(times, schedule))
    lambdas = [math.log(a / s) for a, s in zip(alphas, sigmas, strict=True)]
    x = initial_noise
    models: list[torch.Tensor] = []  # m_{i-2}, m_{i-1}
    for i in range(steps):
        if i > 0:
            # 1. predictor from x_{i-1} (corrected) to t_i
            h = lambdas[i] - lambdas[i - 1]
            b_h = math.expm1(-h)  # bh2: B(h) = e^{-h} - 1, also h phi_1(-h)
            base = (sigmas[i] / sigmas[i - 1]) * x - (alphas[i] * b_h) * models[-1]
            d1, rhos_c = None, (0.5,)
            if len(models) == 2:
                r = (lambdas[i - 2] - lambdas[i - 1]) / h
                d1 = (models[-2] - models[-1]) / r
                rhos_c = _unipc_rhos_c(h, r)
                x = base - (alphas[i] * b_h * 0.5) * d1
            else:
                x = base
        # 2. m_i = x0_hat at the predicted x_i
        pred_noises = _call(model, x, sigmas[i], cond)
        m = clip_x0((x - sigmas[i] * pred_noises) / alphas[i], x0_range)
        if callback is not None:
            callback(i, float(times[i]), x, m)
        if i == steps - 1:
            return m
        if i > 0:
            # 3. corrector with m_i: x_i^c
            corr = rhos_c[-1] * (m - models[-1])
            if d1 is not None:
                corr = corr + rhos_c[0] * d1
            x = base - (alphas[i] * b_h) * corr
        models = [*models[-1:], m]
    return x  # steps == 0: no evaluation


def _unipc_rhos_c(h: float, r: float) -> tuple[float, float]:
    """UniC's order-2 coefficients: solve [[1, 1], [r, 1]] rho = [b_1, b_2] (bh2), with
    hh = -h, h phi_1 = e^{hh} - 1, b_k from the phi_k recursion of the reference code."""
    hh = -h
    b_h = math.expm1(hh)
    h_phi_k = math.expm1(hh) / hh - 1.0
    b1 = h_phi_k / b_h
    h_phi_k = h_phi_k / hh - 0.5
    b2 = 2.0 * h_phi_k / b_h
    # [[1, 1], [r, 1]] (rho_1, rho_2) = (b1, b2)
    rho_1 = (b1 - b2) / (1.0 - r)
    return rho_1, b1 - rho_1


# --- the registry -------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerSpec:
    """One registered sampler.

    :param fn: the sampler function (the common signature above).
    :param grid: (steps, schedule) -> [S] float64 evaluation times.
    :param stochastic: whether eta > 0 is allowed (otherwise eta must be 0).
    :param clip_x0: whether x0_hat is clipped to the data range by default.
    :param help: one line for the CLI's help.
    """

    fn: Callable[..., torch.Tensor]
    grid: Callable[[int, ScheduleConfig], torch.Tensor]
    stochastic: bool
    clip_x0: bool
    help: str


# name -> (function, time grid); what else is known of each (eta, default clipping, help) is
# in `sampler_names.SAMPLER_INFO`, which the command line reads without importing torch.
_FUNCTIONS: dict[str, tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]] = {
    "ddim": (ddim_sample, ddim_times),
    "dpmpp-2m": (dpmpp_2m_sample, ddim_times),
    "dpmpp-2m-logsnr": (dpmpp_2m_sample, logsnr_times),
    "unipc": (unipc_sample, ddim_times),
}


def _registry() -> dict[str, SamplerSpec]:
    """`_FUNCTIONS` joined with `SAMPLER_INFO`; ImportError when they name different samplers."""
    if list(_FUNCTIONS) != list(SAMPLER_INFO):
        raise ImportError(
            f"the sampler registry ({', '.join(_FUNCTIONS)}) and sampler_names.SAMPLER_INFO "
            f"({', '.join(SAMPLER_INFO)}) must name the same samplers in the same order"
        )
    return {
        name: SamplerSpec(fn, grid, **asdict(SAMPLER_INFO[name]))
        for name, (fn, grid) in _FUNCTIONS.items()
    }


SAMPLERS: dict[str, SamplerSpec] = _registry()


def sampler_spec(name: str) -> SamplerSpec:
    """The registry entry of `name`; ValueError naming the choices for an unknown one."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def check_steps(steps: int, name: str = "steps") -> int:
    """`steps` as an int if it is an integer >= 1 (numpy's, or a 0-d integer tensor, too:
    `config.as_integer`), else ValueError naming it (a float such as 2.5 would make a grid
    of ceil(2.5) times, 0 would return the noise unchanged)."""
    value = as_integer(steps)
    if value is None or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {steps!r}")
    return value


def check_sampler(sampler: str, eta: float) -> None:
    """ValueError for an unknown sampler, an eta that is not a number in [0, 1], or eta > 0
    with a deterministic one."""
    spec = sampler_spec(sampler)
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0 <= eta <= 1:
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    if not spec.stochastic and eta > 0:
        raise ValueError(f"{sampler} is deterministic; use eta 0 (got eta {eta})")


def default_clip_x0(sampler: str) -> bool:
    """Clip x0_hat to the data range by default? The registry's `clip_x0`."""
    return sampler_spec(sampler).clip_x0


def resolve_clip(clip: bool | None, sampler: str) -> bool:
    """An explicit clip setting, or the sampler's default (`default_clip_x0`) for None."""
    return default_clip_x0(sampler) if clip is None else bool(clip)


def sampler_x0_range(
    clip: bool | None, sampler: str, mean: torch.Tensor, std: torch.Tensor
) -> X0Range | None:
    """The `x0_range` a sampler gets under a clip setting (`resolve_clip`): the data range
    (`data_range`) or None."""
    return data_range(mean, std) if resolve_clip(clip, sampler) else None


def sample(
    model: Denoiser,
    initial_noise: torch.Tensor,
    steps: int,
    schedule: ScheduleConfig,
    *,
    sampler: str = "ddim",
    eta: float = 0.0,
    generators: Sequence[torch.Generator] | None = None,
    callback: StepCallback | None = None,
    x0_range: X0Range | None = None,
    cond: Any = None,
) -> torch.Tensor:
    """Run the named sampler (`SAMPLERS`) on its own time grid of `steps` evaluations.

    :param model: the denoiser, called as model(x_t [N x C x H x W], noise variances [N]
        (noise_rate^2, float32), cond) -> predicted noise [N x C x H x W]; it must take the
        third argument even when it ignores it.
    :param initial_noise: [N x C x H x W] standard normal x_T.
    :param steps: number of network evaluations S >= 1 (every sampler uses exactly S).
    :param eta: stochasticity in [0, 1]; must be 0 for a deterministic sampler.
    :param generators: one per image (N), each drawing that image's fresh noise; needed
        when eta > 0.
    :param callback: called after each network evaluation as callback(step, t, x_t, x0_hat).
    :param x0_range: clip every x0_hat to it (`data_range`); None: no clipping.
    :param cond: conditioning, passed unchanged to every network call.
    :return: [N x C x H x W] predicted clean images x0_hat (normalised space).
    :raises ValueError: naming the bad argument: an unknown sampler, steps not an integer
        >= 1, eta outside [0, 1] or > 0 for a deterministic sampler, noise that is not
        [N x C x H x W], or generators that are not one per image.
    """
    check_sampler(sampler, eta)
    steps = check_steps(steps)
    if initial_noise.dim() != 4:
        raise ValueError(
            f"initial_noise must be [N x C x H x W], got shape {tuple(initial_noise.shape)}"
        )
    if generators is not None and len(generators) != len(initial_noise):
        raise ValueError(
            f"generators must be one per image: got {len(generators)} for "
            f"{counted(len(initial_noise), 'image')}"
        )
    spec = SAMPLERS[sampler]
    return spec.fn(
        model,
        initial_noise,
        spec.grid(steps, schedule),
        schedule,
        eta=eta,
        generators=generators,
        callback=callback,
        x0_range=x0_range,
        cond=cond,
    )
