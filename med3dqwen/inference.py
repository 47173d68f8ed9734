"""One call from a CT and a question to an answer: ``med3dqwen.predict(model, volume, question, ...)``.

What it does, in order (each step timed in ``Prediction.timings``):

1. **Model** (``load_model``): a folder or Hub id (plus an optional PEFT adapter) is loaded once per process and kept,
   keyed by ``(model, adapter, device)``; an already loaded model is used as it is.
2. **Volume** (``load_volume``): NIfTI, a DICOM folder / file or ``.npy``, through ``med3dqwen.processing.ct_io``.
3. **ROI** (``mask``): a mask file (``label`` picks one label of a multi-label map, by id or name, names translated
   through the anatomy vocabulary), or a region name (``roi``) looked up in the anatomy vocabulary and segmented
   with ``segmenter`` (``"threshold"``, ``"vista3d"``, ``"totalsegmentator"`` or any ``MaskSource``), or nothing.
4. **Prompt and question**: the ROI is resized to the model grid as the image processor does; an ROI that is empty
   there gives a warning and the no-prompt variant (no contour, question without the outline prefix), never a
   crash. The question is rewritten with ``med3dqwen.data.rewrite`` (RadLex terms, the colour's prefix).
5. **Generate** (``generate``): the training collator builds the model inputs and
   ``med3dqwen.evaluation.generation.generate_batch`` answers greedily, as ``evaluate.py`` does; a closed question on a
   model with a closed head also gets the head's softmax over the question's allowed labels.
6. **Files** (``overlay``): with ``output_dir``, ``answer.json`` (:meth:`Prediction.to_dict`) and
   ``overlay_montage.png`` (the model-grid slices that carry the contour, with the contour the model saw drawn in
   its colour; evenly spaced slices without a contour for the no-prompt variant), both written atomically.

Bad input raises :class:`PredictError`, a ``ValueError`` whose one-line message names the input (``volume``,
``mask``, ``roi``, ``model``, ``adapter``, ...) and the problem.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .anatomy.vocabulary import SOURCES, default_vocabulary
from .data.rewrite import RewriteConfig, closed_label_names, rewrite_question, system_prompt
from .data.schema import IMAGE_SUFFIXES, YES_NO_NAMES, chat_messages, volume_settings
from .io import atomic_output, prompt_png_stack, volume_montage_png
from .processing.ct_io import CTInputError, CTVolume, MaskMismatchError, load_mask, load_volume
from .processing.ct_transforms import binarize_mask, resize_mask
from .segmentation.base import MaskSource, UnknownStructureError, close_matches


__all__ = [
    "MASK_SOURCES",
    "PROMPTS",
    "SEGMENTERS",
    "PredictError",
    "Prediction",
    "adapter_base",
    "clear_model_cache",
    "load_model",
    "predict",
]

PROMPTS = ("red", "blue", "none")
"""``prompt`` values: the contour colour, or ``"none"`` for the no-prompt variant."""
SEGMENTERS = ("threshold", "vista3d", "totalsegmentator")
"""``segmenter`` names for a region given by name (``roi``)."""
MASK_SOURCES = ("file", "totalsegmentator", "vista3d", "threshold", "none")
"""``Prediction.mask_source`` values (a ``MaskSource`` object passed as ``segmenter`` reports its ``source_name``)."""

_AUX_VERBS = frozenset(
    "is are am was were does do did has have had can could will would should shall may might must".split()
)
_OVERLAY_NAME = "overlay_montage.png"
_ANSWER_NAME = "answer.json"
_MONTAGE_TILES = 16
_PLACEHOLDER_ANSWER = "-"  # the collator needs an assistant turn to find where the prompt ends; its text is unused


class PredictError(ValueError):
    """Bad input to :func:`predict`: a one-line message naming the input and the problem.

    Attributes:
        input: which input (``"volume"``, ``"mask"``, ``"roi"``, ``"model"``, ``"adapter"``, ...).
        value: the value given for it.
        problem: what is wrong.
    """

    def __init__(self, input: str, value: Any, problem: str):
        self.input, self.value = input, value
        self.problem = " ".join(str(problem).split())  # one line, whatever the wrapped error held
        super().__init__(f"{input} {str(value)!r}: {self.problem}")

    def __reduce__(self):
        return type(self), (self.input, self.value, self.problem)


@dataclass
class Prediction:
    """The answer to one question about one CT, and how it was obtained (what ``answer.json`` holds).

    Attributes:
        question: the question as asked.
        rewritten_question: the question as the model got it (``med3dqwen.data.rewrite``: RadLex terms, the outline
            prefix of the prompt variant).
        answer: the generated answer (greedy).
        answer_type: ``"closed"`` or ``"open"``.
        closed_answer: the closed head's label (argmax over the allowed labels; ``"yes"``, ``"B"``), None for open
            questions or a model without a closed head.
        probabilities: the closed head's softmax over the question's allowed labels (label name → probability), None
            for open questions or a model without a closed head.
        roi: the region's name (``roi``, or the mask's ``label``), None without one.
        mask_source: where the ROI came from: one of :data:`MASK_SOURCES`.
        covered_fraction: share of the ROI's voxels (on the model grid) under the drawn band, the part of the ROI
            the burned-in contour hides; None when no contour was drawn.
        contour_slices: the model-grid axial slice indices that carry the contour (``[]`` without one).
        num_slices: the model grid's number of axial slices.
        prompt: the prompt actually used: ``"red"``, ``"blue"`` or ``"none"``.
        model: the model's folder or Hub id (its ``name_or_path`` when a loaded model was passed).
        adapter: the adapter's folder or Hub id, None without one.
        timings: seconds per step (``load_model``, ``load_volume``, ``mask``, ``generate``, ``overlay``, ``total``).
        warnings: what the caller should know (an empty ROI answered without a prompt, no closed head, ...).
        overlay_montage: the montage PNG's path when ``output_dir`` was given.
    """

    question: str
    rewritten_question: str
    answer: str
    answer_type: str
    closed_answer: str | None
    probabilities: dict[str, float] | None
    roi: str | None
    mask_source: str
    covered_fraction: float | None
    contour_slices: list[int]
    num_slices: int
    prompt: str
    model: str
    adapter: str | None
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    overlay_montage: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------

_MODEL_CACHE: dict[tuple[str, str | None, str], tuple[Any, Any]] = {}
_MODEL_LOCK = threading.Lock()  # one load at a time: two first requests of a web app must not load a model twice
# One generation at a time: the closed head is read through a forward hook on the (shared, cached) model, which a
# concurrent call's prefill would also trigger.
_GENERATE_LOCK = threading.Lock()
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype")


def clear_model_cache() -> None:
    """Forget the models :func:`load_model` keeps (frees their memory once nothing else holds them)."""
    _MODEL_CACHE.clear()


def _default_device(device: str | None) -> str:
    if device:
        return str(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _cache_key(name: str) -> str:
    """Local folders by their real path (``./m`` and ``/abs/m`` are one model); Hub ids as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _config_dict(folder: Path) -> dict | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}


