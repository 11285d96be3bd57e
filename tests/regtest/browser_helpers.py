"""What the browser tests share: Debian's chromium (required in CI), its headless flags,
and full-page screenshots saved as test artifacts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.async_api import Page

from tests.regtest.gateway_helpers import REPO

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO / "test-artifacts"


def require_chromium() -> Path:
    """The browser; missing, a skip on a developer's machine and a failure in CI."""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing: `make browser` installs Debian's chromium"
        if os.environ.get("CI"):
            pytest.fail(f"browser test prerequisites missing in CI: {reason}")
        pytest.skip(reason)
    return CHROMIUM


async def screenshot(page: Page, name: str, capsys: pytest.CaptureFixture[str]) -> Path:
    """Save the whole page as ``test-artifacts/<name>`` and say where."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    await page.screenshot(path=str(path), full_page=True)
    with capsys.disabled():
        print(f"\nscreenshot: {path}")
    return path
