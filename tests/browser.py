"""Headless Chromium for the page tests (Debian's chromium, driven by Playwright; nothing downloaded)."""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# the flags a closed network needs: no background connections, no updates, no sign-in
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    """The Chromium binary; a skip where it is not installed (a failure where CI requires it)."""
    if CHROMIUM is None:
        if os.environ.get("MMGEN_REQUIRE_BROWSER"):
            pytest.fail("chromium is required here (MMGEN_REQUIRE_BROWSER) but not installed")
        pytest.skip("chromium is not installed (.ci/run installs it)")
    return CHROMIUM


def launch(playwright):
    """A headless Chromium browser (skips the test where there is none)."""
    return playwright.chromium.launch(executable_path=chromium(), headless=True, args=FLAGS)
