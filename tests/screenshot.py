"""``make screenshot``: the status page pictures in README, made for real.

Starts local echo backends, rawproxy on three apps (one with a dead target
it keeps trying, one with a dead target under a health check), traffic
that rises and falls for a while so the sparklines have a shape, a few
connections held open, then headless Chromium (``tests/browser.py``) on the
admin endpoint: one picture of a wide window and one of a phone.  Only
loopback is used; everything started is stopped at the end.
"""

from __future__ import annotations

import argparse
import math
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.browser import PHONE, WIDE, BrowserMissing, set_viewport, start_chromium
from tests.support import (HOST, Backend, ProxyFactory, connect, dead_port, recv_until_eof,
                           wait_until)

TRAFFIC_S = 40.0


def _traffic(ports: dict[str, list[int]], stop: threading.Event) -> None:
    """Connections at a rate that swells and ebbs, sizes that vary."""
    started = time.monotonic()
    turn = 0
    while not stop.is_set():
        elapsed = time.monotonic() - started
        per_turn = 1 + int(3 * (1 + math.sin(elapsed / 4)))
        for index in range(per_turn):
            turn += 1
            app = ("web", "web", "api", "cache")[turn % 4]
            app_ports = ports[app]
            payload = b"x" * (2000 + 40000 * (turn % 7))
            try:
                with connect(app_ports[turn % len(app_ports)]) as sock:
                    sock.sendall(payload)
                    sock.shutdown(socket.SHUT_WR)
                    recv_until_eof(sock)
            except OSError:
                pass
        stop.wait(0.1)


def _admin_port(line: str) -> int:
    return int(line.rsplit(":", 1)[1].strip("/"))


def make_screenshots(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    backends = [Backend("echo") for _ in range(3)]
    stop = threading.Event()
    with tempfile.TemporaryDirectory() as scratch:
        factory = ProxyFactory(Path(scratch))
        held: list[socket.socket] = []
        try:
            proxy, ports = factory.start([
                {"Name": "web", "Ports": 2, "Targets": [
                    backends[0].address, {"Address": backends[1].address, "Weight": 2},
                    {"Address": f"{HOST}:{dead_port()}", "Weight": 1}]},
                {"Name": "api", "Ports": 1, "Targets": [backends[2].address]},
                {"Name": "cache", "Ports": 1, "Targets": [backends[2].address,
                                                          f"{HOST}:{dead_port()}"],
                 "HealthCheck": {"Interval": 1, "Timeout": 0.5}},
            ], "--admin", f"{HOST}:0")
            port = _admin_port(proxy.wait_for_line(r"admin endpoint on http://"))
            for app in ("web", "web", "api"):
                sock = connect(ports[app][0])
                held.append(sock)
            worker = threading.Thread(target=_traffic, args=(ports, stop), daemon=True)
            worker.start()
            driver = start_chromium(WIDE)
            try:
                driver.get(f"http://{HOST}:{port}/")
                wait_until(lambda: int(driver.execute_script(
                    "return document.body.dataset.updates")) >= TRAFFIC_S,
                    timeout_s=TRAFFIC_S * 3, interval_s=0.5, message="the page to fill")
                driver.save_screenshot(str(out / "status-page.png"))
                set_viewport(driver, PHONE)
                driver.execute_script("window.scrollTo(0, 0)")
                seen = int(driver.execute_script("return document.body.dataset.updates"))
                wait_until(lambda: int(driver.execute_script(
                    "return document.body.dataset.updates")) > seen + 1,
                    timeout_s=10, message="a refresh at phone size")
                driver.save_screenshot(str(out / "status-page-phone.png"))
            finally:
                driver.quit()
        finally:
            stop.set()
            for sock in held:
                sock.close()
            factory.close()
            for backend in backends:
                backend.close()
    print(f"wrote {out / 'status-page.png'} and {out / 'status-page-phone.png'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("docs"),
                        help="where the PNG files go (default: docs)")
    args = parser.parse_args()
    try:
        make_screenshots(args.out)
    except BrowserMissing as exc:
        print(f"screenshot: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
