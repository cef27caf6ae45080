"""Throughput benchmark: a plain fp32 eager baseline against the tuned default path.

Both run in one process on the same network and batch, so their ratio is meaningful on
any machine. Numbers are medians over timed iterations after warm-up.
"""

from __future__ import annotations

import contextlib
import copy
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config import ConfigError, RunConfig, UNetConfig
from ..diffusion.samplers import sample as run_sampler
from ..diffusion.schedule import diffuse
from ..runtime import (
    PRECISIONS,
    autocast,
    default_channels_last,
    default_compile,
    default_compile_sampler,
    default_sample_chunk,
    fused_adamw_supported,
    keep_freed_memory,
    kept_freed_memory,
    maybe_compile,
    prepare_inference,
    resolve_device,
    resolve_precision,
    uses_cuda_graphs,
)
from ..train import ema_update, losses
from ..unet import UNet
from ..words import counted


@dataclass
class PathResult:
    name: str
    precision: str
    compiled: bool
    sample_compiled: bool
    channels_last: bool
    inference_prepared: bool
    train_images_per_s: float
    sample_images_per_s: float
    train_gflop_per_s: float
    sample_gflop_per_s: float
    peak_memory_mib: float
    compile_seconds: float
    train_compile_seconds: float
    sample_compile_seconds: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _times(fn: Callable[[], None], iters: int, device) -> list[float]:
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return times


def _median_rate(fn: Callable[[], None], items: int, iters: int, device) -> float:
    return items / statistics.median(_times(fn, iters, device))


