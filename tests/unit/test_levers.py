"""benchmarks/levers/: each patch switches one of issue #17's levers off in
today's code (``sh benchmarks/levers.sh --ablate``).  A patch that no longer
applies would silently measure nothing: this says so at once.  The patches
are made by ``python -m benchmarks.lever_switches`` from its table."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks.lever_switches import LEVERS, patch_for

REPO = Path(__file__).resolve().parents[2]
PATCHES = sorted((REPO / "benchmarks" / "levers").glob("*.patch"))


def test_there_is_a_patch_per_lever() -> None:
    assert [p.stem for p in PATCHES] == ["1-reactor", "2-lean-connection",
                                        "3-fused-steady-state", "4-access-log",
                                        "5-fused-ends", "6-less-garbage", "7-connect-at-once"]
    assert [p.stem for p in PATCHES] == list(LEVERS)


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.stem)
def test_each_patch_is_what_its_switches_make_of_the_code_as_it_is(patch: Path) -> None:
    # A line named in benchmarks/lever_switches.py that moved or changed
    # fails here (SystemExit), and a patch edited by hand differs.
    assert patch.read_text() == patch_for(LEVERS[patch.stem])


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(),
                    reason="needs git and a git checkout")
@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.stem)
def test_each_lever_patch_applies_to_the_code_as_it_is(patch: Path) -> None:
    done = subprocess.run(["git", "apply", "--check", str(patch)], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    touched = [line for line in patch.read_text().splitlines() if line.startswith("+") and
               not line.startswith("+++")]
    assert touched and all("lever off" in line or "False" in line for line in touched), touched
