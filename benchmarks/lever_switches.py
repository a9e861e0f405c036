"""Issue #17's levers as switches: for each, the lines that turn it off.

``python -m benchmarks.lever_switches`` rewrites ``benchmarks/levers/*.patch``
from the code as it is (``levers.sh --ablate`` applies them): each line
named here must occur exactly once in its file, and is replaced by its
"lever off" form.  After a change that moves or rewrites such a line, edit
the table and run this again (``tests/unit/test_levers.py`` says when).
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATCHES = ROOT / "benchmarks" / "levers"

# lever -> [(file, the line as it is, the line with the lever off)]
Switch = tuple[str, str, str]
LEVERS: dict[str, list[Switch]] = {
    "1-reactor": [
        ("rawproxy/loop.py",
         '            EpollPoller() if selector is None and hasattr(select, "epoll")',
         '            EpollPoller() if False and selector is None and hasattr(select, "epoll")'),
    ],
    "2-lean-connection": [
        ("rawproxy/connect.py",
         "        if events != EVENT_WRITE or not self._loop.exact_write_events:",
         "        if True:  # lever off: always ask SO_ERROR and the peer name"),
        ("rawproxy/netio.py",
         '_NONBLOCKING_STREAM = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)',
         "_NONBLOCKING_STREAM = socket.SOCK_STREAM  # lever off: an ioctl per target socket"),
        ("rawproxy/netio.py",
         "    if not _NODELAY_INHERITED:",
         "    if True:  # lever off: a setsockopt per client"),
        ("rawproxy/session.py",
         "            if relay.is_last_to_end(flow):",
         "            if False and relay.is_last_to_end(flow):  # lever off: a shutdown each way"),
    ],
    "3-fused-steady-state": [
        ("rawproxy/session.py",
         "            self._steady = True",
         "            self._steady = False  # lever off: no fused steady state"),
        ("rawproxy/session.py",
         "        self._steady = steady  # with no FIN yet, _settle skips this call while true",
         "        self._steady = False  # lever off: no fused steady state"),
    ],
    "4-access-log": [
        ("rawproxy/accesslog.py",
         "    sinks = _direct_sinks()",
         "    sinks = None  # lever off: every line through logging"),
    ],
    "5-fused-ends": [
        ("rawproxy/movers.py",
         "_ALSO_TAKEN = EVENT_WRITE",
         "_ALSO_TAKEN = 0  # lever off: EVENT_READ alone takes the fast path"),
        ("rawproxy/movers.py",
         "        if relay is None or (stored is not None and stored.held):"
         "  # not the steady state's FIN",
         "        if True:  # lever off: every FIN by the reference continuation"),
        ("rawproxy/session.py",
         "        steady = not (up_eof and down_eof) and (client_mask =="
         " (0 if up_eof else EVENT_READ)",
         "        steady = not (up_eof or down_eof) and (client_mask =="
         " (0 if up_eof else EVENT_READ)  # lever off: no half-open steady state"),
    ],
    "6-less-garbage": [
        ("rawproxy/loop.py",
         "            self.callback = _cancelled",
         "            pass  # lever off: a cancelled timer keeps its callback's objects"),
        ("rawproxy/relay.py",
         "        self.stored: Optional[B] = None",
         "        self.stored: Optional[B] = pool.new_buffer()  # lever off: a buffer each way"),
        ("rawproxy/connect.py",
         "        if (timeouts is not None and self._timer is None and not self._addresses",
         "        if (False and timeouts is not None and self._timer is None  # lever off"),
        ("rawproxy/movers.py",
         "            self._ctx.half_open.arm(self)",
         "            self._arm_inactivity_timer()  # lever off: a heap timer per half-open pair"),
        ("rawproxy/session.py",
         "                self._ctx.half_open.arm(self)",
         "                self._arm_inactivity_timer()  # lever off: a heap timer"),
        ("rawproxy/netio.py",
         "        sock = StreamSocket(family, _NONBLOCKING_STREAM, 0)",
         "        sock = socket.socket(family, _NONBLOCKING_STREAM, 0)  # lever off"),
        ("rawproxy/listeners.py",
         "                    client = netio.StreamSocket(listener.family,"
         " socket.SOCK_STREAM, 0, fd)",
         "                    client = socket.socket(listener.family, socket.SOCK_STREAM, 0, fd)"
         "  # lever off"),
    ],
    "7-connect-at-once": [
        ("rawproxy/session.py",
         "                                    at_once=True)",
         "                                    at_once=False)  # lever off: always wait for write"),
    ],
}


def patch_for(switches: list[Switch], root: Path = ROOT) -> str:
    """The unified diff that turns ``switches`` off in the tree at ``root``."""
    by_file: dict[str, list[tuple[str, str]]] = {}
    for path, now, off in switches:
        by_file.setdefault(path, []).append((now, off))
    out: list[str] = []
    for path in sorted(by_file):
        before = (root / path).read_text().splitlines(keepends=True)
        after = list(before)
        for now, off in by_file[path]:
            hits = [i for i, line in enumerate(before) if line.rstrip("\n") == now]
            if len(hits) != 1:
                raise SystemExit(f"{path}: {len(hits)} lines are {now.strip()!r} (need 1)")
            after[hits[0]] = off + "\n"
        out.extend(difflib.unified_diff(before, after, f"a/{path}", f"b/{path}"))
    return "".join(out)


def main() -> int:
    for name, switches in LEVERS.items():
        (PATCHES / f"{name}.patch").write_text(patch_for(switches))
    print(f"wrote {len(LEVERS)} patches in {PATCHES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
