"""JSON text in, plain Python values out, and JSON values back into short
one-line text for messages.  Knows nothing of what a config means.

* :func:`load` takes ``str`` or ``bytes`` (UTF-8, a leading byte-order mark
  ignored) and returns the parsed value or raises :class:`JSONTextError`,
  whose ``str()`` says what is wrong and where (line and column) on one
  line.  ``NaN``/``Infinity`` literals are not JSON here; nesting too deep
  for the parser is an error, not a ``RecursionError``.
* An object that repeats a key comes back as :class:`ObjectWithDuplicateKey`
  (the last value of each key, as ``json`` keeps it), so the caller can
  report the duplicate with the object's path, which only it knows.
* :func:`render` shows any value :func:`load` returns as JSON on one
  printable line of at most :data:`MAX_RENDERED` characters.  It stops
  producing text at that length, so a value nested a million deep costs
  (in time and in stack) no more than a short one.

Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator, NoReturn, Union

__all__ = ["MAX_RENDERED", "JSONTextError", "ObjectWithDuplicateKey",
           "describe", "load", "render"]

MAX_RENDERED = 60

# Finds the first NaN/Infinity literal outside strings; used only to say
# where one is, after the parser already met it.
_STRING_OR_CONSTANT = re.compile(r'"(?:[^"\\]|\\.)*"|NaN|-?Infinity', re.DOTALL)


class JSONTextError(Exception):
    """Not JSON text; ``str()`` is one line saying why and where."""


class ObjectWithDuplicateKey(dict[str, Any]):
    """A JSON object that repeated ``duplicate_key``; reported where used."""

    def __init__(self, pairs: list[tuple[str, Any]], duplicate_key: str) -> None:
        super().__init__(pairs)
        self.duplicate_key = duplicate_key


class _NonFiniteLiteral(Exception):
    """Internal: the parser met NaN, Infinity or -Infinity."""


def load(text: Union[str, bytes]) -> object:
    """The JSON value of ``text``; raises :class:`JSONTextError`."""
    return _parse(_decode(text))


def _decode(text: Union[str, bytes]) -> str:
    if isinstance(text, str):
        return text[1:] if text.startswith("\ufeff") else text
    try:
        return text.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = text.count(b"\n", 0, exc.start) + 1
        column = exc.start - (text.rfind(b"\n", 0, exc.start) + 1) + 1
        raise JSONTextError(f"not UTF-8 text: byte 0x{text[exc.start]:02x} "
                            f"at line {line} column {column}") from None


def _parse(text: str) -> object:
    try:
        return json.loads(text, object_pairs_hook=_object_from_pairs,
                          parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise JSONTextError(f"invalid JSON at line {exc.lineno} column "
                            f"{exc.colno}: {exc.msg}") from None
    except _NonFiniteLiteral as exc:
        raise JSONTextError(_constant_message(text, str(exc))) from None
    except RecursionError:
        raise JSONTextError("invalid JSON: nested too deeply") from None
    except ValueError as exc:
        # Integers beyond sys.get_int_max_str_digits() (Python 3.11+); the
        # advice after the colon is about Python, not the document.
        raise JSONTextError(f"invalid JSON: {str(exc).split(':')[0]}") from None


def _object_from_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return ObjectWithDuplicateKey(pairs, key)
        seen.add(key)
    raise AssertionError("unreachable: fewer keys than pairs")


def _reject_constant(literal: str) -> NoReturn:
    raise _NonFiniteLiteral(literal)


def _constant_message(text: str, literal: str) -> str:
    for match in _STRING_OR_CONSTANT.finditer(text):
        if not match.group().startswith('"'):
            pos = match.start()
            line = text.count("\n", 0, pos) + 1
            column = pos - (text.rfind("\n", 0, pos) + 1) + 1
            return (f"invalid JSON at line {line} column {column}: "
                    f"{match.group()} is not a number in JSON")
    return f"invalid JSON: {literal} is not a number in JSON"


# --- Values back into message text --------------------------------------------

def render(value: object) -> str:
    """``value`` as JSON on one printable line, shortened when long."""
    text = ""
    for piece in _pieces(value):
        text += "".join(c if c.isprintable() else _escape(c) for c in piece)
        if len(text) > MAX_RENDERED:
            return text[:MAX_RENDERED - 3] + "..."
    return text


def _pieces(value: object) -> Iterator[str]:
    """``json.dumps(value)`` in pieces, made as they are consumed.

    Every level of nesting yields its bracket before going deeper, so a
    consumer that stops after N characters has entered at most N levels
    (``json.dumps`` itself would recurse through all of them)."""
    if isinstance(value, list):
        yield "["
        for index, item in enumerate(value):
            if index:
                yield ", "
            yield from _pieces(item)
        yield "]"
    elif isinstance(value, dict):
        yield "{"
        for index, (key, item) in enumerate(value.items()):
            yield f"{', ' if index else ''}{json.dumps(key, ensure_ascii=False)}: "
            yield from _pieces(item)
        yield "}"
    else:
        yield json.dumps(value, ensure_ascii=False)


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def describe(value: object) -> str:
    """Short description for "must be X, not ..." messages."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an empty list" if not value else "a list"
    return render(value)
