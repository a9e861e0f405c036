"""``python3 -m rawproxy.register``: a machine registers itself as a target.

Puts ``PREFIX targets/APP/ID`` = the target under a lease of ``--ttl``
seconds and keeps the lease alive (every third of the TTL) until SIGTERM or
SIGINT, then revokes it, so the target leaves every proxy at once.  If
this process dies, or loses etcd for longer than the TTL, the lease
expires and etcd removes the key itself: proxies stop sending new
connections there (open ones are untouched).  A lease found expired is
granted again and the key put again.  The same as, with etcdctl::

    etcdctl lease grant 10                      # -> lease 694d7a...
    etcdctl put --lease=694d7a... /rawproxy/targets/web/m1 '"10.0.0.5:8080"'
    etcdctl lease keep-alive 694d7a...

Exit status: 0 after a signal, 2 for bad options, 1 if etcd cannot be
reached at start-up within ``--etcd-timeout``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
import threading
import time
from types import FrameType
from typing import NoReturn, Optional, Sequence

from .config import ConfigError
from .etcd import AuthFailed, Client, EtcdError
from .fleet import TARGETS_DIR, parse_target
from .fleetsource import DEFAULT_PREFIX, FleetStartError, add_connection_arguments, \
    clients_from_args
from .fleetwatch import EndpointCycle

PROG = "rawproxy.register"
log = logging.getLogger("rawproxy.register")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def _ttl(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 2 <= int(text) <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TTL (whole seconds, 2-86400)")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Register a target of an app in etcd under a "
                                            "lease, and keep the lease alive.")
    parser.add_argument("--etcd", required=True, metavar="URL[,URL...]",
                        help="client URLs of the etcd members")
    parser.add_argument("--etcd-prefix", default=DEFAULT_PREFIX, metavar="PREFIX",
                        help=f"the proxies' --etcd-prefix (default: {DEFAULT_PREFIX})")
    parser.add_argument("--app", required=True, help="the app this target serves")
    parser.add_argument("--target", required=True, metavar="HOST:PORT",
                        help="the address proxies connect to")
    parser.add_argument("--weight", type=int, metavar="N", help="its Weight (default: 1)")
    parser.add_argument("--id", metavar="ID",
                        help="the key's last part (default: this host's name and the port)")
    parser.add_argument("--ttl", type=_ttl, default=10, metavar="SECONDS",
                        help="lease TTL: how long the target stays after this process "
                             "stops renewing (default: 10)")
    add_connection_arguments(parser)
    return parser


def _key_and_value(args: argparse.Namespace) -> tuple[bytes, bytes]:
    ident = args.id or f"{socket.gethostname()}-{args.target.rpartition(':')[2]}"
    if not ident or "/" in ident or "/" in args.app or not args.app:
        raise ConfigError("--app and --id must be non-empty and without '/'")
    key = f"{args.etcd_prefix}{TARGETS_DIR}{args.app}/{ident}".encode()
    value: object = args.target
    if args.weight is not None:
        value = {"Address": args.target, "Weight": args.weight}
    text = json.dumps(value).encode()
    parse_target(text, "etcd:" + key.decode())  # the proxies' own check, before any put
    return key, text


class Registration:
    """The lease and the key, kept alive over any endpoint that answers."""

    def __init__(self, clients: Sequence[Client], key: bytes, value: bytes, ttl_s: int) -> None:
        self._clients = clients
        self._cycle = EndpointCycle(len(clients))
        self.key = key
        self.value = value
        self.ttl_s = ttl_s
        self.lease = 0

    @property
    def _client(self) -> Client:
        return self._clients[self._cycle.index]

    def register(self) -> None:
        self.lease = self._client.grant(self.ttl_s)
        self._client.put(self.key, self.value, self.lease)
        log.info("registered %s = %s (lease %x, TTL %ds)", self.key.decode(),
                 self.value.decode(), self.lease, self.ttl_s)

    def renew(self) -> float:
        """Keep the lease alive (or register again); returns the seconds
        until the next renewal."""
        try:
            if not self.lease or self._client.keep_alive(self.lease) <= 0:
                if self.lease:
                    log.warning("lease %x expired: registering again", self.lease)
                self.register()
            self._cycle.succeeded()
            return self.ttl_s / 3
        except AuthFailed:
            raise
        except EtcdError as exc:
            pause_s = self._cycle.failed()
            log.warning("%s; trying %s", exc, self._client.endpoint)
            return pause_s

    def revoke(self) -> None:
        if self.lease:
            try:
                self._client.revoke(self.lease)
                log.info("revoked lease %x: %s is gone", self.lease, self.key.decode())
            except EtcdError as exc:
                log.warning("could not revoke lease %x (it expires in %ds): %s",
                            self.lease, self.ttl_s, exc)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        clients = clients_from_args(args)
        key, value = _key_and_value(args)
    except (FleetStartError, ConfigError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    registration = Registration(clients, key, value, args.ttl)
    try:
        _start(registration, args.etcd_timeout, stop)
        while not stop.wait(registration.renew()):
            pass
    except AuthFailed as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except _GaveUp as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    registration.revoke()
    return 0


class _GaveUp(Exception):
    pass


def _start(registration: Registration, timeout_s: float, stop: threading.Event) -> None:
    """The first registration, from any endpoint, within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not stop.is_set():
        pause_s = registration.renew()
        if registration.lease:
            return
        if time.monotonic() + pause_s >= deadline:
            raise _GaveUp(f"no etcd endpoint answered within {timeout_s:g}s")
        stop.wait(pause_s)


if __name__ == "__main__":
    sys.exit(main())
