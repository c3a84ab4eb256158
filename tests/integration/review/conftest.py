"""Fixtures the review app's browser tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from selenium.webdriver.chrome.webdriver import WebDriver

from tests.browser import chromium


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """One headless Chromium per test module (tests/browser.py), quit at the module's end."""
    driver = chromium()
    try:
        yield driver
    finally:
        driver.quit()
