"""Headless Chromium for the tests of the Prefect and MLflow UIs: Debian's browser (`apt-get install
chromium`, which `scripts/setup.sh` does as root) driven by playwright through its path; playwright's own
browser download cannot reach its host from CI."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

SCREENSHOTS = os.environ.get("COSMOCORE_SCREENSHOTS")  # a folder: keep each screenshot there too (docs/images)


def chromium_path() -> str:
    path = os.environ.get("COSMOCORE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("no Chromium: run scripts/setup.sh as root, or apt-get install chromium "
                    "(or set COSMOCORE_CHROMIUM to a Chromium executable)")
    return path


@contextmanager
def page(width: int = 1400, height: int = 900):
    """A fresh page in headless Chromium (a new profile: no state carried between tests)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def screenshot(page, folder: Path, name: str) -> Path:
    """Save what the page shows as `folder/name`, and in $COSMOCORE_SCREENSHOTS when that is set."""
    path = folder / name
    page.screenshot(path=str(path))
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(SCREENSHOTS) / name)
    return path
