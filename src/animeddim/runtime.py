"""Devices, precision and compilation: where and how the maths runs."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import os
import shutil
import sys
import warnings
from collections.abc import Callable

import torch

from .config import ConfigError
from .words import counted

# Measured on a 2-core AMD EPYC with AVX512-BF16, on a quiet machine (docs/benchmarks.md).
# Training in bf16: channels_last (interleaved: 35.7 vs 32.6 images/s NCHW) and, for runs
# of at least TRAIN_COMPILE_MIN_STEPS steps, torch.compile (1.10x more for ~30 s of
# compilation; a short run would not repay it). Sampling: channels_last, compiled with
# inductor freezing (prepacked oneDNN weights, conv + silu/add fused; ~1.3x per network
# call for ~5-15 s of compilation) for jobs of at least SAMPLE_COMPILE_MIN_EVALS
# image-evaluations, in chunks of CPU_SAMPLE_CHUNK images per network call (64x64
# activations of 16 images stay in cache: ~1.1x faster per image than 64; larger batches
# were slower).
TRAIN_COMPILE_MIN_STEPS = 1000
CPU_SAMPLE_CHUNK = 16
SAMPLE_COMPILE_MIN_EVALS = 10_000

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


_kept_freed_memory: bool | None = None  # None: not tried yet in this process


def keep_freed_memory() -> bool:
    """Let the C allocator keep freed memory for reuse instead of handing it back to the OS.

    glibc serves each large block (above a threshold that grows to at most 32 MiB; a 64-px
    activation of a batch of 64 is 34-100 MiB) with its own mmap and unmaps it on free, so
    each training step faulted in and zeroed ~2.5 GB of fresh pages: 630,000 page faults
    and 1.2-2.2 s of kernel time per fp32 step on 2 cores. With mmap off and no trimming,
    freed blocks stay in the heap and the next step reuses them (docs/benchmarks.md, "Two
    faults in the fp32 training step": 1.25x per step). The process then keeps its peak
    resident memory until it exits. In a worker thread (the web app's jobs) blocks over
    64 MiB, the most a per-thread glibc heap holds, are still mapped and unmapped; smaller
    ones are kept there too. Linux/glibc only (elsewhere nothing is done);
    ANIMEDDIM_MALLOC=system keeps the C library's defaults. Returns whether it took effect.
    """
    global _kept_freed_memory
    choice = os.environ.get("ANIMEDDIM_MALLOC", "")
    if choice not in ("", "system"):
        raise ConfigError(f"ANIMEDDIM_MALLOC must be 'system' or unset, got {choice!r}")
    if _kept_freed_memory is None:
        _kept_freed_memory = False
        if choice != "system" and sys.platform.startswith("linux"):
            try:
                # the process's own symbols: libc is loaded (find_library would run ldconfig)
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):  # not glibc (musl has no mallopt)
                return False
            # mmap off for new blocks, and a trim threshold (INT_MAX bytes) no heap top reaches.
            _kept_freed_memory = bool(mallopt(_M_MMAP_MAX, 0)) and bool(
                mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
            )
    return _kept_freed_memory


def kept_freed_memory() -> bool:
    """Whether `keep_freed_memory` has taken effect in this process."""
    return bool(_kept_freed_memory)


def resolve_device(name: str = "auto", *, host_memory: bool = True) -> torch.device:
    """auto | cpu | cuda | cuda:N | mps -> torch.device, checking that it is present.

    host_memory: on the CPU, also `keep_freed_memory()`: the programs' choice (the CLI's
    commands, the web server, the tour, `train`); the Python API's sampling calls and the
    bench's baseline pass False, leaving a caller's process as it was."""
    dev = _resolve_device(name)
    if dev.type == "cpu" and host_memory:
        keep_freed_memory()
    return dev


def _resolve_device(name: str) -> torch.device:
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
        raise ConfigError(
            f"device {name!r}: only {counted(torch.cuda.device_count(), 'CUDA device')}"
        )
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ConfigError(f"device {name!r} asked for, but MPS is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device {name!r}: expected auto, cpu, cuda, cuda:N or mps")
    return dev


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16 matrix instructions that PyTorch uses.

    PyTorch's kernels run at the level `torch.backends.cpu.get_cpu_capability()` reports
    (lowered with ATEN_CPU_CAPABILITY, e.g. to emulate an AVX2-only CPU); below AVX-512
    bf16 is emulated in software (a 2048^3 bf16 matmul ran at 0.3 GFLOP/s against 70 in
    fp32), so it counts as not fast.
    """
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> str:
    """auto -> bf16 where the hardware does it well, else fp32; ConfigError for a name
    that is not auto, fp32, bf16 or fp16, or fp16 on the CPU."""
    if name != "auto" and name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}: expected auto, fp32, bf16 or fp16")
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
    """The denoiser prepared for sampling: weights in the compute dtype, a memory layout,
    optionally compiled, called in chunks of `chunk` images.

    forward(noisy_images, noise_variances, cond=None) as the network's; inputs are cast and
    laid out here, the output is in the compute dtype (samplers call .float() on it). Images
    are independent in eval mode (BatchNorm uses running statistics), so chunking does not
    change them; per-image conditioning (a tensor with one row per image) is chunked with
    them, any other cond is passed unchanged. If the compiled network fails on its first
    call, this warns once and runs the eager network from then on.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        dtype: torch.dtype,
        fmt,
        autocast_ctx,
        *,
        compiled: Callable | None = None,
        freezing: bool = False,
        chunk: int | None = None,
        graphs: bool = False,
    ):
        super().__init__()
        self.net, self.dtype, self.fmt, self.autocast_ctx = net, dtype, fmt, autocast_ctx
        self.compiled, self.freezing, self.chunk = compiled, freezing, chunk
        self._compiled_ok = False
        self._warm_sizes: set[torch.Size] = set()
        self.graphs = graphs  # `compiled` replays CUDA graphs (runtime.uses_cuda_graphs)

    def _run_compiled(self, x: torch.Tensor, v: torch.Tensor, cond) -> torch.Tensor:
        if self.graphs:  # a replayed CUDA graph's output is overwritten by the next replay
            torch.compiler.cudagraph_mark_step_begin()
            return self.compiled(x, v, cond).clone()
        # Inductor reads `freezing` when it compiles, which happens lazily inside a call
        # (first call, new chunk size); torch.compile(options=...) did not apply it here.
        if not self.freezing:
            return self.compiled(x, v, cond)
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.compiled(x, v, cond)

    def _call(self, x: torch.Tensor, v: torch.Tensor, cond) -> torch.Tensor:
        if self.compiled is None:
            return self.net(x, v, cond)
        if x.shape[-2:] not in self._warm_sizes:
            # One eager call per image size fills lazily built caches first (the folded
            # convs' bias maps), so that the compiled graph does not see them change
            # (which would compile it twice).
            self.net(x[:1], v[:1], _rows(cond, 0, 1, x.shape[0]))
            self._warm_sizes.add(x.shape[-2:])
        if self._compiled_ok:
            return self._run_compiled(x, v, cond)
        try:
            out = self._run_compiled(x, v, cond)
        except Exception as e:  # backend specific: no compiler, unsupported op, ...
            warnings.warn(
                f"torch.compile of the sampling network failed ({type(e).__name__}); "
                "sampling eagerly",
                stacklevel=3,
            )
            self.compiled = None
            return self.net(x, v, cond)
        self._compiled_ok = True
        return out

    def forward(
        self, noisy_images: torch.Tensor, noise_variances: torch.Tensor, cond=None
    ) -> torch.Tensor:
        x = noisy_images.to(self.dtype).contiguous(memory_format=self.fmt)
        n, c = x.shape[0], self.chunk or x.shape[0]
        with self.autocast_ctx:
            if n <= c:
                return self._call(x, noise_variances, cond)
            return torch.cat(
                [
                    self._call(x[i : i + c], noise_variances[i : i + c], _rows(cond, i, i + c, n))
                    for i in range(0, n, c)
                ]
            )


def _rows(cond, start: int, stop: int, n: int):
    """Rows start .. stop - 1 of per-image conditioning (a tensor of n rows); else cond."""
    if isinstance(cond, torch.Tensor) and cond.ndim > 0 and cond.shape[0] == n:
        return cond[start:stop]
    return cond


def default_sample_chunk(device: torch.device) -> int | None:
    """Images per network call when sampling (None: the whole batch at once)."""
    return CPU_SAMPLE_CHUNK if device.type == "cpu" else None


def default_compile_sampler(device: torch.device, evaluations: int | None = None) -> bool:
    """Compile the sampling network? Where it measured faster (CPU with a C compiler, CUDA),
    and only for jobs of at least SAMPLE_COMPILE_MIN_EVALS image-evaluations (images x
    steps; None: assume a large job), which repay the seconds of compilation."""
    if evaluations is not None and evaluations < SAMPLE_COMPILE_MIN_EVALS:
        return False
    if device.type == "cpu":
        return compiler_available()
    return device.type == "cuda"


def prepare_inference(
    model: torch.nn.Module,
    device: torch.device,
    precision: str,
    *,
    channels_last: bool | None = None,
    fold: bool = True,
    bf16_weights: bool = True,
    compile: bool = False,
    chunk: int | None | str = "auto",
    compile_mode: str = "default",
) -> InferenceNet:
    """A copy of the (EMA) network made fast for sampling; the original is left untouched.

    - fold: BatchNorm's running statistics folded exactly into the following conv
      (`unet.fold_batchnorm`), one memory pass less per block;
    - bf16 precision: weights cast to bf16 once, instead of by autocast at every call;
      fp16 keeps fp32 weights under autocast;
    - channels_last: `default_channels_last(device)`;
    - compile: torch.compile the copy (on the CPU with inductor freezing: weights become
      constants, prepacked for oneDNN, with conv + silu/add fused); compiled lazily on the
      first call, once per new chunk size (`default_compile_sampler` says when it pays);
    - chunk: images per network call; "auto" = `default_sample_chunk(device)`;
    - compile_mode: torch.compile's mode (config.COMPILE_MODES); reduce-overhead replays CUDA
      graphs on CUDA, each call's output then copied out of the graph's memory.

    Call again whenever the weights change (the copy, compiled or not, does not follow them).
    """
    from .unet import fold_batchnorm

    if channels_last is None:
        channels_last = default_channels_last(device)
    if chunk == "auto":
        chunk = default_sample_chunk(device)
    net = fold_batchnorm(model) if fold else copy.deepcopy(model).eval().requires_grad_(False)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dtype, ctx = torch.float32, contextlib.nullcontext()
    if precision == "bf16" and bf16_weights:
        dtype = torch.bfloat16
    elif precision != "fp32":
        ctx = autocast(device, precision)
    net = net.to(device=device, dtype=dtype, memory_format=fmt)
    compiled = None
    if compile:
        if device.type == "cpu" and not compiler_available():
            warnings.warn("torch.compile needs a C compiler; sampling eagerly", stacklevel=2)
        else:
            # static shapes: one graph per chunk size (the chunk, and the smaller sizes
            # left at the end of a batch) rather than one dynamic-batch graph for all
            mode = None if compile_mode == "default" else compile_mode
            compiled = torch.compile(net, dynamic=False, mode=mode)
    # Freezing (weights as constants, prepacked) is measured on the CPU only.
    return InferenceNet(
        net,
        dtype,
        fmt,
        ctx,
        compiled=compiled,
        freezing=device.type == "cpu",
        chunk=chunk,
        graphs=compiled is not None and uses_cuda_graphs(compile_mode, device),
    ).eval()


def fused_adamw_supported(device: torch.device) -> bool:
    """Fused AdamW (one kernel for all parameters): CUDA, and the CPU from torch 2.4."""
    if device.type == "cuda":
        return True
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return device.type == "cpu" and (major, minor) >= (2, 4)


def compiler_available() -> bool:
    return shutil.which("cc") is not None or shutil.which("gcc") is not None


def default_channels_last(device: torch.device) -> bool:
    """channels_last where it measured faster for this network (docs/benchmarks.md): CUDA,
    and the CPU for training (bf16: 35.7 vs 32.6 images/s NCHW, AVX512-BF16; fp32: an eager
    step 1.34x faster with AVX-512 kernels, 1.17-1.28x with kernels capped at AVX2) and for
    sampling."""
    return device.type in ("cpu", "cuda")


def default_compile(
    device: torch.device,
    planned_steps: int | None = None,
    time_limit_minutes: float = 0.0,
    processes: int = 1,
    precision: str = "bf16",
) -> bool:
    """torch.compile the training step by default where it pays off (docs/benchmarks.md).

    CUDA: always. CPU (with a C compiler, one process: compiled training under torchrun on
    the CPU was never measured): in bf16, for runs that plan at least
    TRAIN_COMPILE_MIN_STEPS steps (None: a long run) and are not stopped within 10 minutes
    by a time limit, so that the ~30 s of compilation are repaid. Not in fp32 (CPUs
    without fast bf16): there the compiled channels_last step was no faster than the eager
    one (25.8 vs 23.4 s per step, AVX2 kernels; 19.0 vs 18.8 images/s on an AVX-512 Xeon
    without bf16), so compiling would cost time for nothing.
    """
    if device.type == "cuda":
        return True
    if device.type != "cpu" or not compiler_available() or processes > 1:
        return False
    if precision == "fp32":
        return False
    if 0 < time_limit_minutes < 10:
        return False
    return planned_steps is None or planned_steps >= TRAIN_COMPILE_MIN_STEPS


def uses_cuda_graphs(mode: str, device: torch.device) -> bool:
    """Whether a network compiled in `mode` replays CUDA graphs on `device`: then each training
    step must begin with `torch.compiler.cudagraph_mark_step_begin()`."""
    return device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")


def data_on_device(setting: str, nbytes: int, device: torch.device) -> bool:
    """Whether training keeps the uint8 image cache on `device` (config.DATA_ON_DEVICE): "yes",
    "no", or "auto": on CUDA when the cache takes under a quarter of the free memory (the
    host path's per-batch copy and launch would otherwise bound a small network there)."""
    if setting != "auto":
        return setting == "yes"
    if device.type != "cuda":
        return False  # on the CPU the host cache is already where the network runs
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < free / 4


def maybe_compile(
    module: torch.nn.Module, enabled: bool | None, device: torch.device, mode: str = "default"
):
    """torch.compile `module` when asked (None: `default_compile(device)`), in torch.compile's
    `mode` (config.COMPILE_MODES; the CUDA-graph modes compile without graphs off CUDA).

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
        return torch.compile(module, mode=None if mode == "default" else mode)
    except Exception as e:  # pragma: no cover - backend specific
        warnings.warn(
            f"torch.compile failed ({type(e).__name__}: {e}); running eagerly", stacklevel=2
        )
        return module
