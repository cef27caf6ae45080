"""Devices, precision and compilation: where and how the maths runs."""

from __future__ import annotations

import contextlib
import copy
import functools
import shutil
import warnings

import torch

from .config import ConfigError

# Measured on a 2-core AMD EPYC with AVX512-BF16 (docs/benchmarks.md).
# Training: default layout (oneDNN's bf16 backward convolutions did not gain from
# channels_last); sampling: channels_last (forward convolutions did). Compile: off, its
# minutes of compilation on few cores buy little over bf16 oneDNN kernels here.
CPU_CHANNELS_LAST_TRAIN = False
CPU_CHANNELS_LAST_SAMPLE = True
CPU_COMPILE = False

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """auto | cpu | cuda | cuda:N | mps -> torch.device, checking that it is present."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"unknown device {name!r}: expected auto, cpu, cuda, cuda:N or mps"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but this machine has no CUDA GPU")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ConfigError(f"device {name!r} asked for, but MPS is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device {name!r}: expected auto, cpu, cuda, cuda:N or mps")
    return dev


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16 matrix instructions."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> str:
    """auto -> bf16 where the hardware does it well, else fp32."""
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise ConfigError("precision 'fp16' is not supported on the CPU: use bf16 or fp32")
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for the network's forward pass (nullcontext for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class InferenceNet(torch.nn.Module):
    """The denoiser prepared for sampling: weights in the compute dtype, a memory layout.

    forward(noisy_images, noise_variances) as the network's; inputs are cast and laid out
    here, the output is in the compute dtype (samplers call .float() on it).
    """

    def __init__(self, net: torch.nn.Module, dtype: torch.dtype, fmt, autocast_ctx):
        super().__init__()
        self.net, self.dtype, self.fmt, self.autocast_ctx = net, dtype, fmt, autocast_ctx

    def forward(self, noisy_images: torch.Tensor, noise_variances: torch.Tensor) -> torch.Tensor:
        x = noisy_images.to(self.dtype).contiguous(memory_format=self.fmt)
        with self.autocast_ctx:
            return self.net(x, noise_variances)


def prepare_inference(
    model: torch.nn.Module,
    device: torch.device,
    precision: str,
    *,
    channels_last: bool | None = None,
    fold: bool = True,
    bf16_weights: bool = True,
) -> InferenceNet:
    """A copy of the (EMA) network made fast for sampling; the original is left untouched.

    - fold: BatchNorm's running statistics folded exactly into the following conv
      (`unet.fold_batchnorm`), one memory pass less per block;
    - bf16 precision: weights cast to bf16 once, instead of by autocast at every call;
      fp16 keeps fp32 weights under autocast;
    - channels_last: `default_channels_last(device, training=False)`.

    Call again whenever the weights change (the copy does not follow them).
    """
    from .unet import UNet, fold_batchnorm

    if channels_last is None:
        channels_last = default_channels_last(device, training=False)
    net = fold_batchnorm(model) if fold and isinstance(model, UNet) else model
    if net is model:
        net = copy.deepcopy(model).eval().requires_grad_(False)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dtype, ctx = torch.float32, contextlib.nullcontext()
    if precision == "bf16" and bf16_weights:
        dtype = torch.bfloat16
    elif precision != "fp32":
        ctx = autocast(device, precision)
    net = net.to(device=device, dtype=dtype, memory_format=fmt)
    return InferenceNet(net, dtype, fmt, ctx).eval()


def fused_adamw_supported(device: torch.device) -> bool:
    """Fused AdamW (one kernel for all parameters): CUDA, and the CPU from torch 2.4."""
    if device.type == "cuda":
        return True
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return device.type == "cpu" and (major, minor) >= (2, 4)


def compiler_available() -> bool:
    return shutil.which("cc") is not None or shutil.which("gcc") is not None


def default_channels_last(device: torch.device, training: bool = True) -> bool:
    """channels_last where it measured faster for this network (docs/benchmarks.md)."""
    if device.type == "cpu":
        return CPU_CHANNELS_LAST_TRAIN if training else CPU_CHANNELS_LAST_SAMPLE
    return device.type == "cuda"


def default_compile(device: torch.device) -> bool:
    """torch.compile by default where it pays off (docs/benchmarks.md)."""
    return device.type == "cuda" or (device.type == "cpu" and CPU_COMPILE)


def maybe_compile(module: torch.nn.Module, enabled: bool | None, device: torch.device):
    """torch.compile `module` when asked (None: `default_compile(device)`).

    Falls back to the eager module with a one-line warning if compilation is impossible.
    """
    if enabled is None:
        enabled = default_compile(device)
    if not enabled:
        return module
    if device.type == "cpu" and not compiler_available():
        warnings.warn("torch.compile needs a C compiler; running eagerly", stacklevel=2)
        return module
    try:
        return torch.compile(module)
    except Exception as e:  # pragma: no cover - backend specific
        warnings.warn(
            f"torch.compile failed ({type(e).__name__}: {e}); running eagerly", stacklevel=2
        )
        return module
