"""Log lines leave the event loop through a bounded queue: stderr never blocks it.

A ``StreamHandler`` writes on the thread that logs.  When nobody reads
stderr (a stuck journald, ``rawproxy 2>&1 | less`` left paused), the pipe
fills and that write blocks: the loop, and with it every connection, would
stop.  HAProxy sends its logs over non-blocking UDP syslog and drops what
the socket does not take; rawproxy does the equivalent here:

* :class:`SinkHandler` formats a record on the thread that logs (so the
  record's arguments are read at once) and hands the line to a
  :class:`LogSink`.  That costs a lock and an append; it never waits.
* A :class:`LogSink` holds at most ``max_lines`` lines.  One writer thread
  wakes on the first line, lets more gather for 10 ms, then takes them all
  and writes them in one call (a flush skips the wait).  When the
  queue is full, new lines are dropped and counted (``dropped``, exported as
  ``rawproxy_log_lines_dropped_total``), and the writer says how many once
  stderr takes lines again.
* ``flush(timeout_s)`` waits until what was queued before the call is
  written, or the timeout passes: exit paths flush with a bound, and the
  writer calls ``os.write`` on the descriptor rather than through the
  buffered ``sys.stderr`` (whose lock a blocked write would hold), so a
  blocked stderr cannot keep the process alive.
* Across ``fork`` (``--workers``), the parent flushes first and holds the lock,
  so the child starts from a consistent state.  The child then drops the
  parent's queue (the parent writes those lines) and starts its own writer.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import deque
from typing import Callable, Dict, Optional, TextIO

Fields = Dict[str, object]  # an access record's fields (the JSON format's keys)

FORK_FLUSH_TIMEOUT_S = 0.25
BATCH_DELAY_S = 0.01


class LogSink:
    """A bounded line queue drained into ``stream`` by one writer thread.

    When ``stream`` has a file descriptor (stderr does), the writer calls
    ``os.write`` on it directly.  A buffered text stream holds its own lock
    for the whole of a blocking write: interpreter shutdown, a worker's exit
    or a fork would then wait on that lock for as long as nobody reads.
    """

    def __init__(self, stream: TextIO, max_lines: int = 10_000) -> None:
        self._stream = stream
        self._fd = _fileno(stream)
        self._encoding = getattr(stream, "encoding", None) or "utf-8"
        self._max_lines = max_lines
        self._start()
        if hasattr(os, "register_at_fork"):
            ref = weakref.ref(self)
            os.register_at_fork(before=_call_if_alive(ref, LogSink._before_fork),
                                after_in_parent=_call_if_alive(ref, LogSink._after_fork_parent),
                                after_in_child=_call_if_alive(ref, LogSink._after_fork_child))

    def _start(self) -> None:
        # put() takes the bare lock (a C-level with, the cheapest there is:
        # it runs once per access-log line); the rest go through the condition.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._lines: deque[str] = deque()
        self._queued = 0     # lines accepted since start
        self._written = 0    # of those, lines the writer has finished with
        self.dropped = 0
        self._dropped_told = 0
        self._closed = False
        self._writer_gone = False
        self._flushing = 0   # callers waiting in flush(): write without delay
        self._thread = threading.Thread(target=self._run, name="rawproxy-log", daemon=True)
        self._thread.start()

    def put(self, line: str) -> None:
        """Queue one line, or drop and count it when the queue is full."""
        with self._lock:
            if self._closed or self._writer_gone or len(self._lines) >= self._max_lines:
                self.dropped += 1
                return
            self._lines.append(line)
            self._queued += 1
            if len(self._lines) == 1:
                self._cond.notify_all()  # the writer sleeps only on an empty queue

    def flush(self, timeout_s: float) -> bool:
        """Wait until every line queued so far is written; False if not in time.

        After :meth:`close` it does not wait: close already gave the writer
        its time, and a stuck stderr must not hold up exit twice.
        """
        with self._cond:
            target = self._queued
            if self._closed:
                return self._written >= target
            self._flushing += 1
            self._cond.notify_all()
            try:
                self._cond.wait_for(
                    lambda: self._written >= target or self._writer_gone, timeout_s)
                return self._written >= target
            finally:
                self._flushing -= 1

    def close(self, timeout_s: float) -> None:
        """Write what is queued (for at most ``timeout_s``), then stop the writer.

        Only the first call waits (``logging.shutdown`` closes handlers again
        at exit)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._lines and not self._closed:
                        self._cond.wait()
                    if not self._lines:
                        return  # closed and empty
                    if not (self._closed or self._flushing):
                        # Let a batch gather: one write, and one hand-over of the
                        # GIL from the loop, per BATCH_DELAY_S rather than per line.
                        self._cond.wait(BATCH_DELAY_S)
                    batch = list(self._lines)
                    self._lines.clear()
                    dropped = self.dropped - self._dropped_told
                    self._dropped_told = self.dropped
                text = "\n".join(batch) + "\n"
                if dropped:
                    text += f"rawproxy: {dropped} log lines dropped: stderr was not taking them\n"
                self._write(text)
                with self._cond:
                    self._written += len(batch)
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._writer_gone = True
                self._cond.notify_all()

    def _write(self, text: str) -> None:
        try:
            if self._fd is None:
                self._stream.write(text)
                self._stream.flush()
                return
            data = memoryview(text.encode(self._encoding, "backslashreplace"))
            while data:
                data = data[os.write(self._fd, data):]
        except Exception:
            pass  # stderr gone or unusable: nothing better to do with a log line

    def _before_fork(self) -> None:
        self.flush(FORK_FLUSH_TIMEOUT_S)
        self._cond.acquire()

    def _after_fork_parent(self) -> None:
        self._cond.release()

    def _after_fork_child(self) -> None:
        # The parent's writer did not survive the fork and the parent writes
        # its own queue: start empty, with a fresh lock and writer.
        closed = self._closed
        self._start()
        if closed:
            self.close(0.0)


def _fileno(stream: TextIO) -> Optional[int]:
    """The stream's descriptor, its buffer flushed first; None if it has none."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.StringIO: UnsupportedOperation
        return None
    stream.flush()
    return fd


def _call_if_alive(ref: "weakref.ref[LogSink]",
                   method: Callable[[LogSink], None]) -> Callable[[], None]:
    def call() -> None:
        sink = ref()
        if sink is not None:
            method(sink)
    return call


class SinkHandler(logging.Handler):
    """A logging handler that formats on the calling thread and queues the line."""

    def __init__(self, sink: LogSink, exit_timeout_s: float = 2.0) -> None:
        super().__init__()
        self.sink = sink
        self.exit_timeout_s = exit_timeout_s

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.put(self.format(record))
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        self.sink.flush(self.exit_timeout_s)

    def close(self) -> None:
        self.sink.close(self.exit_timeout_s)
        super().close()
