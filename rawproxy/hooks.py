"""Calling a machine hook (SPEC 10) off the loop thread.

A :class:`~rawproxy.configtypes.Hook` is an HTTP POST (``URL``: JSON body
``{"app": ..., "target": ...}``, ``{app}``/``{target}`` in the URL replaced,
URL-quoted; any 2xx is "accepted") or a command (``Command``: run without a
shell, ``{app}``/``{target}`` replaced in each argument; exit 0 is
"accepted").  Either may block for as long as the machines API likes, so
each call runs on a thread of its own (hook calls are rare: one per start
or stop of a target) and its verdict comes back to the loop through
``call_soon_threadsafe``, as the resolver's answers do.  A call that takes
longer than ``timeout_s`` fails: the socket times out, or the command is
killed (and reaped).  The verdict is ``(accepted, detail)``; ``detail`` says
why in a log line (``HTTP 500``, ``exit status 1``, ``timed out after 2s``).
"""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import urllib.parse
from typing import Callable

from .configtypes import Hook

__all__ = ["HookRunner", "OnHookDone", "call_hook", "expand"]

OnHookDone = Callable[[bool, str], None]


def expand(text: str, app: str, target: str, quote: bool) -> str:
    """``{app}`` and ``{target}`` replaced (URL-quoted when ``quote``)."""
    if quote:
        app, target = urllib.parse.quote(app, safe=""), urllib.parse.quote(target, safe="")
    return text.replace("{app}", app).replace("{target}", target)


def call_hook(hook: Hook, app: str, target: str, timeout_s: float) -> tuple[bool, str]:
    """Call ``hook`` now, blocking (on a hook thread): (accepted, detail)."""
    try:
        if hook.url is not None:
            return _post(expand(hook.url, app, target, quote=True), app, target, timeout_s)
        return _run([expand(arg, app, target, quote=False) for arg in hook.command], timeout_s)
    except Exception as exc:  # any failure of a hook is its verdict, never the loop's
        return False, str(exc) or type(exc).__name__


def _post(url: str, app: str, target: str, timeout_s: float) -> tuple[bool, str]:
    parts = urllib.parse.urlsplit(url)
    body = json.dumps({"app": app, "target": target}).encode()
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=timeout_s)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read(65536)
        ok = 200 <= response.status < 300
        return ok, f"HTTP {response.status}"
    except OSError as exc:
        if isinstance(exc, TimeoutError) or "timed out" in str(exc):
            return False, f"timed out after {timeout_s:g}s"
        return False, exc.strerror or str(exc) or type(exc).__name__
    finally:
        conn.close()


def _run(argv: list[str], timeout_s: float) -> tuple[bool, str]:
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, close_fds=True)
    except OSError as exc:
        return False, f"{argv[0]}: {exc.strerror or exc}"
    try:
        status = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()  # reaped: no zombie
        return False, f"timed out after {timeout_s:g}s (killed)"
    return status == 0, f"exit status {status}"


class HookRunner:
    """Runs hooks on threads; verdicts are delivered by ``call_soon_threadsafe``."""

    def __init__(self, call_soon_threadsafe: Callable[[Callable[[], None]], None]) -> None:
        self._post = call_soon_threadsafe

    def run(self, hook: Hook, app: str, target: str, timeout_s: float,
            on_done: OnHookDone) -> None:
        def work() -> None:
            ok, detail = call_hook(hook, app, target, timeout_s)
            try:
                self._post(lambda: on_done(ok, detail))
            except Exception:
                pass  # the loop closed meanwhile (shutdown): nobody waits for it

        try:
            threading.Thread(target=work, name="rawproxy-hook", daemon=True).start()
        except RuntimeError as exc:  # no thread to be had (a process or memory limit)
            # Delivered later like any verdict: the caller's state is set up by then.
            reason = f"cannot start a thread for the hook: {exc}"
            self._post(lambda: on_done(False, reason))