def _check_model_folder(name: str) -> None:
    """A local model folder must hold a Med3DQwen config; a missing path must at least look like a Hub id."""
    path = Path(name).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise PredictError("model", name, "the folder holds no config.json; it is not a saved model")
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except ValueError as err:
            raise PredictError("model", name, f"its config.json is not valid JSON ({err})") from err
        if model_type != "med3d_qwen":
            raise PredictError("model", name, f"is a {model_type!r} model, not a Med3DQwen (model_type 'med3d_qwen')")
        return
    if path.exists():
        raise PredictError("model", name, "is a file; give a model folder or a Hub id")
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise PredictError("model", name, "no such folder, and not a Hub id of the form 'owner/name'")


def _hub_error(what: str, name: str, err: Exception) -> PredictError:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    reason = "the Hub is switched off (HF_HUB_OFFLINE=1)" if offline else "it could not be fetched from the Hub"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return PredictError(
        what, name, f"not a local folder and {reason}; download it first (huggingface-cli download {name}) and "
        f"pass the folder ({first})"
    )  # fmt: skip


def adapter_base(adapter: str) -> str | None:
    """The ``base_model_name_or_path`` of a PEFT adapter folder or Hub id (None when its config names none).

    Raises:
        PredictError: no such folder, not an adapter, or a Hub id that cannot be fetched.
    """
    folder = Path(adapter).expanduser()
    if folder.is_dir():
        config_path = folder / "adapter_config.json"
    elif folder.exists():
        raise PredictError("adapter", adapter, "is a file; give the adapter's folder (holding adapter_config.json)")
    else:
        if adapter.count("/") != 1 or adapter.startswith((".", "/", "~")):
            raise PredictError("adapter", adapter, "no such folder, and not a Hub id of the form 'owner/name'")
        try:
            from huggingface_hub import hf_hub_download

            config_path = Path(hf_hub_download(adapter, "adapter_config.json"))
        except Exception as err:  # offline, unknown repo, network: all say the same to the user
            raise _hub_error("adapter", adapter, err) from err
    if not config_path.is_file():
        raise PredictError("adapter", adapter, "holds no adapter_config.json; it is not a PEFT adapter")
    try:
        return json.loads(config_path.read_text()).get("base_model_name_or_path")
    except ValueError as err:
        raise PredictError("adapter", adapter, f"its adapter_config.json is not valid JSON ({err})") from err


