"""``python -m tests.integration.reaper -- CMD...``: run CMD as a child subreaper.

An upgraded rawproxy is the child of the process it replaced; once that one
exits, the new one is re-parented to the nearest subreaper.  This is it:
every exit in the tree below it is reported on stderr, so a test can read
the exit status of a process it did not start itself::

    reaper: pid N started        (CMD)
    reaper: pid N exited C       (C: the exit status, -SIG if killed)

SIGTERM to the reaper kills everything still below it (SIGKILL), so a
test's cleanup leaves no process behind, whoever its parent had become;
the death of the test process that started it does the same.
The reaper exits once nothing is left below it.  Linux only (prctl).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found.extend(int(child) for child in task.read_text().split())
        except OSError:
            pass
    return found


def say(text: str) -> None:
    os.write(2, f"reaper: {text}\n".encode())


def main(argv: list[str]) -> int:
    command = argv[argv.index("--") + 1:] if "--" in argv else argv
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        say(f"prctl failed: errno {ctypes.get_errno()}")
        return 1
    killing = False

    def kill_all(signum: int, frame: object) -> None:
        nonlocal killing
        killing = True
        for pid in children(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, kill_all)
    # A test process killed outright (an interrupted run) cannot clean up:
    # its death is a SIGTERM here, so nothing below is left running.
    parent = os.getppid()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before the prctl took
        return 1
    child = subprocess.Popen(command, close_fds=False)  # what the test passed goes on down
    say(f"pid {child.pid} started")
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 0
        code = os.waitstatus_to_exitcode(status)
        if pid == child.pid:
            child.returncode = code  # reaped here: Popen must not wait for it again
        say(f"pid {pid} exited {code}")
        if killing:
            kill_all(signal.SIGTERM, None)  # orphans adopted since


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
