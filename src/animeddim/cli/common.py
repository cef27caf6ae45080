"""What every command shares: exit codes, the one-line usage error, progress bars, rank."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from .. import interrupts

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class CliError(Exception):
    """A bad option value; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and a pointer to --help), exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        if _said_by_another_process():
            self.exit(EXIT_USAGE)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        # An option the command does not have is said by the command's own parser (argparse
        # hands it up to the top one, whose line pointed to `animeddim --help`, which lists
        # the commands but not their options).
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


FIRST_PROCESS_WAIT_S = 20.0  # how long a torchrun process waits for the first to say an error


def _said_by_another_process() -> bool:
    """True in a process of a torchrun launch (WORLD_SIZE > 1) other than the first on its
    node (LOCAL_RANK, else RANK, in 1 .. WORLD_SIZE - 1) while no process group is joined: an
    error of the options found there is found by that first process too (the same command,
    on the same file system), which says it once; this one waits to be stopped by torchrun
    (`FIRST_PROCESS_WAIT_S`; False after it: then it says the error itself). Once joined,
    errors every process finds are agreed on and said by process 0 (`mirrored`)."""
    import os

    world = os.environ.get("WORLD_SIZE", "1").strip()
    own = os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")).strip()
    if not (world.isdigit() and own.isdigit() and 0 < int(own) < int(world)):
        return False  # one process, or an environment each process names for itself
    d = sys.modules.get("animeddim.distributed")
    if d is not None and d.is_distributed():
        return False
    # Not at once: torchrun stops every process as soon as one fails, and this one exiting
    # first would stop the first process before it says the error (nothing said at all).
    # It fails with the error and this process is stopped meanwhile; if it is not (another
    # launcher), this one says it after the wait.
    import signal
    import time

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # stopped by torchrun: in silence
    time.sleep(FIRST_PROCESS_WAIT_S)
    return False


MAIN_PROCESS_WAIT_S = 10.0  # how long a joined process waits for process 0 to say its error
_SAID_KEY = "animeddim/said"  # in the job's store: the user error process 0 has said


def say_error(error: BaseException, mirrored: bool) -> None:
    """Print a user error (`mirrored`: a copy of process 0's, which says it) once per job.

    Once the processes have joined, an error found by every process (the same command on
    the same files: a missing --run) is said by process 0 alone. They may disagree (one
    node lacks the file), so no collective is used: the others may be busy elsewhere or
    waiting in another collective, where an all-reduce of an error flag would hang or be
    paired with the wrong call. The word goes through the job's key-value store (torchrun's
    agent, or process 0's under env://), which every process reaches at any time: process
    0 prints, then sets the key; another process with an error waits for that key (at most
    `MAIN_PROCESS_WAIT_S`, SIGTERM silent: torchrun stops it once process 0 exits) and stays
    silent if process 0 said the same; if not, it says its own. An error is never unsaid; a
    store that went away (process 0 gone) makes a process say its own.
    """
    d = sys.modules.get("animeddim.distributed")
    joined = d is not None and d.is_distributed()
    if mirrored or (joined and not d.is_main() and _main_said(d, str(error))):
        _store_done(d, joined)
        return
    print(f"{_prog()}: error: {error}", file=sys.stderr, flush=True)
    if joined and d.is_main():
        _main_says(d, str(error))
    else:
        _store_done(d, joined)


def _main_says(d, text: str) -> None:
    """On process 0, after printing: tell the others; a store of its own (env://, no
    torchrun agent) is kept up until each other process is done with it (or the wait ends),
    else a process still waiting would find it gone and say the error again."""
    import os
    import time

    try:
        store = _store()
        store.set(_SAID_KEY, text)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            return
        others = [f"animeddim/done/{r}" for r in range(1, d.world_size())]
        deadline = time.monotonic() + MAIN_PROCESS_WAIT_S
        while not store.check(others) and time.monotonic() < deadline:
            time.sleep(0.05)
    except (RuntimeError, KeyboardInterrupt):  # a store gone, a Ctrl-C: nothing more to tell
        return


