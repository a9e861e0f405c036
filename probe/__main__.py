"""``python3 -m probe``: see probe.cli."""

import sys


def _main() -> int:
    try:
        from probe.cli import main
        return main()
    except KeyboardInterrupt:
        # Ctrl-C while the modules load (before main() handles signals):
        # nothing was started yet.
        print("probe: interrupted", file=sys.stderr)
        return 130


raise SystemExit(_main())
