"""Fast paths give the fp32 eager results: bf16, folded BatchNorm, inference copies, compile.

Tiny networks only; no timing thresholds (benchmarks print numbers, tests assert behaviour).
"""

from __future__ import annotations

import copy

import pytest
import torch

from animeddim import runtime
from animeddim.apps import bench
from animeddim.config import RunConfig, ScheduleConfig, UNetConfig
from animeddim.diffusion.generation import generate
from animeddim.runtime import autocast, compiler_available, prepare_inference
from animeddim.train import losses
from animeddim.unet import UNet, fold_batchnorm

CPU = torch.device("cpu")
TINY = UNetConfig(image_size=16, widths=[8, 16], block_depth=1, embedding_dims=8)
SCHED = ScheduleConfig()


def trained_looking_net(seed: int = 0) -> UNet:
    """A tiny net with non-zero head and BatchNorm running statistics far from (0, 1)."""
    torch.manual_seed(seed)
    net = UNet(TINY)
    torch.nn.init.normal_(net.head.weight, std=0.3)
    net.train()
    with torch.no_grad():
        for _ in range(30):
            net(torch.randn(8, 3, 16, 16) * 1.7 + 0.4, torch.rand(8))
    return net.eval()


def inputs(n: int = 6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 16, 16, generator=g), torch.rand(n, generator=g)


@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_batchnorm_is_exact_including_borders(channels_last):
    net = trained_looking_net()
    x, v = inputs()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    folded = fold_batchnorm(net).to(memory_format=fmt)
    with torch.no_grad():
        ref = net(x, v)
        out = folded(x.contiguous(memory_format=fmt), v)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # A plain bias fold (no border map) would be wrong at the image border: prove the
    # border matters for this net, so the test above really checks the map.
    block = folded.down[0][0]
    x1 = torch.randn(2, block.conv1.weight.shape[1], 16, 16)
    m = block.conv1.bias_map(x1)
    assert (m[..., 0, :] - m[..., 8, :]).abs().max() > 1e-3


def test_fold_leaves_original_training_net_alone():
    net = trained_looking_net()
    before = copy.deepcopy(net.state_dict())
    prepare_inference(net, CPU, "bf16")
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


@pytest.mark.parametrize(
    ("precision", "channels_last", "atol"),
    [("fp32", False, 1e-5), ("fp32", True, 1e-5), ("bf16", False, 0.1), ("bf16", True, 0.1)],
)
def test_prepared_inference_matches_fp32(precision, channels_last, atol):
    net = trained_looking_net()
    x, v = inputs()
    prepared = prepare_inference(net, CPU, precision, channels_last=channels_last)
    with torch.no_grad():
        ref = net(x, v)
        out = prepared(x, v).float()
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=atol)
    assert (out - ref).abs().mean() < atol / 5


def test_generate_with_prepared_network_matches_reference():
    net = trained_looking_net()
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    kw = dict(mean=mean, std=std, schedule=SCHED, image_size=16, n=6, seed=3, steps=5)
    ref = generate(net, **kw).int()
    fp32 = generate(prepare_inference(net, CPU, "fp32"), **kw).int()
    bf16 = generate(prepare_inference(net, CPU, "bf16", channels_last=True), **kw).int()
    autocast_ref = generate(net, **kw, autocast=autocast(CPU, "bf16")).int()
    assert (fp32 - ref).abs().max() <= 1  # rounding only
    for other in (ref, autocast_ref):  # bf16 rounding: a few levels on average
        diff = (bf16 - other).abs().float()
        assert diff.mean() < 2.0
        assert (diff > 16).float().mean() < 0.02


def test_bf16_training_losses_match_fp32():
    cfg = RunConfig.from_dict({"data": {"image_size": 16}, "model": TINY.__dict__}).validate()
    torch.manual_seed(0)
    net = UNet(TINY)
    torch.nn.init.normal_(net.head.weight, std=0.3)
    g = torch.Generator().manual_seed(2)
    images = torch.randn(8, 3, 16, 16, generator=g)
    noises = torch.randn(8, 3, 16, 16, generator=g)
    t = torch.rand(8, generator=g, dtype=torch.float64)
    got = {}
    for precision in ("fp32", "bf16"):
        model = copy.deepcopy(net)
        nl, il = losses(model, images, noises, t, cfg, autocast(CPU, precision))
        nl.backward()
        got[precision] = (nl.item(), il.item(), model.head.weight.grad.clone())
        assert nl.dtype == torch.float32
    assert got["bf16"][0] == pytest.approx(got["fp32"][0], rel=0.02)
    assert got["bf16"][1] == pytest.approx(got["fp32"][1], rel=0.02)
    cos = torch.nn.functional.cosine_similarity(
        got["bf16"][2].flatten(), got["fp32"][2].flatten(), dim=0
    )
    assert cos > 0.99


