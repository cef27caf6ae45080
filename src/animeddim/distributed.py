"""torch.distributed under torchrun: process group from the environment, rank helpers, collectives.

torchrun starts one process per device and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; :func:`setup` joins that group (nccl on CUDA, gloo on the CPU) and picks the GPU of
LOCAL_RANK. Without torchrun (WORLD_SIZE unset or 1) nothing is initialised and every helper is
the single-process identity, so callers use them unconditionally.

Equivalence with one process rests on three conventions: the batch size is the *global* batch
(each rank takes a contiguous slice of it), random draws are made for the global batch and then
sliced, and images are sharded by index (image i depends only on (seed, i)).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from .config import ConfigError
from .words import counted

_COMM_DEVICE = torch.device("cpu")  # where collectives run: this rank's GPU for nccl


# --- the process group --------------------------------------------------------------------


def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def local_rank() -> int:
    """LOCAL_RANK as set by torchrun: this process's index on its node (0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if env_world_size() > 1 else 0


def check_launch_env(world: int) -> None:
    """ConfigError unless torchrun's variables describe this process (WORLD_SIZE > 1).

    A WORLD_SIZE left set by a scheduler, or a process started by hand, would otherwise fail
    in torch's rendezvous with a traceback naming one missing variable.
    """
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world} is set but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: start the processes with torchrun, "
            "which sets them all (docs/distributed.md), or unset WORLD_SIZE to run one process"
        )
    for k, low, high in (
        ("RANK", 0, world - 1),
        ("LOCAL_RANK", 0, None),
        ("MASTER_PORT", 1, 65535),
    ):
        v = os.environ.get(k, str(low))
        if not v.strip().isdigit() or int(v) < low or (high is not None and int(v) > high):
            within = f"{low} .. {high}" if high is not None else f"an integer >= {low}"
            raise ConfigError(f"{k}={v!r} with WORLD_SIZE={world}: expected {within}")


JOIN_NOTE_S = 10.0  # a join taking longer than this says what it waits for


def _join(backend: str, device: torch.device) -> None:
    """init_process_group, which waits for every process of WORLD_SIZE (torch gives up after
    30 min). The wait is C++ code that Python signal handlers cannot interrupt, so Ctrl-C and
    SIGTERM take their default action meanwhile (nothing has been done yet that they could
    lose); after JOIN_NOTE_S a line says what it waits for."""
    world, rank_ = env_world_size(), os.environ["RANK"]
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    note = threading.Timer(
        JOIN_NOTE_S,
        lambda: print(
            f"animeddim: process {rank_} of {world} waiting for the others to join at {where} "
            "(all WORLD_SIZE processes must start; Ctrl-C stops)",
            file=sys.stderr,
            flush=True,
        ),
    )
    note.daemon = True
    saved = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            if callable(signal.getsignal(s)):  # a Python handler; an ignored signal stays so
                saved[s] = signal.signal(s, signal.SIG_DFL)
    note.start()
    try:
        store = _attempt_store(world)
        joined = {} if store is None else {"store": store, "rank": int(rank_), "world_size": world}
        if backend == "nccl":
            tdist.init_process_group("nccl", device_id=device, **joined)
        else:
            tdist.init_process_group("gloo", **joined)
    finally:
        note.cancel()
        for s, handler in saved.items():
            signal.signal(s, handler)


