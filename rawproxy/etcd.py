"""A small client for etcd's v3 JSON gateway: standard library only.

etcd (3.4 and later) serves its gRPC API as JSON over HTTP on the client
port: ``POST /v3/kv/range``, ``/v3/kv/put``, ``/v3/lease/*``,
``/v3/auth/authenticate`` and ``/v3/watch``, which answers with a chunked
stream of JSON objects, one a line.  Keys and values travel base64-encoded;
64-bit integers as JSON strings.  This module speaks exactly that, with
``http.client``, ``ssl``, ``json`` and ``base64``.

Errors are translated once, here, into three kinds (and their base):

* :class:`Unavailable` -- this endpoint did not answer usefully (refused,
  timed out, TLS failed, the stream ended, the member has no leader): try
  another endpoint;
* :class:`AuthFailed` -- wrong user or password, or a permission missing:
  another endpoint would say the same;
* :class:`Compacted` -- the revision asked for is gone: read everything again.

``str()`` of each is one line naming the endpoint.  A :class:`Client` talks
to one endpoint; it is used from one thread at a time, except
:meth:`WatchStream.abort`, which any thread may call to end a watch.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, NoReturn, Optional, TypeVar, Union
from urllib.parse import urlsplit

__all__ = ["AuthFailed", "Client", "Compacted", "Endpoint", "EtcdError", "Event", "KeyValue",
           "Quiet", "Unavailable", "WatchBatch", "WatchStream", "make_ssl_context", "parse_endpoints",
           "prefix_end"]

JSON_HEADERS = {"Content-Type": "application/json"}
# grpc-gateway turns Grpc-Metadata-* headers into gRPC metadata: with
# "hasleader" a member that loses its leader (cut off from the quorum)
# cancels the watch instead of leaving it silently stale.
WATCH_HEADERS = {**JSON_HEADERS, "Grpc-Metadata-hasleader": "true"}
# gRPC status codes the gateway puts in "code".
_INVALID_ARGUMENT, _DEADLINE, _PERMISSION, _OUT_OF_RANGE = 3, 4, 7, 11
_UNAVAILABLE, _UNAUTHENTICATED = 14, 16
# Auth errors etcd sends as InvalidArgument: wrong password, no user given.
_AUTH_TEXTS = ("authentication failed", "user name is empty")
_BAD_TOKEN_TEXT = "invalid auth token"
_COMPACTED_TEXT = "compacted"
# TCP keep-alive on a watch: a member whose host vanished (no FIN, no RST)
# is noticed in about IDLE + INTERVAL * COUNT seconds, at no cost here.
_KEEPALIVE = (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3))


class EtcdError(Exception):
    """A request failed; ``str()`` is one line naming the endpoint."""


class Unavailable(EtcdError):
    """This endpoint cannot serve now: another may."""


class Quiet(Unavailable):
    """A watch stream had nothing to say for a while: ask again (the member
    may be frozen, with a kernel still acknowledging for it)."""


class AuthFailed(EtcdError):
    """Credentials refused or permission missing: no endpoint will do better."""


class Compacted(EtcdError):
    def __init__(self, message: str, revision: int) -> None:
        super().__init__(message)
        self.revision = revision


@dataclass(frozen=True)
class Endpoint:
    scheme: str  # "http" or "https"
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_endpoints(text: str) -> tuple[Endpoint, ...]:
    """``URL[,URL...]``; ValueError with a one-line reason otherwise."""
    endpoints = []
    for url in text.split(","):
        url = url.strip()
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise ValueError(f"{url!r} is not an etcd URL (http://HOST:PORT)") from None
        if parts.scheme not in ("http", "https") or not parts.hostname or \
                parts.path.strip("/") or parts.query or parts.username:
            raise ValueError(f"{url!r} is not an etcd URL (http://HOST:PORT or https://...)")
        default = 443 if parts.scheme == "https" else 80
        endpoints.append(Endpoint(parts.scheme, parts.hostname, port or default))
    return tuple(endpoints)


def make_ssl_context(cacert: Optional[str], cert: Optional[str],
                     key: Optional[str]) -> ssl.SSLContext:
    """A client context; EtcdError naming the file that could not be used."""
    context = ssl.create_default_context(cafile=cacert)
    if cert is not None:
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise EtcdError(f"cannot use client certificate {cert}: {_reason(exc)}") from None
    return context


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes a range cover every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    return base64.b64decode(str(text)) if text else b""


def _int(value: object) -> int:
    return int(str(value)) if value not in (None, "") else 0


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: {exc.verify_message}"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower() if exc.strerror[:1].isupper() else exc.strerror
    return str(exc) or type(exc).__name__


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    lease: int

    @classmethod
    def from_json(cls, kv: dict[str, object]) -> KeyValue:
        return cls(_unb64(kv.get("key")), _unb64(kv.get("value")),
                   _int(kv.get("mod_revision")), _int(kv.get("lease")))


@dataclass(frozen=True)
class Event:
    deleted: bool  # a DELETE (or a lease that expired); else a PUT
    kv: KeyValue


@dataclass(frozen=True)
class WatchBatch:
    """One message of a watch stream."""

    revision: int  # the store's revision when it was sent
    events: tuple[Event, ...]
    created: bool = False
    compact_revision: int = 0  # > 0: the start revision was compacted away
    canceled: bool = False
    cancel_reason: str = ""


def _watch_batch(result: dict[str, object]) -> WatchBatch:
    header = result.get("header")
    events = result.get("events") or []
    assert isinstance(events, list)
    return WatchBatch(
        revision=_int(header.get("revision")) if isinstance(header, dict) else 0,
        events=tuple(Event(e.get("type") == "DELETE", KeyValue.from_json(e.get("kv") or {}))
                     for e in events if isinstance(e, dict)),
        created=bool(result.get("created")),
        compact_revision=_int(result.get("compact_revision")),
        canceled=bool(result.get("canceled")),
        cancel_reason=str(result.get("cancel_reason") or ""))


_T = TypeVar("_T")
Connection = Union[http.client.HTTPConnection, http.client.HTTPSConnection]


class WatchStream:
    """The batches of one watch, until the stream ends (Unavailable)."""

    def __init__(self, endpoint: Endpoint, conn: Connection,
                 response: http.client.HTTPResponse, quiet_s: float) -> None:
        self.endpoint = endpoint
        self.quiet_s = quiet_s
        self._conn = conn
        self._response = response
        self._aborted = threading.Event()

    def __iter__(self) -> Iterator[WatchBatch]:
        try:
            while True:
                line = self._response.readline()
                if not line.strip():
                    if not line:
                        ended = "aborted" if self._aborted.is_set() else "ended"
                        raise Unavailable(f"{self.endpoint}: the watch stream {ended}")
                    continue
                yield _watch_batch(_stream_result(self.endpoint, line))
        except (socket.timeout, TimeoutError):
            raise Quiet(f"{self.endpoint}: the watch was quiet for "
                        f"{self.quiet_s:g}s") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if self._aborted.is_set():
                raise Unavailable(f"{self.endpoint}: watch aborted") from None
            raise Unavailable(f"{self.endpoint}: watch: {_reason(exc)}") from None
        finally:
            self._conn.close()

    def abort(self) -> None:
        """End the stream from any thread: the reader gets Unavailable."""
        self._aborted.set()
        sock = self._conn.sock
        if sock is not None:
            try:
                # The plain socket's shutdown, not SSLSocket's (which
                # unwraps the TLS object under the reading thread's feet).
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass


def _stream_result(endpoint: Endpoint, line: bytes) -> dict[str, object]:
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    if "error" in message:
        error = message["error"]
        if isinstance(error, dict):
            raise _classify(endpoint, _int(error.get("grpc_code")), str(error.get("message")))
        raise _classify(endpoint, _int(message.get("code")), str(message.get("message")))
    result = message.get("result")
    if not isinstance(result, dict):
        raise ValueError("a watch message without a result")
    return result


def _classify(endpoint: Endpoint, code: int, message: str) -> EtcdError:
    text = f"{endpoint}: {message}"
    if code in (_PERMISSION, _UNAUTHENTICATED) or (
            code == _INVALID_ARGUMENT and any(text in message for text in _AUTH_TEXTS)):
        return AuthFailed(text)
    if code == _OUT_OF_RANGE and _COMPACTED_TEXT in message:
        return Compacted(text, 0)
    if code in (_UNAVAILABLE, _DEADLINE) or "no leader" in message:
        return Unavailable(text)
    return EtcdError(text)


class Client:
    """Requests to one endpoint, authenticated when ``user`` is given."""

    def __init__(self, endpoint: Endpoint, timeout_s: float, *,
                 ssl_context: Optional[ssl.SSLContext] = None,
                 user: Optional[str] = None, password: str = "") -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._ssl_context = ssl_context
        self._user = user
        self._password = password
        self._token: Optional[str] = None

    # -- plumbing -------------------------------------------------------------

    def _connect(self) -> Connection:
        ep = self.endpoint
        if ep.scheme == "https":
            return http.client.HTTPSConnection(ep.host, ep.port, timeout=self.timeout_s,
                                               context=self._ssl_context)
        return http.client.HTTPConnection(ep.host, ep.port, timeout=self.timeout_s)

    def _headers(self, base: dict[str, str]) -> dict[str, str]:
        if self._user is not None and self._token is None:
            self._authenticate()
        return base if self._token is None else {**base, "Authorization": self._token}

    def _send(self, path: str, body: dict[str, object], headers: dict[str, str]
              ) -> tuple[Connection, http.client.HTTPResponse]:
        conn = self._connect()
        try:
            conn.request("POST", path, body=json.dumps(body), headers=headers)
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise Unavailable(f"{self.endpoint}: {_reason(exc)}") from None

    def _post(self, path: str, body: dict[str, object],
              headers: dict[str, str]) -> dict[str, object]:
        conn, response = self._send(path, body, headers)
        try:
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise Unavailable(f"{self.endpoint}: {_reason(exc)}") from None
        finally:
            conn.close()
        try:
            answer = json.loads(data)
        except ValueError:
            raise Unavailable(f"{self.endpoint}: HTTP {response.status}: not etcd's "
                              "JSON gateway") from None
        if not isinstance(answer, dict):
            raise Unavailable(f"{self.endpoint}: an answer that is not a JSON object")
        if response.status != 200 or "error" in answer:
            raise _classify(self.endpoint, _int(answer.get("code")),
                            str(answer.get("message") or answer.get("error")))
        return answer

    def _renewing(self, attempt: Callable[[], _T]) -> _T:
        """``attempt()``, again with a new token if the old one expired
        (etcd forgets a simple token unused for --auth-token-ttl)."""
        try:
            return attempt()
        except AuthFailed as exc:
            if self._user is None or _BAD_TOKEN_TEXT not in str(exc):
                raise
        self.forget_token()
        return attempt()

    def forget_token(self) -> None:
        self._token = None

    def call(self, path: str, body: dict[str, object]) -> dict[str, object]:
        """POST ``body`` to ``path``; a stale auth token is renewed once."""
        return self._renewing(lambda: self._post(path, body, self._headers(JSON_HEADERS)))

    def _authenticate(self) -> None:
        answer = self._post("/v3/auth/authenticate",
                            {"name": self._user, "password": self._password}, JSON_HEADERS)
        self._token = str(answer.get("token") or "") or None

    # -- the API --------------------------------------------------------------

    def range_prefix(self, prefix: bytes) -> tuple[int, list[KeyValue]]:
        """Every key under ``prefix`` at one revision: (revision, kvs)."""
        answer = self.call("/v3/kv/range", {"key": _b64(prefix),
                                            "range_end": _b64(prefix_end(prefix))})
        header = answer.get("header")
        revision = _int(header.get("revision")) if isinstance(header, dict) else 0
        kvs = answer.get("kvs") or []
        assert isinstance(kvs, list)
        return revision, [KeyValue.from_json(kv) for kv in kvs if isinstance(kv, dict)]

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """Store ``value``; returns the new revision."""
        body: dict[str, object] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        header = self.call("/v3/kv/put", body).get("header")
        return _int(header.get("revision")) if isinstance(header, dict) else 0

    def grant(self, ttl_s: int) -> int:
        """A new lease of ``ttl_s`` seconds; returns its ID."""
        return _int(self.call("/v3/lease/grant", {"TTL": ttl_s}).get("ID"))

    def keep_alive(self, lease: int) -> int:
        """Renew ``lease``; returns its TTL, 0 when it has already expired."""
        answer = self.call("/v3/lease/keepalive", {"ID": str(lease)})
        result = answer.get("result")
        return _int(result.get("TTL")) if isinstance(result, dict) else 0

    def revoke(self, lease: int) -> None:
        self.call("/v3/lease/revoke", {"ID": str(lease)})

    def watch(self, prefix: bytes, start_revision: int, quiet_s: float) -> WatchStream:
        """Watch every key under ``prefix`` from ``start_revision`` on; a
        stream with nothing to read for ``quiet_s`` ends (Unavailable)."""
        body: dict[str, object] = {"create_request": {
            "key": _b64(prefix), "range_end": _b64(prefix_end(prefix)),
            "start_revision": str(start_revision)}}
        return self._renewing(lambda: self._watch(body, quiet_s))

    def _watch(self, body: dict[str, object], quiet_s: float) -> WatchStream:
        conn, response = self._send("/v3/watch", body, self._headers(WATCH_HEADERS))
        if response.status != 200:
            try:
                self._raise_error(response)
            finally:
                conn.close()
        if conn.sock is not None:
            _keep_alive(conn.sock)
            conn.sock.settimeout(quiet_s)
        return WatchStream(self.endpoint, conn, response, quiet_s)

    def _raise_error(self, response: http.client.HTTPResponse) -> NoReturn:
        try:
            answer = json.loads(response.read())
        except (OSError, ValueError, http.client.HTTPException):
            answer = {}
        if not isinstance(answer, dict):
            answer = {}
        raise _classify(self.endpoint, _int(answer.get("code")),
                        str(answer.get("message") or f"HTTP {response.status}"))


def _keep_alive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in _KEEPALIVE:
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