def _main_said(d, text: str) -> bool:
    """Whether process 0 said `text` (waiting for it: see `say_error`)."""
    import signal
    import time

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # stopped by torchrun: in silence
    deadline = time.monotonic() + MAIN_PROCESS_WAIT_S
    try:
        store = _store()
        while not store.check([_SAID_KEY]):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return store.get(_SAID_KEY).decode() == text
    except (RuntimeError, KeyboardInterrupt):  # process 0's store gone, or Ctrl-C: say it
        return False


def _store():
    """The key-value store the process group was joined through (torch keeps it for the
    default group; torch has no public accessor)."""
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _store_done(d, joined: bool) -> None:
    """Tell process 0 (if it keeps the store) that this process is done with it."""
    if joined and not d.is_main():
        try:
            _store().set(f"animeddim/done/{d.rank()}", "1")
        except RuntimeError:
            pass


class _Bars:
    """A `pipelines.Progress` shown as one tqdm bar per stage, on stderr (rank 0 only)."""

    def __init__(self, unit: str = "img"):
        self.unit, self.stage, self.bar = unit, None, None
        self.enabled = _is_main()

    def __call__(self, stage: str, done: int, total: int) -> None:
        interrupts.check()  # a SIGTERM whose first raise was swallowed (see `interrupts`)
        if not self.enabled:
            return
        if stage == self.stage and self.bar is None and done >= total:
            return  # a repeated "all done" of the stage just finished: no bar again
        if stage != self.stage or self.bar is None:
            from tqdm import tqdm

            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage, unit=self.unit, leave=False, file=sys.stderr)
            _open_bars.add(self)
        self.bar.n = done
        self.bar.refresh()
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()  # leave=False: the bar's line is cleared
        self.bar = None  # the stage stays: a repeated final report does not reopen it
        _open_bars.discard(self)


_open_bars: set[_Bars] = set()  # closed before an error prints, so it gets a line of its own


def _close_bars() -> None:
    for bars in list(_open_bars):
        bars.close()


def need_folder(path: str | Path, option: str = "", images: bool = True) -> None:
    """Raise `CliError` unless `path` is a folder, saying which it is: missing, a broken
    link, a file, an archive or something else; `option` ('--runs') names the option that
    gave it; `images`: a folder of images is wanted (an archive's remedy is `data prepare`)."""
    from ..image_files import folder_problem

    if (problem := folder_problem(path, images)) is not None:
        given = f"{option} {str(path)!r}" if option else repr(str(path))
        raise CliError(f"{given} {problem}")


def shown(value: float, spec: str) -> str:
    """`value` formatted by `spec` ('.3f'), a negative that rounds to zero there shown as
    zero: an FID is >= 0, and the -3.6e-12 of a folder against itself is the float rounding of
    a difference of traces, not a value below zero (the JSON keeps it as computed)."""
    text = format(value, spec)
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _names(text: str, choices: tuple[str, ...], what: str) -> list[str]:
    """A comma-separated list of names, each one of `choices`."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in choices]
    if bad or not names:
        raise CliError(f"unknown {what}(s) {bad or text!r}: choose from {', '.join(choices)}")
    return once(names, f"--{what}s")


def once(values: list, what: str) -> list:
    """`values`, refused if one is given twice (`--steps 2,1,2` would measure 2 twice and
    write two rows of it)."""
    twice = [v for k, v in enumerate(values) if v in values[:k]]
    if twice:
        listed = ", ".join(
            f"{v:g}" if isinstance(v, float) else str(v) for v in dict.fromkeys(twice)
        )
        raise CliError(f"{what}: {listed} given more than once; give each once")
    return values


def _is_main() -> bool:
    """False on the ranks > 0 of a torchrun launch (they stay quiet), else True."""
    d = sys.modules.get("animeddim.distributed")
    return d is None or d.is_main()


def _prog() -> str:
    """'animeddim', tagged with the rank on the ranks > 0 of a torchrun launch."""
    d = sys.modules.get("animeddim.distributed")
    return "animeddim" if d is None or d.is_main() else f"animeddim [rank {d.rank()}]"
