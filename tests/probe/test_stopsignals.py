"""StopSignals' rules, by calling its handler directly (no real signal), and
ProxyProcess.stop's grace against a stand-in that ignores SIGTERM."""

from __future__ import annotations

import signal
import sys
import time

import pytest

from probe.local import READY, ProxyProcess
from probe.stopsignals import STOP_SIGNALS, Interrupted, StopSignals


def test_the_first_signal_raises_and_later_ones_only_hurry() -> None:
    assert not StopSignals().hurry
    signals = StopSignals()
    with pytest.raises(Interrupted) as caught:
        signals.on_signal(signal.SIGINT)
    assert (caught.value.exit_code, caught.value.name) == (130, "SIGINT")
    assert isinstance(caught.value, KeyboardInterrupt)
    signals.on_signal(signal.SIGTERM)   # cleanup under way: noted, not raised
    assert signals.hurry and signals.received == [signal.SIGINT, signal.SIGTERM]


def test_a_signal_inside_a_shield_is_raised_when_the_outermost_one_ends() -> None:
    signals = StopSignals()
    steps = []
    with pytest.raises(Interrupted) as caught:
        with signals.shielded():
            with signals.shielded():
                signals.on_signal(signal.SIGTERM)
                steps.append("inner went on")
            steps.append("outer went on")
        steps.append("not reached")
    assert caught.value.exit_code == 143
    assert steps == ["inner went on", "outer went on"]
    with signals.shielded():     # raised once: later shields end quietly
        signals.on_signal(signal.SIGINT)
    signals.on_signal(signal.SIGINT)


def test_a_shield_raises_nothing_without_a_signal_and_wins_over_an_error() -> None:
    signals = StopSignals()
    with signals.shielded():
        pass
    with pytest.raises(Interrupted) as caught:
        with signals.shielded():
            signals.on_signal(signal.SIGINT)
            raise ValueError("what the shielded code was failing with")
    assert isinstance(caught.value.__context__, ValueError)


def test_stop_all_runs_every_stop_shielded_last_registered_first() -> None:
    signals = StopSignals()
    calls: list[str] = []
    signals.at_stop(lambda: calls.append("env"))

    def second() -> None:
        calls.append("second")
        signals.on_signal(signal.SIGINT)   # a signal in the middle of stopping

    signals.at_stop(second)
    with pytest.raises(Interrupted):
        signals.stop_all()
    assert calls == ["second", "env"]


def test_installed_takes_the_stop_signals_even_from_an_inherited_ignore() -> None:
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # as `probe &` in a script inherits it
    try:
        signals = StopSignals()
        with signals.installed():
            assert all(signal.getsignal(s) == signals.on_signal for s in STOP_SIGNALS)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert all(signal.getsignal(s) == previous[s] for s in STOP_SIGNALS
                   if s != signal.SIGINT)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert {signal.SIGINT, signal.SIGTERM} <= set(STOP_SIGNALS)


STUBBORN = ("import signal, sys\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            f"sys.stderr.write({READY!r} + '\\n')\n"
            "sys.stderr.flush()\n"
            "while True:\n"
            "    signal.pause()\n")


@pytest.mark.skipif(not hasattr(signal, "pause"), reason="needs signal.pause")
@pytest.mark.parametrize("grace_s, hurry", [(0.2, False), (600.0, True)])
def test_a_proxy_that_ignores_sigterm_is_killed_after_the_grace(grace_s: float,
                                                                hurry: bool) -> None:
    proxy = ProxyProcess([sys.executable, "-c", STUBBORN])
    try:
        assert proxy.wait_ready(60)
        started = time.monotonic()
        assert proxy.stop(grace_s, lambda: hurry) == -signal.SIGKILL
        assert time.monotonic() - started < 60   # the hurried grace is 1 s, not 600
    finally:
        if proxy.proc.poll() is None:
            proxy.proc.kill()
            proxy.proc.wait(10)
