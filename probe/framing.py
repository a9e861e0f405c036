"""Frames on the wire, and a sans-IO receiver that names the first defect.

A frame is a 22-byte header and a payload::

    magic b"PF" | stream u32 | seq u32 | length u32 | crc32(payload) u32 | crc32(header[:18]) u32

all big-endian.  The payload is pseudo-random bytes derived from
``(stream, seq)``, so a receiver can rebuild what should have arrived and
say exactly where a corrupted frame went wrong, with no side channel.

``Decoder(stream_id, frame_count)`` reassembles one echoed stream from any
split of the bytes: ``feed(data)`` returns how many frames it completed,
``feed(b"")`` means EOF (as with ``recv``).  The first defect stops it and
stays in ``defect``; ``done`` is true after every frame and then EOF.
No I/O here: the socket side (stalls, resets, refusals) lives in checks.py
and only reuses ``Defect`` and ``Kind`` to report them.
"""

from __future__ import annotations

import enum
import random
import struct
import zlib
from typing import NamedTuple, Optional

MAGIC = b"PF"
_FIELDS = struct.Struct("!2sIIII")
_HCRC = struct.Struct("!I")
HEADER_SIZE = _FIELDS.size + _HCRC.size
_KNOWN = 10  # magic, stream and seq: the header bytes a receiver can predict


class Kind(enum.Enum):
    CORRUPTED = "corrupted"
    TRUNCATED = "truncated"
    OUT_OF_ORDER = "out of order"
    DUPLICATED = "duplicated"
    MIXED = "mixed"          # a frame of another connection's stream
    EXTRA = "extra bytes"    # bytes after the last frame
    STALLED = "stalled"
    RESET = "reset"
    REFUSED = "refused"
    ERROR = "error"          # any other socket error


class Defect(NamedTuple):
    kind: Kind
    detail: str

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.detail}"


def payload(stream_id: int, seq: int, length: int) -> bytes:
    """The payload of frame ``seq`` of ``stream_id``: random, but reproducible."""
    return random.Random((stream_id << 32) | seq).randbytes(length)


def encode(stream_id: int, seq: int, length: int) -> bytes:
    body = payload(stream_id, seq, length)
    fields = _FIELDS.pack(MAGIC, stream_id, seq, length, zlib.crc32(body))
    return fields + _HCRC.pack(zlib.crc32(fields)) + body


def stream_of(header: bytes) -> Optional[int]:
    """The stream id of a frame header's first bytes, or None if not a frame."""
    if len(header) < _KNOWN or header[:2] != MAGIC:
        return None
    return int.from_bytes(header[2:6], "big")


def _first_difference(got: bytes, want: bytes) -> int:
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), -1)


class Decoder:
    """Reassembles and verifies the echo of one stream; see the module doc."""

    __slots__ = ("stream_id", "frame_count", "defect", "done", "_buf", "_offset",
                 "_next_seq", "_length")

    def __init__(self, stream_id: int, frame_count: int) -> None:
        self.stream_id = stream_id
        self.frame_count = frame_count
        self.defect: Optional[Defect] = None
        self.done = False
        self._buf = bytearray()
        self._offset = 0               # stream offset of _buf[0]
        self._next_seq = 0
        self._length: Optional[int] = None  # payload length once a header is accepted

    @property
    def frames_ok(self) -> int:
        return self._next_seq

    @property
    def bytes_ok(self) -> int:
        return self._offset

    def feed(self, data: bytes) -> int:
        if self.defect is not None or self.done:
            return 0
        if not data:
            self._on_eof()
            return 0
        self._buf += data
        completed = 0
        while self.defect is None and self._step():
            completed += 1
        return completed

    def _fail(self, kind: Kind, detail: str) -> None:
        self.defect = Defect(kind, detail)

    def _on_eof(self) -> None:
        seq, have = self._next_seq, len(self._buf)
        if seq == self.frame_count and not have:
            self.done = True
        elif self._length is not None:
            self._fail(Kind.TRUNCATED, f"frame {seq} ended after {have - HEADER_SIZE} of "
                       f"{self._length} payload bytes ({seq} of {self.frame_count} frames whole)")
        elif have:
            self._fail(Kind.TRUNCATED, f"frame {seq} ended inside its header ({have} of "
                       f"{HEADER_SIZE} bytes, {seq} of {self.frame_count} frames whole)")
        else:
            self._fail(Kind.TRUNCATED, f"EOF after {seq} of {self.frame_count} frames")

    def _step(self) -> bool:
        """Consume one frame from the buffer if it is whole; False if it needs more."""
        seq, at = self._next_seq, self._offset
        if seq == self.frame_count:
            if not self._buf:
                return False
            self._fail(Kind.EXTRA, f"{len(self._buf)}+ bytes after the last frame "
                       f"(stream byte {at})")
            return False
        if self._length is None:
            if len(self._buf) < HEADER_SIZE:
                return False
            self._length = self._check_header(bytes(self._buf[:HEADER_SIZE]), seq, at)
            if self._length is None:
                return False
        end = HEADER_SIZE + self._length
        if len(self._buf) < end:
            return False
        with memoryview(self._buf) as view:
            crc_ok = zlib.crc32(view[HEADER_SIZE:end]) == _FIELDS.unpack_from(view)[4]
        if not crc_ok:
            index = _first_difference(bytes(self._buf[HEADER_SIZE:end]),
                                      payload(self.stream_id, seq, self._length))
            self._fail(Kind.CORRUPTED, f"frame {seq} payload byte {index} of {self._length} "
                       f"(stream byte {at + HEADER_SIZE + index})")
            return False
        del self._buf[:end]
        self._offset += end
        self._next_seq += 1
        self._length = None
        return True

    def _check_header(self, header: bytes, seq: int, at: int) -> Optional[int]:
        """The payload length if ``header`` is frame ``seq`` of this stream, else None."""
        magic, stream, got_seq, length, _ = _FIELDS.unpack_from(header)
        if magic != MAGIC or zlib.crc32(header[:_FIELDS.size]) != _HCRC.unpack_from(
                header, _FIELDS.size)[0]:
            expected = _FIELDS.pack(MAGIC, self.stream_id, seq, 0, 0)[:_KNOWN]
            index = _first_difference(header[:_KNOWN], expected)
            if index >= 0:
                self._fail(Kind.CORRUPTED, f"frame {seq} header byte {index} "
                           f"(stream byte {at + index})")
            else:   # the bytes a receiver cannot predict: length and checksums
                self._fail(Kind.CORRUPTED, f"frame {seq} header: bad length or checksum "
                           f"(stream bytes {at + _KNOWN}-{at + HEADER_SIZE - 1})")
        elif stream != self.stream_id:
            self._fail(Kind.MIXED, f"frame {got_seq} of stream {stream:08x} arrived on stream "
                       f"{self.stream_id:08x} where its frame {seq} was due (stream byte {at})")
        elif got_seq < seq:
            self._fail(Kind.DUPLICATED, f"frame {got_seq} again where frame {seq} was due "
                       f"(stream byte {at})")
        elif got_seq > seq:
            self._fail(Kind.OUT_OF_ORDER, f"frame {got_seq} where frame {seq} was due "
                       f"(stream byte {at})")
        else:
            return int(length)
        return None
