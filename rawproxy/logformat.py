"""How log lines look: one event a line, as text or as JSON (``--log-format``).

:func:`configure_logging` is called by ``cli`` only, once, at start: lines
go through a bounded queue and a writer thread, so a stderr nobody reads
never stops the loop (``logsink``).

Each formatter also builds its line from parts, with no ``LogRecord``
(``line``): the access log writes one line per connection that way
(``accesslog``), the same text as ``format`` gives (tested), with the
time stamp's seconds formatted once a second rather than once a line.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import time
from typing import Optional

from .logsink import Fields, LogSink, SinkHandler

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class OneLineFormatter(logging.Formatter):
    """One event a line, tracebacks included (folded with ' | ')."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)
        self._second: tuple[int, str] = (-1, "")  # one tuple: swapped whole, thread-safe

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " | ")

    def line(self, created: float, levelname: str, name: str, message: str,
             fields: Optional[Fields]) -> Optional[str]:
        """What ``format`` makes of a plain INFO-style record; None for a custom format."""
        if self._fmt != TEXT_FORMAT or self.datefmt is not None:
            return None
        second = int(created)
        cached, stamp = self._second
        if cached != second:
            stamp = time.strftime(self.default_time_format, self.converter(created))
            self._second = (second, stamp)
        text = f"{stamp},{int((created - second) * 1000):03d} {levelname} {name}: {message}"
        return text.replace("\n", " | ") if "\n" in text else text


class JsonFormatter(logging.Formatter):
    """One JSON object a line; access records carry their fields as keys."""

    def __init__(self) -> None:
        super().__init__()
        self._second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(
                record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)

    def line(self, created: float, levelname: str, name: str, message: str,
             fields: Optional[Fields]) -> Optional[str]:
        """What ``format`` makes of a record with ``fields`` (or ``message``)."""
        # fromtimestamp's rounding: to the nearest microsecond, half to even.
        second = int(created)
        micros = round((created - second) * 1e6)
        if micros >= 1_000_000:
            second, micros = second + 1, micros - 1_000_000
        cached, stamp = self._second
        if cached != second:
            stamp = datetime.datetime.fromtimestamp(
                second, datetime.timezone.utc).isoformat(timespec="seconds")[:-6]
            self._second = (second, stamp)
        entry: dict[str, object] = {
            "time": f"{stamp}.{micros // 1000:03d}+00:00",
            "level": levelname.lower(), "logger": name}
        if fields is not None:
            entry.update(fields)
        else:
            entry["message"] = message
        return json.dumps(entry)


def configure_logging(level: str, log_format: str) -> SinkHandler:
    handler = SinkHandler(LogSink(sys.stderr))
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(OneLineFormatter())
    root = logging.getLogger("rawproxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    return handler
