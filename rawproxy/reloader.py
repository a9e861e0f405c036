"""Reloading the config: on SIGHUP, and with ``--watch`` when the file changes.

``Reloader.reload(trigger)`` loads the source again; a :class:`ConfigError`
or a port that cannot be bound is logged (the same one-line message
``--check`` gives) and counted, and the old config keeps serving.

The watcher polls the file's identity -- (device, inode, size, mtime) --
once a second, so an editor that writes a new file and renames it over the
old one is noticed as well as an in-place write, with no dependency beyond
``os.stat``.  A file that is briefly missing mid-replace is not a change;
it is looked at again on the next poll.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from .config import Config, ConfigError, ConfigSource, FileConfigSource
from .listeners import BindError
from .loop import EventLoop
from .server import Server

log = logging.getLogger("rawproxy.reload")

WATCH_INTERVAL_S = 1.0

FileIdentity = tuple[int, int, int, int]


def file_identity(path: str) -> Optional[FileIdentity]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Reloader:
    """Serves a new config: :meth:`apply` is the one way in, whatever the
    source (this file, or etcd through ``fleetsource``)."""

    def __init__(self, loop: EventLoop, server: Server, source: ConfigSource) -> None:
        self._loop = loop
        self._server = server
        self._source = source
        self._path = source.path if isinstance(source, FileConfigSource) else None
        self._identity = file_identity(self._path) if self._path is not None else None

    def reload(self, trigger: str) -> bool:
        if self._path is not None:
            self._identity = file_identity(self._path)
        try:
            config = self._source.load()
        except ConfigError as exc:
            self.reject(trigger, exc)
            return False
        return self.apply(config, trigger)

    def apply(self, config: Config, trigger: str) -> bool:
        """Serve ``config`` (validated) from now on, or say why not."""
        try:
            self._server.reload(config)
        except (ConfigError, BindError) as exc:
            self.reject(trigger, exc)
            return False
        except RuntimeError as exc:  # draining
            log.warning("reload (%s) ignored: %s", trigger, exc)
            return False
        self._server.stats.reloads_ok += 1
        self._server.stats.last_reload_ok = True
        return True

    def reject(self, trigger: str, error: Exception) -> None:
        """A config that will not be served: logged, counted, the old one stays."""
        self._server.stats.reloads_failed += 1
        self._server.stats.last_reload_ok = False
        log.error("reload (%s) rejected, the old config keeps serving: %s", trigger, error)

    def watch(self) -> None:
        """Poll the file once a second and reload when it changed."""
        if self._path is not None:
            self._loop.call_later(WATCH_INTERVAL_S, self._poll)

    def close(self) -> None:
        """Stop following the source (nothing to do for a polled file)."""

    def _poll(self) -> None:
        assert self._path is not None
        identity = file_identity(self._path)
        if identity is not None and identity != self._identity:
            log.info("%s changed on disk", self._path)
            self.reload("file changed")
        self._loop.call_later(WATCH_INTERVAL_S, self._poll)
