"""The admin endpoint's HTTP/1.1 text, pure: the request head read (its
request line and one header), the response written with the headers every
answer carries (no caching, no sniffing, ``Connection: close``; the pages'
content security policy)."""

from __future__ import annotations

from typing import Optional

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}
HTML = "text/html; charset=utf-8"
# The page's own script and styles are inline; it loads nothing else and
# talks only to this endpoint.  No framing: the sign-in page takes a token.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
               "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
               "frame-ancestors 'none'")


def head_end(data: bytes) -> int:
    """Offset of the blank line ending the request head, or -1.  Bare LF
    line ends are taken too (RFC 9112 2.2: a recipient MAY)."""
    ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
    return min(ends) if ends else -1


def _lines(head: bytes) -> list[bytes]:
    return [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]


def parse_request_head(head: bytes) -> Optional[tuple[str, str]]:
    """(method, path) from the request line, or None if it is not HTTP/1.x."""
    parts = _lines(head)[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None
    try:
        return parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None


def header_value(head: bytes, name: str) -> Optional[str]:
    """The first value of header ``name`` (any case) in a request head, or None."""
    wanted = name.lower().encode("ascii")
    for line in _lines(head)[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == wanted:
            return value.strip().decode("latin-1")
    return None


def format_response(status: int, content_type: str, body: bytes, head_only: bool) -> bytes:
    extra = ""
    if status == 405:
        extra += "Allow: GET, HEAD\r\n"
    if status == 401:
        extra += 'WWW-Authenticate: Bearer realm="rawproxy"\r\n'
    if content_type == HTML:
        extra += f"Content-Security-Policy: {PAGE_POLICY}\r\nReferrer-Policy: no-referrer\r\n"
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
            f"{extra}Connection: close\r\n\r\n").encode("ascii")
    return head if head_only else head + body
