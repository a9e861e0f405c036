"""The ``--workers`` supervisor's admin endpoint: every worker's answer, merged.

Each worker renders its own exposition (``metrics.render``) with a
``worker="N"`` label on every sample; the supervisor merges them so that a
scrape sees each family once, with the samples of every worker under it.
``/config`` lists each worker's view (null for one that did not answer).
"""

from __future__ import annotations

import json
from typing import Callable, Optional

from .admin import AdminHandlers, Response
from .control import Answers

# Asks every ready worker a question; calls back with the answers by worker.
AskAll = Callable[[str, Callable[[Answers], None]], None]


def merge_expositions(texts: list[str]) -> str:
    """One exposition from several: each family's HELP/TYPE once, then the
    samples of every input (they differ by their ``worker`` label)."""
    order: list[str] = []
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for text in texts:
        family = ""
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split(" ", 3)[2]
                if family not in headers:
                    order.append(family)
                    headers[family] = []
                    samples[family] = []
                if len(headers[family]) < 2 and line not in headers[family]:
                    headers[family].append(line)
            elif line and family:
                samples[family].append(line)
    lines: list[str] = []
    for family in order:
        lines.extend(headers[family])
        lines.extend(samples[family])
    return "\n".join(lines) + "\n" if lines else ""


class SupervisorViews(AdminHandlers):
    """``/metrics`` and ``/config`` ask every worker at once (``ask_all``:
    one deadline for all) and answer with what came; ``/healthz`` is 503
    while no worker is ready."""

    def __init__(self, is_draining: Callable[[], bool], ready_count: Callable[[], int],
                 ask_all: AskAll) -> None:
        self._ready_count = ready_count
        self._ask_all = ask_all
        self._answers: Answers = []  # the workers' answers while a reply is built
        super().__init__(is_draining, self._merged_metrics, self._workers_view)

    def _merged_metrics(self) -> str:
        return merge_expositions([text for text in self._answers if text])

    def _workers_view(self) -> object:
        return {"Workers": [_json_or_none(text) for text in self._answers],
                "Draining": self._is_draining()}

    def respond(self, method: str, path: str) -> Response:
        response = super().respond(method, path)
        if response[0] == 200 and path.split("?", 1)[0] == "/healthz" \
                and not self._ready_count():
            return 503, "text/plain", b"no worker ready\n"
        return response

    def respond_async(self, method: str, path: str,
                      reply: Callable[[Response], None]) -> None:
        request = {"/metrics": "metrics", "/config": "config"}.get(path.split("?", 1)[0])
        if request is None or method not in ("GET", "HEAD"):
            reply(self.respond(method, path))
            return

        def answered(answers: Answers) -> None:
            self._answers = answers
            try:
                reply(self.respond(method, path))
            finally:
                self._answers = []

        self._ask_all(request, answered)


def _json_or_none(text: Optional[str]) -> object:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None
