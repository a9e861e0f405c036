"""Issue #18 (11): a config nested deeply enough must still give a one-line
ConfigError (exit 2 from ``--check``), never a RecursionError.

The dangerous depths are a narrow band just under the JSON decoder's own
limit: deep enough that showing the value in a message recursed too far,
shallow enough to parse.  Where that band lies depends on the Python
version and the stack above the parser, so the in-process test sweeps a
range around the recursion limit and the command-line test first finds the
deepest document that still parses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from rawproxy.config import ConfigError, parse_config

LAUNCHER = Path(__file__).resolve().parents[2] / "rawproxy.py"


def nested_lists(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_objects(depth: int) -> str:
    return '{"x": ' * depth + "1" + "}" * depth


def ok_app(**raw_values: str) -> str:
    """An app whose keys hold raw JSON text (for values json.dumps cannot nest)."""
    fields = {"Name": '"a"', "Ports": "[5001]", "Targets": '["h:1"]', **raw_values}
    return '{"Apps": [{' + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}]}"


PLACES: dict[str, Callable[[str], str]] = {
    "ConnectTimeout": lambda value: ok_app(ConnectTimeout=value),
    "Ports[0]": lambda value: ok_app(Ports=f"[{value}]"),
    "HealthCheck Interval": lambda value: ok_app(HealthCheck=f'{{"Interval": {value}}}'),
    "Targets[0] Weight": lambda value: ok_app(
        Targets=f'[{{"Address": "h:1", "Weight": {value}}}]'),
}


@pytest.mark.parametrize("nest", [nested_lists, nested_objects])
@pytest.mark.parametrize("place", sorted(PLACES))
def test_any_depth_gives_one_line_error(place: str, nest: Callable[[int], str]) -> None:
    limit = sys.getrecursionlimit()
    for depth in range(max(1, limit - 300), limit + 30):
        text = PLACES[place](nest(depth))
        with pytest.raises(ConfigError) as info:
            parse_config(text, "deep.json")
        message = str(info.value)
        assert message.startswith("deep.json: ") and message.isprintable(), depth
        assert "is not" in message or "nested too deeply" in message, message


def test_very_deep_brackets_in_a_value() -> None:
    text = ok_app(ConnectTimeout="[" * 100_000)
    with pytest.raises(ConfigError, match=r"^deep\.json: invalid JSON: nested too deeply$"):
        parse_config(text, "deep.json")


def test_deep_value_message_is_shortened() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(ok_app(ConnectTimeout=nested_lists(500)), "deep.json")
    assert str(info.value) == (
        'deep.json: Apps[0] "a" ConnectTimeout: ' + "[" * 57 + "... is not a duration "
        "(seconds, a number > 0 and at most 604800)")


# --- python3 rawproxy.py --check ---------------------------------------------

def check(path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path.write_text(text)
    return subprocess.run([sys.executable, str(LAUNCHER), "--check", "-c", str(path)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60)


def test_check_exits_2_with_one_line_at_every_depth(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"

    def document(depth: int) -> str:
        return ok_app(ConnectTimeout=nested_lists(depth))

    # Find the deepest document the decoder accepts (it says "nested too
    # deeply" beyond): doubling, then bisection.  That depth and the few
    # below it are where showing the value needs the most stack.
    def too_deep(depth: int) -> bool:
        return "nested too deeply" in check(path, document(depth)).stderr

    far_too_deep = check(path, ok_app(ConnectTimeout="[" * 100_000))
    assert (far_too_deep.returncode, far_too_deep.stderr) == (
        2, f"rawproxy: error: {path}: invalid JSON: nested too deeply\n")

    shallow, deep = 1, 500
    while not too_deep(deep):
        shallow, deep = deep, deep * 2
        assert deep < 10_000_000
    while deep - shallow > 1:
        middle = (shallow + deep) // 2
        if too_deep(middle):
            deep = middle
        else:
            shallow = middle
    for depth in range(max(1, shallow - 3), shallow + 1):
        result = check(path, document(depth))
        assert result.returncode == 2, (depth, result.stderr[-300:])
        assert "Traceback" not in result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"rawproxy: error: {path}: "), lines
        assert "is not a duration" in lines[0]
        assert result.stdout == ""
