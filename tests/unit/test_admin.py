"""Unit tests for rawproxy.admin: request-line parsing, the endpoints'
answers, the response bytes, and one loopback run of AdminServer.

The handlers and the formatting are pure and tested without sockets.  The
server tests use a real EventLoop and a listener on 127.0.0.1 port 0, and
drive the loop with ``run_once`` until a condition holds (with a deadline),
never sleeping for a fixed time.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Callable, Iterator, List

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rawproxy import admin
from rawproxy.admin import AdminHandlers, AdminServer, format_response, parse_request_head
from rawproxy.loop import EventLoop
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


@pytest.mark.parametrize("path", ["/", "/nope", "/healthz/", "/HEALTHZ", "/metricsx", "healthz",
                                  "http://localhost/healthz"])
def test_unknown_paths_are_404(path: str) -> None:
    assert Views().handlers().respond("GET", path) == (404, "text/plain", b"not found\n")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "get", "OPTIONS"])
@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/config"])
def test_other_methods_are_405(method: str, path: str) -> None:
    views = Views()
    assert views.handlers().respond(method, path) == (405, "text/plain",
                                                      b"method not allowed\n")
    assert views.snapshots == 0 and views.configs == 0


def test_unknown_path_wins_over_bad_method() -> None:
    assert Views().handlers().respond("POST", "/nope")[0] == 404


def test_head_answers_like_get() -> None:
    handlers = Views().handlers()
    for path in ("/healthz", "/metrics", "/config"):
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
        b"Connection: close\r\n\r\nok\n")


def test_format_response_head_only_keeps_the_length_drops_the_body() -> None:
    full = format_response(200, "application/json", b'{"a": 1}\n', False)
    head = format_response(200, "application/json", b'{"a": 1}\n', True)
    assert full == head + b'{"a": 1}\n'
    assert head.endswith(b"\r\n\r\n") and b"Content-Length: 9\r\n" in head


@pytest.mark.parametrize("status, reason", [
    (400, "Bad Request"), (404, "Not Found"), (405, "Method Not Allowed"),
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
    admin_server = AdminServer(loop, views.handlers(), HOST, 0)
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


def test_clients_over_the_cap_are_refused(
        loop: EventLoop, server: AdminServer, clients: Callable[[], Client],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin, "MAX_CLIENTS", 1)
    first = clients()
    drive(loop, lambda: len(server.connections) == 1, "the first accept")
    second = clients()
    drive(loop, second.at_eof, "the second client to be turned away")
    assert second.reset and second.data == b""
    assert len(server.connections) == 1
    first.send(b"GET /healthz HTTP/1.1\r\n\r\n")  # the first is still served
    drive(loop, first.at_eof, "the first response")
    assert first.data.startswith(b"HTTP/1.1 200 OK\r\n")


def test_close_releases_every_descriptor(
        loop: EventLoop, views: Views, clients: Callable[[], Client]) -> None:
    before = loop.watched_count
    admin_server = AdminServer(loop, views.handlers(), HOST, 0)
    admin_server.start()
    probe = Client(admin_server.port)
    try:
        drive(loop, lambda: len(admin_server.connections) == 1, "the accept")
        assert loop.watched_count == before + 2
        admin_server.close()
        assert loop.watched_count == before and not admin_server.connections
        drive(loop, probe.at_eof, "the client to see the close")
    finally:
        probe.close()
