"""``python3 -m rawproxy``: the same as ``python3 rawproxy.py``."""

from .cli import main

raise SystemExit(main())
