"""Devices, precision and compilation: where and how the maths runs."""

from __future__ import annotations

import contextlib
import functools
import shutil
import warnings

import torch

from .config import ConfigError

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


def compiler_available() -> bool:
    return shutil.which("cc") is not None or shutil.which("gcc") is not None


def maybe_compile(module: torch.nn.Module, enabled: bool | None, device: torch.device):
    """torch.compile `module` when asked (None: on CUDA, where it pays off at once).

    Falls back to the eager module with a one-line warning if compilation is impossible.
    """
    if enabled is None:
        enabled = device.type == "cuda"
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
