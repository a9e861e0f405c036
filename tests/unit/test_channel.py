"""rawproxy.channel: a frame's descriptor count is digits only, or the
channel is out of step and closed (never a negative or padded count)."""

from __future__ import annotations

import socket

import pytest

from rawproxy.channel import FDS_MARK, Channel, encode_frame
from rawproxy.loop import EventLoop
from tests.unit.test_supervisor import run_until


@pytest.mark.parametrize("count", ["-1", " 0", "+0", "0_0", "", "٣"])
def test_a_descriptor_count_that_is_not_plain_digits_closes_the_channel(count: str) -> None:
    loop = EventLoop()
    ours, theirs = socket.socketpair()
    frames: list[str] = []
    lost: list[bool] = []
    channel = Channel(loop, ours, frames.append, lambda: lost.append(True))
    try:
        theirs.sendall(encode_frame(f"{FDS_MARK}{count}\nhello"))
        run_until(loop, lambda: bool(lost or frames))
        assert frames == [] and channel.closed
    finally:
        channel.close()
        theirs.close()
        loop.close()


def test_a_plain_zero_count_is_accepted() -> None:
    loop = EventLoop()
    ours, theirs = socket.socketpair()
    frames: list[str] = []
    channel = Channel(loop, ours, frames.append, lambda: None)
    try:
        theirs.sendall(encode_frame(f"{FDS_MARK}0\nhello"))
        run_until(loop, lambda: bool(frames))
        assert frames == ["hello"] and not channel.closed
    finally:
        channel.close()
        theirs.close()
        loop.close()
