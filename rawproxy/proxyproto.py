"""PROXY protocol headers (HAProxy's proxy-protocol.txt), v1 text and v2 binary.

``header(version, client, local)`` returns the bytes sent to the target
before any byte of the client's, so the target learns the real client
address.  ``client`` is the client's (ip, port) as seen by the proxy and
``local`` the proxy address it connected to.  IPv4-mapped IPv6 addresses
(a dual-stack listener) are written as IPv4.  When the two addresses are of
different families the header says so honestly: ``PROXY UNKNOWN`` (v1) or
the UNSPEC family with no addresses (v2), as the spec prescribes.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Tuple, Union

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_VERSION_PROXY = 0x21       # version 2, command PROXY
_V2_TCP4 = 0x11                # AF_INET, SOCK_STREAM
_V2_TCP6 = 0x21                # AF_INET6, SOCK_STREAM
_V2_UNSPEC = 0x00

Endpoint = Tuple[str, int]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def _ip(host: str) -> IPAddress:
    ip = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def header(version: str, client: Endpoint, local: Endpoint) -> bytes:
    if version == "v1":
        return v1_header(client, local)
    if version == "v2":
        return v2_header(client, local)
    raise ValueError(f"unknown PROXY protocol version {version!r}")


def v1_header(client: Endpoint, local: Endpoint) -> bytes:
    src, dst = _ip(client[0]), _ip(local[0])
    if src.version != dst.version:
        return b"PROXY UNKNOWN\r\n"
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {client[1]} {local[1]}\r\n".encode("ascii")


def v2_header(client: Endpoint, local: Endpoint) -> bytes:
    src, dst = _ip(client[0]), _ip(local[0])
    if src.version != dst.version:
        return V2_SIGNATURE + struct.pack("!BBH", _V2_VERSION_PROXY, _V2_UNSPEC, 0)
    family = _V2_TCP4 if src.version == 4 else _V2_TCP6
    addresses = src.packed + dst.packed + struct.pack("!HH", client[1], local[1])
    return V2_SIGNATURE + struct.pack("!BBH", _V2_VERSION_PROXY, family,
                                      len(addresses)) + addresses
