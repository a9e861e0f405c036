"""rawproxy.accesslog: the record of one connection, as text and as fields."""

from __future__ import annotations

import logging

import pytest

from rawproxy import outcomes
from rawproxy.accesslog import access_record, log_access


def test_a_plain_record() -> None:
    text, fields = access_record("web", 8080, "127.0.0.1:41734", "127.0.0.1:19101",
                                 11, 22, 3, outcomes.DONE, "")
    assert text == ("app=web port=8080 client=127.0.0.1:41734 target=127.0.0.1:19101 "
                    "bytes_in=11 bytes_out=22 duration_ms=3 end=done")
    assert fields == {"app": "web", "port": 8080, "client": "127.0.0.1:41734",
                      "target": "127.0.0.1:19101", "bytes_in": 11, "bytes_out": 22,
                      "duration_ms": 3, "end": "done"}


def test_a_detail_becomes_why_quoted_when_it_has_spaces() -> None:
    text, fields = access_record("web", 1, "[::1]:5", "-", 0, 0, 0, outcomes.CONNECT_FAILED,
                                 "Connection refused")
    assert text.endswith(' target=- bytes_in=0 bytes_out=0 duration_ms=0 '
                         'end=connect-failed why="Connection refused"')
    assert fields["why"] == "Connection refused"


@pytest.mark.parametrize("name, shown", [
    ("", '""'), ("a b", '"a b"'), ('say "hi"', '"say \\"hi\\""'), ("plain", "plain"),
    ("tab\there", "tab\there"),
])
def test_values_are_quoted_only_when_a_reader_would_split_them(name: str, shown: str) -> None:
    text, fields = access_record(name, 1, "c", "t", 0, 0, 0, "done", "")
    assert text.startswith(f"app={shown} port=1 ")
    assert fields["app"] == name


def test_log_access_carries_the_fields_for_the_json_format(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rawproxy.access")
    log_access("web", 80, "1.2.3.4:5", "-", 0, 0, 0, outcomes.DENIED, "not in AllowFrom")
    (record,) = caplog.records
    assert record.name == "rawproxy.access" and record.levelno == logging.INFO
    assert record.getMessage().endswith('end=denied why="not in AllowFrom"')
    assert record.fields["why"] == "not in AllowFrom"  # type: ignore[attr-defined]


def test_log_access_builds_nothing_when_info_is_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="rawproxy.access")
    log_access("web", 80, "1.2.3.4:5", "-", 0, 0, 0, outcomes.DONE, "")
    assert caplog.records == []


def test_a_percent_sign_is_not_a_format() -> None:
    text, _ = access_record("100%", 1, "c", "t", 0, 0, 0, "done", "50% %s")
    record = logging.LogRecord("rawproxy.access", logging.INFO, __file__, 1, text, None, None)
    assert record.getMessage() == text