def test_fused_adamw_on_cpu_matches_plain_adamw():
    torch.manual_seed(0)
    a = UNet(TINY)
    b = copy.deepcopy(a)
    opts = [
        torch.optim.AdamW(a.parameters(), lr=1e-3, weight_decay=1e-4, fused=True),
        torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=1e-4, foreach=False),
    ]
    x, v = inputs()
    for _ in range(3):
        for net, opt in zip((a, b), opts, strict=True):
            opt.zero_grad()
            net(x, v).square().mean().backward()
            net.head.weight.grad += 0.01  # the head's gradient is zero at init
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not compiler_available(), reason="torch.compile needs a C compiler")
@pytest.mark.parametrize(("precision", "atol"), [("fp32", 1e-4), ("bf16", 0.1)])
def test_compiled_prepared_network_matches_eager(precision, atol):
    """The compiled sampling network (inductor freezing on the CPU), chunked 4 + 2."""
    net = trained_looking_net()
    x, v = inputs()
    eager = prepare_inference(net, CPU, precision, chunk=None)
    compiled = prepare_inference(net, CPU, precision, compile=True, chunk=4)
    assert compiled.compiled is not None and x.shape[0] == 6
    with torch.no_grad():
        out = compiled(x, v).float()
        assert compiled.compiled is not None  # it did not fall back
        torch.testing.assert_close(out, eager(x, v).float(), rtol=0, atol=atol)
        torch.testing.assert_close(out, net(x, v), rtol=0, atol=atol)


def test_chunked_sampling_network_gives_the_same_images():
    net = trained_looking_net()
    x, v = inputs()
    whole = prepare_inference(net, CPU, "fp32", chunk=None)
    with torch.no_grad():
        ref = whole(x, v)
        for chunk in (1, 4, 6, 100):
            out = prepare_inference(net, CPU, "fp32", chunk=chunk)(x, v)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_failed_compilation_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(module, **kw):
        def call(*a):
            raise RuntimeError("no backend here")

        return call

    monkeypatch.setattr(runtime, "compiler_available", lambda: True)
    monkeypatch.setattr(torch, "compile", broken_compile)
    net = trained_looking_net()
    x, v = inputs()
    prepared = prepare_inference(net, CPU, "fp32", compile=True)
    with torch.no_grad(), pytest.warns(UserWarning, match="sampling eagerly"):
        out = prepared(x, v)
    assert prepared.compiled is None
    with torch.no_grad():
        torch.testing.assert_close(out, net(x, v), rtol=1e-5, atol=1e-5)


def test_training_compiles_only_for_runs_that_repay_it(monkeypatch):
    monkeypatch.setattr(runtime, "compiler_available", lambda: True)
    assert runtime.default_compile(CPU)  # unknown length: a long run
    assert runtime.default_compile(CPU, planned_steps=5000)
    assert not runtime.default_compile(CPU, planned_steps=100)
    assert not runtime.default_compile(CPU, planned_steps=5000, time_limit_minutes=3)
    assert runtime.default_compile(CPU, planned_steps=5000, time_limit_minutes=60)
    assert runtime.default_compile(torch.device("cuda"), planned_steps=10)
    assert not runtime.default_compile(CPU, planned_steps=5000, precision="fp32")  # no gain
    assert runtime.default_channels_last(CPU)  # fp32 training too
    monkeypatch.setattr(runtime, "compiler_available", lambda: False)
    assert not runtime.default_compile(CPU, planned_steps=5000)


def test_sampler_compiles_only_for_jobs_that_repay_it(monkeypatch):
    monkeypatch.setattr(runtime, "compiler_available", lambda: True)
    assert not runtime.default_compile_sampler(CPU, 64 * 20)  # a grid: seconds of sampling
    assert runtime.default_compile_sampler(CPU, 1000 * 20)  # an evaluation
    assert runtime.default_compile_sampler(CPU)
    monkeypatch.setattr(runtime, "compiler_available", lambda: False)
    assert not runtime.default_compile_sampler(CPU, 1000 * 20)
    assert runtime.default_sample_chunk(CPU) == runtime.CPU_SAMPLE_CHUNK
    assert runtime.default_sample_chunk(torch.device("cuda")) is None


