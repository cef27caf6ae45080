"""A stop that a signal asked for, raised again where long work next checks.

The CLI turns SIGTERM into `Terminated` (a KeyboardInterrupt, so it unwinds like Ctrl-C).
Python swallows an exception raised where it cannot propagate (a `__del__`, a callback from
C: "Exception ignored in ..."); once `sample` drew on for minutes after its SIGTERM, which such
a raise would explain. So the signal is also recorded here, and every progress update of a
command and every training step calls `check`, which raises it again.
"""

from __future__ import annotations


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds exactly like Ctrl-C."""


seen: set[int] = set()  # the signals this process has been asked to stop by


def check() -> None:
    """Raise `Terminated` if a stop was asked for (a no-op otherwise: one set test)."""
    if seen:
        raise Terminated()
