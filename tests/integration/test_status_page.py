"""The status page (``GET /`` on the admin endpoint) in a real browser.

Headless Chromium (``tests/browser.py``) loads the page from a proxy
subprocess on loopback, and the tests read the rendered DOM: every app and
target with its state, the counts equal to what the proxy's own /metrics
says, and the counts moving after more traffic without a page reload.  The
page's numbers are read from ``data-value`` attributes (the raw numbers
behind the formatted text), the states from ``data-state`` and the words
shown.  Every wait is a condition polled with a deadline.

Without Chromium the tests skip with the reason, except under CI (CI=true),
where they fail: CI installs it (``.ci/run``).
"""

from __future__ import annotations

import json
import re
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import pytest

from tests.browser import PHONE, WIDE, BrowserMissing, set_viewport, skip_or_fail, start_chromium
from tests.support import (FIRST_PICK, HOST, Backend, ProxyFactory, ProxyProcess, admin_get,
                           connect, dead_port, recv_until_eof, wait_until)

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

pytestmark = pytest.mark.slow  # a browser start and several page refreshes

BackendFactory = Callable[..., Backend]
PAGE_WAIT_S = 15.0

# What the page shows, read in one go (elements are rebuilt every refresh,
# so no element is held across calls).
SNAPSHOT_JS = """
const number = (node) => node ? Number(node.dataset.value) : null;
const out = {updates: Number(document.body.dataset.updates),
             serving: document.getElementById("serving").dataset.state || "",
             servingText: document.getElementById("serving").textContent,
             reload: document.getElementById("reload").dataset.state || "",
             workers: document.getElementById("workers").textContent,
             banner: document.getElementById("banner").hidden ? "" :
                     document.getElementById("banner").textContent,
             totals: {}, apps: {}};
document.querySelectorAll("#totals .stat").forEach((stat) => {
  out.totals[stat.dataset.field] = number(stat.querySelector(".value"));
});
document.querySelectorAll("section.app").forEach((section) => {
  const app = {stats: {}, targets: {}, ports: section.querySelector(".ports").textContent,
               sparks: section.querySelectorAll("svg.spark polyline").length};
  section.querySelectorAll(".stat").forEach((stat) => {
    app.stats[stat.dataset.field] = number(stat.querySelector(".value"));
  });
  section.querySelectorAll("tr[data-target]").forEach((row) => {
    app.targets[row.dataset.target] = {
      state: row.dataset.state,
      badge: row.querySelector(".badge").textContent,
      attempts: number(row.querySelector("[data-field=attempts]")),
      failures: row.querySelector("[data-field=failures]").textContent};
  });
  out.apps[section.dataset.app] = app;
});
return out;
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    try:
        driver = start_chromium(WIDE)
    except BrowserMissing as exc:
        skip_or_fail(str(exc))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: WebDriver) -> Iterator[WebDriver]:
    yield browser
    # Stop the page polling a proxy that is going away.  (sessionStorage is
    # per origin, and every proxy has its own port: nothing carries over.)
    browser.get("about:blank")
    set_viewport(browser, WIDE)


def admin_port(proxy: ProxyProcess) -> int:
    line = proxy.wait_for_line(r"admin endpoint on http://")
    match = re.search(r":(\d+)/", line)
    assert match, line
    return int(match.group(1))



def metric(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{key}="{value}"' in line for key, value in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def echo(port: int, payload: bytes) -> None:
    with connect(port) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == payload


def snapshot(driver: WebDriver) -> dict[str, Any]:
    result = driver.execute_script(SNAPSHOT_JS)
    assert isinstance(result, dict)
    return result


def wait_for_page(driver: WebDriver, condition: Callable[[dict[str, Any]], bool],
                  message: str) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    def holds() -> bool:
        seen[:] = [snapshot(driver)]
        return condition(seen[0])

    try:
        wait_until(holds, timeout_s=PAGE_WAIT_S, interval_s=0.05, message=message)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the page showed {json.dumps(seen, indent=1)}") from None
    return seen[0]


def two_apps(live: Backend) -> tuple[list[dict[str, Any]], str, str]:
    """web: a live target and a dead one it keeps trying (connect failures);
    cache: a live and a dead target under a health check (steady states)."""
    dead_web = f"{HOST}:{dead_port()}"
    dead_cache = f"{HOST}:{dead_port()}"
    apps = [{"Name": "web", "Ports": 2, "Targets": [live.address,
                                                    {"Address": dead_web, "Weight": FIRST_PICK}]},
            {"Name": "cache", "Ports": 1, "Targets": [live.address, dead_cache],
             "HealthCheck": {"Interval": 0.2, "Timeout": 0.2}}]
    return apps, dead_web, dead_cache


def test_the_page_shows_every_app_and_target_and_follows_the_traffic(
        proxies: ProxyFactory, backend: BackendFactory, page: WebDriver) -> None:
    live = backend("echo")
    apps, dead_web, dead_cache = two_apps(live)
    proxy, ports = proxies.start(apps, "--admin", f"{HOST}:0")
    port = admin_port(proxy)
    for index in range(6):
        echo(ports["web"][index % 2], b"w" * 1000)
    for _ in range(3):
        echo(ports["cache"][0], b"c" * 500)
    status, metrics = admin_get(port, "/metrics")
    assert status == 200
    web_failures = metric(metrics, "rawproxy_connect_failures_total", app="web")
    assert web_failures >= 1  # FIRST_PICK: the dead target is tried first

    page.get(f"http://{HOST}:{port}/")
    shown = wait_for_page(page, lambda s: s["apps"].get("web", {}).get("stats", {}).get(
        "accepted") == 6 and s["apps"].get("cache", {}).get("targets", {}).get(
        dead_cache, {}).get("state") == "down", "the first traffic on the page")
    assert set(shown["apps"]) == {"web", "cache"}
    web, cache = shown["apps"]["web"], shown["apps"]["cache"]
    assert web["ports"] == f"ports {ports['web'][0]}, {ports['web'][1]}"
    assert cache["ports"] == f"port {ports['cache'][0]}"
    assert web["stats"] == {"active": 0, "accepted": 6, "bytes": 12000,
                            "failures": web_failures}
    assert cache["stats"] == {"active": 0, "accepted": 3, "bytes": 3000, "failures": 0}
    assert set(web["targets"]) == {live.address, dead_web}
    assert web["targets"][live.address]["state"] == "up"
    assert web["targets"][live.address]["attempts"] == 6
    assert web["targets"][dead_web]["attempts"] == web_failures
    assert web["targets"][dead_web]["failures"] == f"refused {int(web_failures)}"
    # Steady under the health check; the state is spelled out, not only coloured.
    assert cache["targets"][live.address]["state"] == "up"
    assert "up" in cache["targets"][live.address]["badge"]
    assert cache["targets"][dead_cache]["state"] == "down"
    assert "down" in cache["targets"][dead_cache]["badge"]
    assert shown["totals"]["accepted"] == 9 and shown["totals"]["apps"] == 2
    assert shown["serving"] == "serving" and "serving" in shown["servingText"]
    assert shown["banner"] == ""

    page.execute_script("window.notReloaded = true;")
    before = shown["updates"]
    for index in range(5):
        echo(ports["web"][index % 2], b"m" * 100)
    moved = wait_for_page(page, lambda s: s["apps"]["web"]["stats"]["accepted"] == 11,
                          "the new connections on the page")
    assert moved["apps"]["web"]["stats"]["bytes"] == 12000 + 1000
    assert moved["totals"]["accepted"] == 14
    assert moved["updates"] > before
    assert page.execute_script("return window.notReloaded === true;")  # same document
    # A sparkline for each of open, connections, bytes and failures, drawn
    # once a few samples were taken.
    wait_for_page(page, lambda s: s["apps"]["web"]["sparks"] == 4, "the sparklines")


def test_the_page_shows_open_connections_a_failed_reload_and_draining(
        proxies: ProxyFactory, backend: BackendFactory, page: WebDriver) -> None:
    live = backend("echo")
    proxy, ports = proxies.start([{"Name": "web", "Ports": 1, "Targets": [live.address]}],
                                 "--admin", f"{HOST}:0")
    port = admin_port(proxy)
    page.get(f"http://{HOST}:{port}/")
    wait_for_page(page, lambda s: s["reload"] == "ok" and "web" in s["apps"], "the page")
    with connect(ports["web"][0]) as held:
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        wait_for_page(page, lambda s: s["apps"]["web"]["stats"]["active"] == 1,
                      "the open connection")
        proxy.config_path.write_text('{"Apps": [}')
        proxy.signal(signal.SIGHUP)
        wait_for_page(page, lambda s: s["reload"] == "failed", "the failed reload")
        proxy.signal(signal.SIGTERM)  # drains while the connection stays open
        shown = wait_for_page(page, lambda s: s["serving"] == "draining", "draining")
        assert "draining" in shown["servingText"]
        assert shown["apps"]["web"]["stats"]["active"] == 1


def test_the_page_says_when_the_endpoint_stops_answering(
        proxies: ProxyFactory, backend: BackendFactory, page: WebDriver) -> None:
    proxy, _ = proxies.start([{"Name": "web", "Ports": 1, "Targets": [backend().address]}],
                             "--admin", f"{HOST}:0", "--drain-timeout", "0")
    port = admin_port(proxy)
    page.get(f"http://{HOST}:{port}/")
    wait_for_page(page, lambda s: "web" in s["apps"], "the page")
    assert proxy.stop() == 0
    shown = wait_for_page(page, lambda s: s["banner"] != "", "the stale-data banner")
    assert "No answer from the admin endpoint" in shown["banner"]
    assert "web" in shown["apps"]  # the last data stays, marked stale


def test_the_page_adds_up_the_workers(proxies: ProxyFactory, backend: BackendFactory,
                                      page: WebDriver) -> None:
    live = backend("echo")
    proxy, ports = proxies.start([{"Name": "web", "Ports": 2, "Targets": [live.address]}],
                                 "--workers", "2", "--admin", f"{HOST}:0")
    wait_until(lambda: proxy.count_lines("supervising 2 workers") == 1,
               message="both workers to be ready")
    port = admin_port(proxy)
    for index in range(20):
        echo(ports["web"][index % 2], b"%d" % index)
    page.get(f"http://{HOST}:{port}/")
    shown = wait_for_page(page, lambda s: s["apps"].get("web", {}).get("stats", {}).get(
        "accepted") == 20, "the connections of both workers, summed")
    assert shown["workers"] == "2 of 2 workers answering"
    assert list(shown["apps"]["web"]["targets"]) == [live.address]
    assert shown["apps"]["web"]["targets"][live.address]["state"] == "up"
    assert shown["apps"]["web"]["targets"][live.address]["attempts"] == 20


def test_with_a_token_the_page_asks_for_it(proxies: ProxyFactory, backend: BackendFactory,
                                           page: WebDriver, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    token = "correct-horse-battery-staple"
    token_file = tmp_path / "token"
    token_file.write_text(f"  {token}\n")
    proxy, _ = proxies.start([{"Name": "web", "Ports": 1, "Targets": [backend().address]}],
                             "--admin", f"{HOST}:0", "--admin-token-file", str(token_file))
    port = admin_port(proxy)
    assert admin_get(port, "/config")[0] == 401
    assert admin_get(port, "/config", token)[0] == 200

    page.get(f"http://{HOST}:{port}/")
    field = page.find_element(By.ID, "token")
    field.send_keys("wrong")
    page.find_element(By.ID, "open").click()
    wait_until(lambda: "not accepted" in page.find_element(By.ID, "message").text,
               timeout_s=PAGE_WAIT_S, message="the wrong token to be refused")
    field.clear()
    field.send_keys(token)
    page.find_element(By.ID, "open").click()
    wait_for_page_element(page, "section.app[data-app=web]")
    shown = wait_for_page(page, lambda s: s["updates"] >= 2, "refreshes with the token")
    assert shown["banner"] == ""

    # A link carrying the token in its fragment signs in at once, and the
    # token does not stay in the address bar.
    page.execute_script("sessionStorage.clear()")
    page.get("about:blank")
    page.get(f"http://{HOST}:{port}/#token={token}")
    wait_for_page_element(page, "section.app[data-app=web]")
    assert token not in page.current_url


def wait_for_page_element(driver: WebDriver, selector: str) -> None:
    from selenium.webdriver.common.by import By

    wait_until(lambda: bool(driver.find_elements(By.CSS_SELECTOR, selector)),
               timeout_s=PAGE_WAIT_S, message=f"{selector} on the page")


def test_the_page_fits_a_phone(proxies: ProxyFactory, backend: BackendFactory,
                               page: WebDriver) -> None:
    live = backend("echo")
    apps, _, _ = two_apps(live)
    proxy, _ = proxies.start(apps, "--admin", f"{HOST}:0")
    port = admin_port(proxy)
    set_viewport(page, PHONE)
    page.get(f"http://{HOST}:{port}/")
    wait_for_page(page, lambda s: len(s["apps"]) == 2, "the page")
    # Nothing wider than the screen: no sideways scrolling on a phone.
    width = page.execute_script("return document.documentElement.scrollWidth;")
    assert width <= PHONE[0]


NAMES_JS = """
return {apps: Array.from(document.querySelectorAll("section.app")).map(
          (s) => [s.dataset.app, s.querySelector(".name").textContent,
                  Array.from(s.querySelectorAll("tr[data-target]")).map(
                    (r) => [r.dataset.target, r.dataset.state])]),
        images: document.querySelectorAll("#apps img").length,
        updates: Number(document.body.dataset.updates)};
