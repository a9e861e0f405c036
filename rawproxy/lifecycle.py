"""One process and its surroundings: systemd, and the processes of an upgrade.

``cli`` makes one :class:`Lifecycle` per process at start
(:meth:`Lifecycle.from_environment`), before anything listens:

* ``sockets`` -- what it inherited instead of binding (``inherited``):
  systemd's ``LISTEN_FDS`` and the sockets an upgrade hands down
  (``RAWPROXY_UPGRADE``, see ``upgrade``); both variables are removed;
* :meth:`serving` -- every port listens: the inherited sockets no port took
  are closed, then the process that started this one hears ``ready``
  (an upgrade), or else systemd hears ``READY=1``;
* :meth:`reload_state` -- ``RELOADING=1`` before a reload, ``READY=1`` after
  (:meth:`notifying` wraps the signal handlers with these and :meth:`stopping`);
* :meth:`stopping` -- ``STOPPING=1`` when a stop signal starts the drain
  (not when the process drains because it handed over: the service goes on);
* :meth:`enable_upgrade` -- SIGUSR2 starts an upgrade (``upgrade.Upgrader``);
  until then the signal is ignored, never fatal;
* :meth:`after_fork` -- in a ``--workers`` worker: its part of the sockets,
  and none of the rest, which is the supervisor's.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import TYPE_CHECKING, Callable, MutableMapping, Optional

from . import systemd
from .inherited import InheritedSockets
from .loop import EventLoop
from .upgrade import ENV_VAR, Collect, ReadyPipe, Upgrader, decode_handover

if TYPE_CHECKING:
    from .admin import AdminServer
    from .server import Server

log = logging.getLogger("rawproxy.upgrade")


class Lifecycle:
    def __init__(self, sockets: InheritedSockets, notifier: systemd.Notifier,
                 ready_pipe: Optional[ReadyPipe] = None) -> None:
        self.sockets = sockets
        self.notifier = notifier
        self._ready_pipe = ready_pipe
        self.upgrader: Optional[Upgrader] = None
        self.handed_over = False
        self.is_worker = False
        self.is_serving = False

    @classmethod
    def from_environment(cls, environ: Optional[MutableMapping[str, str]] = None) -> Lifecycle:
        env = os.environ if environ is None else environ
        # SIGUSR2 kills by default: ignored until enable_upgrade takes it.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        fds = systemd.listen_fds(env)
        if fds:
            log.info("systemd passed %d sockets", len(fds))
        ready_pipe = None
        value = env.pop(ENV_VAR, None)
        if value is not None:
            handover = decode_handover(value)
            if handover is None:
                log.warning("ignoring a malformed %s=%r", ENV_VAR, value)
            else:
                old_pid, ready_fd, handed = handover
                log.info("upgrade: started by pid %d, which hands over %d sockets",
                         old_pid, len(handed))
                fds += handed
                ready_pipe = ReadyPipe(ready_fd, old_pid)
        return cls(InheritedSockets.from_fds(fds), systemd.Notifier.from_environment(env),
                   ready_pipe)

    @classmethod
    def bare(cls) -> Lifecycle:
        """Nothing inherited, nobody to tell (tests, and embedding)."""
        return cls(InheritedSockets(), systemd.Notifier(None))

    @property
    def upgraded(self) -> bool:
        """Started by an upgrade, and not ready yet."""
        return self._ready_pipe is not None

    def serving(self, workers: int = 0) -> None:
        """Every port listens (in the supervisor of ``workers``: every worker is ready)."""
        self.is_serving = True
        self.sockets.close_rest(workers)
        if self.is_worker:
            return
        if self._ready_pipe is not None:
            self._ready_pipe.announce()  # the old process tells systemd: MAINPID=
            self._ready_pipe = None
        else:
            self.notifier.ready()

    def reload_state(self, reloading: bool) -> None:
        if not self.is_worker:
            if reloading:
                self.notifier.reloading()
            else:
                self.notifier.ready()

    def stopping(self) -> None:
        if not self.is_worker and not self.handed_over:
            self.notifier.stopping()

    def notifying(self, on_stop: Callable[[], None], on_reload: Callable[[], None]
                  ) -> tuple[Callable[[], None], Callable[[], None]]:
        """The SIGTERM/SIGINT and SIGHUP handlers, telling systemd too."""
        def stop() -> None:
            self.stopping()
            on_stop()

        def reload() -> None:
            self.reload_state(True)
            try:
                on_reload()
            finally:
                self.reload_state(False)

        return stop, reload

    def enable_upgrade(self, loop: EventLoop, collect: Collect, on_handed_over: Callable[[], None],
                       refusal: Callable[[], Optional[str]]) -> None:
        def ready(pid: int) -> None:
            self.handed_over = True
            on_handed_over()

        def refused() -> Optional[str]:
            return refusal() if self.is_serving else "this process is still starting"

        self.upgrader = Upgrader(loop, collect, ready, refusal=refused, notifier=self.notifier)
        loop.add_signal_handler(signal.SIGUSR2, self.upgrader.request)

    def enable_single_process_upgrade(self, server: Server, admin: Optional[AdminServer],
                                      drain_timeout_s: float) -> None:
        """Without ``--workers``: hand over the listeners and the admin
        socket, then drain."""
        def collect(deliver: Callable[..., None]) -> None:
            fds = [listener.fd for listener in server.listeners.by_port.values()]
            if admin is not None and admin.listening_socket is not None:
                fds.append(admin.listening_socket.fileno())
            deliver(fds, None)

        def handed_over() -> None:
            if admin is not None:
                admin.hand_over()
                stop = server.on_drained  # once the admin requests it had taken are answered
                server.on_drained = lambda: admin.when_idle(stop)
            server.drain(drain_timeout_s)

        self.enable_upgrade(server.loop, collect, handed_over,
                            lambda: "this process is draining" if server.draining else None)

    def after_fork(self, index: int) -> None:
        """In worker ``index``, just after the fork."""
        self.is_worker = True
        if self._ready_pipe is not None:
            self._ready_pipe.close()  # the supervisor says ready, once all are
            self._ready_pipe = None
        self.notifier.close()  # this process's copy of its socket
        self.notifier = systemd.Notifier(None)
        if self.upgrader is not None:
            self.upgrader.close_after_fork()
            self.upgrader = None
        self.sockets.share(index)

    def close(self) -> None:
        if self.upgrader is not None:
            self.upgrader.close()
        if self._ready_pipe is not None:
            self._ready_pipe.close()
        self.notifier.close()
        self.sockets.close()