def _attempt_store(world: int) -> tdist.Store | None:
    """The store of this elastic attempt under torchrun's agent store, else None (env://).

    torchrun (2.13) keeps one store per job, at the same MASTER_PORT after an elastic restart,
    and env:// joins it without a per-attempt prefix; each process's gloo (or nccl) address
    of the attempt before was still there, so a restarted process read its dead peer's and
    failed: 'Gloo connectFullMesh failed ... Connection refused' (or waited). Keys under
    TORCHELASTIC_RESTART_COUNT are this attempt's alone, as torch's own launcher once did.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "").strip()
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not attempt.isdigit():
        return None
    from torch.distributed.constants import default_pg_timeout  # 30 min, as env:// waits

    agent = tdist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=False,
        timeout=default_pg_timeout,
    )
    return tdist.PrefixStore(f"animeddim/attempt_{attempt}/", agent)


BACKEND_ENV = "ANIMEDDIM_DDP_BACKEND"  # nccl (CUDA's default) or gloo; gloo alone shares GPUs


def backend_for(device: torch.device) -> str:
    """The process group's backend: gloo on the CPU; on CUDA nccl, or gloo if BACKEND_ENV says.

    NCCL refuses two ranks on one GPU; gloo all-reduces and broadcasts CUDA tensors, so with
    ``ANIMEDDIM_DDP_BACKEND=gloo`` more processes than GPUs can share them (testing a multi-GPU
    run on one GPU; slower than nccl).
    """
    chosen = os.environ.get(BACKEND_ENV, "").strip().lower()
    if chosen not in ("", "nccl", "gloo"):
        raise ConfigError(f"{BACKEND_ENV}={chosen!r}: use nccl or gloo")
    if device.type == "cpu":
        if chosen == "nccl":
            raise ConfigError(f"{BACKEND_ENV}=nccl needs CUDA; the CPU runs gloo")
        return "gloo"
    return chosen or "nccl"


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group (once) and return this process's device.

    With WORLD_SIZE > 1: `backend_for(device)`; on CUDA device ``cuda`` becomes
    ``cuda:LOCAL_RANK`` (``cuda:LOCAL_RANK % GPUs`` under gloo, which may share a GPU).
    Otherwise returns `device` unchanged.
    """
    global _COMM_DEVICE
    if env_world_size() <= 1:
        return device
    if not tdist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if not tdist.is_initialized():
        check_launch_env(env_world_size())
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(
            f"multi-process training runs on CUDA (nccl) or the CPU (gloo), not {device.type!r}"
        )
    backend = backend_for(device)
    if device.type == "cuda" and device.index is None:
        n = torch.cuda.device_count()
        if local_rank() >= n and backend == "nccl":
            raise ConfigError(
                f"LOCAL_RANK {local_rank()} but this node has {counted(n, 'CUDA device')}: "
                "start at most one process per GPU (torchrun --nproc_per_node), or share "
                f"GPUs over gloo ({BACKEND_ENV}=gloo)"
            )
        device = torch.device("cuda", local_rank() % n)
    if not tdist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        _join(backend, device)
    if tdist.get_backend() == "nccl":
        _COMM_DEVICE = torch.device("cuda", torch.cuda.current_device())
    return device


def lost_peer(error: BaseException) -> str | None:
    """What went, in one line, if `error` is a collective failing because another process of
    the group stopped (killed, failed, its node gone): gloo's 'Connection closed by peer',
    torch's DistError. None for any other error."""
    text = str(error)
    gloo = "gloo/transport" in text or "Connection closed by peer" in text
    if not isinstance(error, RuntimeError) or not (gloo or isinstance(error, tdist.DistError)):
        return None
    text = text.split("] ", 1)[1] if text.startswith("[") and "] " in text else text
    text = text.split(". This is typically", 1)[0].strip().rstrip(".")
    return (
        f"lost contact with another process of this job ({text.splitlines()[0]}): it stopped "
        "or its node went away; its own output says why"
    )


def uses_gloo() -> bool:
    """Whether this process is in a gloo process group (always so on the CPU under torchrun)."""
    return is_distributed() and tdist.get_backend() == "gloo"


def cleanup() -> None:
    """Leave the process group (no-op when none was joined)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on global rank 0: the one process that writes files and talks to the user."""
    return rank() == 0


def check_global_batch(batch_size: int) -> None:
    """--batch-size is the global batch: it must split into equal per-process shards."""
    w = world_size()
    if batch_size % w:
        lower, upper = batch_size // w * w, (batch_size // w + 1) * w
        error = ConfigError(
            f"--batch-size {batch_size} is the global batch and must be divisible by the "
            f"number of processes ({w}): use {f'{lower} or ' if lower else ''}{upper}"
        )
        error.mirrored = not is_main()  # every rank finds it; rank 0 reports it
        raise error


def shard(n: int, r: int | None = None) -> tuple[int, int]:
    """Rank `r`'s (default: this rank's) contiguous block [lo, hi) of n items (as
    batches.iterate_batches slices)."""
    r, w = rank() if r is None else r, world_size()
    return r * n // w, (r + 1) * n // w


# --- collectives (identities in one process) ----------------------------------------------


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all ranks, in place; returns `t`."""
    if is_distributed():
        c = t.to(_COMM_DEVICE)
        tdist.all_reduce(c)
        if c is not t:
            t.copy_(c)
    return t


def reduced_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over all ranks as a new tensor (`t` itself in one process)."""
    return all_reduce_sum(t.detach().clone()) if is_distributed() else t


