"""Ctrl-C and SIGTERM: SIGTERM raises as Ctrl-C does, and both wait while a run writes its outcome."""

from __future__ import annotations

import os
import signal

import pytest

from compressflow.interrupts import Terminated, exit_code, interrupts_deferred, terminate_as_interrupt


def test_sigterm_raises_terminated_inside_the_block():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as caught, terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10**6):  # the handler runs between bytecodes
            pass
    assert exit_code(caught.value) == 143
    assert signal.getsignal(signal.SIGTERM) == before  # restored afterwards


def test_a_second_ctrl_c_waits_until_the_outcome_is_written():
    # an interactive run's Ctrl-C (a background job's SIGINT is ignored: the test below)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    written = []
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(10**5):
                    pass
                written.append("summary")
                written.append("status")
        assert written == ["summary", "status"]  # nothing cut the block short
        assert exit_code(caught.value) == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_held_sigterm_is_raised_as_terminated():
    with pytest.raises(Terminated):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10**5):
                pass


def test_an_ignored_sigint_stays_ignored_while_the_outcome_is_written():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10**5):
                pass
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # nothing raised, nothing changed
    finally:
        signal.signal(signal.SIGINT, previous)