def _flops(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _reset_peak(device: torch.device) -> None:
    """Start a fresh peak-memory window for one path."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux: writing 5 to clear_refs resets the resident-set high-water mark (VmHWM) to
    # the current RSS, so each path's peak is its own (plus what the process already held).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mib(device: torch.device) -> float:
    """CUDA: peak allocated by torch. CPU: peak resident set of the process (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    # Elsewhere ru_maxrss (KiB on Linux, bytes on macOS) is the process-lifetime maximum.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def run_path(
    name: str,
    cfg: UNetConfig,
    batch_size: int,
    device: torch.device,
    *,
    precision: str,
    compile: bool,
    channels_last: bool,
    fused: bool,
    prepared_inference: bool,
    iters: int,
    sample_channels_last: bool | None = None,
    sample_compile: bool | None = None,
    sample_iters: int = 2,
    sample_steps: int = 20,
    sampler: str = "ddim",
    sample_batch_size: int | None = None,
    compile_mode: str = "default",
) -> PathResult:
    """Measure one configuration: training step and sampling throughput.

    Training: the loop's step (diffuse, forward under the precision, L1 losses, backward,
    AdamW, EMA) on batches of `batch_size`. Sampling: `sample_steps` steps of `sampler` on
    `sample_batch_size` images (None: `batch_size`) with the EMA network, either as it is
    under autocast (baseline) or through `runtime.prepare_inference` (tuned: folded BN,
    cast weights, layout, chunked calls, compiled when `sample_compile`, default `compile`).
    The peak memory covers this path's warm-up and timed iterations only.
    """
    torch.manual_seed(0)
    run_cfg = RunConfig(model=cfg)
    sched = run_cfg.schedule
    _reset_peak(device)
    model = UNet(cfg).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if fused:
        kw = {"fused": True} if fused_adamw_supported(device) else {"foreach": True}
    else:
        kw = {"foreach": False}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4, **kw)
    ctx = autocast(device, precision)
    net = maybe_compile(model, compile, device, compile_mode)
    graphs = net is not model and uses_cuda_graphs(compile_mode, device)
    s = cfg.image_size
    x0 = torch.randn(batch_size, cfg.channels, s, s, device=device).contiguous(memory_format=fmt)
    noise = torch.randn_like(x0)
    t = torch.rand(batch_size, device=device, dtype=torch.float64)
    ema_p, live_p = list(ema.parameters()), list(model.parameters())

    def train_step() -> None:  # the training loop's own loss (`train.losses`), then AdamW, EMA
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss, _ = losses(net, x0, noise, t, run_cfg, ctx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            if fused:
                ema_update(ema_p, live_p, 0.999)
            else:  # the plain port: one update per parameter from Python
                for e, p in zip(ema_p, live_p, strict=True):
                    e.mul_(0.999).add_(p.detach(), alpha=0.001)

    t0 = time.perf_counter()
    train_step()
    _sync(device)
    train_compile = time.perf_counter() - t0 if net is not model else 0.0
    train_step()  # warm-up (autotuning, allocator, oneDNN primitive caches)
    _sync(device)
    train_rate = _median_rate(train_step, batch_size, iters, device)

    net_s, sample_ctx, sample_compiled = _sampling_net(
        ema,
        device,
        precision,
        ctx,
        prepared_inference,
        compile if sample_compile is None else sample_compile,
        sample_channels_last,
        compile_mode,
    )
    n_sample = sample_batch_size or batch_size
    sample_noise = torch.randn(n_sample, *x0.shape[1:], device=device)

    @torch.no_grad()
    def sample() -> None:
        with sample_ctx:
            run_sampler(net_s, sample_noise, sample_steps, sched, sampler=sampler)

    t0 = time.perf_counter()
    sample()  # also the warm-up: 20 network calls
    _sync(device)
    sample_compile_s = time.perf_counter() - t0 if sample_compiled else 0.0
    sample_rate = _median_rate(sample, n_sample, sample_iters, device)
    peak = _peak_mib(device)  # before the flop-counting passes below
    train_flops = _flops(lambda: _eager_train_flops(model, x0, noise, t, sched))
    sample_flops = _flops(lambda: _eager_forward_flops(ema, x0, t)) * sample_steps
    return PathResult(
        name=name,
        precision=precision,
        compiled=net is not model,
        sample_compiled=sample_compiled,
        channels_last=channels_last,
        inference_prepared=prepared_inference,
        train_images_per_s=train_rate,
        sample_images_per_s=sample_rate,
        train_gflop_per_s=train_flops / batch_size * train_rate / 1e9,
        sample_gflop_per_s=sample_flops / batch_size * sample_rate / 1e9,
        peak_memory_mib=peak,
        compile_seconds=train_compile + sample_compile_s,
        train_compile_seconds=train_compile,
        sample_compile_seconds=sample_compile_s,
    )


def _sampling_net(ema, device, precision, ctx, prepared, compile, channels_last, mode):
    """(network, context, compiled?) that a path samples with: the tuned path's prepared copy
    (`runtime.prepare_inference`), or the EMA network under autocast (the baseline)."""
    if prepared:
        net = prepare_inference(
            ema, device, precision, channels_last=channels_last, compile=compile, compile_mode=mode
        )
        return net, contextlib.nullcontext(), net.compiled is not None
    net = maybe_compile(ema, compile, device)
    return net, ctx, net is not ema


def _eager_train_flops(model, x0, noise, t, sched) -> None:
    xt, _, nr = diffuse(x0, noise, t, sched)
    model(xt, (nr**2).view(-1)).float().abs().mean().backward()
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def _eager_forward_flops(model, x0, t) -> None:
    model(x0, t.float())


def _best_rate(fn: Callable[[], None], work: float, iters: int, device) -> float:
    """Work per second of the fastest of `iters` timed calls, after two warm-up calls."""
    fn()
    fn()
    _sync(device)
    return work / min(_times(fn, iters, device))


def chip_peak(device: torch.device, precisions: tuple[str, ...], iters: int = 5) -> dict:
    """What this chip reaches on the operations the network is made of, in GFLOP/s.

    For each precision: one large square matmul, and 3x3 convolutions forward and backward
    (input and weight gradients) at two shapes like the network's widest levels, in both
    memory layouts, keeping the fastest. Each rate is the fastest of `iters` calls: the
    rate the training and sampling paths are compared with (their FLOPs are counted the
    same way, matmul and convolution only).
    """
    big = device.type == "cuda"
    n = 8192 if big else 2048
    shapes = [(256, 256, 64), (256, 512, 32)] if big else [(32, 64, 32), (32, 128, 16)]
    out: dict[str, dict[str, float]] = {}
    for precision in precisions:
        dtype = PRECISIONS[precision] or torch.float32
        a = torch.randn(n, n, device=device, dtype=dtype)
        conv_rates = [
            _conv_rate(batch, ch, size, fmt, dtype, device, iters)
            for batch, ch, size in shapes
            for fmt in (torch.contiguous_format, torch.channels_last)
        ]
        out[precision] = {
            "matmul_gflop_per_s": _best_rate(lambda a=a: a @ a, 2 * n**3 / 1e9, iters, device),
            "conv_fwd_bwd_gflop_per_s": max(conv_rates),
        }
    return out


def _conv_rate(batch: int, ch: int, size: int, fmt, dtype, device, iters: int) -> float:
    conv = torch.nn.Conv2d(ch, ch, 3, padding=1, bias=False)
    conv = conv.to(device=device, dtype=dtype, memory_format=fmt)
    x = torch.randn(batch, ch, size, size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=fmt).requires_grad_(True)

    def fwd_bwd() -> None:
        conv(x).sum().backward()

    flops = 3 * 2 * batch * ch * ch * 9 * size * size  # forward + input and weight gradients
    return _best_rate(fwd_bwd, flops / 1e9, iters, device)


def peak_precisions(device: torch.device) -> tuple[str, ...]:
    """fp32, and bf16 where `auto` picks it (native bf16: slow emulated bf16 is no peak)."""
    return ("fp32", "bf16") if resolve_precision("auto", device) == "bf16" else ("fp32",)


def peak_shares(r: dict) -> dict[str, dict[str, float]]:
    """Each path's training and sampling GFLOP/s as a share of the peak in its precision."""
    shares = {}
    for path in ("baseline", "tuned"):
        res = r[path]
        peak = r["peak"].get(res["precision"]) or r["peak"]["fp32"]
        shares[path] = {
            f"{what}_of_{op}": res[f"{what}_gflop_per_s"] / peak[f"{op}_gflop_per_s"]
            for what in ("train", "sample")
            for op in ("matmul", "conv_fwd_bwd")
        }
    return shares


def data_pipeline_rate(
    image_size: int, batch_size: int, on_device: torch.device | None = None, n: int = 4096
) -> float:
    """Images/s from the uint8 cache to augmented float batches (one epoch, median of 3): the
    host cache (CPU batches), or with `on_device` a copy of it there (train --data-on-device)."""
    from ..batches import device_images, iterate_batches

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8)
    idx = np.arange(n)
    device = on_device or torch.device("cpu")
    source = images if on_device is None else device_images(images, on_device)

    def epoch() -> None:
        for b in iterate_batches(
            source,
            idx,
            batch_size,
            seed=0,
            epoch=0,
            shuffle=True,
            flip=True,
            drop_last=True,
            device=device,
        ):
            b.sub_(0.5)  # the normalisation the training loop applies

    return _median_rate(epoch, n - n % batch_size, 3, device)


