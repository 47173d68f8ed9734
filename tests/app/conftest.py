"""Fixtures of the browser tests: Debian's Chromium driven by Playwright, the viewer served on 127.0.0.1 with a tiny
saved model, and a small phantom CT written in a temporary folder.

The browser is the system's (``chromium`` from Debian, or ``MED3DQWEN_CHROMIUM=/path``); Playwright's own browser
download is never used. The tests skip, saying why, only when no such browser is found.
"""

import os
from pathlib import Path

import numpy as np
import pytest

from med3dqwen.app.browser import BROWSER_NAMES, find_chromium, launch_chromium


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip(
            "no Chromium found (looked for $MED3DQWEN_CHROMIUM and "
            f"{', '.join(BROWSER_NAMES)} on PATH); install it with `apt-get install chromium` (.ci/run does)"
        )
    return path


@pytest.fixture(scope="session")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, chromium_path)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser):
    from playwright.sync_api import expect

    # The machine running the suite is shared (2 cores, other test workers): give each page update 20 s, not 5 s.
    expect.set_options(timeout=20_000)
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The shared tiny end-to-end model (tests/tiny_models.py) with its processor, saved as a user would."""
    from tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def app_url(tiny_model_dir, tmp_path_factory):
    """The viewer for the tiny model, served on 127.0.0.1 from a background thread of this process."""
    from med3dqwen.app.cli import launch
    from med3dqwen.app.ui import build_app

    demo = build_app(str(tiny_model_dir), output_root=tmp_path_factory.mktemp("app-out"))
    _, url, share_url = launch(demo, host="127.0.0.1", block=False)
    assert url.startswith("http://127.0.0.1:") and share_url is None
    yield url
    demo.close()


@pytest.fixture(scope="session")
def phantom_files(tmp_path_factory) -> dict[str, Path]:
    """A small phantom CT as NIfTI (what a user uploads), a mask on its grid and one from another scan."""
    from med3dqwen.builders.phantom import PhantomConfig, generate_phantom
    from med3dqwen.io import save_nifti

    folder = tmp_path_factory.mktemp("phantom")
    phantom = generate_phantom(3, PhantomConfig(shape=(32, 64, 64)))
    hu = np.clip(np.rint(phantom.volume), -1024, 3071).astype(np.int16)
    return {
        "volume": save_nifti(folder / "chest_ct.nii.gz", hu, phantom.affine, dtype=np.int16),
        "mask": save_nifti(folder / "lobe.nii.gz", phantom.masks["lung_upper_lobe_right"], phantom.affine),
        "other_mask": save_nifti(folder / "other_scan_mask.nii.gz", phantom.masks["liver"][:, :, :48], phantom.affine),
        "text": _write(folder / "notes.txt", "not a CT"),
    }


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
