"""Med3DQwenProcessor: the 3D image processor + the Qwen2.5 tokenizer, with image-placeholder expansion.

A prompt holds one image block per volume, ``<|vision_start|><|image_pad|><|vision_end|>``; the processor expands
its single ``<|image_pad|>`` into ``num_visual_tokens`` × ``<|image_pad|>`` followed by ``num_slice_tokens`` ×
``<|vision_pad|>`` (the slice tokens), then tokenizes. The model splices its features on those ids.

Self-contained for Hub remote code: third-party imports and the sibling image processor / tokenizer modules only.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence

import numpy as np
from transformers import BatchFeature, ProcessorMixin
from transformers.processing_utils import ImagesKwargs, ProcessingKwargs, TextKwargs

from .tokenization_med3d_qwen import CHAT_TEMPLATE


__all__ = ["Med3DQwenImagesKwargs", "Med3DQwenProcessor", "Med3DQwenProcessorKwargs"]

IMAGE_TOKEN = "<|image_pad|>"
SLICE_TOKEN = "<|vision_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_BLOCK = f"{VISION_START}{IMAGE_TOKEN}{VISION_END}"
_IMAGE_BLOCK_RE = re.compile(re.escape(IMAGE_BLOCK))
# Keys of a content-list image block that hold the volume (transformers' own list) and what may go with it.
_IMAGE_SOURCE_KEYS = ("image", "url", "path", "base64")
_IMAGE_EXTRA_KEYS = ("mask", "label", "layout", "intensity", "rescale")
# Keyword names that would hold a volume or mask under a name the processor does not read: refused, not dropped.
_VOLUME_LIKE_NAMES = ("image", "volume", "pixel_values", "mask", "roi", "ct", "nifti", "video")


class Med3DQwenImagesKwargs(ImagesKwargs, total=False):
    """The image-side keyword arguments of :meth:`Med3DQwenProcessor.__call__` (transformers' ``images_kwargs``)."""

    masks: list | None
    label: int | str | list | None
    layout: str | None
    intensity: str | list | None
    rescale: tuple | list | None
    return_prompt_info: bool


class Med3DQwenProcessorKwargs(ProcessingKwargs, total=False):
    """What ``Med3DQwenProcessor.__call__`` reads, by modality: ``text_kwargs`` go to the tokenizer,
    ``images_kwargs`` (:class:`Med3DQwenImagesKwargs`) to the image processor, ``common_kwargs`` to both
    (``return_tensors``). Each may also be given flat, as ``processor(..., padding=True, masks=[...])``; a flat
    argument wins over the same key in a modality dictionary, as in transformers' ``ProcessorMixin._merge_kwargs``.
    """

    images_kwargs: Med3DQwenImagesKwargs


class Med3DQwenProcessor(ProcessorMixin):
    r"""Processor of Med3DQwen: volumes through [`Med3DQwenImageProcessor`], text through the Qwen2.5 tokenizer.

    Args:
        image_processor ([`Med3DQwenImageProcessor`]): the 3D image processor.
        tokenizer ([`PreTrainedTokenizerFast`]): a Qwen2.5 tokenizer (see `load_qwen2_5_tokenizer`).
        chat_template (`str`, *optional*): defaults to the tokenizer module's `CHAT_TEMPLATE` (the same template and
            default system prompt as `load_qwen2_5_tokenizer()`'s), with image blocks and `{% generation %}` marks.
        num_visual_tokens (`int`, *optional*, defaults to 256): projector tokens per volume.
        num_slice_tokens (`int`, *optional*, defaults to 8): slice tokens per volume (0 without slice tokens).
    """

    valid_processor_kwargs = Med3DQwenProcessorKwargs

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        num_visual_tokens: int = 256,
        num_slice_tokens: int = 8,
        **kwargs,
    ):
        self.num_visual_tokens = int(num_visual_tokens)
        self.num_slice_tokens = int(num_slice_tokens)
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)
        vocab = tokenizer.get_vocab() if tokenizer is not None else {}
        missing = [t for t in (IMAGE_TOKEN, SLICE_TOKEN, VISION_START, VISION_END) if t not in vocab]
        if tokenizer is not None and missing:
            raise ValueError(f"the tokenizer lacks the special tokens {missing}; use a Qwen2.5 tokenizer")
        self.image_token_id = vocab.get(IMAGE_TOKEN)
        self.slice_token_id = vocab.get(SLICE_TOKEN)

    @classmethod
    def from_config(cls, config, tokenizer=None, **image_kwargs) -> Med3DQwenProcessor:
        """A processor matching a `Med3DQwenConfig` (token counts, volume size, prompt encoding)."""
        from .image_processing_med3d_qwen import Med3DQwenImageProcessor

        if tokenizer is None:
            from .tokenization_med3d_qwen import load_qwen2_5_tokenizer

            tokenizer = load_qwen2_5_tokenizer()
        vision = config.vision_config
        image_processor = Med3DQwenImageProcessor(
            volume_size=vision.volume_size, prompt_encoding=config.prompt_encoding, **image_kwargs
        )
        return cls(
            image_processor,
            tokenizer,
            num_visual_tokens=vision.num_visual_tokens,
            num_slice_tokens=vision.num_slice_tokens,
        )

    @property
    def image_sequence(self) -> str:
        """What one image placeholder expands to."""
        return IMAGE_TOKEN * self.num_visual_tokens + SLICE_TOKEN * self.num_slice_tokens

    def expand_image_tokens(self, text: str) -> str:
        """Replace each single ``<|image_pad|>`` of an image block by the full visual + slice token sequence."""
        return self._expand(text)[0]

    def _expand(self, text: str) -> tuple[str, list[dict]]:
        """The expanded text and, per image, where its ``<|image_pad|>`` was and where its expansion is.

        The offsets have the form of transformers' ``text_replacement_offsets``, which ``apply_chat_template``
        uses to move the ``{% generation %}`` spans past the expansion (``return_assistant_tokens_mask=True``).
        """
        sequence, pieces, offsets, last, gained = self.image_sequence, [], [], 0, 0
        for match in _IMAGE_BLOCK_RE.finditer(text):
            start = match.start() + len(VISION_START)
            end = start + len(IMAGE_TOKEN)
            pieces += [text[last:start], sequence]
            offsets.append(
                {
                    "type": "image",
                    "span": (start, end),
                    "new_span": (start + gained, start + gained + len(sequence)),
                    "text": IMAGE_TOKEN,
                    "replacement": sequence,
                }
            )
            gained += len(sequence) - len(IMAGE_TOKEN)
            last = end
        pieces.append(text[last:])
        return "".join(pieces), offsets

    def __call__(
        self,
        images=None,
        text: str | Sequence[str] | None = None,
        videos=None,
        audio=None,
        *,
        volumes=None,
        masks=None,
        label=None,
        layout=None,
        intensity=None,
        rescale=None,
        return_prompt_info: bool = False,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Prepare model inputs.

        Args:
            images: one volume per image block in `text`, in order: file paths (NIfTI, DICOM, `.npy`, figure),
                nibabel images, MONAI `MetaTensor`s, `CTVolume`s, or arrays / tensors with `layout="DHW"`. A list
                of lists (one per sample, as TRL's collator and `apply_chat_template` pass them) is flattened.
            text: prompts (e.g. from :meth:`apply_chat_template`), each with zero or more image blocks.
            videos, audio: not supported; giving them is an error.
            volumes: another name for `images` (give one of the two).
            masks: ROI masks, one per volume (or None), drawn as boundary prompts; same kinds as the volumes.
            label: per volume (or one for all) the label id or name to outline in a multi-label mask file.
            layout: the axis layout of bare arrays (`"DHW"`); required for them, since they carry no affine.
            intensity, rescale: per-volume intensity kind and HU rescale, see `Med3DQwenImageProcessor.preprocess`.
            return_prompt_info: also return `covered_fraction` (B,) and `roi_empty` (B,) (not model inputs).
            return_tensors: `"pt"` (default), `"np"` or None (lists, numpy `pixel_values`).
            **kwargs: tokenizer arguments (`padding`, `padding_side`, `truncation` ...; truncation can cut image
                tokens, and the model then raises a token/feature mismatch), and transformers' processor flags
                `return_mm_token_type_ids` (1 on each volume's visual and slice tokens) and
                `return_text_replacement_offsets`. transformers' per-modality dictionaries work too:
                `text_kwargs={...}`, `images_kwargs={"masks": ..., "label": ...}`, `common_kwargs={"return_tensors":
                ...}` (see `Med3DQwenProcessorKwargs`; a flat argument wins over the same key in a dictionary).

        Returns:
            `BatchFeature` with the model inputs only: `input_ids`, `attention_mask` and, when volumes are given,
            `pixel_values`; so `model.generate(**processor(...))` works.

        Raises:
            ValueError: the number of image blocks in the text differs from the number of volumes; `images` and
                `volumes` both given; videos or audio given.
            TypeError: a keyword argument that neither the processor nor the tokenizer reads (a volume given as
                `image=` or `pixel_values=` would otherwise be dropped silently).
        """
        if text is None:
            raise ValueError("text is required: the volume goes where the prompt's image block is")
        image_args = {"masks": masks, "label": label, "layout": layout, "intensity": intensity, "rescale": rescale}
        image_args["return_prompt_info"] = return_prompt_info or None
        image_args, return_tensors = _merge_modality_kwargs(kwargs, image_args, return_tensors)
        masks, label, layout = image_args["masks"], image_args["label"], image_args["layout"]
        intensity, rescale = image_args["intensity"], image_args["rescale"]
        return_prompt_info = bool(image_args["return_prompt_info"])
        if images is not None and volumes is not None:
            raise ValueError("give the volumes as images= or as volumes=, not both")
        if videos is not None or audio is not None:
            raise ValueError("Med3DQwen reads CT volumes (images= or volumes=); videos= and audio= are not supported")
        self._check_text_kwargs(kwargs)
        volumes = _flatten_samples(images if volumes is None else volumes)
        masks = _flatten_samples(masks)
        texts = [text] if isinstance(text, str) else list(text)
        num_blocks = sum(t.count(IMAGE_BLOCK) for t in texts)
        stray = sum(t.count(IMAGE_TOKEN) for t in texts) - num_blocks
        if stray:
            raise ValueError(
                f"found {stray} {IMAGE_TOKEN} outside a {IMAGE_BLOCK} block; write one image block per volume"
            )
        num_volumes = 0 if volumes is None else len(volumes)
        if num_blocks != num_volumes:
            raise ValueError(f"the text holds {num_blocks} image block(s) but {num_volumes} volume(s) were given")
        data: dict = {}
        if volumes:
            data.update(
                self.image_processor(
                    volumes,
                    masks,
                    return_tensors=return_tensors,
                    intensity=intensity,
                    rescale=rescale,
                    layout=layout,
                    label=label,
                    return_prompt_info=return_prompt_info,
                )
            )
        elif masks and any(mask is not None for mask in masks):
            raise ValueError("masks were given without volumes")
        return_offsets = kwargs.pop("return_text_replacement_offsets", False)
        return_mm_token_type_ids = kwargs.pop("return_mm_token_type_ids", False)
        expanded = [self._expand(t) for t in texts]
        text_inputs = self.tokenizer([t for t, _ in expanded], return_tensors=None, **kwargs)
        data.update(text_inputs)
        if return_offsets:
            data["text_replacement_offsets"] = [offsets for _, offsets in expanded]
        if return_mm_token_type_ids:  # 1 on the visual and slice tokens of each volume, 0 on text
            volume_ids = (self.image_token_id, self.slice_token_id)
            data["mm_token_type_ids"] = [[int(i in volume_ids) for i in row] for row in text_inputs["input_ids"]]
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=["text_replacement_offsets"])

    def _check_text_kwargs(self, kwargs: dict) -> None:
        """Refuse keyword arguments that nothing reads, naming them (the tokenizer would ignore them)."""
        known = set(inspect.signature(type(self.tokenizer).__call__).parameters) | set(TextKwargs.__annotations__)
        unknown = sorted(set(kwargs) - known)
        if not unknown:
            return
        hint = ""
        if any(name.rstrip("s") in _VOLUME_LIKE_NAMES for name in unknown):
            hint = "; volumes go in images= (or volumes=), masks in masks=, multi-label mask ids or names in label="
        raise TypeError(f"{type(self).__name__}.__call__ got unexpected keyword argument(s) {unknown}{hint}")

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs):
        """Render (and with `tokenize=True`, process) conversations in the content-list format.

        Like Qwen2-VL's processor for images: an image block ``{"type": "image", "path": ...}`` (or ``"image"``,
        ``"url"``, ``"base64"``) renders the image block and, with `tokenize=True, return_dict=True`, its volume is
        loaded and returned as `pixel_values`. Each image block may also hold ``"mask"`` (the ROI drawn as the
        boundary prompt: path, nibabel image, MetaTensor or array), ``"label"`` (for a multi-label mask),
        ``"layout"`` (for bare arrays), ``"intensity"`` and ``"rescale"``. A ``{"type": "image"}`` without a
        volume only renders the block (the records' form; give the volume in `processor_kwargs={"images": ...}`).

        All other arguments are those of `ProcessorMixin.apply_chat_template` (`add_generation_prompt`,
        `return_assistant_tokens_mask`, `processor_kwargs`, ...). Without `return_tensors` the ids come back as
        lists and `pixel_values` as a numpy array, as the tokenizer's `apply_chat_template` returns lists; pass
        `return_tensors="pt"` for tensors.
        """
        if kwargs.get("tokenize"):
            processor_kwargs = dict(kwargs.get("processor_kwargs") or {})
            for key, values in _image_block_extras(conversation).items():
                if key in processor_kwargs:
                    raise ValueError(f"{key!r} given both in the image blocks and in processor_kwargs")
                processor_kwargs[key] = values
            if kwargs.get("return_tensors", "auto") == "auto":
                # As the tokenizer's apply_chat_template (and TRL's checks, which read it): lists, unless asked.
                processor_kwargs.setdefault("return_tensors", None)
            kwargs["processor_kwargs"] = processor_kwargs
        return super().apply_chat_template(conversation, chat_template, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return list(dict.fromkeys([*self.tokenizer.model_input_names, "pixel_values"]))

    def prompt_lengths(self, prompts: Sequence[str]) -> np.ndarray:
        """Token count of each prompt after image expansion (for masking the prompt out of the labels)."""
        expanded = [self.expand_image_tokens(p) for p in prompts]
        return np.asarray([len(ids) for ids in self.tokenizer(expanded)["input_ids"]])


def _merge_modality_kwargs(kwargs: dict, image_args: dict, return_tensors):
    """Fold transformers' per-modality dictionaries (``text_kwargs``, ``images_kwargs``, ``common_kwargs``) into
    the flat arguments; ``kwargs`` (the tokenizer's) is updated in place. A flat argument wins.

    Raises:
        TypeError: a modality dictionary that is not a dict, an ``images_kwargs`` key the image side does not read
            (``videos_kwargs`` / ``audio_kwargs`` are refused as the ``videos`` / ``audio`` inputs are).
    """
    for name in ("videos_kwargs", "audio_kwargs"):
        if kwargs.pop(name, None):
            raise TypeError(f"Med3DQwenProcessor reads CT volumes: {name} is not supported")
    nested = {name: kwargs.pop(name, None) or {} for name in ("text_kwargs", "images_kwargs", "common_kwargs")}
    for name, value in nested.items():
        if not isinstance(value, dict):
            raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
    common = dict(nested["common_kwargs"])
    if "return_tensors" in common:  # the flat return_tensors defaults to "pt": the common key decides unless given
        return_tensors = common.pop("return_tensors") if return_tensors == "pt" else return_tensors
    for key, value in {**common, **nested["text_kwargs"]}.items():
        kwargs.setdefault(key, value)
    unknown = sorted(set(nested["images_kwargs"]) - set(Med3DQwenImagesKwargs.__annotations__))
    if unknown:
        raise TypeError(f"images_kwargs holds keys the image processor does not read: {unknown}")
    for key, value in nested["images_kwargs"].items():
        if image_args[key] is None:
            image_args[key] = value
    return image_args, return_tensors


def _flatten_samples(values) -> list | None:
    """One flat list of volumes (or masks) from a single one, a list, or a list of per-sample lists."""
    if values is None:
        return None
    if not isinstance(values, (list, tuple)):
        return [values]
    flat = []
    for value in values:
        flat.extend(value if isinstance(value, (list, tuple)) else [value])
    return flat


def _image_block_extras(conversation) -> dict[str, list]:
    """Per-volume ``mask`` / ``label`` / ... of the image blocks that hold a volume, in order (empty if none has one).

    Raises:
        ValueError: an image block gives a mask (or another extra) but no volume.
    """
    batched = isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], (list, tuple))
    conversations = conversation if batched else [conversation]
    extras: dict[str, list] = {key: [] for key in _IMAGE_EXTRA_KEYS}
    for messages in conversations:
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, list):
                continue
            for block in content:
                if not isinstance(block, dict) or block.get("type") != "image":
                    continue
                has_volume = any(block.get(key) is not None for key in _IMAGE_SOURCE_KEYS)
                given = [key for key in _IMAGE_EXTRA_KEYS if block.get(key) is not None]
                if given and not has_volume:
                    raise ValueError(f"an image block gives {given} but no volume (one of {_IMAGE_SOURCE_KEYS})")
                if has_volume:
                    for key in _IMAGE_EXTRA_KEYS:
                        extras[key].append(block.get(key))
    processor_names = {"mask": "masks"}
    return {processor_names.get(k, k): v for k, v in extras.items() if any(x is not None for x in v)}
