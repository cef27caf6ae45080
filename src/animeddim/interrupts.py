"""A stop that a signal asked for, raised again where long work next checks.

The CLI turns SIGTERM into `Terminated` (a KeyboardInterrupt, so it unwinds like Ctrl-C).
Python swallows an exception raised where it cannot propagate (a `__del__`, a callback from
C: "Exception ignored in ..."); once `sample` drew on for minutes after its SIGTERM, which such
a raise would explain. So the signal is also recorded here, and every progress update of a
command and every training step calls `check`, which raises it again.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOPS = (signal.SIGINT, signal.SIGTERM)  # the signals a command stops on, saving its work


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds exactly like Ctrl-C."""


seen: set[int] = set()  # the signals this process has been asked to stop by


def check() -> None:
    """Raise `Terminated` if a stop was asked for (a no-op otherwise: one set test)."""
    if seen:
        raise Terminated()


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them to the handlers they
    would have met: a stop lands after a unit of work, never inside it (an optimiser step cut
    after its forward pass left BatchNorm statistics of an uncounted batch in the checkpoint
    Ctrl-C saves, and the resumed run differed). For blocks of a second or so. Outside the
    main thread, or over a handler set from C, the block runs as it is."""
    if threading.current_thread() is not threading.main_thread() or any(
        signal.getsignal(s) is None for s in STOPS
    ):
        yield
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in STOPS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(held):  # each signal once, in the order it came
            signal.raise_signal(s)
