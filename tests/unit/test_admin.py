"""Unit tests for rawproxy.admin: request-line parsing, the endpoints'
answers, the response bytes, and one loopback run of AdminServer.

The handlers and the formatting are pure and tested without sockets.  The
server tests use a real EventLoop and a listener on 127.0.0.1 port 0, and
drive the loop with ``run_once`` until a condition holds (with a deadline),
never sleeping for a fixed time.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rawproxy import admin
from rawproxy.admin import AdminHandlers, AdminServer, Response
from rawproxy.adminhttp import format_response, header_value, parse_request_head
from rawproxy.adminsock import AdminAddress
from rawproxy.loop import EVENT_READ, EventLoop
from rawproxy.metrics import CONTENT_TYPE, Snapshot, render
from rawproxy.stats import Stats

HOST = "127.0.0.1"
DEADLINE_S = 5.0
CONFIG_VIEW = {"apps": [{"name": "web", "ports": [5001],
                         "targets": [{"address": "192.0.2.1:80", "up": True}]}]}


class Views:
    """The three views the server supplies, with call counts."""

    def __init__(self) -> None:
        self.draining = False
        self.snapshots = 0
        self.configs = 0

    def is_draining(self) -> bool:
        return self.draining

    def snapshot(self) -> str:
        self.snapshots += 1
        return render(Snapshot(Stats(start_time=0.0), {}, {}, {}, {}, self.draining))

    def config(self) -> object:
        self.configs += 1
        return CONFIG_VIEW

    def handlers(self) -> AdminHandlers:
        return AdminHandlers(self.is_draining, self.snapshot, self.config)


class SlowHandlers(AdminHandlers):
    """Answers only when told to, like the supervisor waiting for its workers."""

    def __init__(self, views: Views) -> None:
        super().__init__(views.is_draining, views.snapshot, views.config)
        self.pending: List[Callable[[], None]] = []

    def respond_async(self, method: str, path: str,
                      reply: Callable[[Response], None]) -> None:
        self.pending.append(lambda: reply(self.respond(method, path)))

    def answer_all(self) -> None:
        pending, self.pending = self.pending, []
        for answer in pending:
            answer()


# -- parse_request_head ----------------------------------------------------------

@pytest.mark.parametrize("head, expected", [
    (b"GET /healthz HTTP/1.1", ("GET", "/healthz")),
    (b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*", ("GET", "/metrics")),
    (b"HEAD / HTTP/1.0", ("HEAD", "/")),
    (b"POST /config?x=1 HTTP/1.1", ("POST", "/config?x=1")),
])
def test_parse_good_request_lines(head: bytes, expected: tuple[str, str]) -> None:
    assert parse_request_head(head) == expected


@pytest.mark.parametrize("head", [
    b"",
    b"GET /healthz",
    b"GET /healthz HTTP/2.0",
    b"GET /healthz http/1.1",
    b"GET  /healthz HTTP/1.1",
    b"GET /healthz HTTP/1.1 extra",
    b"\r\nGET /healthz HTTP/1.1",
    b"G\xffT /healthz HTTP/1.1",
    b"GET /caf\xc3\xa9 HTTP/1.1",
    b"SSH-2.0-OpenSSH_9.6",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
])
def test_parse_bad_request_lines(head: bytes) -> None:
    assert parse_request_head(head) is None


# -- AdminHandlers.respond -----------------------------------------------------------

def test_healthz_ok_then_draining() -> None:
    views = Views()
    handlers = views.handlers()
    assert handlers.respond("GET", "/healthz") == (200, "text/plain", b"ok\n")
    views.draining = True  # read on every request, not at construction
    assert handlers.respond("GET", "/healthz") == (503, "text/plain", b"draining\n")
    assert views.snapshots == 0 and views.configs == 0  # nothing else computed


def test_metrics_content_type_and_body() -> None:
    views = Views()
    views.draining = True
    status, content_type, body = views.handlers().respond("GET", "/metrics")
    assert (status, content_type) == (200, CONTENT_TYPE)
    assert views.snapshots == 1
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["rawproxy_draining"].samples[0].value == 1


def test_config_is_json() -> None:
    views = Views()
    status, content_type, body = views.handlers().respond("GET", "/config")
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body) == CONFIG_VIEW
    assert body.endswith(b"\n")
    assert views.configs == 1 and views.snapshots == 0


@pytest.mark.parametrize("path", ["/nope", "/index.html", "//", "/healthz/", "/HEALTHZ", "/metricsx", "healthz",
                                  "http://localhost/healthz"])
def test_unknown_paths_are_404(path: str) -> None:
    assert Views().handlers().respond("GET", path) == (404, "text/plain", b"not found\n")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "get", "OPTIONS"])
@pytest.mark.parametrize("path", ["/", "/healthz", "/metrics", "/config"])
def test_other_methods_are_405(method: str, path: str) -> None:
    views = Views()
    assert views.handlers().respond(method, path) == (405, "text/plain",
                                                      b"method not allowed\n")
    assert views.snapshots == 0 and views.configs == 0


def test_unknown_path_wins_over_bad_method() -> None:
    assert Views().handlers().respond("POST", "/nope")[0] == 404


def test_head_answers_like_get() -> None:
    handlers = Views().handlers()
    for path in ("/", "/healthz", "/metrics", "/config"):
        assert handlers.respond("HEAD", path) == handlers.respond("GET", path)


@pytest.mark.parametrize("query", ["?", "?verbose=1", "?a=b&c=/metrics", "?/config"])
def test_query_strings_are_ignored(query: str) -> None:
    handlers = Views().handlers()
    for path in ("/healthz", "/metrics", "/config"):
        assert handlers.respond("GET", path + query) == handlers.respond("GET", path)
    assert handlers.respond("GET", "/nope" + query)[0] == 404


# -- format_response ---------------------------------------------------------------------

def test_format_response_bytes() -> None:
    assert format_response(200, "text/plain", b"ok\n", False) == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
        b"Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
        b"Connection: close\r\n\r\nok\n")


def test_format_response_head_only_keeps_the_length_drops_the_body() -> None:
    full = format_response(200, "application/json", b'{"a": 1}\n', False)
    head = format_response(200, "application/json", b'{"a": 1}\n', True)
    assert full == head + b'{"a": 1}\n'
    assert head.endswith(b"\r\n\r\n") and b"Content-Length: 9\r\n" in head


@pytest.mark.parametrize("status, reason", [
    (400, "Bad Request"), (401, "Unauthorized"), (404, "Not Found"), (405, "Method Not Allowed"),
    (500, "Internal Server Error"),
    (431, "Request Header Fields Too Large"), (503, "Service Unavailable"), (599, "Unknown"),
])
def test_format_response_reasons(status: int, reason: str) -> None:
    line = format_response(status, "text/plain", b"", False).split(b"\r\n", 1)[0]
    assert line == f"HTTP/1.1 {status} {reason}".encode()


# -- AdminServer on a real loop and loopback socket ----------------------------------------

def drive(loop: EventLoop, condition: Callable[[], bool], what: str,
          timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        loop.run_once(max_wait_s=0.01)


class Client:
    """A non-blocking loopback client that gathers what it receives."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=DEADLINE_S)
        self.data = b""
        self.eof = False
        self.reset = False

    def send(self, data: bytes) -> None:
        self.sock.settimeout(DEADLINE_S)  # at_eof() left it non-blocking
        self.sock.sendall(data)

    def at_eof(self) -> bool:
        """Read what is there; True once the server closed or reset."""
        self.sock.setblocking(False)
        while not (self.eof or self.reset):
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                return False
            except ConnectionResetError:
                self.reset = True
                break
            if not chunk:
                self.eof = True
            self.data += chunk
        return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    event_loop = EventLoop()
    yield event_loop
    event_loop.close()


