"""Ctrl-C and SIGTERM: both interrupt a run the same way, and neither can cut its last writes.

SIGTERM (what ``kill``, systemd and job schedulers send) is raised as :class:`Terminated`,
a KeyboardInterrupt, so every path that marks runs KILLED on Ctrl-C serves it too. While a
run writes its outcome (the summary, the parent's status), both signals wait: a second
Ctrl-C must not leave a parent whose status is not the pipeline's outcome.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; handled as Ctrl-C, exit code 143 instead of 130."""

    exit_code = 143


def _on_main_thread() -> bool:
    # signal handlers can only be installed from the main thread
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` where the program is."""
    if not _on_main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:  # the caller asked for none
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM are held; the first one held is raised after it."""
    if not _on_main_thread():
        yield
        return
    held: list[int] = []
    # a signal the process ignores (SIGINT of a background job) stays ignored
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    if held:
        raise Terminated("signal 15") if held[0] == signal.SIGTERM else KeyboardInterrupt()


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """130 for Ctrl-C, 143 for SIGTERM (the shell's 128 + signal number)."""
    return getattr(interrupt, "exit_code", 130)
