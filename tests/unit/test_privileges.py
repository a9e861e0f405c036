"""Unit tests for rawproxy.privileges: resolving --user/--group and raising
the descriptor limit.

Only the current identity is looked up for real (it exists wherever the
tests run); names that cannot exist stand for typos.  The rlimit decisions
are checked against a fake ``getrlimit``/``setrlimit``; the one real call
restores the limit afterwards.
"""

from __future__ import annotations

import grp
import os
import pwd
import resource
from typing import Iterator, List, Tuple

import pytest

from rawproxy.privileges import PrivilegeError, lookup_identity, raise_fd_limit

NO_SUCH_NAME = "rawproxy-test-no-such-name"
INF = resource.RLIM_INFINITY


def current_user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        pytest.skip("the current uid has no passwd entry")


def current_group_name() -> str:
    try:
        return grp.getgrgid(os.getegid()).gr_name
    except KeyError:
        pytest.skip("the current gid has no group entry")


# -- lookup_identity ----------------------------------------------------------------

def test_neither_option_means_no_switch() -> None:
    assert lookup_identity(None, None) is None


def test_unknown_user_is_a_clear_error() -> None:
    with pytest.raises(PrivilegeError) as info:
        lookup_identity(NO_SUCH_NAME, None)
    assert str(info.value) == f"--user: no such user {NO_SUCH_NAME!r}"
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_unknown_group_is_a_clear_error() -> None:
    with pytest.raises(PrivilegeError) as info:
        lookup_identity(None, NO_SUCH_NAME)
    assert str(info.value) == f"--group: no such group {NO_SUCH_NAME!r}"


@pytest.mark.parametrize("value", [
    "4294967294",              # a free uid/gid below the top of uid_t
    "99999999999999999999",   # past uid_t/gid_t: getgrgid raises OverflowError
    "\u00b2",                  # "²" is a digit to str.isdigit but not to int()
    "",
])
def test_impossible_names_and_ids_are_privilege_errors(value: str) -> None:
    with pytest.raises(PrivilegeError, match="--user: no such user"):
        lookup_identity(value, None)
    with pytest.raises(PrivilegeError, match="--group: no such group"):
        lookup_identity(None, value)


def test_numeric_ids_are_accepted() -> None:
    current_user_name()  # skips where the uid has no entry
    current_group_name()
    uid, gid = os.geteuid(), os.getegid()
    assert lookup_identity(str(uid), str(gid)) == (uid, gid)


def test_names_and_numbers_agree() -> None:
    user, group = current_user_name(), current_group_name()
    assert lookup_identity(user, group) == lookup_identity(str(os.geteuid()), str(os.getegid()))
    assert lookup_identity(user, None) == lookup_identity(str(os.geteuid()), None)


def test_user_alone_brings_its_primary_group() -> None:
    entry = pwd.getpwnam(current_user_name())
    if os.geteuid() != 0 and entry.pw_gid != os.getegid():
        pytest.skip("running with a group other than the user's primary one")
    assert lookup_identity(entry.pw_name, None) == (entry.pw_uid, entry.pw_gid)


def test_group_alone_keeps_the_current_user() -> None:
    current_group_name()
    assert lookup_identity(None, str(os.getegid())) == (os.getuid(), os.getegid())


def test_switching_identity_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    user = current_user_name()
    monkeypatch.setattr(os, "geteuid", lambda: 54321)  # an unprivileged stranger
    monkeypatch.setattr(os, "getegid", lambda: 54321)
    with pytest.raises(PrivilegeError, match="need the proxy to start as root"):
        lookup_identity(user, None)


# -- raise_fd_limit --------------------------------------------------------------------

@pytest.fixture
def restore_fd_limit() -> Iterator[Tuple[int, int]]:
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield limits
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)  # lowering the soft limit is allowed


def test_raise_fd_limit_for_real(restore_fd_limit: Tuple[int, int]) -> None:
    soft, hard = restore_fd_limit
    new = raise_fd_limit()
    assert new == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != INF:
        assert new >= soft
    if hard != INF:
        assert new in (soft, hard)  # raised to hard, or left where it was if refused


class FakeLimits:
    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.limits = (soft, hard)
        self.refuse = refuse
        self.calls: List[Tuple[int, int]] = []

    def getrlimit(self, which: int) -> Tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which: int, limits: Tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        self.calls.append(limits)
        if self.refuse:
            raise ValueError("not allowed to raise maximum limit")
        self.limits = limits


def install(monkeypatch: pytest.MonkeyPatch, fake: FakeLimits) -> None:
    monkeypatch.setattr(resource, "getrlimit", fake.getrlimit)
    monkeypatch.setattr(resource, "setrlimit", fake.setrlimit)


@pytest.mark.parametrize("soft, hard, expected, calls", [
    (1024, 524288, 524288, [(524288, 524288)]),       # the usual case: up to hard
    (4096, 4096, 4096, []),                           # nothing to raise
    (1024, INF, 1 << 20, [(1 << 20, INF)]),           # an infinite hard limit: nr_open's default
    (2_000_000, INF, 2_000_000, []),                  # already past that default
    (INF, INF, INF, []),                              # already unlimited
])
def test_raise_fd_limit_decisions(monkeypatch: pytest.MonkeyPatch, soft: int, hard: int,
                                  expected: int, calls: List[Tuple[int, int]]) -> None:
    fake = FakeLimits(soft, hard)
    install(monkeypatch, fake)
    assert raise_fd_limit() == expected
    assert fake.calls == calls


def test_raise_fd_limit_keeps_the_soft_limit_when_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeLimits(1024, INF, refuse=True)  # nr_open lower than 1 << 20
    install(monkeypatch, fake)
    assert raise_fd_limit() == 1024
    assert fake.calls == [(1 << 20, INF)]