def test_prepared_sampling_net_hands_its_compile_mode_to_torch_compile(monkeypatch):
    """prepare_inference(compile_mode=...) reaches torch.compile; CUDA graphs (and the copy of
    each output out of the graph's memory) only where the mode replays them on CUDA."""
    seen = []
    monkeypatch.setattr(runtime, "compiler_available", lambda: True)
    monkeypatch.setattr(torch, "compile", lambda m, **kw: seen.append(kw) or m)
    net = UNet(UNetConfig(image_size=8, widths=[4, 8], block_depth=1, embedding_dims=4)).eval()
    for mode in ("default", "reduce-overhead"):
        prepared = runtime.prepare_inference(net, CPU, "fp32", compile=True, compile_mode=mode)
        assert not prepared.graphs  # the CPU has no CUDA graphs
    assert seen == [{"dynamic": False, "mode": None}, {"dynamic": False, "mode": "reduce-overhead"}]


def test_bench_runs_both_paths_and_reports_every_number():
    r = bench.run(image_size=16, batch_size=4, device_name="cpu", iters=1, compile=False, kid=False)
    for path in ("baseline", "tuned"):
        p = r[path]
        for key in ("train_images_per_s", "sample_images_per_s", "train_gflop_per_s"):
            assert p[key] > 0, (path, key)
        assert p["peak_memory_mib"] > 0
    assert r["tuned"]["inference_prepared"] and not r["baseline"]["inference_prepared"]
    assert r["data_pipeline_images_per_s"] > 0
    assert "| training images/s |" in bench.format_table(r)
    # the tuned path keeps freed host memory (glibc), and says so; the JSON says whether
    # the baseline ran without it (it did unless an earlier test set it in this process)
    import os
    import sys

    kept = sys.platform.startswith("linux") and os.environ.get("ANIMEDDIM_MALLOC") != "system"
    assert r["tuned_kept_freed_memory"] is kept and runtime.kept_freed_memory() is kept
    assert ("freed memory kept" in r["tuned"]["name"]) is kept
    assert isinstance(r["baseline_kept_freed_memory"], bool)


def test_bench_refuses_a_network_it_cannot_build_or_train_in_one_line():
    """`bench --image-size 15` (not a multiple of 8) ended in a RuntimeError traceback from
    the first skip connection, `--image-size 8 --batch-size 1` (a 1x1 innermost level) in a
    ValueError traceback from BatchNorm: both are one line, exit 2, before any measure."""
    from conftest import run_cli

    from animeddim.config import ConfigError

    for args, line in (
        (
            ("--image-size", "15"),
            "animeddim: error: invalid image_size = 15: expected a multiple of 8 (the network "
            "halves the image 3 times)",
        ),
        (
            ("--image-size", "8", "--batch-size", "1"),
            "animeddim: error: bench --image-size 8 --batch-size 1: the innermost level is 1x1 "
            "pixels, and a batch of 1 image gives BatchNorm one value per channel: use "
            "--batch-size 2 or more, or a larger --image-size",
        ),
    ):
        p = run_cli("bench", *args, "--iters", "1", "--no-kid", "--device", "cpu", check=False)
        assert p.returncode == 2 and p.stderr.strip() == line, p.stderr
    with pytest.raises(ConfigError, match="innermost level is 1x1"):
        bench.run(image_size=8, batch_size=1, device_name="cpu", iters=1, kid=False)
    assert bench.checked_config(8, 2).image_size == 8  # two 1x1 values per channel train


def test_bf16_counts_as_fast_only_where_pytorch_runs_avx512_kernels():
    """Below AVX-512 (an AVX2-only CPU, or ATEN_CPU_CAPABILITY=avx2) bf16 is software
    emulation, so `auto` picks fp32 there whatever /proc/cpuinfo says."""
    import os
    import subprocess
    import sys

    code = (
        "import torch; from animeddim import runtime as r; "
        "print(r.cpu_has_fast_bf16(), r.resolve_precision('auto', torch.device('cpu')))"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "fp32"]


