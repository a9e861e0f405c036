"""The floor: the least a single-threaded CPython proxy does per connection.

``python3 floor_proxy.py --listen 127.0.0.1:8000 --target 127.0.0.1:9000``.
The same design and system calls as rawproxy's hot path, with every
feature taken out: one raw ``select.epoll``, ``accept`` straight from the
C socket, a non-blocking ``connect_ex``, ``splice(2)`` through pipes from a
pool, half-close, close.  No timers, no balancer, no failover, no limits,
no counters, no log, no admin; the client is read only once its target
has connected.  It is correct for what the benchmark asks of it (partial
sends park the pipe and wait for the destination to drain), not a proxy
anyone should run.

It answers the question issue #17 leaves open: how low can a proxy
written in CPython go?  In one ``benchmarks.run`` beside HAProxy and
rawproxy (peer ``floor``, not run by default), HAProxy -> floor is the
price of CPython and this design, floor -> rawproxy the price of
rawproxy's features.  Linux and Python 3.10+ only (``os.splice``).
"""

from __future__ import annotations

import _socket
import argparse
import errno
import os
import select
import signal
import sys
from typing import Callable, Optional

CHUNK = 1 << 16
FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
IN, OUT = select.EPOLLIN, select.EPOLLOUT
AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)

Handler = Callable[[int], None]


class Pipes:
    """Empty pipes to borrow: a direction holds one only while bytes are in it."""

    def __init__(self) -> None:
        self.free: list[tuple[int, int]] = []

    def take(self) -> tuple[int, int]:
        return self.free.pop() if self.free else os.pipe2(os.O_NONBLOCK)

    def give(self, pipe: tuple[int, int]) -> None:
        self.free.append(pipe)


class Direction:
    """One way through a connection: src -> pipe -> dst."""

    __slots__ = ("conn", "src", "dst", "held", "pipe", "ended")

    def __init__(self, conn: "Conn", src: "_socket.socket", dst: "_socket.socket") -> None:
        self.conn = conn
        self.src = src
        self.dst = dst
        self.held = 0  # bytes parked in self.pipe: dst would block
        self.pipe: Optional[tuple[int, int]] = None
        self.ended = False

    def on_readable(self, events: int) -> None:
        if self.held:  # parked: its source is unread until dst drains
            if events & select.EPOLLERR:  # a reset, reported whatever the mask
                self.conn.close()
            return  # a hang-up (FIN both ways) waits: the parked bytes still go
        proxy = self.conn.proxy
        try:
            pipe = proxy.pipes.take()
        except OSError:  # no descriptors for a pipe: this connection ends
            self.conn.close()
            return
        try:
            got = os.splice(self.src.fileno(), pipe[1], CHUNK, flags=FLAGS)
        except BlockingIOError:
            proxy.pipes.give(pipe)
            return
        except OSError:
            proxy.pipes.give(pipe)
            self.conn.close()
            return
        if got == 0:
            proxy.pipes.give(pipe)
            self.ended = True
            self.conn.ended(self)
            return
        self.pipe = pipe
        self.held = got
        self.flush()

    def flush(self) -> None:
        pipe = self.pipe
        assert pipe is not None
        while self.held:
            try:
                sent = os.splice(pipe[0], self.dst.fileno(), self.held, flags=FLAGS)
            except BlockingIOError:
                self.conn.park(self)
                return
            except OSError:
                self.conn.close()
                return
            self.held -= sent
        self.conn.proxy.pipes.give(pipe)
        self.pipe = None


