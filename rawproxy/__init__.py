"""rawproxy: a configurable raw TCP proxy and load balancer.

Standard library only, CPython 3.9+.  The package is layered so that
dependencies point toward pure code::

    cli -> server -> session -> relay -> ringbuf
             |          |
             |          +-> netio (every socket call, errors classified once)
             +-> router (port -> app, weighted choice, passive health)
             +-> resolver (DNS off the loop, cached)
             +-> loop (selector, fd -> handler table, timers, signals)
    config (pure: JSON -> validated immutable objects)

Nothing imports ``cli``; nothing runs at import time.
"""

__version__ = "0.1.0"
