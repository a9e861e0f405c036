"""What every session of a server shares: one object, handed to each session (no globals)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

from .connect import ConnectTimeouts
from .loop import EventLoop
from .pipes import PipePool
from .resolver import Resolver
from .ringbuf import BufferPool
from .timeouts import Timeouts
from .waitqueue import WaitQueues

if TYPE_CHECKING:  # both import this module
    from .autostart import Autostart
    from .session import Session


class SessionContext:
    """The loop, resolver, pools, queues and timeout tables of a server's sessions."""

    __slots__ = ("loop", "resolver", "pool", "pipes", "on_closed", "on_no_resources",
                 "queues", "machines", "half_open", "connect_timeouts")

    def __init__(self, loop: EventLoop, resolver: Resolver, pool: BufferPool,
                 on_closed: Callable[[Session[Any]], None],
                 half_open_timeout_s: float = 60.0,
                 pipes: Optional[PipePool] = None,
                 on_no_resources: Callable[[str], None] = lambda reason: None,
                 queues: Optional[WaitQueues] = None) -> None:
        # Sessions waiting for a slot (an app's Concurrency), by app.
        self.queues = (queues if queues is not None
                       else WaitQueues(loop.time, loop.call_later, loop.call_soon))
        self.on_no_resources = on_no_resources  # the server pauses accepting
        # Starts machines for apps with Machines (SPEC 10); the server sets it.
        self.machines: Optional[Autostart] = None
        self.loop = loop
        self.resolver = resolver
        self.pool = pool
        self.pipes = pipes  # set when relaying with splice
        self.on_closed = on_closed
        # HAProxy's client-fin/server-fin: once one direction has ended, a
        # connection with no bytes moving is closed after this long, so a
        # lost final FIN cannot pin it (and its descriptors) for ever.  All
        # of one length: timed in a table in arming order, not the heap.
        self.half_open: Timeouts[Session[Any]] = Timeouts(loop, half_open_timeout_s,
                                                          _check_idle)
        # The connects' timeouts, a table per ConnectTimeout.
        self.connect_timeouts = ConnectTimeouts(loop)


def _check_idle(session: Session[Any]) -> None:
    session.check_idle()