def _check_adapter(adapter: str, model: str) -> None:
    """The adapter's ``base_model_name_or_path`` must be ``model`` (the same name or folder, or a folder holding the
    same config)."""
    base = adapter_base(adapter)
    if not base or _cache_key(base) == _cache_key(model):
        return
    base_folder, model_folder = Path(base).expanduser(), Path(model).expanduser()
    if base_folder.is_dir() and model_folder.is_dir():
        base_config, model_config = _config_dict(base_folder), _config_dict(model_folder)
        if base_config is not None and base_config == model_config:
            return  # a copy of the same base
    raise PredictError(
        "adapter", adapter, f"was trained on base model {base!r}, which is not --model {model!r}; pass that base "
        "as the model (or the adapter trained on this one)"
    )  # fmt: skip


def load_model(model: str, adapter: str | None = None, device: str | None = None) -> tuple[Any, Any]:
    """The model (with ``adapter`` loaded on it) and its processor, in eval mode on ``device``; loaded once per
    process and then returned from a cache keyed by ``(model, adapter, device)``.

    Args:
        model: a saved Med3DQwen folder or a Hub id.
        adapter: a PEFT adapter folder or Hub id trained on ``model``, or None.
        device: torch device (default: ``"cuda"`` when available, else ``"cpu"``).

    Raises:
        PredictError: no such folder, not a Med3DQwen, a Hub id that cannot be fetched (offline), an adapter trained
            on another base model or whose weights do not fit.
    """
    device = _default_device(device)
    key = (_cache_key(model), None if adapter is None else _cache_key(adapter), device)
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = _load_model(model, adapter, device)
        return _MODEL_CACHE[key]


def _load_model(model: str, adapter: str | None, device: str) -> tuple[Any, Any]:
    _check_model_folder(model)
    if adapter is not None:
        _check_adapter(adapter, model)
    from .modeling.modeling_med3d_qwen import Med3DQwenForConditionalGeneration
    from .processing.processing_med3d_qwen import Med3DQwenProcessor

    local = Path(model).expanduser().is_dir()
    try:
        loaded = Med3DQwenForConditionalGeneration.from_pretrained(model)
        processor = Med3DQwenProcessor.from_pretrained(model)
    except OSError as err:
        if not local:
            raise _hub_error("model", model, err) from err
        raise PredictError("model", model, f"cannot be loaded: {err}") from err
    if adapter is not None:
        import peft

        try:
            loaded = peft.PeftModel.from_pretrained(loaded, adapter)
        except (RuntimeError, ValueError, KeyError) as err:  # size mismatch, wrong target modules
            raise PredictError("adapter", adapter, f"does not fit --model {model!r}: {err}") from err
        except OSError as err:
            raise PredictError("adapter", adapter, f"cannot be loaded: {err}") from err
    return loaded.to(device).eval(), processor


