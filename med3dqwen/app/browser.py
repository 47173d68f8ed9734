"""Headless Chromium for the viewer's browser test and the docs screenshots: the system's browser, driven by
Playwright's Python client (``pip install playwright``; never ``playwright install``, which downloads browsers).

On Debian/Ubuntu ``apt-get install chromium`` provides ``/usr/bin/chromium``; ``MED3DQWEN_CHROMIUM=/path`` picks
another executable.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


__all__ = ["BROWSER_NAMES", "CHROMIUM_ARGS", "find_chromium", "launch_chromium"]

# Offline and quiet: no first-run tasks, no component updates, no background requests, no sandbox (root in CI).
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The Chromium executable: ``$MED3DQWEN_CHROMIUM`` if set (``None`` when that file is missing), else the first of
    :data:`BROWSER_NAMES` on ``PATH``, else ``None``."""
    configured = os.environ.get("MED3DQWEN_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else None
    for name in BROWSER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def launch_chromium(playwright, executable: str | None = None):
    """A headless Chromium ``Browser`` from a started ``sync_playwright()``.

    Raises:
        FileNotFoundError: no executable given and none found (the message says how to install one).
    """
    executable = executable or find_chromium()
    if executable is None:
        raise FileNotFoundError(
            f"no Chromium found ($MED3DQWEN_CHROMIUM, or {', '.join(BROWSER_NAMES)} on PATH); "
            "install it with `apt-get install chromium`"
        )
    return playwright.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS))
