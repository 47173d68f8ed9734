"""The Gradio page: load a CT, pick the ROI, scroll the axial slices with the contour, ask, download the montage.

``build_app(model, adapter=None)`` returns the ``gradio.Blocks``; :mod:`med3dqwen.app.cli` launches it. The model
call is :func:`med3dqwen.predict` (loaded once per process and cached there); what the page shows before asking
(cases, masks, slices) comes from :mod:`med3dqwen.app.cases`.

Every handler catches its errors and writes them into the page as one line (``#error-line``): a bad file, a mask
from another scan or an unknown ROI name is a message naming the input, never a stack trace. Unexpected errors are
logged with their traceback on the server and shown as one line too.
"""

from __future__ import annotations

import functools
import html
import logging
import tempfile
from pathlib import Path

import gradio as gr
import numpy as np

from med3dqwen.anatomy.vocabulary import default_vocabulary
from med3dqwen.inference import PROMPTS, SEGMENTERS, predict
from med3dqwen.processing.ct_io import CTInputError
from med3dqwen.segmentation.base import UnknownStructureError, close_matches
from med3dqwen.segmentation.threshold import HUThresholdSource

from .cases import (
    EXAMPLE_CASES,
    Case,
    CaseMaskSource,
    RoiView,
    example_case,
    load_case_file,
    mask_from_file,
    render_slice,
    roi_view,
    structure_choices,
)


__all__ = ["APP_CSS", "build_app", "one_line_error"]

logger = logging.getLogger(__name__)

APP_CSS = """
#error-line p.error { color: #b91c1c; font-weight: 600; margin: 0; }
#slice-image img { image-rendering: pixelated; }
"""


# Errors about the user's input (CTInputError and PredictError are ValueErrors); anything else is a bug, logged.
_INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError)


def one_line_error(err: BaseException) -> str:
    """The message the page shows for ``err``: one line, naming the input (a CTInputError's file and problem)."""
    text = str(err).strip() or type(err).__name__
    first = text.splitlines()[0].rstrip(":")
    if isinstance(err, _INPUT_ERRORS):
        return first  # CTInputError and PredictError messages start with the input they are about
    return f"{type(err).__name__}: {first}"


def _error_html(message: str) -> str:
    return f'<p class="error">{html.escape(message)}</p>' if message else ""


def _roi_for_name(case: Case, name: str, segmenter: str) -> RoiView | None:
    """The ROI ``name`` as the viewer shows it before asking: the case's own mask (a phantom's), else the HU
    threshold segmenter's; ``None`` when another segmenter will draw it at question time."""
    if case.masks:
        result = CaseMaskSource(case).get_mask(case.volume, name)
        return roi_view(result.mask, f"phantom mask {result.resolved_name}")
    vocabulary = default_vocabulary()
    if vocabulary.canonical(name) is None:
        known = {n for source in ("totalsegmentator", "radlex") for n in vocabulary.names(source)}
        raise UnknownStructureError(name, "anatomy vocabulary", close_matches(name, known))
    if segmenter != "threshold":
        return None
    result = HUThresholdSource().get_mask(case.volume, name)
    return roi_view(result.mask, f"threshold segmenter: {result.resolved_name}")


