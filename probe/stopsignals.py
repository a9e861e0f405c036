"""Stop signals: SIGINT, SIGTERM and SIGHUP end a run, and never half-way.

A stop signal raises ``Interrupted`` (a KeyboardInterrupt) in the main
thread, at most once per run.  Two kinds of code must not be cut short:

* starting something and recording it (``Popen`` and keeping its pid):
  cut in between, the process runs on and nothing knows to stop it;
* stopping what was started: cut in the middle, the rest keeps running.

Such code runs ``shielded()``: a signal that arrives meanwhile is noted and
raised when the outermost shield ends.  Signals after the first never raise
(the run is already stopping, and a second exception could cut the cleanup
that the first one started); ``hurry`` tells the cleanup to stop
processes without waiting for a graceful exit.  Whatever was registered
with ``at_stop()`` is run by ``stop_all()``, the last resort of the code that
catches the interrupt (an interrupt can land between a ``finally:`` and the
cleanup it would have run, and then only the catcher can run it).

``installed()`` sets the handlers even where SIGINT was inherited ignored
(``cmd &`` in a script without job control runs ``cmd`` so, and Python
then leaves SIGINT alone): a probe deaf to Ctrl-C ran on, and so did the
proxy it had started, after whoever sent it gave up and killed it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from types import FrameType
from typing import Any, Callable, Iterator, Optional

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class StopSignals:
    """One run's stop signals: what arrived, the shield, what to stop."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._depth = 0
        self._raised = False
        self._at_stop: list[Callable[[], None]] = []

    @property
    def hurry(self) -> bool:
        """A stop signal arrived: the run's result no longer matters."""
        return bool(self.received)

    def on_signal(self, signum: int, frame: Optional[FrameType] = None) -> None:
        self.received.append(signum)
        if self._depth == 0 and not self._raised:
            self._raised = True
            raise Interrupted(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handlers for the stop signals while the block runs (main thread only:
        elsewhere Python cannot set them, and signals interrupt only it)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous: dict[int, Any] = {}
        try:
            for signum in STOP_SIGNALS:
                previous[signum] = signal.signal(signum, self.on_signal)
            yield
        finally:
            for signum, handler in previous.items():
                if handler is not None:   # None: set outside Python, cannot be put back
                    signal.signal(signum, handler)

    def shielded(self) -> "_Shield":
        return _Shield(self)

    def at_stop(self, stop: Callable[[], None]) -> None:
        """``stop`` must be safe to call twice; ``stop_all()`` calls it."""
        self._at_stop.append(stop)

    def stop_all(self) -> None:
        with self.shielded():
            for stop in reversed(self._at_stop):
                stop()

    def _leave(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self.received and not self._raised:
            self._raised = True
            raise Interrupted(self.received[0])


class _Shield:
    """``with signals.shielded():``.  A class rather than a generator: the
    count goes up in the first statement of ``__enter__``, so a signal that
    raises on the way in raises before it (a generator has code in between,
    and a raise there would leave the count up for good)."""

    __slots__ = ("_signals",)

    def __init__(self, signals: StopSignals) -> None:
        self._signals = signals

    def __enter__(self) -> None:
        self._signals._depth += 1

    def __exit__(self, *exc: object) -> None:
        self._signals._leave()
