"""The probe's command line with stop signals sent to itself at chosen moments.

    python -m tests.probe.interrupt_driver RECORD [--ignore-sigint]
        --at SEAM:SIGNAL [--at SEAM:SIGNAL ...] -- PROBE ARGUMENTS

Each SEAM is a point of a local run (below); the first time the run gets
there, the driver sends SIGNAL (INT, TERM, HUP) to its own pid, so the
handler runs right there, at the next bytecode.  RECORD gets one JSON line
per child process the moment it exists ({"pid", "argv"}) and one per signal
sent ({"signal", "seam", "at"}: time.monotonic(), comparable across
processes on Linux).  ``--ignore-sigint`` starts with SIGINT ignored, as a
process inherits it from ``cmd &`` in a script.  The exit status is the
probe's.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable

from probe import cli, echo, local, scenario

# seam -> (object, attribute, which call fires it (1 = the first), before or after it)
SEAMS: dict[str, tuple[Any, str, int, str]] = {
    "load": (cli, "load", 1, "before"),                       # reading the config
    "echo": (echo.EchoServer, "add", 1, "before"),            # starting the backends
    "spawn": (subprocess.Popen, "_execute_child", 1, "after"),  # inside Popen, child running
    "ready": (local.ProxyProcess, "wait_ready", 1, "before"),   # waiting for "ready:"
    "checks": (scenario, "run_checks", 1, "before"),          # phase 1
    "phase2": (scenario, "run_checks", 2, "before"),
    "close": (local.LocalEnv, "close", 1, "before"),          # between finally: and close()
    "echo-close": (echo.EchoServer, "close", 1, "before"),    # inside close(), shielded
    "stop": (local.ProxyProcess, "stop", 1, "before"),
    "report": (cli, "to_json", 1, "before"),                  # all stopped, report not out
}


def _record(path: str, entry: dict[str, Any]) -> None:
    with open(path, "a") as out:
        out.write(json.dumps(entry) + "\n")


def _hook(record: str, owner: Any, name: str,
          plan: dict[int, list[tuple[str, int, str]]]) -> None:
    original: Callable[..., Any] = getattr(owner, name)
    calls = [0]

    def fire(when: str) -> None:
        for seam, signum, at in plan.get(calls[0], []):
            if at == when:
                _record(record, {"signal": signum, "seam": seam, "at": time.monotonic()})
                os.kill(os.getpid(), signum)

    @functools.wraps(original)
    def hooked(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        fire("before")
        result = original(*args, **kwargs)
        if name == "_execute_child":
            child = args[0]
            _record(record, {"pid": child.pid, "argv": [str(a) for a in child.args]})
        fire("after")
        return result

    setattr(owner, name, hooked)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("record")
    parser.add_argument("--at", action="append", default=[], metavar="SEAM:SIGNAL")
    parser.add_argument("--ignore-sigint", action="store_true")
    split = sys.argv.index("--")
    args = parser.parse_args(sys.argv[1:split])
    plans: dict[tuple[Any, str], dict[int, list[tuple[str, int, str]]]] = {}
    for item in args.at:
        seam, _, name = item.partition(":")
        owner, attribute, call, when = SEAMS[seam]
        signum = int(getattr(signal, f"SIG{name}"))
        plans.setdefault((owner, attribute), {}).setdefault(call, []).append(
            (seam, signum, when))
    plans.setdefault((subprocess.Popen, "_execute_child"), {})   # always record children
    for (owner, attribute), plan in plans.items():
        _hook(args.record, owner, attribute, plan)
    if args.ignore_sigint:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return cli.main(sys.argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())
