"""A shortened soak (about 20 s) as part of the test suite.

The runner is a subprocess in a session of its own, so that whatever it
started -- the proxy, the echo backends -- is killed with its process group
when the test ends, passed, failed or timed out.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

import pytest

from tests.soak.soak import print_table
from tests.support import REPO

SOAK_SECONDS = 20
RUNNER_TIMEOUT_S = 100


@pytest.mark.slow
def test_soak_keeps_every_invariant() -> None:
    with subprocess.Popen(
            [sys.executable, "-m", "tests.soak.soak", "--duration", str(SOAK_SECONDS), "--json"],
            cwd=str(REPO), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True) as runner:
        try:
            out, err = runner.communicate(timeout=RUNNER_TIMEOUT_S)
        finally:
            try:
                os.killpg(runner.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert out.strip(), f"the soak printed nothing (exit {runner.returncode}):\n{err}"
    summary = json.loads(out)
    table = io.StringIO()
    print_table(summary, table)
    assert summary["passed"] and runner.returncode == 0, table.getvalue() + err
    assert summary["backend_kills"] >= 3, table.getvalue()
    assert all(kind["completed"] for kind in summary["streams"].values()), table.getvalue()