def _resolve_model(model, processor, adapter: str | None, device: str | None) -> tuple[Any, Any, str]:
    """``(model, processor, model name)`` of a name (cached load) or of an already loaded model; None: the adapter's
    base model."""
    if model is None:
        if adapter is None:
            raise PredictError("model", "(none)", "give a model (or an adapter, whose base model is then used)")
        model = adapter_base(adapter)
        if not model:
            raise PredictError("adapter", adapter, "its adapter_config.json names no base model; give the model too")
    if isinstance(model, (str, os.PathLike)):
        name = os.fspath(model)
        loaded, loaded_processor = load_model(name, adapter, device)
        return loaded, processor or loaded_processor, name
    name = str(getattr(model, "name_or_path", "") or type(model).__name__)
    if adapter is not None:
        raise PredictError("adapter", adapter, "pass a model name (not a loaded model) to load an adapter on it")
    if processor is None:
        folder = Path(name)
        if not folder.is_dir():
            raise PredictError("model", name, "a loaded model needs processor=... (its name_or_path is no folder)")
        from .processing.processing_med3d_qwen import Med3DQwenProcessor

        processor = Med3DQwenProcessor.from_pretrained(folder)
    return model, processor, name


# ---------------------------------------------------------------------------------------------------------------
# Volume and ROI
# ---------------------------------------------------------------------------------------------------------------


def _load_ct(volume) -> CTVolume:
    if isinstance(volume, CTVolume):
        return volume
    path = Path(volume).expanduser()
    if not path.exists():
        raise PredictError("volume", volume, "no such file or folder")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise PredictError(
            "volume", volume, "is a 2D image; give a CT volume (.nii / .nii.gz, a DICOM folder or file, or .npy)"
        )
    try:
        return load_volume(path)
    except CTInputError as err:
        raise PredictError("volume", volume, err.problem) from err


def _read_as(ct: CTVolume, intensity: str | None, rescale) -> CTVolume:
    """``ct`` read as the caller says (:func:`~med3dqwen.data.schema.volume_settings`' rules, as for records): the
    HU rescale applied to its values (after a file's own header scaling), the intensity kind recorded in its
    ``meta``. Segmenters and the processor then see HU."""
    import dataclasses

    ct = ct.to_hu()  # raw integers of a header-scaled file (load_volume(stored_integers=True)): HU first
    fields = {"intensity": intensity}
    if rescale is not None:
        if isinstance(rescale, (str, bytes)) or len(rescale) != 2:
            raise PredictError("rescale", rescale, "give (slope, intercept)")
        fields.update(rescale_slope=rescale[0], rescale_intercept=rescale[1])
    try:
        settings = volume_settings(fields)
    except ValueError as err:
        what, value = ("intensity", intensity) if str(err).startswith("intensity") else ("rescale", rescale)
        raise PredictError(what, value, str(err)) from err
    if settings["rescale"] is not None:
        slope, intercept = settings["rescale"]
        ct = dataclasses.replace(ct, array=ct.array * np.float32(slope) + np.float32(intercept))
    if settings["intensity"] is not None:
        ct = dataclasses.replace(ct, meta={**ct.meta, "intensity": settings["intensity"]})
    return ct


def _mask_from_file(mask, label, ct: CTVolume) -> np.ndarray:
    """The (D, H, W) bool ROI of a mask file on ``ct``'s grid; ``label`` picks one label (id, or a name the file's
    table, TotalSegmentator's table or the anatomy vocabulary knows)."""
    if isinstance(mask, np.ndarray):  # already on the volume's grid, in ct_io's canonical (D, H, W) layout
        if mask.shape != ct.shape:
            raise PredictError(
                "mask",
                f"<array {mask.shape}>",
                f"differs from the volume's shape {ct.shape} (is it from another scan?)",
            )
        if label is not None:
            return np.asarray(mask) == int(label)
        try:
            return binarize_mask(mask, "mask")  # the processor's rule: floating values > 0.5, integers non-zero
        except CTInputError as err:
            raise PredictError("mask", _name(mask), err.problem) from err
    path = Path(mask).expanduser()
    if not path.is_file():
        raise PredictError("mask", mask, "no such file" if not path.exists() else "is not a file")
    name = path.name.lower()
    if not (name.endswith((".nii", ".nii.gz", ".npy"))):
        raise PredictError("mask", mask, "is not a mask file; give a NIfTI (.nii / .nii.gz) or .npy label map")
    try:
        if label is None or str(label).strip().isdigit():
            return load_mask(path, like=ct, label=None if label is None else int(label))
        from .segmentation.multilabel import MultilabelFileSource

        return MultilabelFileSource(path).get_mask(ct, str(label)).mask
    except UnknownStructureError as err:
        raise PredictError("label", label, f"not found in mask {os.fspath(mask)!r} ({err.problem})") from err
    except CTInputError as err:
        problem = err.problem
        if isinstance(err, MaskMismatchError):
            problem += " (is the mask from another scan?)"
        raise PredictError("mask", mask, problem) from err


