"""Unit tests for rawproxy.proxyproto: PROXY protocol v1 and v2 headers.

Expected bytes are written out by hand from HAProxy's proxy-protocol.txt
(section 2.1 for the v1 text line, 2.2 for the v2 binary block), and the v2
bytes are also taken apart with ``struct`` to show each field.  Addresses
come from the documentation ranges; nothing touches a socket.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from typing import Union

import pytest

from rawproxy.proxyproto import V2_SIGNATURE, header, v1_header, v2_header

SIG = b"\r\n\r\n\x00\r\nQUIT\n"

IP = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def decode_v2(data: bytes) -> tuple[int, int, bytes]:
    """(ver_cmd, family, address block) of a v2 header, checking its length."""
    assert data[:12] == SIG
    ver_cmd, family, length = struct.unpack("!BBH", data[12:16])
    block = data[16:]
    assert len(block) == length
    return ver_cmd, family, block


# -- the signature ---------------------------------------------------------------

def test_v2_signature_is_the_twelve_bytes_of_the_spec() -> None:
    assert V2_SIGNATURE == bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A,
                                  0x51, 0x55, 0x49, 0x54, 0x0A])
    assert len(V2_SIGNATURE) == 12


# -- v1 -------------------------------------------------------------------------

def test_v1_tcp4() -> None:
    assert (v1_header(("192.0.2.10", 51234), ("198.51.100.1", 443))
            == b"PROXY TCP4 192.0.2.10 198.51.100.1 51234 443\r\n")


def test_v1_tcp6() -> None:
    assert (v1_header(("2001:db8::10", 51234), ("2001:db8:ffff::1", 443))
            == b"PROXY TCP6 2001:db8::10 2001:db8:ffff::1 51234 443\r\n")


def test_v1_longest_line_fits_the_107_byte_limit() -> None:
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = v1_header((full, 65535), (full, 65535))
    assert line == f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert len(line) == 104 <= 107


def test_v1_ipv4_mapped_ipv6_is_written_as_ipv4() -> None:
    assert (v1_header(("::ffff:192.0.2.10", 40000), ("::ffff:198.51.100.1", 80))
            == b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 80\r\n")


def test_v1_mapped_client_with_ipv4_local_is_tcp4() -> None:
    assert (v1_header(("::ffff:192.0.2.10", 40000), ("198.51.100.1", 80))
            == b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 80\r\n")


def test_v1_zone_id_is_dropped() -> None:
    assert (v1_header(("fe80::1%eth0", 1), ("fe80::2%eth0", 2))
            == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n")


@pytest.mark.parametrize("client, local", [
    (("192.0.2.10", 1000), ("2001:db8::1", 80)),
    (("2001:db8::10", 1000), ("198.51.100.1", 80)),
    (("::ffff:192.0.2.10", 1000), ("2001:db8::1", 80)),
])
def test_v1_mixed_families_is_unknown(client: tuple[str, int], local: tuple[str, int]) -> None:
    assert v1_header(client, local) == b"PROXY UNKNOWN\r\n"


# -- v2 -------------------------------------------------------------------------

def test_v2_tcp4_bytes() -> None:
    data = v2_header(("192.0.2.10", 51234), ("198.51.100.1", 443))
    assert data == (SIG + b"\x21\x11\x00\x0c"
                    + bytes([192, 0, 2, 10]) + bytes([198, 51, 100, 1])
                    + b"\xc8\x22" + b"\x01\xbb")
    assert len(data) == 16 + 12


def test_v2_tcp4_decoded_with_struct() -> None:
    data = v2_header(("192.0.2.10", 51234), ("198.51.100.1", 443))
    ver_cmd, family, block = decode_v2(data)
    assert ver_cmd >> 4 == 2 and ver_cmd & 0x0F == 1  # version 2, PROXY
    assert family >> 4 == 1 and family & 0x0F == 1    # AF_INET, STREAM
    src, dst, src_port, dst_port = struct.unpack("!4s4sHH", block)
    assert ipaddress.IPv4Address(src) == ipaddress.IPv4Address("192.0.2.10")
    assert ipaddress.IPv4Address(dst) == ipaddress.IPv4Address("198.51.100.1")
    assert (src_port, dst_port) == (51234, 443)


def test_v2_tcp6_bytes() -> None:
    data = v2_header(("2001:db8::10", 51234), ("2001:db8:ffff::1", 443))
    src = bytes.fromhex("20010db8000000000000000000000010")
    dst = bytes.fromhex("20010db8ffff00000000000000000001")
    assert data == SIG + b"\x21\x21\x00\x24" + src + dst + b"\xc8\x22\x01\xbb"
    assert len(data) == 16 + 36


def test_v2_tcp6_decoded_with_struct() -> None:
    data = v2_header(("2001:db8::10", 65535), ("2001:db8:ffff::1", 1))
    ver_cmd, family, block = decode_v2(data)
    assert (ver_cmd, family) == (0x21, 0x21)           # AF_INET6, STREAM
    src, dst, src_port, dst_port = struct.unpack("!16s16sHH", block)
    assert ipaddress.IPv6Address(src) == ipaddress.IPv6Address("2001:db8::10")
    assert ipaddress.IPv6Address(dst) == ipaddress.IPv6Address("2001:db8:ffff::1")
    assert (src_port, dst_port) == (65535, 1)


def test_v2_ipv4_mapped_ipv6_is_written_as_ipv4() -> None:
    assert (v2_header(("::ffff:192.0.2.10", 51234), ("::ffff:198.51.100.1", 443))
            == v2_header(("192.0.2.10", 51234), ("198.51.100.1", 443)))
    _, family, block = decode_v2(v2_header(("::ffff:192.0.2.10", 1), ("198.51.100.1", 2)))
    assert family == 0x11 and len(block) == 12


@pytest.mark.parametrize("client, local", [
    (("192.0.2.10", 1000), ("2001:db8::1", 80)),
    (("2001:db8::10", 1000), ("198.51.100.1", 80)),
])
def test_v2_mixed_families_is_unspec_with_no_addresses(
        client: tuple[str, int], local: tuple[str, int]) -> None:
    data = v2_header(client, local)
    assert data == SIG + b"\x21\x00\x00\x00"
    assert decode_v2(data) == (0x21, 0x00, b"")


# -- dispatch ---------------------------------------------------------------------

def test_header_dispatches_on_version() -> None:
    client, local = ("192.0.2.10", 5), ("198.51.100.1", 6)
    assert header("v1", client, local) == v1_header(client, local)
    assert header("v2", client, local) == v2_header(client, local)
    assert header("v1", client, local) != header("v2", client, local)


@pytest.mark.parametrize("version", ["v3", "V1", "", "1", "v2 "])
def test_unknown_version_raises(version: str) -> None:
    with pytest.raises(ValueError, match="PROXY protocol version"):
        header(version, ("192.0.2.10", 5), ("198.51.100.1", 6))


# -- round trips over random endpoints (seeded) --------------------------------------

def random_pairs(seed: int, count: int = 300) -> list[tuple[IP, IP, int, int]]:
    rng = random.Random(seed)
    out: list[tuple[IP, IP, int, int]] = []
    for index in range(count):
        pair: tuple[IP, IP]
        if index % 2:
            pair = (ipaddress.IPv4Address(rng.getrandbits(32)),
                    ipaddress.IPv4Address(rng.getrandbits(32)))
        else:
            # Top 32 bits set: never an IPv4-mapped address (::ffff:0:0/96).
            pair = (ipaddress.IPv6Address(rng.getrandbits(128) | 1 << 127),
                    ipaddress.IPv6Address(rng.getrandbits(128) | 1 << 127))
        out.append((*pair, rng.randrange(65536), rng.randrange(65536)))
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_v2_round_trip(seed: int) -> None:
    for src, dst, src_port, dst_port in random_pairs(seed):
        _, family, block = decode_v2(v2_header((str(src), src_port), (str(dst), dst_port)))
        size = 4 if src.version == 4 else 16
        assert family == (0x11 if size == 4 else 0x21)
        assert len(block) == 2 * size + 4
        assert block[:size] == src.packed and block[size:2 * size] == dst.packed
        assert struct.unpack("!HH", block[2 * size:]) == (src_port, dst_port)


@pytest.mark.parametrize("seed", [1, 2])
def test_v1_round_trip(seed: int) -> None:
    for src, dst, src_port, dst_port in random_pairs(seed):
        line = v1_header((str(src), src_port), (str(dst), dst_port))
        assert line.endswith(b"\r\n") and len(line) <= 107
        words = line[:-2].decode("ascii").split(" ")
        assert words[0] == "PROXY"
        assert words[1] == ("TCP4" if src.version == 4 else "TCP6")
        assert ipaddress.ip_address(words[2]) == src
        assert ipaddress.ip_address(words[3]) == dst
        assert (int(words[4]), int(words[5])) == (src_port, dst_port)
