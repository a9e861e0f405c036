"""The plain asyncio TCP proxy a Python user writes in an afternoon: a peer.

``python3 asyncio_proxy.py --listen 127.0.0.1:8000 --target 127.0.0.1:9000
[--uvloop]``.  Streams API: ``start_server``, ``open_connection``, two pump
coroutines per connection with 64 KiB reads and ``drain()`` for
backpressure, ``write_eof()`` for half-close.  Deliberately nothing clever:
it is the baseline rawproxy's hand-written loop has to beat.  ``--uvloop``
runs the same code on uvloop when it is importable (exit 3 when it is not).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import socket
import sys
from typing import Optional

READ_BYTES = 64 * 1024


def split_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(READ_BYTES)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        writer.transport.abort()


async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                 target: tuple[str, int]) -> None:
    try:
        target_reader, target_writer = await asyncio.open_connection(*target)
    except OSError:
        client_writer.close()
        return
    for writer in (client_writer, target_writer):
        sock: Optional[socket.socket] = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        await asyncio.gather(pump(client_reader, target_writer),
                             pump(target_reader, client_writer))
    finally:
        client_writer.close()
        target_writer.close()


async def main_async(listen: tuple[str, int], target: tuple[str, int]) -> None:
    sessions: set[asyncio.Task[None]] = set()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            sessions.add(task)
            task.add_done_callback(sessions.discard)
        await handle(reader, writer, target)

    server = await asyncio.start_server(on_client, listen[0], listen[1], backlog=4096)
    stop = asyncio.get_running_loop().create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set_result, None)
    await stop
    # Stop accepting, then end open sessions before waiting for the server
    # (newer Pythons' wait_closed() waits for every connection to close).
    server.close()
    for task in list(sessions):
        task.cancel()
    await asyncio.gather(*sessions, return_exceptions=True)
    await server.wait_closed()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--target", required=True, help="HOST:PORT")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args(argv)
    coro = main_async(split_address(args.listen), split_address(args.target))
    if args.uvloop:
        try:
            uvloop = importlib.import_module("uvloop")
        except ImportError:
            coro.close()
            print("asyncio_proxy: uvloop is not installed", file=sys.stderr)
            return 3
        uvloop.run(coro)
    else:
        asyncio.run(coro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
