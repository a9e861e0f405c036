"""One end of a control socketpair: length-prefixed frames, never blocking a loop.

A frame is a 4-byte big-endian length, then UTF-8 text.  :class:`Channel`
runs one end on an event loop: a frame the socket does not take at once
waits, whole, in an outbox (a blocking send with a timeout could give up
mid-frame and leave the stream out of step for good).  A length no peer
sends closes the channel, as does EOF or a send error; ``on_closed`` says so.

A frame may carry descriptors (``SCM_RIGHTS``): a worker's listening
sockets, asked for when the supervisor upgrades (``upgrade``).  Such a
frame starts with ``\x01<count>\n``; the kernel may deliver the
descriptors with an earlier read than the frame's own bytes, never a later
one, so the receiver keeps them in order and gives each such frame its
count.  They are offered to the frame's handler (:meth:`Channel.take_fds`)
and closed if it leaves them.  What the frames mean is ``control``'s.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import struct
from typing import Callable, Optional, Sequence

from . import netio
from .loop import EVENT_ERROR, EVENT_READ, EVENT_WRITE, EventLoop

log = logging.getLogger("rawproxy.control")

MAX_FRAME_BYTES = 64 << 20  # far above any /metrics or /config answer
# A peer that leaves this much unread (stopped, or stuck) gets no more
# frames until it reads: events are lost whole, never cut.
MAX_OUTBOX_BYTES = 16 << 20
_READS_PER_EVENT = 16  # then the loop serves the others; the rest is read next turn
FDS_MARK = "\x01"
# Linux takes at most 253 descriptors (SCM_MAX_FD) in one sendmsg, and a
# read returns those of one sendmsg at most: larger sets go in pieces.
_FDS_PER_SEND = 250
_ANCILLARY_BYTES = socket.CMSG_SPACE(_FDS_PER_SEND * array.array("i").itemsize)
_RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)


def encode_frame(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!I", len(data)) + data


def take_frame(inbox: bytearray) -> Optional[str]:
    """The first whole frame in ``inbox`` (removed from it), or None; ValueError
    on a length no peer sends (the stream is out of step)."""
    if len(inbox) < 4:
        return None
    (length,) = struct.unpack_from("!I", inbox)
    if length > MAX_FRAME_BYTES:
        raise ValueError(f"control frame of {length} bytes")
    if len(inbox) < 4 + length:
        return None
    frame = bytes(inbox[4:4 + length]).decode(errors="replace")
    del inbox[:4 + length]
    return frame


class Channel:
    """One end of a control socketpair, on a loop, never blocking it."""

    __slots__ = ("_loop", "sock", "_fd", "_inbox", "_outbox", "_on_frame", "_on_closed",
                 "closed", "_outbox_fds", "_inbox_fds", "_frame_fds")

    def __init__(self, loop: EventLoop, sock: socket.socket, on_frame: Callable[[str], None],
                 on_closed: Callable[[], None]) -> None:
        self._loop = loop
        self.sock = sock
        self._fd = sock.fileno()
        self._inbox = bytearray()
        self._outbox = bytearray()
        # [offset in the outbox, descriptors (our duplicates) to send with that byte]
        self._outbox_fds: list[tuple[int, list[int]]] = []
        self._inbox_fds: list[int] = []  # received, in order, not yet given to a frame
        self._frame_fds: list[int] = []  # those of the frame being handled
        self._on_frame = on_frame
        self._on_closed = on_closed  # on EOF, a send error or a bad frame; not on close()
        self.closed = False
        sock.setblocking(False)
        loop.watch(self._fd, self._on_events)
        loop.set_interest(self._fd, EVENT_READ)

    def send(self, text: str, fds: Sequence[int] = ()) -> bool:
        """Queue one frame, with duplicates of ``fds``; False (nothing queued)
        if the channel is closed or the peer has left more than
        MAX_OUTBOX_BYTES unread."""
        if self.closed or len(self._outbox) > MAX_OUTBOX_BYTES:
            return False
        if fds:
            text = f"{FDS_MARK}{len(fds)}\n{text}"
            pieces = [list(fds[i:i + _FDS_PER_SEND]) for i in range(0, len(fds), _FDS_PER_SEND)]
            if len(pieces) > 4 + len(text.encode()):
                return False  # one byte per piece: never for a list of ports
            try:
                for offset, piece in enumerate(pieces, len(self._outbox)):
                    self._outbox_fds.append((offset, [os.dup(fd) for fd in piece]))
            except OSError:
                return False  # out of descriptors; those duplicated go with close()
        self._outbox += encode_frame(text)
        self._flush()
        return not self.closed

    def _flush(self) -> None:
        try:
            while self._outbox:
                sent = self._send_some()
                del self._outbox[:sent]
                self._outbox_fds = [(offset - sent, fds) for offset, fds in self._outbox_fds]
        except netio.WOULD_BLOCK:
            pass
        except OSError:
            self._lost()
            return
        self._loop.set_interest(self._fd, EVENT_READ | EVENT_WRITE if self._outbox else EVENT_READ)

    def _send_some(self) -> int:
        if not self._outbox_fds:
            return self.sock.send(self._outbox)
        offset, fds = self._outbox_fds[0]
        if offset > 0:  # plain bytes up to the next byte that carries descriptors
            return self.sock.send(self._outbox[:offset])
        end = self._outbox_fds[1][0] if len(self._outbox_fds) > 1 else len(self._outbox)
        sent = self.sock.sendmsg([self._outbox[:end]], [
            (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        del self._outbox_fds[0]  # they went with the first byte sent
        _close_fds(fds)
        return sent

    def _on_events(self, events: int) -> None:
        if events & EVENT_WRITE:
            self._flush()
        if events & (EVENT_READ | EVENT_ERROR) and not self.closed:
            self._read()

    def _read(self) -> None:
        for _ in range(_READS_PER_EVENT):
            try:
                data, ancillary, flags, _ = self.sock.recvmsg(1 << 16, _ANCILLARY_BYTES,
                                                              _RECV_FLAGS)
            except netio.WOULD_BLOCK:
                break
            except OSError:
                data, ancillary, flags = b"", [], 0
            self._inbox_fds += _received_fds(ancillary)
            if flags & socket.MSG_CTRUNC:
                log.error("control channel: descriptors lost in transit, closing it")
                self._lost()
                return
            if not data:
                self._deliver()  # what came before the EOF still counts
                self._lost()
                return
            self._inbox += data
        self._deliver()

    def _deliver(self) -> None:
        while not self.closed:
            try:
                frame = take_frame(self._inbox)
                if frame is not None and frame.startswith(FDS_MARK):
                    frame = self._claim_fds(frame)
            except ValueError as exc:
                log.error("control channel out of step, closing it: %s", exc)
                self._lost()
                return
            if frame is None:
                return
            try:
                self._on_frame(frame)
            finally:
                _close_fds(self._frame_fds)  # those the handler did not take
                self._frame_fds = []

    def _claim_fds(self, frame: str) -> str:
        head, _, text = frame.partition("\n")
        digits = head[len(FDS_MARK):]
        # ASCII digits only: int() would take "-1", " 0", "1_0" or other scripts' digits.
        if not (digits.isascii() and digits.isdigit()):
            raise ValueError(f"a frame's descriptor count is not a number: {digits[:20]!r}")
        count = int(digits)
        if count > len(self._inbox_fds):
            raise ValueError(f"a frame carries {count} descriptors, {len(self._inbox_fds)} came")
        self._frame_fds = self._inbox_fds[:count]
        del self._inbox_fds[:count]
        return text

    def take_fds(self) -> list[int]:
        """While a frame is handled: the descriptors it carried, now the caller's."""
        fds, self._frame_fds = self._frame_fds, []
        return fds

    def _lost(self) -> None:
        if not self.closed:
            self.close()
            self._on_closed()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._inbox.clear()
        self._outbox.clear()
        _close_fds(self._inbox_fds + [fd for _, fds in self._outbox_fds for fd in fds])
        self._inbox_fds, self._outbox_fds = [], []
        if self._loop.is_watched(self._fd):
            self._loop.unwatch(self._fd)
        netio.close(self.sock)


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return list(fds)


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
