"""Command line: options -> configs -> library calls. No maths here.

Every user error becomes one line on stderr and exit code 2 (no traceback); a diverged
training run exits with 3. Ctrl-C (SIGINT) and SIGTERM (what `timeout`, schedulers and
containers send) are handled alike: training saves a checkpoint, a half-written output is
removed, and the exit code is 130 for SIGINT, 143 for SIGTERM. Warnings print as one line.
"""

from __future__ import annotations

import signal
import sys
import threading
import warnings
from typing import Any

from .. import interrupts, outputs
from ..interrupts import Terminated
from .common import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    CliError,
    _close_bars,
    _open_bars,
    _prog,
    _said_by_another_process,
    say_error,
)
from .parser import build_parser

__all__ = [
    "EXIT_DIVERGED",
    "EXIT_INTERRUPTED",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "CliError",
    "Terminated",
    "build_parser",
    "main",
]


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..attributes import ClassifierError
    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from ..data import DataError
    from ..metrics import InceptionWeightsMissing
    from ..run_folder import RunFolderError

    return (
        ClassifierError,
        CliError,
        ConfigError,
        DataError,
        CheckpointError,
        RunFolderError,  # report's ReportError too
        InceptionWeightsMissing,
        outputs.OutputExists,
    )


# The commands that share their work over torchrun's processes (docs/distributed.md). Any other,
# started by torchrun, would run whole in every process, each writing the same files.
PARALLEL_COMMANDS = ("train", "sample", "evaluate", "steps")


def _check_parallel(command: str) -> None:
    """CliError for a one-process command started by torchrun (or with WORLD_SIZE > 1 set);
    said by process 0, the others exit with it in silence."""
    import os

    world = os.environ.get("WORLD_SIZE", "1").strip()
    if command in PARALLEL_COMMANDS or world in ("", "1"):
        return
    shared = f"{', '.join(PARALLEL_COMMANDS[:-1])} and {PARALLEL_COMMANDS[-1]}"
    error = CliError(
        f"'{command}' runs in one process, and WORLD_SIZE={world[:20]} (torchrun, or a "
        "scheduler's variable) would have every process do the whole job and write the same "
        f"files; start it without torchrun or unset WORLD_SIZE ({shared} share their work "
        "over torchrun's processes)"
    )
    error.mirrored = os.environ.get("RANK", "0").strip() not in ("", "0")  # type: ignore[attr-defined]
    raise error


def _lost_peer(error: RuntimeError) -> str | None:
    d = sys.modules.get("animeddim.distributed")  # imported by the commands that join a group
    return None if d is None else d.lost_peer(error)


def _out_of_memory(error: RuntimeError) -> str | None:
    """What to say for an allocation that failed (a GPU's OutOfMemoryError, the CPU
    allocator's "can't allocate memory"), else None (a traceback then: a fault of ours).
    Nothing written is lost by it: checkpoints and outputs are written whole or not at all."""
    text = str(error)
    gpu = type(error).__name__ == "OutOfMemoryError"
    if not (gpu or "can't allocate memory" in text):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    where = "GPU" if gpu else "host"
    # a command whose memory other options set too (bench: --image-size) says which help
    remedy = getattr(error, "remedy", "a smaller --batch-size (images per forward pass) needs less")
    return f"out of {where} memory ({first[:200]}); {remedy}"


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
    interrupts.seen.add(signum)  # progress updates raise it again if this raise is swallowed
    raise Terminated()


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Print a warning as one line (no source line), each distinct text once."""
    from ..data import PassedOverWarning, ProfileWarning, SkippedFilesWarning
    from ..enlarged import EnlargedWarning

    text = str(message)
    if text in _shown_warnings:
        return
    _shown_warnings.add(text)
    notes = (SkippedFilesWarning, PassedOverWarning, ProfileWarning, EnlargedWarning)
    tag = "note" if issubclass(category, notes) else f"{_prog()}: warning"
    if _open_bars:  # above the progress bar, not glued to it
        from tqdm import tqdm

        tqdm.write(f"{tag}: {text}", file=sys.stderr)
    else:
        print(f"{tag}: {text}", file=sys.stderr)


_shown_warnings: set[str] = set()


def _print_names_as_they_are() -> None:
    """A file name that is not UTF-8 (Latin-1 from an old archive) is held as surrogate
    escapes, which a strict UTF-8 stdout refused with a traceback once the work was done;
    such a name is printed as the bytes the file system holds, as `ls` prints it."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and getattr(sys.stdout, "errors", None) == "strict":
        reconfigure(errors="surrogateescape")


def main(argv: list[str] | None = None) -> int:
    _print_names_as_they_are()
    parser = build_parser()
    args = parser.parse_args(argv)
    errors = _user_errors()
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if on_main_thread else None
    _shown_warnings.clear()
    interrupts.seen.clear()
    try:
        _check_parallel(args.command)
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            rc = args.func(args)
        # train returns normally after saving the checkpoint a signal asked for
        terminated = rc == EXIT_INTERRUPTED and signal.SIGTERM in interrupts.seen
        return EXIT_TERMINATED if terminated else rc
    except errors as e:
        _close_bars()
        # torchrun: rank 0's error, raised on all ranks, or found before they joined; a copy
        # of process 0's (`mirrored`) ends at once, in silence, as process 0 says it
        mirrored = getattr(e, "mirrored", False)
        if mirrored or not _said_by_another_process():
            say_error(e, mirrored)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        _close_bars()
        term = isinstance(e, Terminated)
        print(f"{_prog()}: {'terminated (SIGTERM)' if term else 'interrupted'}", file=sys.stderr)
        return EXIT_TERMINATED if term else EXIT_INTERRUPTED
    except OSError as e:
        _close_bars()
        print(
            f"{_prog()}: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr
        )
        return 1
    except RuntimeError as e:  # under torchrun: another process gone mid-collective
        lost = _lost_peer(e) or _out_of_memory(e)
        if lost is None:
            raise
        _close_bars()
        print(f"{_prog()}: error: {lost}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if "animeddim.distributed" in sys.modules:  # joined torchrun's process group
            sys.modules["animeddim.distributed"].cleanup()