def _on_screen(rgb: np.ndarray, target: int = 512) -> np.ndarray:
    """Enlarge a small slice by a whole factor (nearest), so a 128-pixel phantom slice is not a stamp in the page and
    the 3-pixel contour stays crisp; slices of ``target`` pixels or more are left as they are."""
    factor = max(1, target // max(rgb.shape[:2]))
    return rgb if factor == 1 else rgb.repeat(factor, axis=0).repeat(factor, axis=1)  # (H*f, W*f, 3)


def _answer_text(result) -> str:
    """What the answer box shows: the generated text; when that is empty (an untrained model may stop at once), the
    closed head's label, saying where it came from, so the box never looks as if nothing happened."""
    if result.answer:
        return result.answer
    if result.closed_answer is not None:
        return f"{result.closed_answer} (the closed-answer head; the generated text was empty)"
    return "(the model generated an empty answer)"


def _slice_info(case: Case, index: int, roi: RoiView | str | None) -> str:
    """The line under the slider; ``roi`` is the drawn ROI, or a note on one drawn only at question time."""
    depth = case.volume.shape[0]
    text = f"**{case.name}** · slice {index} of 0–{depth - 1} (inferior → superior)"
    if isinstance(roi, str):
        text += f" · {roi}"
    elif roi is not None:
        if roi.empty:
            text += " · the ROI is empty on this scan: no contour"
        else:
            text += f" · ROI contour on slices {roi.slices[0]}–{roi.slices[-1]} ({roi.source})"
    return text


def build_app(
    model: str | None,
    adapter: str | None = None,
    *,
    output_root: str | Path | None = None,
    model_label: str | None = None,
) -> gr.Blocks:
    """The viewer page for ``model``.

    Args:
        model: a saved model folder or Hub id, passed to :func:`med3dqwen.predict` (loaded on the first question);
            ``None`` with ``adapter``: the adapter's base model.
        adapter: a PEFT adapter folder for ``model``.
        output_root: where each question's ``answer.json`` and montage are written (default: a temporary folder).
        model_label: how the page names the model (default: ``model``).

    Returns:
        The ``gradio.Blocks``; launch it with :func:`med3dqwen.app.cli.launch` (which adds :data:`APP_CSS`).
    """
    output_root = Path(output_root or tempfile.mkdtemp(prefix="med3dqwen-app-"))
    output_root.mkdir(parents=True, exist_ok=True)

    with gr.Blocks(title="Med3DQwen viewer") as demo:
        case_state = gr.State(None)
        roi_state = gr.State(None)  # the drawn RoiView, a note when a segmenter draws it at question time, or None
        gr.Markdown(
            "## Med3DQwen viewer\n"
            f"Model `{model_label or model or 'the base model of the adapter'}`"
            + (f" with adapter `{adapter}`" if adapter else "")
            + ". Load a CT, choose the ROI, "
            "scroll the axial slices with the contour the model sees, ask a question."
        )
        error_line = gr.HTML("", elem_id="error-line")
        with gr.Row():
            with gr.Column(scale=1):
                example = gr.Dropdown(
                    choices=list(EXAMPLE_CASES),
                    value=None,
                    label="Example case (synthetic phantom)",
                    elem_id="example",
                )
                upload = gr.File(
                    label="…or upload a CT: NIfTI (.nii, .nii.gz), .npy, or a .zip of one DICOM series",
                    height=120,
                    elem_id="upload",
                )
                roi_name = gr.Dropdown(
                    choices=structure_choices(None),
                    value=None,
                    allow_custom_value=True,
                    label="ROI name (TotalSegmentator / RadLex names)",
                    elem_id="roi-name",
                )
                segmenter = gr.Dropdown(
                    choices=list(SEGMENTERS), value="threshold", label="Segmenter for a named ROI", elem_id="segmenter"
                )
                mask_file = gr.File(
                    label="…or upload an ROI mask (.nii, .nii.gz, .npy)", height=120, elem_id="mask-upload"
                )
                mask_label = gr.Textbox(label="Mask label (id or name, for a multilabel mask)", elem_id="mask-label")
                prompt = gr.Radio(choices=list(PROMPTS), value="red", label="Boundary prompt", elem_id="prompt")
            with gr.Column(scale=2, elem_id="viewer"):
                slice_image = gr.Image(
                    label="Axial slice",
                    type="numpy",
                    format="png",
                    interactive=False,
                    height=440,
                    elem_id="slice-image",
                )
                slider = gr.Slider(0, 1, value=0, step=1, label="Axial slice", elem_id="slice-slider")
                info = gr.Markdown("Load a case to start.", elem_id="slice-info")
        with gr.Row():
            with gr.Column(scale=2):
                question = gr.Textbox(
                    label="Question", placeholder="Is there a nodule in this region?", elem_id="question"
                )
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                probabilities = gr.Label(label="Closed-answer probabilities", elem_id="probabilities")
                details = gr.Markdown("", elem_id="answer-details")
            with gr.Column(scale=1):
                montage = gr.Image(
                    label="Overlay montage (the ROI slices the model saw)",
                    type="filepath",
                    interactive=False,
                    elem_id="montage",
                )
                download = gr.DownloadButton("Download montage", visible=False, elem_id="download")

        def guarded(fn=None, *, always: dict | None = None):
            """Run a handler; on any error, show it as one line and leave every other output as it was (except the
            ``always`` updates, applied either way)."""

            def decorate(fn):
                @functools.wraps(fn)
                def wrapper(*args):
                    try:
                        result = fn(*args)
                    except Exception as err:  # noqa: BLE001 - the page must show every failure as one line
                        if not isinstance(err, _INPUT_ERRORS):
                            logger.exception("viewer handler %s failed", fn.__name__)
                        result = {error_line: _error_html(one_line_error(err))}
                    if result:  # a handler with nothing to do leaves the page, its error line included, as it is
                        result.setdefault(error_line, "")
                    result = {**result, **(always or {})}
                    # Gradio reads an empty dict as one output value, not as "no updates": skip one output instead.
                    return result or {error_line: gr.skip()}

                return wrapper

            return decorate(fn) if fn is not None else decorate

        def show_case(case: Case) -> dict:
            middle = case.volume.shape[0] // 2
            return {
                case_state: case,
                roi_state: None,
                roi_name: gr.Dropdown(choices=structure_choices(case), value=None),
                slider: gr.Slider(minimum=0, maximum=case.volume.shape[0] - 1, value=middle, step=1),
                slice_image: _on_screen(render_slice(case.volume, middle)),
                info: _slice_info(case, middle, None),
                answer: "",
                probabilities: None,
                details: "",
                montage: None,
                download: gr.DownloadButton(visible=False),
            }

        @guarded
        def on_example(name):
            if not name:
                return {}
            return show_case(example_case(name))

        # The upload box is emptied after each try, so that the next file can be dropped on it at once; the page
        # names the loaded case in the slice line.
        @guarded(always={upload: None})
        def on_upload(file):
            if file is None:
                return {}
            return show_case(load_case_file(file, name=Path(file).name))

        def require_case(case: Case | None) -> Case:
            if case is None:
                raise CTInputError(None, "no CT loaded: pick an example case or upload a volume first")
            return case

        def current_roi(case: Case, name: str | None, mask_path: str | None, label: str, seg: str) -> RoiView | None:
            if mask_path:
                return roi_view(mask_from_file(case, mask_path, label), f"mask file {Path(mask_path).name}")
            if name:
                return _roi_for_name(case, name, seg)
            return None

        @guarded
        def on_roi(case, previous, name, mask_path, label, seg, index, color):
            if case is None or (previous is None and not name and not mask_path):
                return {}  # nothing chosen, nothing drawn (loading a case empties the ROI box, which lands here)
            try:
                roi = current_roi(case, name, mask_path, label, seg)
            except CTInputError as err:
                if not mask_path:
                    raise
                # A refused mask leaves the box, so that the next question cannot use it; the slice stays bare.
                return {
                    error_line: _error_html(one_line_error(err)),
                    mask_file: None,
                    roi_state: None,
                    slice_image: _on_screen(render_slice(case.volume, int(index))),
                    info: _slice_info(case, int(index), None),
                }
            index = int(index)
            if roi is None and name and not mask_path:
                roi = f"{seg} outlines {name!r} when you ask (the montage shows it)"
            if isinstance(roi, RoiView) and not roi.empty:
                index = roi.slices[len(roi.slices) // 2]
            band = roi.band if isinstance(roi, RoiView) else None
            return {
                roi_state: roi,
                slider: gr.Slider(value=index),
                slice_image: _on_screen(render_slice(case.volume, index, band, color)),
                info: _slice_info(case, index, roi),
            }

        @guarded
        def on_slice(case, roi, index, color):
            if case is None:
                return {}
            index = int(index)
            band = roi.band if isinstance(roi, RoiView) else None
            return {
                slice_image: _on_screen(render_slice(case.volume, index, band, color)),
                info: _slice_info(case, index, roi),
            }

        @guarded
        def on_ask(case, name, mask_path, label, seg, text, color):
            case = require_case(case)
            if not (text or "").strip():
                raise CTInputError(None, "type a question first")
            out_dir = Path(tempfile.mkdtemp(prefix="ask-", dir=output_root))
            kwargs = {"adapter": adapter, "prompt": color, "output_dir": str(out_dir)}
            if mask_path:
                kwargs.update(mask=mask_path, label=(label or "").strip() or None)
            elif name and case.masks:
                kwargs.update(roi=name, segmenter=CaseMaskSource(case))  # the phantom's own mask, as shown
            elif name:
                kwargs.update(roi=name, segmenter=seg)
            result = predict(model, case.volume, text.strip(), **kwargs)
            montage_path = getattr(result, "overlay_montage", None)
            lines = [f"Question as the model read it: *{result.rewritten_question}*"]
            if result.mask_source != "none":
                covered = result.covered_fraction
                lines.append(
                    "ROI "
                    + (f"`{result.roi}` " if result.roi else "")
                    + f"from {'the mask file' if result.mask_source == 'file' else result.mask_source}"
                    + (f", {covered:.0%} of its voxels under the contour" if covered is not None else "")
                )
            lines += [f"⚠ {w}" for w in (result.warnings or [])]
            return {
                answer: _answer_text(result),
                probabilities: dict(result.probabilities or {}) or None,
                details: "\n\n".join(lines),
                montage: str(montage_path) if montage_path else None,
                download: gr.DownloadButton(value=str(montage_path), visible=True)
                if montage_path
                else gr.DownloadButton(visible=False),
            }

        case_outputs = [
            case_state,
            roi_state,
            roi_name,
            slider,
            slice_image,
            info,
            answer,
            probabilities,
            details,
            montage,
            download,
            error_line,
        ]
        roi_inputs = [case_state, roi_state, roi_name, mask_file, mask_label, segmenter, slider, prompt]
        roi_outputs = [roi_state, slider, slice_image, info, mask_file, error_line]
        example.change(on_example, [example], case_outputs, show_progress_on=slice_image)
        upload.upload(on_upload, [upload], [*case_outputs, upload], show_progress_on=slice_image)
        # Progress shows on the slice or the answer, never on the error line (it would read as an error).
        # The mask box reacts to the user's upload and clear only: emptying it from a handler triggers nothing.
        for trigger in (roi_name.change, mask_file.upload, mask_file.clear, mask_label.submit, segmenter.change):
            trigger(on_roi, roi_inputs, roi_outputs, show_progress_on=slice_image)
        # ``input``, not ``change``: a programmatic move (loading a case, picking an ROI) renders once, in its own
        # handler; ``change`` would render the same slice again and rewrite the cached PNG the page is reading.
        slider.input(
            on_slice,
            [case_state, roi_state, slider, prompt],
            [slice_image, info, error_line],
            show_progress="hidden",
            trigger_mode="always_last",
        )
        prompt.change(
            on_slice, [case_state, roi_state, slider, prompt], [slice_image, info, error_line], show_progress="hidden"
        )
        ask_inputs = [case_state, roi_name, mask_file, mask_label, segmenter, question, prompt]
        ask_outputs = [answer, probabilities, details, montage, download, error_line]
        ask.click(on_ask, ask_inputs, ask_outputs, concurrency_limit=1, show_progress_on=answer)
        question.submit(on_ask, ask_inputs, ask_outputs, concurrency_limit=1, show_progress_on=answer)
    return demo