def feature_rates(batch_size: int, device: torch.device) -> dict[str, float]:
    """Inception feature extraction images/s per KID protocol (empty if no weights)."""
    from .. import metrics

    try:
        ext = metrics.InceptionFeatures(device=device)
    except metrics.InceptionWeightsMissing:
        return {}
    images = torch.randint(0, 256, (batch_size, 3, 64, 64), dtype=torch.uint8)
    out = {}
    for protocol in ("paper", "standard"):
        ext.features(images, protocol)  # warm-up
        out[protocol] = _median_rate(
            lambda p=protocol: ext.features(images, p), batch_size, 2, device
        )
    return out


def checked_config(image_size: int, batch_size: int) -> UNetConfig:
    """The benchmarked network's config; ConfigError, before anything is measured, for an
    image size it cannot halve to its innermost level (15: a traceback from the first skip
    connection) or a batch that gives BatchNorm one value per channel there (8 px, batch 1:
    a traceback from the first training step)."""
    cfg = UNetConfig(image_size=image_size)
    cfg.validate()
    inner = image_size // 2 ** (len(cfg.widths) - 1)
    if batch_size * inner * inner < 2:
        raise ConfigError(
            f"bench --image-size {image_size} --batch-size {batch_size}: the innermost level "
            f"is {inner}x{inner} pixels, and a batch of {counted(batch_size, 'image')} gives "
            "BatchNorm one value per channel: use --batch-size 2 or more, or a larger "
            "--image-size"
        )
    return cfg