"""


def test_app_names_that_are_object_keys_or_markup_render_as_text(
        proxies: ProxyFactory, backend: BackendFactory, page: WebDriver) -> None:
    live = backend("echo")
    names = ["__proto__", "constructor", "toString", "<img src=x onerror=alert(1)>"]
    apps = [{"Name": name, "Ports": 1, "Targets": [live.address]} for name in names]
    proxy, _ = proxies.start(apps, "--admin", f"{HOST}:0")
    page.get(f"http://{HOST}:{admin_port(proxy)}/")
    seen: list[Any] = []

    def shown() -> bool:
        seen[:] = [page.execute_script(NAMES_JS)]
        return bool(seen[0]["updates"] >= 1 and len(seen[0]["apps"]) == len(names))

    wait_until(shown, timeout_s=PAGE_WAIT_S, interval_s=0.05,
               message="every app on the page")
    assert seen[0]["images"] == 0
    assert seen[0]["apps"] == [[name, name, [[live.address, "up"]]] for name in names]


def test_a_malformed_token_link_still_leaves_the_form_working(
        proxies: ProxyFactory, backend: BackendFactory, page: WebDriver,
        tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    token_file = tmp_path / "token"
    token_file.write_text("the-token\n")
    proxy, _ = proxies.start([{"Name": "web", "Ports": 1, "Targets": [backend().address]}],
                             "--admin", f"{HOST}:0", "--admin-token-file", str(token_file))
    page.get(f"http://{HOST}:{admin_port(proxy)}/#token=%")
    page.find_element(By.ID, "token").send_keys("wrong")
    page.find_element(By.ID, "open").click()
    wait_until(lambda: "not accepted" in page.find_element(By.ID, "message").text,
               timeout_s=PAGE_WAIT_S, message="the form to ask the endpoint")
