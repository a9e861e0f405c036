"""The control channel between the ``--workers`` supervisor and each worker.

One socketpair per worker carries frames both ways: a 4-byte big-endian
length, then UTF-8 text ``<id>\\n<body>``.

* A question has an id from 1 up (``1\\nmetrics``, ``2\\nconfig``); the worker
  answers with a frame of the same id.  Ids let the supervisor drop an
  answer that comes after it stopped waiting, instead of taking it for the
  answer to its next question.
* Id 0 marks an event, never answered.  Supervisor to worker: ``stop``
  (drain; a second one: exit at once), ``reload``, and ``health [app,
  address, down_until]`` from a sibling.  Worker to supervisor: ``ready``
  (its listeners are bound), ``health [...]`` when its passive health marks
  a target down or up again (edges only), and ``accepted <config>`` after
  a reload it accepted, the config as JSON ``parse_config`` reads back
  (``config.app_view``), for a worker restarted later.  ``down_until`` is on
  the monotonic clock, which all processes of a host share.

The supervisor's end is :class:`WorkerLink` (with :func:`ask_all`, one
question to every worker under one deadline); the worker's is
:class:`WorkerControl`, with :class:`SharingReloader` to report what it
accepts.  Both ends run the channel on their own event loop and never
block it: a frame the socket does not take at once waits, whole, in an
outbox.  (A blocking send with a timeout could give up mid-frame and leave
the stream out of step for good.)  A length no peer sends closes the
channel; so does EOF, which a worker takes as its supervisor's death: it
drains and exits.

The frames travel on a :class:`~rawproxy.channel.Channel`.  One question,
``listeners``, is answered with descriptors: the worker's listening
sockets, which the supervisor hands to its successor on an upgrade.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
from typing import Callable, Optional

from .channel import MAX_FRAME_BYTES as MAX_FRAME_BYTES
from .channel import Channel as Channel
from .channel import encode_frame as encode_frame
from .channel import take_frame as take_frame
from .config import Config, FileConfigSource, app_view
from .loop import EventLoop, Timer
from .reloader import Reloader
from .server import Server

log = logging.getLogger("rawproxy.control")

EVENT_ID = "0"


def encode_health(app: str, address: str, down_until: float) -> str:
    return "health " + json.dumps([app, address, down_until])


def decode_health(text: str) -> Optional[tuple[str, str, float]]:
    kind, _, payload = text.partition(" ")
    try:
        app, address, down_until = json.loads(payload)
        if kind == "health" and isinstance(app, str) and isinstance(address, str):
            return app, address, float(down_until)
    except (ValueError, TypeError):
        pass
    return None


def config_text(config: Config) -> str:
    """``config`` as the JSON text that ``parse_config`` reads back."""
    return json.dumps({"Apps": [app_view(app) for app in config.apps]})


Answers = list[Optional[str]]  # by position; None: no answer in time
TakeFds = Callable[[list[int]], None]  # descriptors an answer carried, now the taker's


class WorkerLink:
    """The supervisor's end of one worker's channel: questions with ids, whose
    answers go to whoever asked, and events both ways."""

    __slots__ = ("channel", "_on_event", "_next_id", "_asks")

    def __init__(self, loop: EventLoop, sock: socket.socket, on_event: Callable[[str], None],
                 on_closed: Callable[[], None]) -> None:
        self._on_event = on_event
        self._next_id = 0
        # request id -> (who gets the answer, who takes its descriptors)
        self._asks: dict[str, tuple[Callable[[Optional[str]], None], Optional[TakeFds]]] = {}
        self.channel = Channel(loop, sock, self._on_frame, on_closed)

    def ask(self, request: str, answer: Callable[[Optional[str]], None],
            take_fds: Optional[TakeFds] = None) -> Optional[str]:
        """Send a question, ``answer`` to get its answer (``take_fds`` the
        descriptors it carries, if any); its id, or None if unsent."""
        self._next_id += 1
        request_id = str(self._next_id)
        if not self.channel.send(f"{request_id}\n{request}"):
            return None
        self._asks[request_id] = (answer, take_fds)
        return request_id

    def forget(self, request_id: str) -> None:
        """Stop waiting: an answer that still comes is dropped."""
        self._asks.pop(request_id, None)

    def send_event(self, body: str) -> bool:
        return self.channel.send(f"{EVENT_ID}\n{body}")

    def _on_frame(self, frame: str) -> None:
        frame_id, _, body = frame.partition("\n")
        if frame_id == EVENT_ID:
            self._on_event(body)
            return
        asked = self._asks.pop(frame_id, None)
        if asked is not None:  # else a late answer: the channel closes its descriptors
            answer, take_fds = asked
            if take_fds is not None:
                take_fds(self.channel.take_fds())
            answer(body)

    def close(self) -> None:
        """Close the channel; whoever still waits gets None (the worker is gone)."""
        self.channel.close()
        asks, self._asks = self._asks, {}
        for answer, _ in asks.values():
            answer(None)


class _Gather:
    """One question to several workers, delivered once: when all have
    answered (or exited) or at the deadline, whichever comes first."""

    __slots__ = ("answers", "waiting", "timer", "_deliver")

    def __init__(self, count: int, deliver: Callable[[Answers], None]) -> None:
        self.answers: Answers = [None] * count
        self.waiting: dict[int, tuple[WorkerLink, str]] = {}  # position -> (link, request id)
        self.timer: Optional[Timer] = None
        self._deliver: Optional[Callable[[Answers], None]] = deliver

    def answer(self, position: int, text: Optional[str]) -> None:
        if self.waiting.pop(position, None) is not None:
            self.answers[position] = text
            if not self.waiting:
                self.finish()

    def finish(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for link, request_id in self.waiting.values():
            link.forget(request_id)
        self.waiting.clear()
        deliver, self._deliver = self._deliver, None
        if deliver is not None:
            deliver(self.answers)


def ask_all(loop: EventLoop, links: list[Optional[WorkerLink]], request: str,
            timeout_s: float, deliver: Callable[[Answers], None],
            take_fds: Optional[Callable[[int, list[int]], None]] = None) -> None:
    """Ask every link at once (None: a worker not to ask); ``deliver`` gets
    the answers by position once all have come or ``timeout_s`` has passed,
    whichever is first: a stuck worker costs one deadline, not one each.
    ``take_fds(position, fds)`` gets the descriptors an answer carries."""
    gather = _Gather(len(links), deliver)
    for position, link in enumerate(links):
        if link is not None:
            request_id = link.ask(request, functools.partial(gather.answer, position),
                                  None if take_fds is None
                                  else functools.partial(take_fds, position))
            if request_id is not None:
                gather.waiting[position] = (link, request_id)
    if gather.waiting:
        gather.timer = loop.call_later(timeout_s, gather.finish)
    else:
        gather.finish()


def collect_listeners(loop: EventLoop, links: list[Optional[WorkerLink]], extra_fds: list[int],
                      timeout_s: float,
                      deliver: Callable[[list[int], Optional[str]], None]) -> None:
    """For an upgrade: ask every link for its listening sockets; ``deliver``
    gets them all (``extra_fds`` last) and why not all came, if they did
    not.  The received descriptors are closed once ``deliver`` returns: the
    new process holds its own copies by then."""
    received: dict[int, list[int]] = {}

    def answered(answers: Answers) -> None:
        fds = [fd for index in sorted(received) for fd in received[index]]
        silent = [str(index) for index, link in enumerate(links)
                  if link is not None and answers[index] != str(len(received.get(index, [])))]
        try:
            deliver(fds + extra_fds, f"worker {', '.join(silent)} did not hand over its "
                    "sockets" if silent else None)
        finally:
            for fd in fds:
                os.close(fd)

    ask_all(loop, links, "listeners", timeout_s, answered,
            lambda index, fds: received.setdefault(index, []).extend(fds))


class WorkerControl:
    """The worker's end: answers the supervisor and takes its orders on the
    worker's own loop.  Under ``--workers`` a worker takes SIGTERM, SIGINT
    and SIGHUP from its supervisor only, as the ``stop`` and ``reload``
    events (see ``supervisor``).  ``listening`` gives the descriptors of its
    listening sockets, sent with the answer to ``listeners``."""

    def __init__(self, loop: EventLoop, sock: socket.socket, index: int, *,
                 metrics_text: Callable[[], str], config_view: Callable[[], object],
                 on_stop: Callable[[], None], on_reload: Callable[[], None],
                 on_orphaned: Callable[[], None],
                 on_shared_health: Callable[[str, str, float], None],
                 listening: Callable[[], list[int]] = list) -> None:
        self.index = index
        self._metrics_text = metrics_text
        self._config_view = config_view
        self._listening = listening
        self._orders = {"stop": on_stop, "reload": on_reload}
        self._on_shared_health = on_shared_health
        self._channel = Channel(loop, sock, self._on_frame, on_orphaned)

    def announce_ready(self) -> None:
        self._channel.send(f"{EVENT_ID}\nready")

    def share_health(self, app: str, address: str, down_until: float) -> None:
        """Tell the supervisor of a passive-health edge, for the other workers."""
        self._channel.send(f"{EVENT_ID}\n" + encode_health(app, address, down_until))

    def share_config(self, config: Config) -> None:
        """Tell the supervisor of a config this worker accepted."""
        self._channel.send(f"{EVENT_ID}\naccepted " + config_text(config))

    def _on_frame(self, frame: str) -> None:
        frame_id, _, body = frame.partition("\n")
        if frame_id == EVENT_ID:
            order = self._orders.get(body)
            if order is not None:
                order()
                return
            shared = decode_health(body)
            if shared is not None:
                self._on_shared_health(*shared)
            return
        if body == "metrics":
            answer = self._metrics_text()
        elif body == "config":
            answer = json.dumps(self._config_view())
        elif body == "listeners":
            fds = self._listening()
            if fds:  # a frame with descriptors; a count the supervisor can check
                self._channel.send(f"{frame_id}\n{len(fds)}", fds)
                return
            answer = "0"
        else:
            answer = ""
        self._channel.send(f"{frame_id}\n{answer}")

    def close(self) -> None:
        self._channel.close()


class SharingReloader(Reloader):
    """A worker's reloader: each config it accepts, on SIGHUP or ``--watch``,
    also goes to the supervisor, which starts any worker it restarts later
    with it -- not with the start-up config, nor with a file since rejected."""

    def __init__(self, loop: EventLoop, server: Server, source: FileConfigSource,
                 share: Callable[[Config], None]) -> None:
        super().__init__(loop, server, source)
        self._share = share

    def reload(self, trigger: str) -> bool:
        accepted = super().reload(trigger)
        if accepted:
            self._share(self._server.config)
        return accepted