_FAULTS_CODE = """
import resource, torch
from animeddim import runtime
runtime.resolve_device("cpu")
kept = runtime.kept_freed_memory()
for _ in range(8):  # first uses: the heap grows to what the pattern needs
    torch.empty(2**24).fill_(1.0)
rounds = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        torch.empty(2**24).fill_(1.0)  # 64 MiB, freed at once
    rounds.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, *rounds)
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize("malloc", ["kept", "system"])
def test_freed_host_memory_is_reused_without_page_faults(malloc):
    """On the CPU, resolving the device makes glibc keep freed blocks: once the heap has
    grown to the pattern, eight 64 MiB tensors allocated and freed one after the other
    fault in no fresh pages (the C library's default maps and unmaps each, 16,384 page
    faults apiece); ANIMEDDIM_MALLOC=system keeps that default. The measure is the median of
    five such rounds: in one full-suite run of 2026-12-07 a single round faulted exactly one
    block's pages (16,384) once, which 85 repeats alone, under load and under memory pressure
    did not reproduce; a one-off relocation of the heap is not what the test is about."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ANIMEDDIM_MALLOC"}
    if malloc == "system":
        env["ANIMEDDIM_MALLOC"] = "system"
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_CODE], env=env, capture_output=True, text=True, check=True
    )
    kept, *rounds = out.stdout.split()
    faults = sorted(int(r) for r in rounds)[len(rounds) // 2]
    if malloc == "kept":
        assert kept == "True" and faults < 1000, rounds
    else:
        assert kept == "False" and faults > 8 * 16384 // 2, rounds


def test_unknown_malloc_setting_is_one_line_and_exit_2(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "ANIMEDDIM_MALLOC": "bogus"}
    out = subprocess.run(
        [sys.executable, "-m", "animeddim", "sample", "--model", "avatars-64", "--n", "1"]
        + ["--out", str(tmp_path / "s")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and not (tmp_path / "s").exists()
    assert out.stderr.strip().splitlines() == [
        "animeddim: error: ANIMEDDIM_MALLOC must be 'system' or unset, got 'bogus'"
    ]


@pytest.mark.skipif(not compiler_available(), reason="torch.compile needs a C compiler")
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_training_upsamples_by_the_bilinear_stencil(monkeypatch, channels_last):
    """Compiled CPU code with gradients upsamples by `unet._twice` (a stencil whose backward
    is slices and adds), eager code by F.interpolate; both are bilinear upsampling with
    half-pixel centres, values and gradients, at odd sizes and in either layout."""
    from animeddim import unet

    traced = []
    twice = unet._twice
    monkeypatch.setattr(unet, "_twice", lambda x, d: traced.append(d) or twice(x, d))
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 7, 9, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(3, 5, 14, 18, generator=g)

    def run(fn):
        xi = x.clone().requires_grad_()
        out = fn(xi)
        out.backward(grad_out)
        return out.detach(), xi.grad

    ref, ref_grad = run(
        lambda t: torch.nn.functional.interpolate(
            t, scale_factor=2, mode="bilinear", align_corners=False
        )
    )
    eager, eager_grad = run(unet.upsample2x)
    assert not traced and torch.equal(eager, ref) and torch.equal(eager_grad, ref_grad)
    out, grad = run(torch.compile(unet.upsample2x, dynamic=False))
    assert traced  # the compiled function is the stencil
    assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(grad, ref_grad, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


_ALLOCATOR_CODE = """
import sys
from animeddim import runtime
if sys.argv[1] == "api":
    from animeddim import pipelines
    loaded, dev = pipelines.load_for_sampling(device="cpu")
    pipelines.resolve_settings("cpu", "fp32", steps=1)
else:
    from animeddim.cli.sampling import load_for_sampling
    loaded = load_for_sampling(None, None, "cpu")
print(runtime.kept_freed_memory())
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize(("caller", "kept"), [("api", "False"), ("command", "True")])
def test_the_api_leaves_the_allocator_alone_and_the_commands_tune_it(caller, kept):
    """Loading a model and resolving settings through the Python API on the CPU leaves a
    caller's process with glibc's defaults (a notebook that draws a few images does not keep
    its peak memory for ever); the sampling commands make the allocator keep freed memory."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ANIMEDDIM_MALLOC"}
    out = subprocess.run(
        [sys.executable, "-c", _ALLOCATOR_CODE, caller],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split()[-1] == kept
