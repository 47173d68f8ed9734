"""The viewer end to end in headless Chromium, against the app served on 127.0.0.1 with a tiny saved model.

Upload a small phantom CT, name the ROI, move the slice slider, ask, read the answer; and the bad-input cases, which
must show one line in the page and never a stack trace.
"""

from pathlib import Path

import pytest
from playwright.sync_api import expect


pytestmark = pytest.mark.slow  # ~20-30 s: a browser, a server, a model load and one generation


def _upload(page, selector: str, path) -> None:
    page.locator(f"{selector} input[type=file]").set_input_files(str(path))


def _slice_png(page) -> bytes:
    """The slice image as the browser rendered it."""
    return page.locator("#slice-image img").screenshot()


def _choose_roi(page, name: str) -> None:
    box = page.locator("#roi-name input")
    box.fill(name)
    box.press("Enter")


def _error_line(page):
    return page.locator("#error-line p.error")


def test_upload_scroll_and_ask(page, app_url, phantom_files):
    page.goto(app_url)
    _upload(page, "#upload", phantom_files["volume"])
    info = page.locator("#slice-info")
    expect(info).to_contain_text("chest_ct.nii.gz · slice 16 of 0–31")

    _choose_roi(page, "right lung")  # a RadLex-style name; the threshold segmenter serves lung_right
    expect(info).to_contain_text("ROI contour on slices")
    expect(info).to_contain_text("(threshold segmenter: lung_right)")
    image = page.locator("#slice-image img")
    before_src, before = image.get_attribute("src"), _slice_png(page)
    shown = int(page.locator("#slice-slider input[type=number]").input_value())

    slider = page.locator("#slice-slider input[type=range]")
    slider.focus()
    for _ in range(3):
        slider.press("ArrowLeft")  # towards the inferior slices: the lung is there, the contour changes
    expect(info).to_contain_text(f"slice {shown - 3} of")
    expect(image).not_to_have_attribute("src", before_src)
    assert _slice_png(page) != before, "the rendered slice did not change when the slider moved"

    page.locator("#question textarea").fill("Is there a nodule in the right lung?")
    page.locator("#ask").click()
    page.wait_for_function(  # the answer, or an error line: fail at once with its text rather than time out
        "() => document.querySelector('#answer textarea').value !== ''"
        " || document.querySelector('#error-line p.error') !== null",
        timeout=90_000,
    )
    assert _error_line(page).count() == 0, _error_line(page).inner_text()
    shown = page.locator("#answer textarea").input_value()
    expect(page.locator("#answer-details")).to_contain_text("Inside the red boundary, is there a nodule")
    probabilities = page.locator("#probabilities")
    expect(probabilities).to_contain_text("%")
    labels = probabilities.inner_text()
    assert "yes" in labels and "no" in labels, labels  # a yes/no question: the head's softmax over {no, yes}
    # The tiny random model may generate no text; then the box shows the closed head's label instead.
    assert shown.strip() and shown != "(the model generated an empty answer)", shown
    if "closed-answer head" in shown:
        assert shown.split()[0] in ("yes", "no"), shown
    montage = page.locator("#montage img")
    expect(montage).to_be_visible()
    with page.expect_download() as download:
        page.locator("#download").click()
    assert download.value.suggested_filename.endswith(".png")
    assert Path(download.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    expect(page.locator("#answer-details")).to_contain_text("ROI right lung from threshold")

    # The same question about an uploaded mask: predict reads the file (the model is already loaded).
    first_montage = montage.get_attribute("src")
    _upload(page, "#mask-upload", phantom_files["mask"])
    expect(info).to_contain_text("(mask file lobe.nii.gz)")
    page.locator("#ask").click()
    expect(page.locator("#answer-details")).to_contain_text("ROI from the mask file", timeout=90_000)
    expect(montage).not_to_have_attribute("src", first_montage)
    assert _error_line(page).count() == 0


def test_bad_inputs_show_one_line(page, app_url, phantom_files):
    page.goto(app_url)
    error = _error_line(page)

    _upload(page, "#upload", phantom_files["text"])
    expect(error).to_have_text(
        "notes.txt: unsupported file type '.txt'; upload .nii, .nii.gz, .npy, .dcm or a .zip of one DICOM series"
    )

    _upload(page, "#upload", phantom_files["volume"])
    expect(page.locator("#slice-info")).to_contain_text("chest_ct.nii.gz")
    expect(error).to_have_count(0)

    _choose_roi(page, "right lng")
    expect(error).to_contain_text("unknown structure 'right lng'")
    expect(error).to_contain_text("did you mean")

    # A segmenter that runs only at question time: the page says so, and asking without its weights is one line.
    page.locator("#segmenter input").click()
    page.get_by_role("option", name="vista3d").click()
    _choose_roi(page, "liver")
    expect(page.locator("#slice-info")).to_contain_text("vista3d outlines 'liver' when you ask")
    expect(error).to_have_count(0)
    page.locator("#question textarea").fill("Is the liver enlarged?")
    page.locator("#ask").click()
    expect(error).to_contain_text("segmenter 'vista3d'")

    _upload(page, "#mask-upload", phantom_files["other_mask"])
    expect(error).to_contain_text(
        "other_scan_mask.nii.gz: mask grid (32, 64, 48) differs from volume grid (32, 64, 64)"
    )

    # The refused mask left the box: the right one can be dropped at once, and is outlined.
    _upload(page, "#mask-upload", phantom_files["mask"])
    expect(error).to_have_count(0)
    expect(page.locator("#slice-info")).to_contain_text("ROI contour on slices")
    expect(page.locator("#slice-info")).to_contain_text("(mask file lobe.nii.gz)")

    page.locator("#question textarea").fill("")
    page.locator("#ask").click()
    expect(error).to_have_text("type a question first")

    for text in (error.inner_text(), page.locator("body").inner_text()):
        assert "Traceback" not in text and 'File "' not in text
    assert len(error.inner_text().splitlines()) == 1
