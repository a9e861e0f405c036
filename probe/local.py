"""Local mode: echo backends in place of the targets, a derived config, rawproxy on it.

``LocalEnv.start()`` gives every target of every app its own echo backend
on 127.0.0.1 (so who served a connection proves which app it went to),
except targets named in ``down``: those get a loopback port that is bound
but never listens, so connects to it are refused.  Each app's ports are
replaced by ports free at the time (probe.ports says where from and why);
every other key of the config is written as it was.  No name of the config
is ever resolved.  One app is added for the autostart phase: its one
target is a machine that starts stopped (probe.autostart).  Then ``rawproxy.py`` runs on the derived config with
``--listen-host 127.0.0.1`` until its ``ready:`` line (a port taken
meanwhile means new ports and another try).  Its stderr is always drained.

``close()`` stops it all, also after a failure or a stop signal: the
backends, then SIGTERM to the proxy's pid and SIGKILL if it does not exit
(after a short grace once a stop signal arrived).  Starting the proxy
together with recording it, and all of ``close()``, run shielded from stop
signals (probe.stopsignals): a signal can neither leave a proxy nobody knows
of nor cut the cleanup short.
"""

from __future__ import annotations

import collections
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Deque, Mapping, Optional, Sequence

from .autostart import MachineStub
from .config import App
from .echo import EchoBackend, EchoServer
from .ports import PortPool
from .stopsignals import StopSignals

READY = "rawproxy.server: ready:"
_START_TRIES = 5
_READY_TIMEOUT_S = 60.0    # only a proxy that hangs without exiting waits this long
_STOP_GRACE_S = 20.0       # SIGTERM to SIGKILL: it drains (5 s) and exits meanwhile
_HURRY_GRACE_S = 1.0       # the same once a stop signal arrived
_STOP_TIMEOUT_S = 10.0
_POLL_S = 0.05


class LocalError(Exception):
    """Local mode could not start; the message says why."""


class LocalTarget:
    __slots__ = ("app", "address", "backend", "port")

    def __init__(self, app: str, address: str, backend: Optional[EchoBackend], port: int) -> None:
        self.app = app
        self.address = address      # as written in the config
        self.backend = backend      # None: down, nothing listens on ``port``
        self.port = port

    @property
    def state(self) -> str:
        if self.backend is None:
            return "down"
        return "stopped" if self.backend.stopped else "up"


def derive_config(raw: Mapping[str, Any], addresses: Sequence[Sequence[str]],
                  port_map: Mapping[int, int]) -> dict[str, Any]:
    """``raw`` with app i's target j at ``addresses[i][j]`` and ports mapped."""
    apps = []
    for app, local in zip(raw["Apps"], addresses):
        targets = [{**t, "Address": a} if isinstance(t, dict) else a
                   for t, a in zip(app["Targets"], local)]
        apps.append({**app, "Ports": [port_map[p] for p in app["Ports"]], "Targets": targets})
    return {**raw, "Apps": apps}