def any_true(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (a decision all ranks must share)."""
    if not is_distributed():
        return bool(flag)
    return bool(all_reduce_sum(torch.tensor([float(flag)])).item() > 0)


def all_true(flag: bool | torch.Tensor) -> bool:
    """True on every rank if `flag` is true on all ranks."""
    return not any_true(not bool(flag))


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's (picklable) `obj`, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def gather_to_main(t: torch.Tensor) -> torch.Tensor | None:
    """Concatenate every rank's `t` along dim 0 (rank order) on rank 0; None on other ranks.

    Ranks may hold different lengths; the other dimensions and the dtype must agree.
    """
    if not is_distributed():
        return t
    c = t.to(_COMM_DEVICE)
    sizes = [torch.zeros(1, dtype=torch.int64, device=_COMM_DEVICE) for _ in range(world_size())]
    tdist.all_gather(sizes, torch.tensor([len(c)], device=_COMM_DEVICE))
    lengths = [int(s.item()) for s in sizes]
    buf = torch.zeros((max(lengths), *c.shape[1:]), dtype=c.dtype, device=_COMM_DEVICE)
    buf[: len(c)] = c
    parts = [torch.empty_like(buf) for _ in lengths] if is_main() else None
    tdist.gather(buf, parts, dst=0)
    if parts is None:
        return None
    return torch.cat([p[:n] for p, n in zip(parts, lengths, strict=True)]).to(t.device)


def on_main(fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 alone (e.g. creating the run folder); if it raises, every rank raises.
    Returns its result on rank 0, None on the other ranks.

    The other ranks raise a copy marked ``mirrored = True`` (the CLI prints it once, on rank 0)
    instead of waiting in their next collective for a process that has gone.
    """
    error = result = None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - passed on to the other ranks, then re-raised
            error = e
    if is_distributed():
        box = [_portable(error)]
        tdist.broadcast_object_list(box, src=0)
        if not is_main() and box[0] is not None:
            box[0].mirrored = True
            raise box[0]
    if error is not None:
        raise error
    return result


def from_main(fn: Callable[[], Any]) -> Any:
    """`fn()` run on rank 0 alone, as :func:`on_main` (an error there is raised on every
    rank), and its (picklable) result returned on every rank."""
    result = on_main(fn)
    if is_distributed():
        box = [result]
        tdist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def on_every(fn: Callable[[], Any]) -> Any:
    """`fn()` on every rank (e.g. reading what each node sees of the data folder); if it raises
    on any rank, every rank raises (:func:`agree`). `fn` must call no collective."""
    error, result = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - shared with the other ranks, then re-raised
        error = e
    agree(error)
    return result


def agree(error: Exception | None) -> None:
    """Every rank passes its error or None; if any is an error, every rank raises: rank 0 the
    first failing rank's error, naming that process when it is another, the other ranks a
    copy marked ``mirrored`` (the CLI prints it once). A collective: every rank must call it.
    """
    if is_distributed():
        errors = all_gather_object(_portable(error))
        failed = next((r for r, e in enumerate(errors) if e is not None), None)
        if failed is not None:
            if not is_main():
                mine = error if error is not None else errors[failed]
                mine.mirrored = True
                raise mine
            if failed:  # another process's error: say which
                first = errors[failed]
                if first.args and isinstance(first.args[0], str):
                    first.args = (f"process {failed} of {world_size()}: {first.args[0]}",)
                raise first
    if error is not None:
        raise error


SAME_COMMAND = "start every process with the same command and options (torchrun does, on each node)"


def check_same(values: dict[str, Any], fix: str = SAME_COMMAND) -> None:
    """ConfigError on every rank unless each rank's `values` (nested dicts are named
    ``section.key``) equal rank 0's; the message names the first that differs, then `fix`."""
    if not is_distributed():
        return
    flat = _flat(values)
    everyone = all_gather_object(flat)
    for r, theirs in enumerate(everyone):
        for key in sorted(flat.keys() | theirs.keys()):
            ours, other = everyone[0].get(key), theirs.get(key)
            if other != ours:
                error = ConfigError(
                    f"process {r} of {len(everyone)} has {key} = {other!r}, process 0 has "
                    f"{ours!r}: {fix}"
                )
                error.mirrored = not is_main()  # every rank finds it; rank 0 reports it
                raise error


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _portable(error: BaseException | None) -> BaseException | None:
    """`error` as it survives pickling to another process (its text, if it does not)."""
    if error is None:
        return None
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - an exception that does not pickle
        return RuntimeError(f"{type(error).__name__}: {error}")


@contextlib.contextmanager
def held_on_main(make: Callable[[], contextlib.AbstractContextManager]) -> Iterator[None]:
    """Hold the context `make()` (e.g. the run folder's lock) on rank 0 alone for the body;
    if entering it raises, every rank raises, as in :func:`on_main` (the other ranks would
    otherwise wait in their next collective for a process that has gone)."""
    with contextlib.ExitStack() as stack:
        on_main(lambda: stack.enter_context(make()))
        yield


@contextlib.contextmanager
def local_main_first() -> Iterator[None]:
    """Run the body on each node's LOCAL_RANK 0 first, then on the other ranks; an error in the
    body on any rank is raised on every rank (:func:`agree`), none waits for a rank that failed.

    For work that fills a cache the others can reuse (the decoded-image disk cache). The body
    must call no collective.
    """
    first, error = local_rank() == 0, None
    if not first:
        agree(None)  # the first processes' turn
    try:
        yield
    except Exception as e:  # noqa: BLE001 - shared with the other ranks, then re-raised
        error = e
    agree(error)
    if first:
        agree(None)  # the other processes' turn


# --- model ----------------------------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the gradient of each rank's input is the sum over ranks of
    the output's gradients (every rank's loss depends on every rank's input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return all_reduce_sum(x.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return all_reduce_sum(grad.clone())


class _GlooSyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d synchronised over gloo ranks, CPU or CUDA tensors (torch's SyncBatchNorm
    takes GPU tensors only; under gloo on CUDA this layer is kept too, the one checked on the
    CPU against one process).

    Batch statistics over the global batch from two differentiable all-reduces (sum, then sum of
    squared deviations), in float64; the backward pass all-reduces their gradients, as
    torch.nn.SyncBatchNorm does. Same buffers and state-dict keys as nn.BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        local = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64, device=x.device)
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims, dtype=torch.float64), local]))
        n = sums[-1]
        mean = sums[:-1] / n
        centred = x - mean.to(x.dtype).view(shape)
        var = _AllReduceSum.apply((centred.double() ** 2).sum(dims)) / n  # biased, as BN normalises
        y = centred * torch.rsqrt(var + self.eps).to(x.dtype).view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """BatchNorm over the global batch (nn.SyncBatchNorm), so training matches one process.

    A no-op in one process. Buffers and parameters are shared with the original layers, so the
    state dict (and checkpoints) keep their keys.
    """
    if not is_distributed():
        return model
    if not uses_gloo():  # nccl
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if type(m) is not nn.BatchNorm2d:
                raise NotImplementedError(f"no gloo synchronisation for {type(m).__name__}")
            m.__class__ = _GlooSyncBatchNorm2d  # same state, a forward that syncs over gloo
    return model


