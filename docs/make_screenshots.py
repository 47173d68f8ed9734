"""Take the viewer screenshots of docs/app.md and the README with the browser driver the tests use.

Usage (from the repository root, offline; needs the ``dev`` extra and Debian's ``chromium``):

    python docs/make_screenshots.py                          # tiny random model: the answers are meaningless
    python docs/make_screenshots.py --model runs/demo-sft/base --adapter runs/demo-sft

It serves ``med3dqwen-app`` on 127.0.0.1, loads the first example phantom, outlines its right upper lobe, scrolls to
a slice of it, asks a question and writes ``docs/images/app.png`` (the page) and ``docs/images/app_viewer.png`` (the
slice viewer). Without ``--model`` it saves the tests' tiny random model (``tests/tiny_models.py``) to a temporary
folder first, so the page shows the pipeline working, not a trained model's answer.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Is there a nodule in the right lung upper lobe?"


def tiny_model(folder: Path) -> Path:
    """The tests' tiny end-to-end model with its processor, saved to ``folder`` (random weights)."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import tiny_config

    from med3dqwen.modeling.modeling_med3d_qwen import Med3DQwenForConditionalGeneration
    from med3dqwen.processing.processing_med3d_qwen import Med3DQwenProcessor
    from med3dqwen.processing.tokenization_med3d_qwen import load_qwen2_5_tokenizer

    config = tiny_config()
    torch.manual_seed(0)
    Med3DQwenForConditionalGeneration(config).save_pretrained(folder)
    Med3DQwenProcessor.from_config(config, tokenizer=load_qwen2_5_tokenizer()).save_pretrained(folder)
    return folder


def take(url: str, output_dir: Path) -> list[Path]:
    """Drive the page at ``url`` and write the screenshots; returns their paths."""
    from playwright.sync_api import expect, sync_playwright

    from med3dqwen.app.browser import launch_chromium
    from med3dqwen.app.cases import EXAMPLE_CASES

    output_dir.mkdir(parents=True, exist_ok=True)
    page_png, viewer_png = output_dir / "app.png", output_dir / "app_viewer.png"
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        page.set_default_timeout(60_000)
        page.goto(url)
        page.locator("#example input").click()
        page.get_by_role("option", name=next(iter(EXAMPLE_CASES))).click()
        info = page.locator("#slice-info")
        expect(info).to_contain_text("Phantom")
        roi = page.locator("#roi-name input")
        roi.fill("lung_upper_lobe_right")
        roi.press("Enter")
        expect(info).to_contain_text("ROI contour on slices")
        slider = page.locator("#slice-slider input[type=range]")
        slider.focus()
        for _ in range(4):
            slider.press("ArrowRight")
        page.locator("#question textarea").fill(QUESTION)
        page.locator("#ask").click()
        page.wait_for_function(
            "() => document.querySelector('#answer textarea').value !== ''"
            " || document.querySelector('#error-line p.error') !== null",
            timeout=180_000,
        )
        error = page.locator("#error-line p.error")
        if error.count():
            raise RuntimeError(f"the page shows an error: {error.inner_text()}")
        expect(page.locator("#montage img")).to_be_visible()
        page.wait_for_timeout(500)  # let the montage finish painting
        page.screenshot(path=str(page_png), full_page=True)
        page.locator("#viewer").screenshot(path=str(viewer_png))
        browser.close()
    return [page_png, viewer_png]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder or Hub id (default: a tiny random model)")
    parser.add_argument("--adapter", help="PEFT adapter folder for --model")
    parser.add_argument("--output_dir", default=str(ROOT / "docs" / "images"))
    args = parser.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from med3dqwen.app.cli import launch
    from med3dqwen.app.ui import build_app

    with tempfile.TemporaryDirectory(prefix="med3dqwen-shots-") as tmp:
        model = args.model or str(tiny_model(Path(tmp) / "tiny"))
        label = args.model or "tiny random model (tests/tiny_models.py)"
        demo = build_app(model, args.adapter, output_root=Path(tmp) / "out", model_label=label)
        _, url, _ = launch(demo, block=False)
        try:
            for path in take(url, Path(args.output_dir)):
                print(f"wrote {path}")
        finally:
            demo.close()


if __name__ == "__main__":
    main()
