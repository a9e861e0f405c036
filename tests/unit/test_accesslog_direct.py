"""The access log's direct path: lines built from parts, straight into the log sink.

The formatters' ``line`` must give what their ``format`` gives for the same
record (checked over many time stamps, the second's edges included), and
``log_access`` must put the same line into the sink either way.  Anything
else on the record's way (another handler, a filter, a custom format, a
disabled logger) sends it through ``logging`` as before.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Iterator, Optional

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rawproxy import outcomes
from rawproxy.accesslog import access_log, access_record, log_access
from rawproxy.logformat import JsonFormatter, OneLineFormatter
from rawproxy.logsink import Fields, LogSink, SinkHandler

RECORD = ("web", 8080, "127.0.0.1:41734", "127.0.0.1:19101", 11, 22, 3, outcomes.DONE, "")
# Time stamps in seconds: 2001 to 2096, so every digit count stays the same.
stamps = st.floats(min_value=1e9, max_value=4e9, allow_nan=False, allow_infinity=False)
EDGES = (1_700_000_000.0, 1_700_000_000.9995, 1_700_000_000.9999996, 1_700_000_001.0005)


def slow_record(created: float, message: str, fields: Optional[Fields]) -> logging.LogRecord:
    """The record logging would make, at ``created``."""
    record = logging.LogRecord("rawproxy.access", logging.INFO, __file__, 1, message, None, None)
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0  # as LogRecord does (3.9-3.11)
    if fields is not None:
        record.fields = fields
    return record


@settings(max_examples=300, deadline=None)
@given(created=stamps, message=st.text(max_size=40))
@example(created=EDGES[0], message="a\nb")
@example(created=EDGES[1], message="")
@example(created=EDGES[2], message="x")
@example(created=EDGES[3], message="x")
def test_the_text_line_is_what_format_gives(created: float, message: str) -> None:
    formatter = OneLineFormatter()
    expected = formatter.format(slow_record(created, message, None))
    assert formatter.line(created, "INFO", "rawproxy.access", message, None) == expected


@settings(max_examples=300, deadline=None)
@given(created=stamps, message=st.text(max_size=40))
@example(created=EDGES[2], message="x")
@example(created=EDGES[1], message="x")
def test_the_json_line_is_what_format_gives(created: float, message: str) -> None:
    formatter = JsonFormatter()
    _, fields = access_record(*RECORD[:-1], message)
    for parts in (fields, None):
        expected = formatter.format(slow_record(created, message, parts))
        assert formatter.line(created, "INFO", "rawproxy.access", message, parts) == expected


def test_a_custom_text_format_builds_no_line() -> None:
    assert OneLineFormatter("%(message)s").line(1e9, "INFO", "x", "m", None) is None


class Captured:
    """The rawproxy loggers set up as cli does, into a StringIO."""

    def __init__(self, formatter: logging.Formatter) -> None:
        self.stream = io.StringIO()
        self.handler = SinkHandler(LogSink(self.stream))
        self.handler.setFormatter(formatter)
        self.root = logging.getLogger("rawproxy")
        self.saved = (self.root.handlers[:], self.root.level, self.root.propagate)
        self.root.handlers[:] = [self.handler]
        self.root.setLevel(logging.INFO)
        self.root.propagate = False

    def only_sink(self) -> None:
        """Drop pytest's capture handlers from the logger (pytest attaches
        them to non-propagating loggers when a test starts)."""
        self.root.handlers[:] = [self.handler]

    def lines(self) -> list[str]:
        assert self.handler.sink.flush(5.0)
        return self.stream.getvalue().splitlines()

    def restore(self) -> None:
        self.handler.close()
        self.root.handlers[:], level, self.root.propagate = self.saved
        self.root.setLevel(level)


@pytest.fixture(params=[OneLineFormatter, JsonFormatter])
def captured(request: pytest.FixtureRequest) -> Iterator[Captured]:
    holder = Captured(request.param())
    yield holder
    holder.restore()


def direct_then_logging(captured: Captured, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The same record twice: through the direct path, then through logging."""
    captured.only_sink()
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.25)  # both read it
    monkeypatch.setattr(time, "time_ns", lambda: 1_700_000_000_250_000_000)  # 3.12+
    log_access(*RECORD)
    text, fields = access_record(*RECORD)
    access_log.info(text, extra={"fields": fields})
    return captured.lines()


def test_the_direct_line_is_the_line_logging_writes(captured: Captured,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    make_record = logging.Logger.makeRecord

    def counted(self: logging.Logger, *args: object, **kwargs: object) -> logging.LogRecord:
        calls.append(1)
        return make_record(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(logging.Logger, "makeRecord", counted)
    direct, through_logging = direct_then_logging(captured, monkeypatch)
    assert direct == through_logging
    assert "end=done" in direct or '"end": "done"' in direct
    assert len(calls) == 1, "the direct path made a LogRecord"


def test_a_filter_sends_the_record_through_logging(captured: Captured) -> None:
    captured.only_sink()
    seen: list[logging.LogRecord] = []

    def keep(record: logging.LogRecord) -> bool:
        seen.append(record)
        return True

    captured.handler.addFilter(keep)
    log_access(*RECORD)
    assert len(seen) == 1 and len(captured.lines()) == 1


class Recording(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_another_handler_on_the_way_gets_the_record(captured: Captured) -> None:
    captured.only_sink()
    other = Recording()
    access_log.addHandler(other)
    try:
        log_access(*RECORD)
    finally:
        access_log.removeHandler(other)
    assert len(other.records) == 1 and len(captured.lines()) == 1


def test_nothing_is_written_when_the_level_is_off(captured: Captured) -> None:
    captured.only_sink()
    captured.root.setLevel(logging.WARNING)
    log_access(*RECORD)
    assert captured.lines() == []


def test_a_disabled_logger_writes_nothing(captured: Captured) -> None:
    captured.only_sink()
    access_log.disabled = True
    try:
        log_access(*RECORD)
    finally:
        access_log.disabled = False
    assert captured.lines() == []