class Conn:
    __slots__ = ("proxy", "client", "target", "up", "down", "closed", "client_mask",
                 "target_mask")

    def __init__(self, proxy: "Proxy", client: "_socket.socket",
                 target: "_socket.socket") -> None:
        self.proxy = proxy
        self.client = client
        self.target = target
        self.up = Direction(self, client, target)
        self.down = Direction(self, target, client)
        self.closed = False
        self.client_mask = 0
        self.target_mask = OUT

    def on_target_event(self, events: int) -> None:
        """The target's first event: connected, or not."""
        proxy = self.proxy
        if not events & OUT or events & (select.EPOLLERR | select.EPOLLHUP):
            self.close()
            return
        tfd, cfd = self.target.fileno(), self.client.fileno()
        proxy.handlers[tfd] = self.on_target_io
        proxy.epoll.modify(tfd, IN)
        proxy.handlers[cfd] = self.on_client_io
        proxy.epoll.register(cfd, IN)
        self.client_mask = self.target_mask = IN

    def on_client_io(self, events: int) -> None:
        if events & OUT:
            self.unpark(self.down)
        if events & ~OUT and not self.closed:
            self.up.on_readable(events)

    def on_target_io(self, events: int) -> None:
        if events & OUT:
            self.unpark(self.up)
        if events & ~OUT and not self.closed:
            self.down.on_readable(events)

    def park(self, way: Direction) -> None:
        """way's dst would block: stop reading its src, wait for dst to drain."""
        self.rearm()

    def unpark(self, way: Direction) -> None:
        if not way.held or self.closed:
            return
        way.flush()
        if way.held or self.closed:
            return
        if self.up.ended and self.down.ended:
            self.close()
        else:
            self.rearm()

    def rearm(self) -> None:
        """Each socket's interest from the state (only off the fast path)."""
        up, down = self.up, self.down
        client = (0 if up.ended or up.held else IN) | (OUT if down.held else 0)
        target = (0 if down.ended or down.held else IN) | (OUT if up.held else 0)
        epoll = self.proxy.epoll
        if client != self.client_mask:
            epoll.modify(self.client.fileno(), client)
            self.client_mask = client
        if target != self.target_mask:
            epoll.modify(self.target.fileno(), target)
            self.target_mask = target

    def ended(self, way: Direction) -> None:
        """way's source sent its FIN: pass it on, or close when both have."""
        other = self.down if way is self.up else self.up
        if other.ended and not other.held:
            self.close()
            return
        try:
            way.dst.shutdown(_socket.SHUT_WR)
        except OSError:
            self.close()
            return
        self.rearm()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        proxy = self.proxy
        for way in (self.up, self.down):
            if way.pipe is not None:
                os.close(way.pipe[0])
                os.close(way.pipe[1])
        for sock in (self.client, self.target):
            fd = sock.fileno()
            if proxy.handlers.pop(fd, None) is not None:
                proxy.epoll.unregister(fd)
                proxy.closed_in_batch.add(fd)  # its number may be reused in this batch
            sock.close()


class Proxy:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.target = target
        self.epoll = select.epoll()
        self.pipes = Pipes()
        self.handlers: dict[int, Handler] = {}
        self.closed_in_batch: set[int] = set()
        self.listener = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        self.listener.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        self.listener.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        self.listener.bind(listen)
        self.listener.listen(4096)
        self.listener.setblocking(False)
        self.handlers[self.listener.fileno()] = self.on_accept
        self.epoll.register(self.listener.fileno(), IN)
        self.running = True

    def on_accept(self, events: int) -> None:
        listener = self.listener
        for _ in range(4):
            try:
                fd, _addr = listener._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            except OSError:
                return
            client = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM, 0, fd)
            client.setblocking(False)
            target = _socket.socket(_socket.AF_INET,
                                    _socket.SOCK_STREAM | _socket.SOCK_NONBLOCK)
            code = target.connect_ex(self.target)
            if code not in (0, errno.EINPROGRESS):
                client.close()
                target.close()
                continue
            conn = Conn(self, client, target)
            self.handlers[target.fileno()] = conn.on_target_event
            self.epoll.register(target.fileno(), OUT)

    def run(self) -> None:
        poll = self.epoll.poll
        handlers = self.handlers
        stale = self.closed_in_batch
        while self.running:
            try:
                events = poll(1.0)
            except InterruptedError:
                continue
            stale.clear()
            for fd, mask in events:
                if stale and fd in stale:
                    continue  # closed earlier in this batch: not the new socket's
                handler = handlers.get(fd)
                if handler is not None:
                    handler(mask)


def split_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--target", required=True, help="HOST:PORT")
    args = parser.parse_args(argv)
    if not hasattr(os, "splice"):
        print("floor_proxy: needs os.splice (Linux, Python 3.10+)", file=sys.stderr)
        return 3
    proxy = Proxy(split_address(args.listen), split_address(args.target))

    def stop(signum: int, frame: object) -> None:
        proxy.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    proxy.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
