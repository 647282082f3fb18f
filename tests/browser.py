"""Headless Chromium for the page tests (Debian's chromium, driven by Playwright; nothing downloaded)."""

from __future__ import annotations

# the flags a closed network needs: no background connections, no updates, no sign-in
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def launch(playwright, executable: str):
    """A headless Chromium browser at ``executable``."""
    return playwright.chromium.launch(executable_path=executable, headless=True, args=FLAGS)
