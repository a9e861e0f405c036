"""Process-wide settings: the descriptor limit and dropping root.

* :func:`raise_fd_limit` lifts the soft ``RLIMIT_NOFILE`` to the hard limit
  at start-up: every proxied connection costs two descriptors, and the
  usual soft default (1024) would cap the proxy near 500 connections.
* :func:`lookup_identity` resolves ``--user``/``--group`` before anything is
  bound (so a typo fails fast, exit 2); :func:`drop_privileges` switches to
  them after the listeners are bound, so ports below 1024 can be served
  without running as root.  Supplementary groups are cleared first, the
  group set before the user (after ``setuid`` it no longer could be).
"""

from __future__ import annotations

import grp
import os
import pwd
import resource
from typing import Optional


class PrivilegeError(Exception):
    pass


def raise_fd_limit() -> int:
    """Raise the soft descriptor limit as far as allowed; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # RLIM_INFINITY as a soft limit is refused by Linux; cap at nr_open's default.
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError):
        return soft
    return wanted


def lookup_identity(user: Optional[str], group: Optional[str],
                    need_root: bool = True) -> Optional[tuple[int, int]]:
    """(uid, gid) to switch to, or None when neither option was given;
    ``need_root`` False (``--check``): only that the names exist."""
    if user is None and group is None:
        return None
    uid, gid = os.getuid(), os.getgid()
    if user is not None:
        try:
            entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
        except (KeyError, ValueError, OverflowError):  # a digit int() refuses, an id past uid_t
            raise PrivilegeError(f"--user: no such user {user!r}") from None
        uid, gid = entry.pw_uid, entry.pw_gid
    if group is not None:
        try:
            gid = (grp.getgrnam(group) if not group.isdigit() else grp.getgrgid(int(group))).gr_gid
        except (KeyError, ValueError, OverflowError):
            raise PrivilegeError(f"--group: no such group {group!r}") from None
    if need_root and os.geteuid() != 0 and (uid != os.geteuid() or gid != os.getegid()):
        raise PrivilegeError("--user/--group need the proxy to start as root")
    return uid, gid


def drop_privileges(uid: int, gid: int) -> None:
    if os.geteuid() != 0:
        return  # already that identity (checked by lookup_identity)
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(uid)
    if os.geteuid() != uid or os.getegid() != gid:
        raise PrivilegeError("could not drop privileges")
