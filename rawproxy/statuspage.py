"""The status page for people (``GET /`` on the admin endpoint), and the
sign-in page a browser gets with the 401 when ``--admin-token-file`` is set.

Both are self-contained HTML files beside this module -- inline CSS and
script, nothing loaded from anywhere else, so they work offline and under a
strict Content-Security-Policy -- kept as files so an editor sees HTML, and
read through the package loader (``pkgutil.get_data``) so they are found in
a checkout, an installed wheel and the zipapp alike.

The page holds no data: its script fetches ``config`` and ``metrics`` (the
same JSON and Prometheus text any client gets) every second, sums the
metrics over the ``worker`` label (so one process and the ``--workers``
supervisor look the same), computes rates from successive samples and keeps
the last five minutes of them for the sparklines.  With a token it sends
``Authorization: Bearer`` from the tab's sessionStorage.
"""

from __future__ import annotations

import pkgutil

PAGE_FILE = "statuspage.html"
SIGNIN_FILE = "signin.html"


def _load(name: str) -> bytes:
    data = pkgutil.get_data(__package__ or "rawproxy", name)
    if data is None:  # a loader that cannot read resources
        raise FileNotFoundError(f"rawproxy/{name} is missing from this installation")
    return data


def load_page() -> bytes:
    return _load(PAGE_FILE)


def load_signin() -> bytes:
    return _load(SIGNIN_FILE)
