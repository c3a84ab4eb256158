"""A real browser for the review app's tests and screenshots: Debian's headless Chromium through Selenium.

Both binaries are named explicitly (``/usr/bin/chromium``, ``/usr/bin/chromedriver``, from the Debian
packages ``chromium`` and ``chromium-driver`` that ``deploy/dev-services.sh`` installs), so Selenium
Manager is never consulted and nothing is downloaded at run time. A missing binary is an error, never a
skip. ``--no-sandbox`` because the tests run as root in CI.

The browser's performance log is on, so a test can read the HTTP status of a page it was sent to
(:func:`statuses`): WebDriver itself never says whether a page answered 200 or 403.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

__all__ = ["CHROMEDRIVER", "CHROMIUM", "chromium", "image_loaded", "sign_in", "statuses", "wait"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def chromium(width: int = 1600, height: int = 1000) -> WebDriver:
    """A fresh headless Chromium with an empty profile, its viewport ``width`` x ``height`` CSS pixels."""
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not binary.is_file():
            raise FileNotFoundError(f"{binary} is missing: apt-get install chromium chromium-driver "
                                    "(deploy/dev-services.sh does)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-extensions", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--force-device-scale-factor=1", f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    # the window size includes no browser chrome in headless mode, but make the viewport exact regardless
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    return driver


def wait(driver: WebDriver, timeout: float = 30.0) -> WebDriverWait[WebDriver]:
    return WebDriverWait(driver, timeout, poll_frequency=0.05)


def sign_in(driver: WebDriver, base: str, username: str, password: str, *, path: str | None = "/login") -> None:
    """Fill in and submit the login form at ``base + path`` (or the one the browser is on, if ``path`` is
    None), then wait until the browser has left the login page."""
    if path is not None:
        driver.get(base + path)
    driver.find_element(By.ID, "username").send_keys(username)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "sign-in").click()
    wait(driver).until(lambda d: "/login" not in d.current_url)


def statuses(driver: WebDriver, path: str) -> list[int]:
    """HTTP statuses of the documents (pages, not images or scripts) whose URL path is ``path``, received
    since the last call (the performance log is emptied by reading it); redirects included."""
    found = []
    for entry in driver.get_log("performance"):
        msg: dict[str, Any] = json.loads(entry["message"])["message"]
        params = msg.get("params", {})
        if params.get("type") != "Document":
            continue
        if msg.get("method") == "Network.responseReceived":
            response = params["response"]
        elif msg.get("method") == "Network.requestWillBeSent" and "redirectResponse" in params:
            response = params["redirectResponse"]  # a redirect answers no document of its own
        else:
            continue
        url = str(response["url"]).split("?", 1)[0]
        if url.endswith(path):
            found.append(int(response["status"]))
    return found


def image_loaded(driver: WebDriver, element_id: str, src_part: str) -> bool:
    """The ``<img>`` shows a source containing ``src_part``, and that image has loaded and decoded."""
    return bool(driver.execute_script(
        "var i = document.getElementById(arguments[0]);"
        "return !!i && i.getAttribute('src').indexOf(arguments[1]) >= 0 && i.complete && i.naturalWidth > 0;",
        element_id, src_part))