class ProxyProcess:
    """rawproxy in a subprocess; a thread reads its stderr so the pipe never fills."""

    __slots__ = ("proc", "lines", "_ready", "_settled", "_reader")

    def __init__(self, argv: Sequence[str]) -> None:
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.lines: Deque[str] = collections.deque(maxlen=2000)
        self._ready = False
        self._settled = threading.Event()   # ready, or stderr ended
        self._reader = threading.Thread(target=self._read, name="probe-proxy-stderr",
                                        daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        try:
            for raw in self.proc.stderr:
                line = raw.decode(errors="replace").rstrip("\n")
                self.lines.append(line)
                if READY in line and not self._ready:
                    self._ready = True
                    self._settled.set()
        finally:
            self._settled.set()

    def wait_ready(self, timeout_s: float) -> bool:
        self._settled.wait(timeout_s)
        return self._ready

    def count(self, text: str) -> int:
        return sum(1 for line in list(self.lines) if text in line)

    def stop(self, grace_s: float = _STOP_GRACE_S,
             hurry: Callable[[], bool] = lambda: False) -> int:
        """SIGTERM (the proxy drains), SIGKILL if it lingers past ``grace_s``
        (``_HURRY_GRACE_S`` as soon as ``hurry()``); its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            while self.proc.poll() is None:
                if time.monotonic() - started >= (_HURRY_GRACE_S if hurry() else grace_s):
                    self.proc.kill()
                    break
                try:
                    self.proc.wait(_POLL_S)
                except subprocess.TimeoutExpired:
                    pass
        code = self.proc.wait(_STOP_TIMEOUT_S)
        self._reader.join(_HURRY_GRACE_S if hurry() else _STOP_TIMEOUT_S)
        # Closing the pipe under a reader still blocked in read() would block
        # here until that read returns: leave such a pipe to the process exit.
        if self.proc.stderr is not None and not self._reader.is_alive():
            self.proc.stderr.close()
        return code


class LocalEnv:
    """Backends, derived config and proxy of one local run (see the module doc).

    ``signals``: the run's stop signals, for the shields and for hurrying;
    ``close`` is registered with them.  ``ports``: where ports come from."""

    def __init__(self, apps: Sequence[App], raw: Mapping[str, Any], down: frozenset[str],
                 launcher: Path, signals: Optional[StopSignals] = None,
                 ports: Optional[PortPool] = None) -> None:
        self.apps = apps
        self._raw = raw
        self._down = down
        self._launcher = launcher
        self._signals = signals if signals is not None else StopSignals()
        self._ports = ports if ports is not None else PortPool()
        self._echo: Optional[EchoServer] = None
        self._tmp: Optional[tempfile.TemporaryDirectory[str]] = None
        self._held: list[socket.socket] = []    # the down targets' ports
        self.targets: list[list[LocalTarget]] = []
        self.port_map: dict[int, int] = {}
        self.proxy: Optional[ProxyProcess] = None
        self.starts = 0                          # proxies started (a retry makes two)
        self.exit_code: Optional[int] = None
        self.stopping = threading.Event()        # set first thing by close()
        # The autostart phase's app: its machine starts stopped (probe.autostart).
        self.autostart: Optional[MachineStub] = None
        self.autostart_port = 0
        self._signals.at_stop(self.close)

    def start(self) -> None:
        try:
            self._start()
        except OSError as exc:   # no port, no descriptor, no temporary directory...
            raise LocalError(f"cannot start local mode: {exc.strerror or exc}") from exc

    def _start(self) -> None:
        with self._signals.shielded():
            self._echo = echo = EchoServer()
            self._tmp = tempfile.TemporaryDirectory(prefix="probe-")
        for app in self.apps:
            row = []
            for address in app.targets:
                if address in self._down:
                    self._held.append(self._ports.bind(listen=False))
                    row.append(LocalTarget(app.name, address, None,
                                           self._held[-1].getsockname()[1]))
                else:
                    backend = echo.add(self._ports.bind(listen=True))
                    row.append(LocalTarget(app.name, address, backend, backend.port))
            self.targets.append(row)
        self.autostart = MachineStub(echo, self._ports.bind(listen=False))
        addresses = [[f"127.0.0.1:{t.port}" for t in row] for row in self.targets]
        path = Path(self._tmp.name) / "config.json"
        for _ in range(_START_TRIES):
            ports = [p for app in self.apps for p in app.ports]
            *fresh, self.autostart_port = self._ports.free(len(ports) + 1)
            self.port_map = dict(zip(ports, fresh))
            derived = derive_config(self._raw, addresses, self.port_map)
            derived["Apps"].append(self.autostart.app_config(self.autostart_port))
            path.write_text(json.dumps(derived, indent=2))
            with self._signals.shielded():
                self.starts += 1
                self.proxy = ProxyProcess([sys.executable, str(self._launcher), "--config",
                                           str(path), "--listen-host", "127.0.0.1",
                                           "--log-level", "info", "--drain-timeout", "5"])
            if self.proxy.wait_ready(_READY_TIMEOUT_S):
                return
            self.proxy.stop(hurry=self._hurry)
            if not self.proxy.count("Address already in use"):
                break
        tail = "\n".join(list(self.proxy.lines)[-10:]) if self.proxy else ""
        raise LocalError(f"rawproxy did not start ({self._launcher}):\n{tail}")

    def _hurry(self) -> bool:
        return self._signals.hurry

    def stop_target(self, target: LocalTarget) -> None:
        if self._echo is not None and target.backend is not None:
            self._echo.stop(target.backend)

    def served(self, target: LocalTarget) -> tuple[int, tuple[int, ...]]:
        if self._echo is None or target.backend is None:
            return 0, ()
        return self._echo.snapshot(target.backend)

    def close(self) -> None:
        """Stop everything started; safe to call twice and after a failed start.
        Shielded: a stop signal meanwhile makes it hurry, and is raised at the
        end.  Backends first: if checks were interrupted, their connections
        end, so the proxy's drain has nothing to wait for."""
        with self._signals.shielded():
            self.stopping.set()
            try:
                if self.autostart is not None:
                    self.autostart.close()
                    self.autostart = None
                if self._echo is not None:
                    self._echo.close()
                    self._echo = None
            finally:
                try:
                    if self.proxy is not None and self.exit_code is None:
                        self.exit_code = self.proxy.stop(hurry=self._hurry)
                finally:
                    for sock in self._held:
                        sock.close()
                    self._held.clear()
                    if self._tmp is not None:
                        self._tmp.cleanup()
                        self._tmp = None
