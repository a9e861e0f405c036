"""benchmarks/levers/: each patch switches one of issue #17's levers off in
today's code (``sh benchmarks/levers.sh --ablate``).  A patch that no longer
applies would silently measure nothing: this says so at once."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PATCHES = sorted((REPO / "benchmarks" / "levers").glob("*.patch"))


def test_there_is_a_patch_per_lever() -> None:
    assert [p.stem for p in PATCHES] == ["1-reactor", "2-lean-connection",
                                        "3-fused-steady-state", "4-access-log",
                                        "5-fused-ends"]


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
