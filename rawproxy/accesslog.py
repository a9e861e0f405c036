"""The access log: one record per client connection, when it ends.

``log_access(...)`` emits it on the ``rawproxy.access`` logger at INFO, and
does nothing else when that level is off.  The record is built by
:func:`access_record`, a plain function with no logging in it: the text
line (``key=value`` pairs in a fixed order, a value quoted as JSON when it
is empty or holds a space or a quote) and the same fields as a dict, which
the JSON log format writes as keys (it reads ``record.fields``).

The line is one f-string, not a join over the fields: it is built once per
closed connection, on the loop thread, and the access log is to cost next
to nothing (issue #17).  So where the record would reach only log sinks
(``logsink.SinkHandler``, as ``cli`` sets up) whose formatters build a line
from its parts (``logformat``), that line goes straight into each sink:
no ``LogRecord``, no caller lookup, no handler lock, and the time stamp's
seconds formatted once a second.  Anything else on the way (a filter,
another handler, a custom format) gets the record through ``logging``,
as before; the lines are the same either way.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Optional

from .logsink import Fields, SinkHandler

access_log = logging.getLogger("rawproxy.access")


def access_record(app: str, port: int, client: str, target: str, bytes_in: int,
                  bytes_out: int, duration_ms: int, end: str,
                  detail: str) -> tuple[str, Fields]:
    """The text line and the fields of one connection's record."""
    text = (f"app={_text(app)} port={port} client={_text(client)} target={_text(target)} "
            f"bytes_in={bytes_in} bytes_out={bytes_out} duration_ms={duration_ms} "
            f"end={_text(end)}")
    fields: Fields = {"app": app, "port": port, "client": client, "target": target,
                      "bytes_in": bytes_in, "bytes_out": bytes_out,
                      "duration_ms": duration_ms, "end": end}
    if detail:
        text += f" why={_text(detail)}"
        fields["why"] = detail
    return text, fields


def log_access(app: str, port: int, client: str, target: str, bytes_in: int,
               bytes_out: int, duration_ms: int, end: str, detail: str) -> None:
    """Log one connection's record (``target`` is "-" when none was chosen)."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    text, fields = access_record(app, port, client, target, bytes_in, bytes_out,
                                 duration_ms, end, detail)
    if not _to_sinks(text, fields):
        access_log.info(text, extra={"fields": fields})


def _to_sinks(text: str, fields: Fields) -> bool:
    """Queue the record's lines straight into the sinks it would reach;
    False (and nothing queued) when anything else is on its way."""
    sinks = _direct_sinks()
    if sinks is None:
        return False
    created = time.time()
    lines = []
    for handler in sinks:
        line = getattr(handler.formatter, "line")(created, "INFO", access_log.name, text, fields)
        if line is None:
            return False
        lines.append((handler.sink, line))
    for sink, line in lines:
        sink.put(line)
    return True


def _direct_sinks() -> Optional[list[SinkHandler]]:
    """The handlers an INFO record of the access log reaches, when all are
    log sinks with a formatter that builds lines (``line``), and no filter
    or disabled logger is on the way; None otherwise."""
    if access_log.disabled:
        return None
    found: list[SinkHandler] = []
    logger: Optional[logging.Logger] = access_log
    while logger is not None:
        if logger.filters:
            return None
        for handler in logger.handlers:
            if (not isinstance(handler, SinkHandler) or handler.filters
                    or not hasattr(handler.formatter, "line")):
                return None
            if handler.level <= logging.INFO:
                found.append(handler)
        if not logger.propagate:
            break
        logger = logger.parent
    return found or None


def _text(value: str) -> str:
    if not value or " " in value or '"' in value:
        return json.dumps(value)
    return value