def run(
    image_size: int = 64,
    batch_size: int = 64,
    device_name: str = "auto",
    iters: int = 5,
    compile: bool | None = None,
    kid: bool = True,
    sample_batch_size: int | None = None,
    sampler: str = "ddim",
    steps: int = 20,
    compile_mode: str = "default",
    say: Callable[[str], None] | None = None,
) -> dict:
    """Run baseline and tuned paths; return a JSON-able dict of results and ratios.

    Both paths train on batches of `batch_size` and sample `sample_batch_size` images (None:
    `batch_size`) with `steps` steps of `sampler`; `compile_mode` is the tuned path's. `say`
    is told each measurement as it starts (minutes on a slow CPU)."""
    say = say or (lambda _: None)
    # The baseline runs with the C library's allocator as it comes (unless an earlier call in
    # this process changed it: the JSON says so); the tuned path keeps freed host memory.
    cfg = checked_config(image_size, batch_size)
    device = resolve_device(device_name, host_memory=False)
    baseline_kept = kept_freed_memory()
    say(f"baseline fp32 eager: training, then sampling ({steps} {sampler} steps)")
    baseline = run_path(
        "baseline fp32 eager",
        cfg,
        batch_size,
        device,
        precision="fp32",
        compile=False,
        channels_last=False,
        fused=False,
        prepared_inference=False,
        iters=iters,
        sample_steps=steps,
        sampler=sampler,
        sample_batch_size=sample_batch_size,
    )
    precision = resolve_precision("auto", device)
    do_compile = compile if compile is not None else default_compile(device, precision=precision)
    do_compile_sample = compile if compile is not None else default_compile_sampler(device)
    channels_last = default_channels_last(device)  # for training and sampling alike
    chunk = default_sample_chunk(device)
    kept = keep_freed_memory() if device.type == "cpu" else False
    flags = [precision, "fused AdamW", "folded BN"]
    flags += ["freed memory kept"] if kept else []
    mode = f" {compile_mode}" if compile_mode != "default" else ""
    flags += [f"compiled{mode}"] if do_compile else []
    flags += ["compiled sampling"] if do_compile_sample and not do_compile else []
    flags += [f"sampling in chunks of {chunk}"] if chunk else []
    flags += ["channels_last"] if channels_last else []
    say(f"tuned path ({', '.join(flags)}): training, then sampling")
    tuned = run_path(
        f"tuned ({', '.join(flags)})",
        cfg,
        batch_size,
        device,
        precision=precision,
        compile=do_compile,
        channels_last=channels_last,
        fused=True,
        prepared_inference=True,
        iters=iters,
        sample_compile=do_compile_sample,
        sample_steps=steps,
        sampler=sampler,
        sample_batch_size=sample_batch_size,
        compile_mode=compile_mode,
    )
    say("data pipeline, then the chip's peak (a matmul, convolutions forward and backward)")
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "image_size": image_size,
        "batch_size": batch_size,
        "sample_batch_size": sample_batch_size or batch_size,
        "sampler": sampler,
        "sample_steps": steps,
        "compile_mode": compile_mode,
        "baseline": asdict(baseline),
        "tuned": asdict(tuned),
        "train_speedup": tuned.train_images_per_s / baseline.train_images_per_s,
        "sample_speedup": tuned.sample_images_per_s / baseline.sample_images_per_s,
        "data_pipeline_images_per_s": data_pipeline_rate(image_size, batch_size),
        "data_pipeline_on_device_images_per_s": data_pipeline_rate(image_size, batch_size, device),
        "baseline_kept_freed_memory": baseline_kept,
        "tuned_kept_freed_memory": kept,
    }
    result["data_over_train"] = result["data_pipeline_images_per_s"] / tuned.train_images_per_s
    result["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    result["peak"] = chip_peak(device, peak_precisions(device), iters=max(iters, 3))
    result["peak_share"] = peak_shares(result)
    if kid:
        say("Inception features")
        result["inception_images_per_s"] = feature_rates(batch_size, device)
    return result


def format_table(r: dict) -> str:
    b, t = r["baseline"], r["tuned"]
    rows = [
        ("training images/s", "train_images_per_s", ".1f"),
        (
            f"sampling images/s ({counted(r['sample_steps'], r['sampler'] + ' step')}, "
            f"batch {r['sample_batch_size']})",
            "sample_images_per_s",
            ".2f",
        ),
        ("training GFLOP/s", "train_gflop_per_s", ".0f"),
        ("sampling GFLOP/s", "sample_gflop_per_s", ".0f"),
        ("peak memory MiB", "peak_memory_mib", ".0f"),
        ("compile seconds (train + sample)", "compile_seconds", ".1f"),
    ]
    lines = [
        f"animeddim bench: {r['device']}, torch {r['torch']}, {r['image_size']}px, "
        f"batch {r['batch_size']}, {r['date']}",
        f"| metric | {b['name']} | {t['name']} | ratio |",
        "|---|---:|---:|---:|",
    ]
    for label, key, fmt in rows:
        ratio = f"{t[key] / b[key]:.2f}x" if b[key] else "-"
        lines.append(f"| {label} | {b[key]:{fmt}} | {t[key]:{fmt}} | {ratio} |")
    lines.append(
        f"data pipeline: {r['data_pipeline_images_per_s']:.0f} images/s "
        f"({r['data_over_train']:.1f}x tuned training); from a cache on the device: "
        f"{r['data_pipeline_on_device_images_per_s']:.0f} images/s"
    )
    peaks = ", ".join(
        f"{p} matmul {v['matmul_gflop_per_s']:.0f}, "
        f"conv fwd+bwd {v['conv_fwd_bwd_gflop_per_s']:.0f}"
        for p, v in r["peak"].items()
    )
    kernels = f" ({r['cpu_capability']} kernels)" if r["device"].startswith("cpu") else ""
    lines.append(f"chip peak GFLOP/s{kernels}: {peaks}")
    for path in ("baseline", "tuned"):
        s, prec = r["peak_share"][path], r[path]["precision"]
        lines.append(
            f"{path} ({prec}) share of the {prec} peak: training {s['train_of_conv_fwd_bwd']:.0%} "
            f"of conv, {s['train_of_matmul']:.0%} of matmul; sampling "
            f"{s['sample_of_conv_fwd_bwd']:.0%} of conv, {s['sample_of_matmul']:.0%} of matmul"
        )
    if r.get("baseline_kept_freed_memory"):
        lines.append("note: the baseline also kept freed memory (set earlier in this process)")
    for k, v in r.get("inception_images_per_s", {}).items():
        lines.append(f"Inception features ({k} protocol): {v:.1f} images/s")
    return "\n".join(lines)


def main(
    image_size: int,
    batch_size: int,
    device: str,
    iters: int,
    as_json: bool,
    compile: bool | None,
    kid: bool,
    sample_batch_size: int | None = None,
    sampler: str = "ddim",
    steps: int = 20,
    compile_mode: str = "default",
) -> int:
    r = run(
        image_size,
        batch_size,
        device,
        iters,
        compile,
        kid,
        sample_batch_size,
        sampler,
        steps,
        compile_mode,
        say=lambda what: print(f"bench: measuring {what}", file=sys.stderr, flush=True),
    )
    print(json.dumps(r, indent=2) if as_json else format_table(r))
    sys.stdout.flush()
    return 0