def _name(mask) -> str:
    return f"<array {mask.shape}>" if isinstance(mask, np.ndarray) else os.fspath(mask)


def _vocabulary_names() -> list[str]:
    vocabulary = default_vocabulary()
    names = set(vocabulary.entries)
    for source in SOURCES:
        names.update(vocabulary.names(source))
    return sorted(names)


def _check_roi_name(roi: str) -> str:
    """The canonical key of ``roi`` in the anatomy vocabulary, or a :class:`PredictError` with close matches."""
    if not isinstance(roi, str) or not roi.strip():
        raise PredictError("roi", roi, "give a region name such as 'liver' or 'right lung lower lobe'")
    key = default_vocabulary().canonical(roi)
    if key is None:
        matches = close_matches(roi, _vocabulary_names())
        hint = f"; did you mean {matches}?" if matches else ""
        raise PredictError(
            "roi", roi, f"is not in the anatomy vocabulary (RadLex, TotalSegmentator, VISTA-3D, RadGenome names){hint}"
        )
    return key


def _segmenter(segmenter, device: str | None, options: dict[str, Any]) -> MaskSource:
    if isinstance(segmenter, MaskSource):
        return segmenter
    if segmenter == "threshold":
        from .segmentation.threshold import HUThresholdSource

        return HUThresholdSource(**options)
    if segmenter == "vista3d":
        if importlib.util.find_spec("monai") is None:
            raise PredictError("segmenter", segmenter, "needs MONAI (pip install 'med3dqwen[seg]')")
        from .segmentation.vista3d import Vista3DSource

        options = {"device": _default_device(device), **options}
        options.setdefault("bundle_dir", os.environ.get("MED3DQWEN_VISTA3D_BUNDLE") or None)
        try:
            return Vista3DSource(**options)
        except (ValueError, OSError) as err:
            raise PredictError("segmenter", segmenter, str(err)) from err
    if segmenter == "totalsegmentator":
        return _TotalSegmentatorSource(device=device, **options)
    raise PredictError("segmenter", segmenter, f"unknown; choose one of {list(SEGMENTERS)} or pass a MaskSource")


class _TotalSegmentatorSource(MaskSource):
    """Runs the TotalSegmentator package (when installed) on the volume's file for the structure's classes, then
    reads the multi-label output like any TotalSegmentator label map."""

    source_name = "totalsegmentator"

    def __init__(self, device: str | None = None, fast: bool = False):
        if importlib.util.find_spec("totalsegmentator") is None:
            raise PredictError(
                "segmenter", "totalsegmentator", "the TotalSegmentator package is not installed (pip install "
                "TotalSegmentator, then run it once with internet to fetch its weights); or pass --mask, or use "
                "--segmenter threshold / vista3d"
            )  # fmt: skip
        self.device = "gpu" if _default_device(device).startswith("cuda") else "cpu"
        self.fast = fast

    def get_mask(self, volume: CTVolume, structure: str, *, volume_id: str | None = None):
        from totalsegmentator.python_api import totalsegmentator

        from .segmentation.multilabel import MultilabelFileSource

        classes = default_vocabulary().components(structure, "totalsegmentator")
        if not classes:
            raise UnknownStructureError(structure, self.source_name, detail="no TotalSegmentator class or classes")
        if not volume.path:
            raise PredictError("volume", "<array>", "TotalSegmentator reads files; give the volume as a file")
        with tempfile.TemporaryDirectory(prefix="med3dqwen-ts-") as tmp:
            out = Path(tmp) / "segmentation.nii.gz"
            try:
                totalsegmentator(
                    volume.path, out, ml=True, roi_subset=classes, device=self.device, fast=self.fast, quiet=True
                )
            except (Exception, SystemExit) as err:  # no weights offline, a class outside its "total" task, ...
                raise PredictError("segmenter", "totalsegmentator", f"TotalSegmentator failed: {err!r}") from err
            result = MultilabelFileSource(out).get_mask(volume, structure)
        result.path = None  # the temporary file is gone
        return result


# ---------------------------------------------------------------------------------------------------------------
# Question
# ---------------------------------------------------------------------------------------------------------------