@pytest.fixture
def views() -> Views:
    return Views()


@pytest.fixture
def server(loop: EventLoop, views: Views) -> Iterator[AdminServer]:
    admin_server = AdminServer(loop, views.handlers(), AdminAddress(HOST, 0))
    admin_server.start()
    yield admin_server
    admin_server.close()


@pytest.fixture
def clients(server: AdminServer) -> Iterator[Callable[[], Client]]:
    opened: List[Client] = []

    def open_client() -> Client:
        client = Client(server.port)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        client.close()


def test_start_binds_an_ephemeral_port(server: AdminServer) -> None:
    assert server.port != 0


def test_get_is_answered_and_the_connection_closed(
        loop: EventLoop, server: AdminServer, clients: Callable[[], Client]) -> None:
    client = clients()
    client.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    drive(loop, client.at_eof, "the response and EOF")
    assert not client.reset
    assert client.data == format_response(200, "text/plain", b"ok\n", False)
    client.close()
    drive(loop, lambda: not server.connections, "the server to close its side")


def test_request_split_across_segments(
        loop: EventLoop, server: AdminServer, clients: Callable[[], Client]) -> None:
    client = clients()
    client.send(b"HEAD /config HT")
    drive(loop, lambda: len(server.connections) == 1, "the accept")
    loop.run_once(max_wait_s=0.01)
    assert not client.at_eof()  # half a request: nothing answered yet
    client.send(b"TP/1.1\r\n\r\n")
    drive(loop, client.at_eof, "the response")
    body = (json.dumps(CONFIG_VIEW, indent=2) + "\n").encode()
    assert client.data == format_response(200, "application/json", body, True)


