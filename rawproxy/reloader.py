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

from .config import ConfigError, FileConfigSource
from .loop import EventLoop
from .server import BindError, Server

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
    def __init__(self, loop: EventLoop, server: Server, source: FileConfigSource) -> None:
        self._loop = loop
        self._server = server
        self._source = source
        self._identity = file_identity(source.path)

    def reload(self, trigger: str) -> bool:
        stats = self._server.stats
        self._identity = file_identity(self._source.path)
        try:
            config = self._source.load()
            self._server.reload(config)
        except (ConfigError, BindError) as exc:
            stats.reloads_failed += 1
            stats.last_reload_ok = False
            log.error("reload (%s) rejected, the old config keeps serving: %s", trigger, exc)
            return False
        except RuntimeError as exc:  # draining
            log.warning("reload (%s) ignored: %s", trigger, exc)
            return False
        stats.reloads_ok += 1
        stats.last_reload_ok = True
        return True

    def watch(self) -> None:
        """Poll the file once a second and reload when it changed."""
        self._loop.call_later(WATCH_INTERVAL_S, self._poll)

    def _poll(self) -> None:
        identity = file_identity(self._source.path)
        if identity is not None and identity != self._identity:
            log.info("%s changed on disk", self._source.path)
            self.reload("file changed")
        self._loop.call_later(WATCH_INTERVAL_S, self._poll)