def _closed_fields(question: str, answer_type: str, choices: Sequence[str] | None) -> tuple[str, tuple[str, ...]]:
    """``(answer_type, closed_choices)``: ``choices`` make a closed question over their names; ``"auto"`` makes a
    question that starts with an auxiliary verb ("Is there ...", "Does ...") a yes/no question."""
    if answer_type not in ("auto", "closed", "open"):
        raise PredictError("answer_type", answer_type, "must be 'auto', 'closed' or 'open'")
    if choices is not None:
        if answer_type == "open":
            raise PredictError("choices", list(choices), "an open question has no choices")
        try:
            return "closed", closed_label_names(list(choices))
        except ValueError as err:
            raise PredictError("choices", list(choices), str(err)) from err
    if answer_type == "auto":
        words = question.strip().split()
        first = words[0].lower().strip(",.:;?!") if words else ""
        answer_type = "closed" if first in _AUX_VERBS else "open"
    return answer_type, (tuple(YES_NO_NAMES) if answer_type == "closed" else ())


# ---------------------------------------------------------------------------------------------------------------
# Predict
# ---------------------------------------------------------------------------------------------------------------


def predict(
    model,
    volume,
    question: str,
    *,
    adapter: str | None = None,
    mask: str | os.PathLike | np.ndarray | None = None,
    label: str | int | None = None,
    roi: str | None = None,
    segmenter: str | MaskSource = "threshold",
    segmenter_options: dict[str, Any] | None = None,
    prompt: str = "red",
    choices: Sequence[str] | None = None,
    answer_type: str = "auto",
    output_dir: str | os.PathLike | None = None,
    device: str | None = None,
    max_new_tokens: int = 64,
    processor=None,
    intensity: str | None = None,
    rescale: tuple[float, float] | None = None,
) -> Prediction:
    """Answer ``question`` about the CT ``volume``, with the boundary prompt around the ROI (see the module docstring).

    Args:
        model: a Med3DQwen folder or Hub id (loaded once per process, see :func:`load_model`), a loaded model, or
            None with ``adapter``: the adapter's base model (its ``base_model_name_or_path``).
        volume: a NIfTI file, a DICOM folder or file, a ``.npy`` (D, H, W) array file, or a ``CTVolume``.
        question: the question, as a user would ask it.
        adapter: a PEFT adapter folder or Hub id trained on ``model``.
        mask: a mask file on the volume's grid (binary, or multi-label with ``label``), or a (D, H, W) array on the
            grid of the loaded volume (``ct_io.load_volume``'s canonical layout; ``label`` an id).
        label: which label of a multi-label ``mask``: an id, or a name (the file's label table, TotalSegmentator's,
            or any name of the anatomy vocabulary for it).
        roi: a region name (RadLex / TotalSegmentator / VISTA-3D / RadGenome); without ``mask`` it is segmented
            with ``segmenter``; with ``mask`` it only names the region.
        segmenter: ``"threshold"`` (HU rules: body, lungs, airway, bone), ``"vista3d"`` (MONAI VISTA-3D; its bundle
            folder in ``segmenter_options={"bundle_dir": ...}`` or ``MED3DQWEN_VISTA3D_BUNDLE``),
            ``"totalsegmentator"`` (the TotalSegmentator package, when installed), or a ``MaskSource`` object (its
            own structure names, no vocabulary check).
        segmenter_options: keyword arguments of the segmenter's constructor.
        prompt: ``"red"`` or ``"blue"`` (the contour's colour, also named in the rewritten question), or ``"none"``.
        choices: the label set of a closed multiple-choice question (``["A. left lung", "B. right lung"]``) or
            ``["no", "yes"]``; the question's text should list them as the dataset questions do.
        answer_type: ``"auto"`` (closed yes/no when the question starts with an auxiliary verb, or when ``choices``
            are given; else open), ``"closed"`` or ``"open"``.
        output_dir: where to write ``answer.json`` and ``overlay_montage.png`` (None: write nothing).
        device: torch device for a model loaded by name (default: cuda when available).
        max_new_tokens: the longest answer, in tokens.
        processor: the processor of an already loaded ``model`` (default: loaded from its ``name_or_path``).
        intensity: ``"hu"`` or ``"unit"`` (values already in [0, 1], as M3D-VQA's ``.npy`` arrays; not windowed);
            default: what the file says (HU).
        rescale: ``(slope, intercept)`` for a file whose header lacks them (CT-RATE's originals: ``(1, -1024)``):
            HU = value × slope + intercept, applied on loading, so segmenting by name sees HU too.

    Returns:
        A :class:`Prediction`.

    Raises:
        PredictError: bad input (the message names it): a missing or unreadable volume, a 2D image, a mask from
            another scan or not a mask, an unknown label, an ROI name outside the vocabulary (with close matches) or
            one the segmenter cannot give, a segmenter that is not installed, a model or adapter that cannot be
            loaded (offline Hub id, another base model), an empty question.
    """
    begin = time.perf_counter()
    timings: dict[str, float] = {}
    notes: list[str] = []
    if prompt not in PROMPTS:
        raise PredictError("prompt", prompt, f"must be one of {list(PROMPTS)}")
    if not isinstance(question, str) or not question.strip():
        raise PredictError("question", question, "ask a non-empty question")
    if max_new_tokens < 1:
        raise PredictError("max_new_tokens", max_new_tokens, "must be >= 1")
    if roi is not None and mask is None and not isinstance(segmenter, MaskSource):
        _check_roi_name(roi)  # before any loading: a typo costs nothing (a MaskSource object knows its own names)
    kind, names = _closed_fields(question, answer_type, choices)

    step = time.perf_counter()
    ct = _read_as(_load_ct(volume), intensity, rescale)
    timings["load_volume"] = time.perf_counter() - step

    step = time.perf_counter()
    roi_mask, mask_source = None, "none"
    if mask is not None:
        roi_mask, mask_source = _mask_from_file(mask, label, ct), "file"
        roi = roi if roi is not None else (None if label is None else str(label))
    elif roi is not None:
        source = _segmenter(segmenter, device, dict(segmenter_options or {}))
        try:
            result = source.get_mask(ct, roi)
        except UnknownStructureError as err:
            raise PredictError("roi", roi, f"{err.problem} (segmenter {source.source_name!r})") from err
        except CTInputError as err:
            raise PredictError("roi", roi, f"segmenting it failed: {err}") from err
        roi_mask = result.mask
        mask_source = {"hu_threshold": "threshold"}.get(result.source, result.source)
        if result.whole_volume:
            notes.append(f"ROI {roi!r} is the whole volume by rule: no contour can be drawn; asked without a prompt")
            roi_mask = None
    timings["mask"] = time.perf_counter() - step

    step = time.perf_counter()  # after the inputs are checked: a typo costs no model load
    model, processor, model_name = _resolve_model(model, processor, adapter, device)
    timings["load_model"] = time.perf_counter() - step

    step = time.perf_counter()
    image_processor = processor.image_processor
    small = None if roi_mask is None else resize_mask(roi_mask, image_processor.volume_size)  # the model grid
    if prompt == "none":
        small = None
    elif small is not None and not small.any():
        what = "is empty" if not roi_mask.any() else "vanishes at the model's resolution"
        notes.append(f"the ROI {roi or _name(mask)!r} {what}: asked without a boundary prompt (no-prompt variant)")
        small = None
    used_prompt = prompt if small is not None else "none"

    config = RewriteConfig(color=used_prompt if used_prompt != "none" else "red", prompt=used_prompt != "none")
    try:
        rewritten = rewrite_question(question, config)
    except ValueError as err:
        raise PredictError("question", question, str(err)) from err
    text, probabilities, closed_answer, pixel_values = _answer(
        model, processor, ct, small, roi_mask, rewritten, config, kind, names, roi, max_new_tokens, notes
    )
    timings["generate"] = time.perf_counter() - step

    step = time.perf_counter()
    overlay, covered, contour_slices = _overlay(pixel_values, small, used_prompt, image_processor, output_dir)
    timings["overlay"] = time.perf_counter() - step

    prediction = Prediction(
        question=question,
        rewritten_question=rewritten,
        answer=text.strip(),
        answer_type=kind,
        closed_answer=closed_answer,
        probabilities=probabilities,
        roi=roi,
        mask_source=mask_source,
        covered_fraction=covered,
        contour_slices=contour_slices,
        num_slices=int(image_processor.volume_size[0]),
        prompt=used_prompt,
        model=model_name,
        adapter=adapter,
        timings=timings,
        warnings=notes,
        overlay_montage=None if overlay is None else str(overlay),
    )
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    timings["total"] = time.perf_counter() - begin
    if output_dir is not None:
        with atomic_output(Path(output_dir) / _ANSWER_NAME) as tmp:
            tmp.write_text(json.dumps(prediction.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return prediction


def _answer(model, processor, ct, small, roi_mask, rewritten, config, kind, names, roi, max_new_tokens, notes):
    """``(text, probabilities, closed answer, pixel_values (1, C, D, H, W))`` of one question."""
    import nibabel as nib

    from .evaluation.generation import closed_head_labels, generate_batch
    from .training.collator import Med3DQwenCollator, SampleError

    head = closed_head_labels(model)
    mask_image = None
    if small is not None:  # the full-resolution mask, as the image processor reads masks (its own resize follows)
        mask_image = nib.Nifti1Image(np.asarray(roi_mask, dtype=np.uint8), ct.affine)
    record = {
        "messages": chat_messages(system_prompt(config.color, config.prompt), rewritten, _PLACEHOLDER_ANSWER),
        "volume_path": ct,
        "mask_path": mask_image,
        "boundary_prompt": config.color if config.prompt else "none",  # the record field (schema.prompt_mask_path)
        "roi": roi,
        "answer_type": kind,
        "closed_answer": names[0] if names else None,  # the target is not used: the head's logits are read
        "closed_choices": list(names),
        "volume_id": Path(ct.path).name if ct.path else "volume",
    }
    if kind == "closed" and head:
        outside = [n for n in names if n not in head]
        if outside:
            raise PredictError("choices", list(names), f"{outside} are not labels of the model's closed head {head}")
    try:
        collator = Med3DQwenCollator(_processor_for(processor, config), closed_label_names=head)
        with _GENERATE_LOCK:
            batch = generate_batch(model, collator, [record], max_new_tokens=max_new_tokens)
    except SampleError as err:
        raise PredictError("volume", ct.path or "<array>", str(err)) from err
    probabilities = closed_answer = None
    if kind == "closed":
        if batch.closed_logits is None:
            notes.append("the model has no closed head: no probabilities for this closed question")
        else:
            import torch

            probs = torch.softmax(batch.closed_logits[0], dim=-1)  # (K,), 0 outside the allowed labels
            probabilities = {name: float(probs[head.index(name)]) for name in names}
            closed_answer = max(probabilities, key=probabilities.get)
    return batch.texts[0], probabilities, closed_answer, batch.pixel_values


def _processor_for(processor, config: RewriteConfig):
    """The processor that draws the contour in the prompt's colour: the cached one, or for the ``rgb`` encoding (the
    one where the colour reaches the model) a shallow copy whose image processor uses ``config.color``."""
    image_processor = processor.image_processor
    if not config.prompt or image_processor.prompt_encoding != "rgb" or image_processor.prompt_color == config.color:
        return processor
    recoloured = copy.copy(processor)
    recoloured.image_processor = copy.copy(image_processor)
    recoloured.image_processor.prompt_color = config.color
    return recoloured


def _overlay(pixel_values, small, used_prompt, image_processor, output_dir):
    """``(montage path or None, covered fraction, contour slices)``; writes the montage when ``output_dir`` is given.

    The montage shows the model input itself (channel 0: the windowed, resized volume), so its grey levels and the
    band are exactly what the model saw; the band is painted in the prompt's colour.
    """
    image = pixel_values[0, 0].detach().float().cpu().numpy()  # (D, H, W) in [0, 1]
    if small is not None:
        stack = prompt_png_stack(
            image,
            small,
            output_dir if output_dir is not None else tempfile.gettempdir(),
            color=used_prompt,
            window=(0.0, 1.0),
            thickness=image_processor.contour_thickness,
            mode=image_processor.contour_mode,
            keep_largest=image_processor.keep_largest,
            write_slices=False,
            montage=output_dir is not None,
            max_montage_tiles=_MONTAGE_TILES,
            prefix="overlay",
        )
        return stack.montage, stack.covered_fraction, stack.slice_indices
    if output_dir is None:
        return None, None, []
    return volume_montage_png(image, Path(output_dir) / _OVERLAY_NAME, (0.0, 1.0), _MONTAGE_TILES), None, []