def wrap_ddp(net: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `net` (gradients averaged over ranks); `net` in one process.

    DDP broadcasts rank 0's parameters and buffers at construction, so all ranks start equal.
    """
    if not is_distributed():
        return net
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids)


# --- sampling sharded by image index --------------------------------------------------------


def shard_images(
    make: Callable[[int, int], torch.Tensor], n: int, first_index: int = 0
) -> torch.Tensor | None:
    """Images first_index .. first_index + n - 1, made in contiguous blocks over the ranks.

    ``make(count, first)`` returns uint8 [count x H x W x C] images first .. first + count - 1;
    each rank makes its block and rank 0 receives all n in order (other ranks get None). When
    image i depends only on (seed, i) this is exactly the single-process result. Every rank must
    call this.
    """
    return gather_to_main(own_block(make, n, first_index))


def own_block(
    make: Callable[[int, int], torch.Tensor], n: int, first_index: int = 0
) -> torch.Tensor:
    """This rank's block of the images :func:`shard_images` makes: ``make(count, first)`` for
    its [lo, hi) of `n` (all of them in one process), uint8 even when empty."""
    lo, hi = shard(n)
    part = make(hi - lo, first_index + lo)
    return part.to(torch.uint8) if hi == lo else part  # empty may come as float


def generate(
    *, n: int, first_index: int = 0, cond: Any = None, **kwargs: Any
) -> torch.Tensor | None:
    """`diffusion.generation.generate` sharded by image index (see :func:`shard_images`);
    per-image `cond` (one row per image) is sliced to each rank's block."""
    from .diffusion.generation import batch_cond
    from .diffusion.generation import generate as generate_images

    def make(count: int, first: int) -> torch.Tensor:
        lo = first - first_index
        part = batch_cond(cond, lo, lo + count)
        return generate_images(n=count, first_index=first, cond=part, **kwargs)

    return shard_images(make, n, first_index)
