"""Name resolution off the event loop, with a short-lived cache.

``getaddrinfo`` blocks, so it runs on a few worker threads; results come
back to the loop through ``post`` (the loop's ``call_soon_threadsafe``), and
callbacks always run on the loop thread.  Contract:

* ``resolve(host, port, on_done)`` returns a :class:`Resolution` at once for
  an IP literal or a fresh cache entry, else ``None`` and calls
  ``on_done(resolution)`` later.  Concurrent lookups of one name share one
  ``getaddrinfo`` call.
* Answers are cached for ``ttl_s`` (30 s by default); failures for
  ``negative_ttl_s`` (5 s), so a dead name does not queue a lookup per
  client but is retried soon after it is fixed.
* ``is_started`` tells a caller whose time ran out whether its lookup
  ever got a thread (if not, the shortage was ours); ``withdraw`` drops
  the callback of a caller that gave up.
* A failure that is ours, not the name's (no thread could be started, no
  descriptor or memory for the lookup: ``Resolution.local``), is answered
  but never cached, and callers must not charge it to the target.
* ``getaddrinfo``, the clock and the thread factory are parameters: unit
  tests replace them and never send a query to a real resolver.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import queue
import socket
import threading
import time
from typing import Any, Callable, Optional, Sequence, Tuple

from . import netio
from .netio import SockAddr

log = logging.getLogger("rawproxy.resolver")

Address = Tuple[int, SockAddr]  # (family, sockaddr) ready for connect
GetAddrInfo = Callable[..., Sequence[Tuple[Any, ...]]]
Post = Callable[[Callable[[], None]], None]
ThreadFactory = Callable[..., threading.Thread]

# getaddrinfo failures that say "this process is short of something": a
# system error (EAI_SYSTEM, which Python raises as a plain OSError with
# its errno) for descriptors or memory, or EAI_MEMORY.  EAI_AGAIN is not
# among them: it is the name service failing to answer, which makes the
# target as unreachable as any unresolvable name.
_EAI_MEMORY = getattr(socket, "EAI_MEMORY", None)


class Resolution:
    __slots__ = ("addresses", "error", "expires_at", "local", "loopback")

    def __init__(self, addresses: tuple[Address, ...], error: str, expires_at: float,
                 local: bool = False) -> None:
        self.addresses = addresses
        self.error = error  # "" when addresses were found
        self.expires_at = expires_at
        self.local = local  # the failure is this process's shortage, not the name's
        # Every address on this host's loopback: a connect to it is usually
        # over when connect() returns (rawproxy.connect takes it at once).
        self.loopback = bool(addresses) and all(is_loopback(address) for address in addresses)


def _is_local_failure(exc: BaseException) -> bool:
    if isinstance(exc, socket.gaierror):  # its errno is an EAI_* code
        return _EAI_MEMORY is not None and exc.errno == _EAI_MEMORY
    return netio.is_local_shortage(exc)


def is_loopback(address: Address) -> bool:
    try:
        return ipaddress.ip_address(address[1][0]).is_loopback
    except ValueError:
        return False


def literal_address(host: str, port: int) -> Optional[Address]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 6:
        return (socket.AF_INET6, (host, port, 0, 0))
    return (socket.AF_INET, (host, port))


class Resolver:
    def __init__(self, post: Post, getaddrinfo: GetAddrInfo = socket.getaddrinfo,
                 clock: Callable[[], float] = time.monotonic, ttl_s: float = 30.0,
                 negative_ttl_s: float = 5.0, workers: int = 2,
                 thread_factory: ThreadFactory = threading.Thread) -> None:
        self._post = post
        self._thread_factory = thread_factory
        self._getaddrinfo = getaddrinfo
        self._clock = clock
        self._ttl_s = ttl_s
        self._negative_ttl_s = negative_ttl_s
        self._worker_count = workers
        self._cache: dict[tuple[str, int], Resolution] = {}
        self._waiting: dict[tuple[str, int], list[Callable[[Resolution], None]]] = {}
        self._jobs: queue.SimpleQueue[Optional[tuple[str, int]]] = queue.SimpleQueue()
        # Names a thread has taken (added by it, dropped on delivery): a
        # lookup not in here is still queued behind others (see is_started).
        self._started: set[tuple[str, int]] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def resolve(self, host: str, port: int,
                on_done: Callable[[Resolution], None]) -> Optional[Resolution]:
        key = (host, port)
        cached = self._cache.get(key)
        if cached is not None and cached.expires_at > self._clock():
            return cached
        literal = literal_address(host, port)
        if literal is not None:
            # Cached for ever, so an IP target costs one dict lookup per
            # connect instead of an ipaddress parse.
            resolution = self._cache[key] = Resolution((literal,), "", float("inf"))
            return resolution
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.append(on_done)
            return None
        problem = self._start_workers()
        if problem:
            # Answered now and not cached: nothing was queued, so nothing
            # is left waiting on a job no worker will ever take.
            return Resolution((), f"cannot resolve {host}: {problem}", self._clock(),
                              local=True)
        self._waiting[key] = [on_done]
        self._jobs.put(key)
        return None

    def _start_workers(self) -> str:
        """Top the workers up to their number; "" if at least one runs."""
        if self._closed:
            return "resolver closed"
        while len(self._threads) < self._worker_count:
            name = f"rawproxy-dns-{len(self._threads)}"
            try:
                thread = self._thread_factory(target=self._work, name=name, daemon=True)
                thread.start()
            except RuntimeError as exc:  # "can't start new thread": a thread limit
                log.warning("cannot start a resolver thread: %s", exc)
                break
            self._threads.append(thread)
        return "" if self._threads else "no resolver thread"

    def _work(self) -> None:
        while True:
            key = self._jobs.get()
            if key is None:
                return
            self._started.add(key)  # one set operation: atomic under the GIL
            resolution = self._lookup(*key)
            # Bind now: a closure would read ``key``/``resolution`` when the loop
            # runs it, by which time this thread may have taken the next job.
            self._post(functools.partial(self._deliver, key, resolution))

    def _lookup(self, host: str, port: int) -> Resolution:
        try:
            infos = self._getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                      proto=socket.IPPROTO_TCP)
        except Exception as exc:  # anything: a worker that dies would wedge the name
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            local = _is_local_failure(exc)
            if not local and not isinstance(exc, (OSError, UnicodeError)):
                log.error("getaddrinfo(%r) raised %r", host, exc)
            return Resolution((), f"cannot resolve {host}: {reason}",
                              self._clock() + self._negative_ttl_s, local)
        addresses: list[Address] = []
        for family, _type, _proto, _canon, sockaddr in infos:
            address = (family, sockaddr)
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            return Resolution((), f"cannot resolve {host}: no addresses",
                              self._clock() + self._negative_ttl_s)
        return Resolution(tuple(addresses), "", self._clock() + self._ttl_s)

    def _deliver(self, key: tuple[str, int], resolution: Resolution) -> None:
        self._started.discard(key)
        if not resolution.local:
            self._cache[key] = resolution
        for on_done in self._waiting.pop(key, []):
            try:
                on_done(resolution)
            except Exception:
                log.exception("error in resolution callback for %s:%d", *key)

    def is_started(self, host: str, port: int) -> bool:
        """Whether a thread is looking ``host`` up (False: still queued, or
        not asked): a caller whose time ran out while its lookup waited for a
        thread was short of threads, not failed by the name."""
        return (host, port) in self._started

    def withdraw(self, host: str, port: int, on_done: Callable[[Resolution], None]) -> None:
        """Forget ``on_done`` (its caller gave up): a hanging name must not
        collect one callback per client that timed out."""
        waiting = self._waiting.get((host, port))
        if waiting is not None:
            try:
                waiting.remove(on_done)
            except ValueError:
                pass

    def forget(self) -> None:
        """Drop cached answers (a reload should see DNS changes at once)."""
        self._cache.clear()

    def close(self) -> None:
        """Stop the workers; a lookup in progress finishes in the background."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        self._threads.clear()