def test_garbage_gets_400(
        loop: EventLoop, server: AdminServer, clients: Callable[[], Client]) -> None:
    client = clients()
    client.send(b"hello there\r\n\r\n")
    drive(loop, client.at_eof, "the response")
    assert client.data.startswith(b"HTTP/1.1 400 Bad Request\r\n")


def test_oversized_request_gets_431_readable_in_full(
        loop: EventLoop, server: AdminServer, clients: Callable[[], Client]) -> None:
    client = clients()
    request = b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * (admin.MAX_REQUEST_BYTES + 2000)
    assert len(request) > 8192
    client.send(request)
    drive(loop, client.at_eof, "the 431 response")
    # A close with the excess unread would reset the connection and could
    # destroy the response; the lingering close must deliver all of it.
    assert not client.reset
    assert client.data == format_response(431, "text/plain", b"request too large\n", False)
    client.close()
    drive(loop, lambda: not server.connections, "the server to close its side")


def test_silent_client_is_closed_after_the_request_timeout(
        loop: EventLoop, server: AdminServer, clients: Callable[[], Client],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin, "REQUEST_TIMEOUT_S", 0.2)
    client = clients()
    drive(loop, lambda: len(server.connections) == 1, "the accept")
    accepted_at = time.monotonic()
    drive(loop, client.at_eof, "the server to give up on the client")
    assert time.monotonic() - accepted_at >= 0.15  # the timer, not something sooner
    assert client.data == b""
    assert not server.connections


