"""``pip install .`` (and so ``pipx install .``) gives working ``rawproxy`` and
``rawproxy-probe`` commands, and the zipapp carries the status page.

Offline: the wheel is built with the dev venv's setuptools
(``--no-build-isolation --no-index``, setuptools pinned in
requirements-dev.txt) from a copy of the checkout (the build writes
``build/`` and ``*.egg-info`` next to its sources, which must not land in the
shared tree), then installed with the dev venv's pip (``--python``) into a
bare venv made without pip, which is what keeps this test to a few seconds.
The commands then run from outside the checkout, so nothing is imported
from it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.support import REPO

pytestmark = pytest.mark.slow  # a wheel build and an install: several seconds

SOURCES = ("rawproxy", "probe", "setup.cfg", "pyproject.toml", "README.md")


def run(argv: list[str], cwd: Path, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(argv, cwd=str(cwd), env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=timeout_s)
    assert result.returncode == 0, f"{argv} exited {result.returncode}:\n{result.stdout}" \
                                   f"\n{result.stderr}"
    return result


def copy_checkout(dest: Path) -> None:
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, dest / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, dest / name)


def test_pip_install_gives_both_commands(tmp_path: Path) -> None:
    src, wheels, env_dir, elsewhere = (tmp_path / name for name in
                                       ("src", "wheels", "venv", "elsewhere"))
    for folder in (src, elsewhere):
        folder.mkdir()
    copy_checkout(src)
    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-index",
         "--no-deps", "--quiet", "-w", str(wheels), str(src)], cwd=tmp_path)
    (wheel,) = wheels.glob("rawproxy-*.whl")
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index",
         "--no-deps", "--quiet", str(wheel)], cwd=tmp_path)

    check = run([str(env_dir / "bin" / "rawproxy"), "--check", "-c", str(REPO / "config.json")],
                cwd=elsewhere)
    assert "3 apps, 12 ports, 7 targets" in check.stdout
    version = run([str(env_dir / "bin" / "rawproxy"), "--version"], cwd=elsewhere)
    assert version.stdout.startswith("rawproxy ")
    probe = run([str(env_dir / "bin" / "rawproxy-probe"), "--help"], cwd=elsewhere)
    assert "--config" in probe.stdout
    # The status page ships in the wheel, read from site-packages.
    page = run([str(python), "-c", "import rawproxy, rawproxy.statuspage as p; "
                "print(rawproxy.__file__); print(len(p.load_page()), len(p.load_signin()))"],
               cwd=elsewhere)
    where, sizes = page.stdout.split("\n")[:2]
    assert where.startswith(str(env_dir)) and all(int(n) > 1000 for n in sizes.split())


def test_the_zipapp_carries_the_status_page(tmp_path: Path) -> None:
    run(["make", "-s", "dist", f"DIST_DIR={tmp_path}"], cwd=REPO, timeout_s=60)
    pyz = tmp_path / "rawproxy.pyz"
    page = run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                "import rawproxy.statuspage as p; print(p.__file__); "
                "print(p.load_page()[:15].decode())", str(pyz)], cwd=tmp_path)
    where, start = page.stdout.split("\n")[:2]
    assert where.startswith(str(pyz)) and start == "<!doctype html>"
