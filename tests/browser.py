"""Headless Chromium for the status page tests and ``make screenshot``.

Debian's ``chromium`` and ``chromium-driver`` packages (``.ci/run`` installs
them), driven by selenium.  The browser is kept off every network but
loopback: all other traffic goes to a proxy address where nothing listens,
names resolve to nothing, and the background services that phone home
(updates, sync, safe browsing) are off.

:func:`start_chromium` returns the driver, or raises :class:`BrowserMissing`
with the reason; :func:`skip_or_fail` turns that into a skip on a developer
machine without Chromium and into a failure under CI (``CI=true``), where
the browser tests must run.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_NAMES = ("chromedriver", "chromium-driver")
WIDE = (1440, 900)
PHONE = (390, 844)

_ARGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--hide-scrollbars", "--force-color-profile=srgb", "--force-device-scale-factor=1",
    "--no-first-run", "--no-default-browser-check", "--disable-extensions",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-domain-reliability", "--dns-prefetch-disable",
    "--disable-client-side-phishing-detection", "--metrics-recording-only",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
    # Loopback is always reached directly; anything else would go to a
    # proxy where nothing listens, and no name resolves.
    "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>;127.0.0.1",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
)


class BrowserMissing(Exception):
    pass


def _which(names: tuple[str, ...]) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise BrowserMissing(f"none of {', '.join(names)} is installed "
                         "(apt-get install chromium chromium-driver)")


def start_chromium(size: tuple[int, int] = WIDE) -> WebDriver:
    """A headless Chromium at ``size`` (CSS pixels); raises BrowserMissing."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        raise BrowserMissing(f"selenium is not installed ({exc})") from None
    options = webdriver.ChromeOptions()
    options.binary_location = _which(CHROMIUM_NAMES)
    for arg in _ARGS:
        options.add_argument(arg)
    options.add_argument(f"--window-size={size[0]},{size[1]}")
    # Both paths given: selenium-manager (which would download) never runs.
    service = Service(executable_path=_which(DRIVER_NAMES))
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except WebDriverException as exc:
        raise BrowserMissing(f"Chromium did not start: {exc.msg}") from None
    set_viewport(driver, size)
    return driver


def set_viewport(driver: WebDriver, size: tuple[int, int]) -> None:
    """Make the page's viewport (not the window) exactly ``size``."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": size[0], "height": size[1], "deviceScaleFactor": 1,
        "mobile": size[0] < 600})


def skip_or_fail(reason: str) -> NoReturn:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run the browser tests: {reason}", pytrace=False)
    pytest.skip(f"no headless browser here: {reason}")