def test_a_new_client_replaces_the_oldest_idle_one(
        loop: EventLoop, server: AdminServer, clients: Callable[[], Client],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Idle connections must not lock a scraper out (issue #18): at the cap,
    # the oldest connection that has not sent a whole request makes room.
    monkeypatch.setattr(admin, "MAX_CLIENTS", 2)
    oldest = clients()
    drive(loop, lambda: len(server.connections) == 1, "the first accept")
    second = clients()
    drive(loop, lambda: len(server.connections) == 2, "the second accept")
    newest = clients()
    newest.send(b"GET /healthz HTTP/1.1\r\n\r\n")
    drive(loop, newest.at_eof, "the newest client's answer")
    assert newest.data.startswith(b"HTTP/1.1 200 OK\r\n")
    drive(loop, oldest.at_eof, "the oldest idle client to be closed")
    assert oldest.data == b""
    assert not second.at_eof()  # only one was evicted
    assert len(server.connections) == 2


def test_clients_over_the_cap_are_refused_while_every_slot_is_busy(
        loop: EventLoop, views: Views, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin, "MAX_CLIENTS", 1)
    slow = SlowHandlers(views)
    admin_server = AdminServer(loop, slow, AdminAddress(HOST, 0))
    admin_server.start()
    busy = Client(admin_server.port)
    refused: Optional[Client] = None
    try:
        busy.send(b"GET /config HTTP/1.1\r\n\r\n")
        drive(loop, lambda: len(slow.pending) == 1, "the request to wait for its answer")
        refused = Client(admin_server.port)
        drive(loop, refused.at_eof, "the extra client to be turned away")
        assert refused.reset and refused.data == b""
        slow.answer_all()
        drive(loop, busy.at_eof, "the late answer")
        assert busy.data.startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        busy.close()
        if refused is not None:
            refused.close()
        admin_server.close()


def test_clients_that_never_read_their_answer_do_not_lock_out_a_probe(
        loop: EventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every slot writing to a client that does not read: the oldest of
    them makes room for a /healthz probe (it is not refused)."""
    monkeypatch.setattr(admin, "MAX_CLIENTS", 2)
    big = AdminHandlers(lambda: False, lambda: "x" * (32 << 20), lambda: {})
    admin_server = AdminServer(loop, big, AdminAddress(HOST, 0))
    admin_server.start()
    stuck = [Client(admin_server.port), Client(admin_server.port)]
    probe: Optional[Client] = None
    try:
        for client in stuck:
            client.send(b"GET /metrics HTTP/1.1\r\n\r\n")
        drive(loop, lambda: len(admin_server.connections) == 2 and all(
            conn.phase.value == "writing" for conn in admin_server.connections),
            "both answers to stall")
        probe = Client(admin_server.port)
        probe.send(b"GET /healthz HTTP/1.1\r\n\r\n")
        drive(loop, probe.at_eof, "the probe's answer")
        assert probe.data.startswith(b"HTTP/1.1 200 OK\r\n")
        assert len(admin_server.connections) <= 2
    finally:
        for client in stuck:
            client.close()
        if probe is not None:
            probe.close()
        admin_server.close()


def test_close_releases_every_descriptor(
        loop: EventLoop, views: Views, clients: Callable[[], Client]) -> None:
    before = loop.watched_count
    admin_server = AdminServer(loop, views.handlers(), AdminAddress(HOST, 0))
    admin_server.start()
    probe = Client(admin_server.port)
    try:
        drive(loop, lambda: len(admin_server.connections) == 1, "the accept")
        assert loop.watched_count == before + 2  # the listener and the client
        admin_server.close()
        assert loop.watched_count == before and not admin_server.connections
        drive(loop, probe.at_eof, "the client to see the close")
    finally:
        probe.close()


def test_a_hand_over_stops_accepting_but_answers_the_requests_already_accepted(
        loop: EventLoop, views: Views) -> None:
    admin_server = AdminServer(loop, views.handlers(), AdminAddress(HOST, 0))
    admin_server.start()
    before = Client(admin_server.port)
    try:
        drive(loop, lambda: len(admin_server.connections) == 1, "the accept")
        admin_server.hand_over()
        assert admin_server.listening_socket is None
        with pytest.raises(ConnectionRefusedError):  # nobody else holds the socket here
            Client(admin_server.port)
        # The request comes after the hand-over; this client asked the old
        # process, which drains now, but the address is served: 200.
        views.draining = True

        def ask() -> None:
            before.send(b"GET /healthz HTTP/1.1\r\n\r\n")
            before.sock.shutdown(socket.SHUT_WR)

        loop.call_later(0.2, ask)  # while the loop waits for it
        loop.stop()  # what the drain's end does: then the in-flight ones are answered
        turns = [0]
        real_run_once = loop.run_once

        def counted_run_once(max_wait_s: Optional[float] = None) -> None:
            turns[0] += 1
            real_run_once(max_wait_s)

        loop.run_once = counted_run_once  # type: ignore[method-assign]
        admin_server.answer_in_flight()
        assert not admin_server.connections
        assert turns[0] < 20, f"{turns[0]} loop turns: it spun while waiting"
        drive(loop, before.at_eof, "the answer")
        assert before.data == format_response(200, "text/plain", b"ok\n", False)
    finally:
        admin_server.close()
        before.close()


def test_when_idle_waits_for_the_open_connections_and_is_at_once_without_them(
        loop: EventLoop, server: AdminServer, clients: Callable[[], Client]) -> None:
    idle: list[str] = []
    server.when_idle(lambda: idle.append("none open"))
    assert idle == ["none open"]
    client = clients()
    drive(loop, lambda: len(server.connections) == 1, "the accept")
    server.hand_over()
    server.when_idle(lambda: idle.append("answered"))  # the end of a drain, say
    client.send(b"HEAD /healthz?probe=1 HTTP/1.1\r\n\r\n")
    client.sock.shutdown(socket.SHUT_WR)
    drive(loop, lambda: len(idle) == 2, "the last connection to close")
    assert idle == ["none open", "answered"]
    drive(loop, client.at_eof, "the answer")
    assert client.data == format_response(200, "text/plain", b"ok\n", True)


# -- requests a hostile or odd client sends ------------------------------------------

def ask(loop: EventLoop, port: int, request: bytes) -> Client:
    client = Client(port)
    client.send(request)
    drive(loop, client.at_eof, f"the answer to {request[:40]!r}")
    client.close()
    return client


def test_bare_lf_line_ends_are_accepted(loop: EventLoop, server: AdminServer) -> None:
    client = ask(loop, server.port, b"GET /healthz HTTP/1.0\nHost: x\n\n")
    assert client.data == format_response(200, "text/plain", b"ok\n", False)


def test_header_lookup() -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\nauthorization:  Bearer x y \r\nAuthorization: second"
    assert header_value(head, "Authorization") == "Bearer x y"
    assert header_value(head, "host") == "a"
    assert header_value(head, "Accept") is None
    assert header_value(b"GET / HTTP/1.1\r\nX-Name: caf\xc3\xa9", "x-name") == "caf\u00c3\u00a9"
    assert header_value(b"GET / HTTP/1.1\r\nAuthorization Bearer x", "Authorization") is None


def test_only_the_first_of_pipelined_requests_is_answered(
        loop: EventLoop, server: AdminServer, views: Views) -> None:
    client = ask(loop, server.port, b"GET /healthz HTTP/1.1\r\n\r\nGET /config HTTP/1.1\r\n\r\n"
                                    b"GET /metrics HTTP/1.1\r\n\r\n")
    assert not client.reset
    assert client.data == format_response(200, "text/plain", b"ok\n", False)
    assert views.configs == 0 and views.snapshots == 0


def test_head_of_the_page_has_no_body(loop: EventLoop, server: AdminServer) -> None:
    client = ask(loop, server.port, b"HEAD / HTTP/1.1\r\n\r\n")
    head, _, body = client.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b""
    length = int(header_value(head, "Content-Length") or "0")
    assert length > 1000


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /caf\xc3\xa9 HTTP/1.1\r\n\r\n", b"400"),
    (b"BREW /healthz HTTP/1.1\r\n\r\n", b"405"),
    (b"GET /healthz?x=\xff HTTP/1.1\r\n\r\n", b"400"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"400"),
    (b"GET /../../etc/passwd HTTP/1.1\r\n\r\n", b"404"),
])
def test_odd_requests_get_an_error_not_a_hang(
        loop: EventLoop, server: AdminServer, request_bytes: bytes, status: bytes) -> None:
    client = ask(loop, server.port, request_bytes)
    assert client.data.startswith(b"HTTP/1.1 " + status + b" ")


def test_a_trickling_client_is_cut_at_the_deadline_not_reset_by_each_byte(
        loop: EventLoop, server: AdminServer, clients: Callable[[], Client],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Slowloris: a byte now and then must not keep the connection open.
    monkeypatch.setattr(admin, "REQUEST_TIMEOUT_S", 0.3)
    client = clients()
    drive(loop, lambda: len(server.connections) == 1, "the accept")
    accepted_at = time.monotonic()
    for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: ":
        if client.at_eof():
            break
        try:
            client.send(bytes([byte]))
        except OSError:
            break
        loop.run_once(max_wait_s=0.02)
    drive(loop, client.at_eof, "the server to give up")
    assert time.monotonic() - accepted_at < 2.0
    assert client.data == b"" and not server.connections


def test_a_failing_view_is_a_500_and_the_next_request_is_served(
        loop: EventLoop, views: Views, caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> object:
        raise RuntimeError("worker answered garbage")

    admin_server = AdminServer(loop, AdminHandlers(views.is_draining, views.snapshot, broken),
                               AdminAddress(HOST, 0))
    admin_server.start()
    try:
        with caplog.at_level(logging.ERROR, logger="rawproxy.admin"):
            failed = ask(loop, admin_server.port, b"GET /config HTTP/1.1\r\n\r\n")
        assert failed.data == format_response(500, "text/plain", b"internal error\n", False)
        assert "worker answered garbage" in caplog.text
        ok = ask(loop, admin_server.port, b"GET /healthz HTTP/1.1\r\n\r\n")
        assert ok.data.startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        admin_server.close()


def test_a_late_answer_after_the_client_left_is_dropped(
        loop: EventLoop, views: Views, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin, "REQUEST_TIMEOUT_S", 0.2)
    slow = SlowHandlers(views)
    admin_server = AdminServer(loop, slow, AdminAddress(HOST, 0))
    admin_server.start()
    client = Client(admin_server.port)
    try:
        client.send(b"GET /config HTTP/1.1\r\n\r\n")
        drive(loop, lambda: len(slow.pending) == 1, "the request to wait")
        drive(loop, client.at_eof, "the timeout")
        assert not admin_server.connections
        slow.answer_all()  # must neither raise nor write to a closed socket
        assert client.data == b""
    finally:
        client.close()
        admin_server.close()


# -- the status page -------------------------------------------------------------------

def test_the_page_is_self_contained_html(loop: EventLoop, server: AdminServer) -> None:
    client = ask(loop, server.port, b"GET / HTTP/1.1\r\n\r\n")
    head, _, body = client.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert header_value(head, "Content-Type") == "text/html; charset=utf-8"
    policy = header_value(head, "Content-Security-Policy") or ""
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    page = body.decode("utf-8")
    assert page.startswith("<!doctype html>") and "<script>" in page
    # Nothing fetched from elsewhere: no src/href attributes, no URLs but
    # the SVG namespace name (an identifier, never fetched).
    assert " src=" not in page and "href=" not in page and "@import" not in page
    urls = {url for url in page.split('"') if "://" in url}
    assert urls == {"http://www.w3.org/2000/svg"}


# -- bearer token -------------------------------------------------------------------

TOKEN = "s3cr3t-token"


@pytest.fixture
def guarded(loop: EventLoop, views: Views) -> Iterator[AdminServer]:
    admin_server = AdminServer(loop, views.handlers(), AdminAddress(HOST, 0), token=TOKEN)
    admin_server.start()
    yield admin_server
    admin_server.close()


@pytest.mark.parametrize("path", ["/", "/metrics", "/config", "/nope", "/config?x"])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic czNjcjN0LXRva2Vu",
                                           f"Bearer {TOKEN}x", f"{TOKEN}"])
def test_without_the_token_every_path_is_401(
        loop: EventLoop, guarded: AdminServer, views: Views, path: str,
        authorization: Optional[str]) -> None:
    header = f"Authorization: {authorization}\r\n" if authorization else ""
    client = ask(loop, guarded.port, f"GET {path} HTTP/1.1\r\n{header}\r\n".encode())
    head = client.data.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert header_value(head, "WWW-Authenticate") == 'Bearer realm="rawproxy"'
    assert views.configs == 0 and views.snapshots == 0


def test_the_401_for_the_page_is_the_sign_in_page(loop: EventLoop, guarded: AdminServer) -> None:
    client = ask(loop, guarded.port, b"GET / HTTP/1.1\r\n\r\n")
    head, _, body = client.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ")
    assert header_value(head, "Content-Type") == "text/html; charset=utf-8"
    assert b'id="signin"' in body and b"rawproxy status" in body
    assert b"/metrics" not in body  # the page itself holds nothing


@pytest.mark.parametrize("path", ["/", "/metrics", "/config", "/healthz"])
def test_with_the_token_every_path_is_served(loop: EventLoop, guarded: AdminServer,
                                             path: str) -> None:
    client = ask(loop, guarded.port,
                 f"GET {path} HTTP/1.1\r\nauthorization: bearer {TOKEN}\r\n\r\n".encode())
    assert client.data.startswith(b"HTTP/1.1 200 OK\r\n")


def test_healthz_needs_no_token(loop: EventLoop, guarded: AdminServer) -> None:
    client = ask(loop, guarded.port, b"GET /healthz HTTP/1.1\r\n\r\n")
    assert client.data == format_response(200, "text/plain", b"ok\n", False)


def test_unknown_paths_with_the_token_are_404(loop: EventLoop, guarded: AdminServer) -> None:
    client = ask(loop, guarded.port,
                 f"GET /nope HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
    assert client.data.startswith(b"HTTP/1.1 404 ")


# -- unix socket ------------------------------------------------------------------------

@pytest.fixture
def socket_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="rpx-", dir="/tmp"))  # short: sun_path is 108 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_unix_socket_is_0600_served_and_removed_at_close(
        loop: EventLoop, views: Views, socket_dir: Path) -> None:
    path = socket_dir / "admin.sock"
    admin_server = AdminServer(loop, views.handlers(), AdminAddress(path=str(path)),
                               token=TOKEN)
    admin_server.start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        answers = []
        for header in (b"", f"Authorization: Bearer {TOKEN}\r\n".encode()):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(str(path))
            client.sendall(b"GET /config HTTP/1.1\r\n" + header + b"\r\n")
            client.setblocking(False)
            data = b""

            def answered() -> bool:
                nonlocal data
                try:
                    chunk = client.recv(65536)
                except BlockingIOError:
                    return False
                data += chunk
                return not chunk

            drive(loop, answered, "the answer over the unix socket")
            client.close()
            answers.append(data)
        assert answers[0].startswith(b"HTTP/1.1 401 ")
        assert answers[1].startswith(b"HTTP/1.1 200 OK\r\n")
        assert json.loads(answers[1].partition(b"\r\n\r\n")[2]) == CONFIG_VIEW
    finally:
        admin_server.close()
    assert not path.exists()


# -- out of descriptors at accept (issue #18) -----------------------------------------------

def test_emfile_at_accept_pauses_the_listener_and_logs_once(
        loop: EventLoop, server: AdminServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # Before the fix the listener stayed registered while accept kept
    # failing: the loop spun at a full core, logging a warning each turn.
    monkeypatch.setattr(admin, "ACCEPT_PAUSE_S", 0.05)
    monkeypatch.setattr(admin, "ACCEPT_PAUSE_MAX_S", 0.1)
    calls = 0

    def no_descriptors() -> socket.socket:
        nonlocal calls
        calls += 1
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(server, "_accept", no_descriptors)
    listener_fd = server._sock.fileno() if server._sock else -1
    waiting = Client(server.port)  # keeps the listener readable throughout
    try:
        with caplog.at_level(logging.INFO, logger="rawproxy.admin"):
            drive(loop, lambda: calls >= 1, "the first failed accept")
            assert loop.interest(listener_fd) == 0  # paused: out of the selector
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:  # a spinning loop would log thousands
                loop.run_once(max_wait_s=0.01)
            assert loop.interest(listener_fd) in (0, EVENT_READ)
            # One accept per pause (plus the shed attempt), not one per turn.
            assert 2 <= calls <= 30
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1
            assert "Too many open files" in warnings[0].getMessage()
            monkeypatch.undo()  # descriptors are back
            drive(loop, lambda: loop.interest(listener_fd) == EVENT_READ, "the resume")
            drive(loop, lambda: len(server.connections) == 1, "the waiting client's accept")
            waiting.send(b"GET /healthz HTTP/1.1\r\n\r\n")
            drive(loop, waiting.at_eof, "its answer")
        assert waiting.data.startswith(b"HTTP/1.1 200 OK\r\n")
        assert "admin accept resumed" in caplog.text
    finally:
        waiting.close()


def test_a_transient_accept_error_skips_that_client_only(
        loop: EventLoop, server: AdminServer, monkeypatch: pytest.MonkeyPatch) -> None:
    real_accept = server._accept
    failures = [OSError(errno.ECONNABORTED, "aborted")]

    def flaky() -> socket.socket:
        if failures:
            raise failures.pop()
        return real_accept()

    monkeypatch.setattr(server, "_accept", flaky)
    client = ask(loop, server.port, b"GET /healthz HTTP/1.1\r\n\r\n")
    assert client.data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert loop.interest(server._sock.fileno() if server._sock else -1) == EVENT_READ
