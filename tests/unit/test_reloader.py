"""Unit tests for rawproxy.reloader: the file identity the watcher polls, and
Reloader against a fake server (what is counted, what is ignored).

Files live in pytest's tmp_path; mtimes are set explicitly with os.utime so
no test depends on the filesystem's timestamp granularity.  The watcher runs
on a real EventLoop with the poll interval patched to zero and is driven
turn by turn; nothing sleeps.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, cast

import pytest

from rawproxy import reloader
from rawproxy.config import Config, ConfigError, FileConfigSource
from rawproxy.listeners import BindError
from rawproxy.loop import EventLoop
from rawproxy.reloader import Reloader, file_identity
from rawproxy.server import Server
from rawproxy.stats import Stats


def config_text(name: str) -> str:
    return json.dumps({"Apps": [{"Name": name, "Ports": [5001], "Targets": ["192.0.2.1:80"]}]})


# -- file_identity ------------------------------------------------------------------

def test_missing_file_has_no_identity(tmp_path: Path) -> None:
    assert file_identity(str(tmp_path / "nope.json")) is None


def test_identity_is_stable_while_nothing_changes(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text("{}")
    assert file_identity(str(path)) == file_identity(str(path)) is not None


def test_in_place_write_of_another_size_changes_identity(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(config_text("a"))
    before = file_identity(str(path))
    st = os.stat(path)
    with open(path, "w") as stream:  # same inode, truncated and rewritten
        stream.write(config_text("abc"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # only the size tells
    after = file_identity(str(path))
    assert before is not None and after is not None
    assert after[:2] == before[:2]  # device and inode
    assert after != before


def test_in_place_write_of_the_same_size_changes_identity_by_mtime(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(config_text("a"))
    st = os.stat(path)
    before = file_identity(str(path))
    path.write_text(config_text("b"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # 1 ms later
    after = file_identity(str(path))
    assert before is not None and after is not None
    assert after[:3] == before[:3]  # device, inode and size
    assert after != before


def test_replace_by_rename_changes_identity(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(config_text("a"))
    st = os.stat(path)
    before = file_identity(str(path))
    staged = tmp_path / "c.json.tmp"  # made while the old file exists: a new inode
    staged.write_text(config_text("b"))
    os.utime(staged, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    os.replace(staged, path)
    after = file_identity(str(path))
    assert before is not None and after is not None
    assert after[2:] == before[2:]  # only the inode tells
    assert after != before


# -- Reloader with a fake server ---------------------------------------------------------

class FakeServer:
    """What Reloader uses of Server: ``stats`` and ``reload(config)``."""

    def __init__(self) -> None:
        self.stats = Stats(start_time=0.0)
        self.configs: List[Config] = []
        self.error: Optional[Exception] = None

    def reload(self, config: Config) -> None:
        if self.error is not None:
            raise self.error
        self.configs.append(config)

    def app_names(self) -> List[str]:
        return [config.apps[0].name for config in self.configs]


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    event_loop = EventLoop()
    yield event_loop
    event_loop.close()


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "rawproxy.json"
    path.write_text(config_text("first"))
    return path


def make_reloader(loop: EventLoop, path: Path) -> tuple[Reloader, FakeServer]:
    fake = FakeServer()
    return Reloader(loop, cast(Server, fake), FileConfigSource(str(path))), fake


def test_a_good_reload_is_applied_and_counted(loop: EventLoop, config_path: Path) -> None:
    reload, fake = make_reloader(loop, config_path)
    config_path.write_text(config_text("second"))
    assert reload.reload("SIGHUP") is True
    assert fake.app_names() == ["second"]
    assert (fake.stats.reloads_ok, fake.stats.reloads_failed) == (1, 0)
    assert fake.stats.last_reload_ok


def test_a_bad_config_is_rejected_and_counted(loop: EventLoop, config_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    reload, fake = make_reloader(loop, config_path)
    config_path.write_text('{"Apps": [')
    assert reload.reload("SIGHUP") is False
    assert fake.configs == []
    assert (fake.stats.reloads_ok, fake.stats.reloads_failed) == (0, 1)
    assert not fake.stats.last_reload_ok
    assert "old config keeps serving" in caplog.text and str(config_path) in caplog.text
    config_path.write_text(config_text("fixed"))
    assert reload.reload("SIGHUP") is True
    assert (fake.stats.last_reload_ok, fake.stats.reloads_ok) == (True, 1)


def test_a_missing_file_is_a_failed_reload(loop: EventLoop, config_path: Path) -> None:
    reload, fake = make_reloader(loop, config_path)
    config_path.unlink()
    assert reload.reload("SIGHUP") is False
    assert fake.stats.reloads_failed == 1 and not fake.stats.last_reload_ok


def test_a_port_that_cannot_be_bound_is_a_failed_reload(loop: EventLoop,
                                                        config_path: Path) -> None:
    reload, fake = make_reloader(loop, config_path)
    fake.error = BindError("127.0.0.1", 5001, "first", "address in use")
    assert reload.reload("SIGHUP") is False
    assert fake.stats.reloads_failed == 1 and not fake.stats.last_reload_ok


def test_a_reload_while_draining_is_ignored_not_counted(loop: EventLoop,
                                                        config_path: Path) -> None:
    reload, fake = make_reloader(loop, config_path)
    fake.error = RuntimeError("draining")
    assert reload.reload("SIGHUP") is False
    assert (fake.stats.reloads_ok, fake.stats.reloads_failed) == (0, 0)
    assert fake.stats.last_reload_ok


def test_config_errors_are_rejections_other_errors_propagate(loop: EventLoop, config_path: Path) -> None:
    reload, fake = make_reloader(loop, config_path)
    fake.error = ConfigError("from the server")
    assert reload.reload("SIGHUP") is False  # a ConfigError from anywhere is a rejection
    fake.error = KeyError("bug")
    with pytest.raises(KeyError):
        reload.reload("SIGHUP")


# -- the watcher ---------------------------------------------------------------------------

def turns(loop: EventLoop, count: int) -> None:
    for _ in range(count):
        loop.run_once(max_wait_s=0)


def drive(loop: EventLoop, condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 5.0
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        loop.run_once(max_wait_s=0.01)


def rewrite(path: Path, text: str) -> None:
    """Write and move the mtime on, so the change shows whatever the size."""
    st = os.stat(path)
    path.write_text(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_watch_reloads_on_change_only(loop: EventLoop, config_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reloader, "WATCH_INTERVAL_S", 0.0)
    reload, fake = make_reloader(loop, config_path)
    reload.watch()
    turns(loop, 5)
    assert fake.configs == []  # polled, unchanged
    rewrite(config_path, config_text("second"))
    drive(loop, lambda: len(fake.configs) == 1, "the reload")
    turns(loop, 5)
    assert fake.app_names() == ["second"]  # once per change, not per poll


def test_watch_ignores_a_briefly_missing_file(loop: EventLoop, config_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reloader, "WATCH_INTERVAL_S", 0.0)
    reload, fake = make_reloader(loop, config_path)
    reload.watch()
    st = os.stat(config_path)
    config_path.unlink()
    turns(loop, 5)
    assert fake.configs == [] and fake.stats.reloads_failed == 0
    config_path.write_text(config_text("third"))
    os.utime(config_path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    drive(loop, lambda: len(fake.configs) == 1, "the reload")
    assert fake.app_names() == ["third"]


def test_watch_does_not_retry_a_rejected_file_until_it_changes(
        loop: EventLoop, config_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reloader, "WATCH_INTERVAL_S", 0.0)
    reload, fake = make_reloader(loop, config_path)
    reload.watch()
    rewrite(config_path, "not json")
    drive(loop, lambda: fake.stats.reloads_failed == 1, "the rejected reload")
    turns(loop, 5)
    assert fake.stats.reloads_failed == 1
    rewrite(config_path, config_text("good"))
    drive(loop, lambda: fake.stats.reloads_ok == 1, "the good reload")
    assert fake.stats.last_reload_ok
