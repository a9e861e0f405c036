"""Following etcd on a thread of its own: never on the event loop (SPEC 11).

A :class:`Watcher` owns one thread that reads the prefix, watches it and
hands what it finds to the loop as :data:`Report` objects, through the
``hand_off`` callable it is given (which must be thread-safe: the loop side
queues them and wakes the loop with ``call_soon_threadsafe``).  Configs are
validated here, on the thread: the loop gets a :class:`~rawproxy.fleet.Composed`
config or a rejection, never raw bytes.

One endpoint at a time; per endpoint the thread goes::

    [READ ->] WATCHING -> (batch -> report)* -> LOST -> next endpoint [-> pause]

* WATCHING starts after the last revision seen (``FleetState.resume_from``),
  so a watch moved to another member, or re-armed, misses nothing; events
  are idempotent (a key's value), so one seen twice does no harm.
* A compacted start revision: READ again on the same endpoint.
* A quiet stream (nothing for ``quiet_s``): WATCHING again on the same
  endpoint; a frozen member then fails the new request and is LOST.
* LOST (refused, reset, timed out, no leader, auth): the next endpoint;
  once every endpoint failed in a row, a pause that doubles up to
  ``MAX_PAUSE_S`` (:class:`EndpointCycle`, pure).
* :meth:`Watcher.reread` (SIGHUP) ends the stream and READs, reporting the
  result even if nothing changed.

Reports carry only what changed: a config whose inputs equal those of the
last one reported is an :class:`Unchanged` revision, so keep-alives and
keys outside the config cost the loop nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

from .config import ConfigError
from .etcd import AuthFailed, Client, EtcdError, Quiet, Unavailable, WatchStream
from .fleet import Composed, FleetState, compose

log = logging.getLogger("rawproxy.etcd")

FIRST_PAUSE_S = 0.1
MAX_PAUSE_S = 2.0
# How long a watch may say nothing before it is asked again: the one guard
# against a member that hangs with its kernel still answering.  One small
# request a minute per proxy costs etcd and the proxy next to nothing.
DEFAULT_QUIET_S = 60.0


@dataclass(frozen=True)
class Applied:
    revision: int
    trigger: str
    composed: Composed


@dataclass(frozen=True)
class Rejected:
    revision: int
    trigger: str
    error: ConfigError


@dataclass(frozen=True)
class Unchanged:
    revision: int


@dataclass(frozen=True)
class Link:
    """The watch came up (``connected``) or was lost (``restarted``)."""

    connected: bool
    restarted: bool = False


Report = Union[Applied, Rejected, Unchanged, Link]


class EndpointCycle:
    """Which endpoint next, and how long to wait first: pure."""

    def __init__(self, count: int, first: int = 0) -> None:
        self.count = count
        self.index = first % count
        self._failures_in_row = 0
        self._pause_s = FIRST_PAUSE_S

    def succeeded(self) -> None:
        self._failures_in_row = 0
        self._pause_s = FIRST_PAUSE_S

    def failed(self) -> float:
        """Move to the next endpoint; returns the pause before trying it."""
        self.index = (self.index + 1) % self.count
        self._failures_in_row += 1
        if self._failures_in_row < self.count:
            return 0.0
        self._failures_in_row = 0
        pause_s = self._pause_s
        self._pause_s = min(MAX_PAUSE_S, self._pause_s * 2)
        return pause_s


def initial_read(clients: Sequence[Client], prefix: bytes, timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> FleetState:
    """Read the prefix from the first endpoint that answers within
    ``timeout_s`` (all of them, in turn, more than once if time allows);
    raise the last error otherwise.  AuthFailed at once: no endpoint
    would answer differently."""
    deadline = clock() + timeout_s
    cycle = EndpointCycle(len(clients))
    while True:
        client = clients[cycle.index]
        client.timeout_s = max(0.05, min(timeout_s, deadline - clock()))
        try:
            revision, kvs = client.range_prefix(prefix)
        except AuthFailed:
            raise
        except EtcdError as exc:
            pause_s = cycle.failed()
            if clock() + pause_s >= deadline:
                raise Unavailable(f"no etcd endpoint answered within {timeout_s:g}s "
                                  f"(last: {exc})") from None
            time.sleep(pause_s)
            continue
        finally:
            client.timeout_s = timeout_s
        return FleetState.from_range(prefix, revision, kvs)


class Watcher:
    """The watch thread; ``state`` is where it starts (see the module doc)."""

    def __init__(self, clients: Sequence[Client], state: FleetState,
                 hand_off: Callable[[Report], None], *, read_first: bool = False,
                 quiet_s: float = DEFAULT_QUIET_S) -> None:
        self._clients = clients
        self._state = state
        self._hand_off = hand_off
        self._quiet_s = quiet_s
        self._cycle = EndpointCycle(len(clients))
        self._need_read = read_first
        self._reread = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._stream: Optional[WatchStream] = None
        self._connected = False
        # Inputs of the last config reported, and whether it was valid.
        self._last = state.inputs() if not read_first else None
        self._last_ok = True
        self._thread = threading.Thread(target=self._run, name="rawproxy-etcd", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def reread(self) -> None:
        """Read everything again and report it (any thread)."""
        self._reread.set()
        self._abort_stream()

    def close(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        self._abort_stream()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _abort_stream(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.abort()

    # -- the thread -----------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            client = self._clients[self._cycle.index]
            try:
                self._follow(client)
                self._cycle.succeeded()
            except EtcdError as exc:
                if self._stopping.is_set():
                    break
                self._lost(client, exc)
            except Exception:  # a bug: say so, and keep following
                log.exception("etcd: watch failed")
                self._lost(client, EtcdError("unexpected error"))

    def _lost(self, client: Client, exc: EtcdError) -> None:
        self._connected = False
        pause_s = self._cycle.failed()
        self._hand_off(Link(connected=False, restarted=True))
        following = self._clients[self._cycle.index].endpoint
        log.warning("etcd: lost %s (%s); switching to %s%s, resuming after revision %d",
                    client.endpoint, _without_endpoint(exc, client), following,
                    f" in {pause_s:g}s" if pause_s else "", self._state.revision)
        if pause_s:
            self._stopping.wait(pause_s)

    def _follow(self, client: Client) -> None:
        """Read if needed, then watch until the stream ends."""
        if self._need_read or self._reread.is_set():
            forced = self._reread.is_set()
            revision, kvs = client.range_prefix(self._state.prefix)
            self._state = FleetState.from_range(self._state.prefix, revision, kvs)
            self._need_read = False
            self._reread.clear()  # only once read: a failed read is tried again
            self._report(f"{'SIGHUP' if forced else 'read again'}, etcd revision {revision}",
                         forced)
        stream = client.watch(self._state.prefix, self._state.resume_from, self._quiet_s)
        with self._lock:
            self._stream = stream
        try:
            if self._reread.is_set() or self._stopping.is_set():
                stream.abort()
            self._consume(client, stream)
        except Quiet:
            return
        except Unavailable:
            if self._reread.is_set() or self._stopping.is_set():
                return
            raise
        finally:
            with self._lock:
                self._stream = None

    def _consume(self, client: Client, stream: WatchStream) -> None:
        for batch in stream:
            if batch.created and not self._connected:
                self._connected = True
                self._hand_off(Link(connected=True))
                log.info("etcd: watching %s on %s after revision %d",
                         self._state.prefix.decode("utf-8", "replace"), client.endpoint,
                         self._state.revision)
            if batch.compact_revision:
                log.warning("etcd: revision %d was compacted (now at %d): reading "
                            "everything again", self._state.resume_from, batch.compact_revision)
                self._need_read = True
                return
            if batch.canceled:
                if "auth token" in batch.cancel_reason:
                    client.forget_token()
                    return
                raise _cancel_error(client, batch.cancel_reason)
            if batch.events:
                self._state.apply(batch.events)
                self._report(f"etcd revision {self._state.revision}", False)

    def _report(self, trigger: str, forced: bool) -> None:
        inputs = self._state.inputs()
        revision = self._state.revision
        if inputs == self._last and not forced:
            if self._last_ok:
                self._hand_off(Unchanged(revision))
            return
        self._last = inputs
        try:
            composed = compose(self._state)
        except ConfigError as exc:
            self._last_ok = False
            self._hand_off(Rejected(revision, trigger, exc))
            return
        self._last_ok = True
        self._hand_off(Applied(revision, trigger, composed))


def _cancel_error(client: Client, reason: str) -> EtcdError:
    text = f"{client.endpoint}: watch canceled: {reason or 'no reason given'}"
    return AuthFailed(text) if "permission" in reason else Unavailable(text)


def _without_endpoint(exc: EtcdError, client: Client) -> str:
    text = str(exc)
    lead = f"{client.endpoint}: "
    return text[len(lead):] if text.startswith(lead) else text
