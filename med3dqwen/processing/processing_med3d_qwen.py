"""Med3DQwenProcessor: the 3D image processor + the Qwen2.5 tokenizer, with image-placeholder expansion.

A prompt holds one image block per volume, ``<|vision_start|><|image_pad|><|vision_end|>``; the processor expands
its single ``<|image_pad|>`` into ``num_visual_tokens`` × ``<|image_pad|>`` followed by ``num_slice_tokens`` ×
``<|vision_pad|>`` (the slice tokens), then tokenizes. The model splices its features on those ids.

Self-contained for Hub remote code: third-party imports and the sibling image processor only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from transformers import BatchFeature, ProcessorMixin


__all__ = ["Med3DQwenProcessor"]

IMAGE_TOKEN = "<|image_pad|>"
SLICE_TOKEN = "<|vision_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_BLOCK = f"{VISION_START}{IMAGE_TOKEN}{VISION_END}"

# ChatML over the paper's message layout [system, user, vision, assistant] and HF's content-list format.
# The "vision" turn carries file paths, not text: it renders nothing, but puts the image block at the start of
# the first user turn (the model sees the volume, then the question). Content lists render their image entries
# as image blocks in place. The template has no layout whitespace, so no whitespace control is needed (a "{%-" would
# also eat the newlines that ChatML needs).
CHAT_TEMPLATE = (
    "{% set has_vision = messages | selectattr('role', 'equalto', 'vision') | list | length > 0 %}"
    "{% set ns = namespace(image_pending=has_vision) %}"
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'vision' %}"
    "{% else %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'user' and ns.image_pending %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% set ns.image_pending = false %}"
    "{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'volume' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Med3DQwenProcessor(ProcessorMixin):
    r"""Processor of Med3DQwen: volumes through [`Med3DQwenImageProcessor`], text through the Qwen2.5 tokenizer.

    Args:
        image_processor ([`Med3DQwenImageProcessor`]): the 3D image processor.
        tokenizer ([`PreTrainedTokenizerFast`]): a Qwen2.5 tokenizer (see `load_qwen2_5_tokenizer`).
        chat_template (`str`, *optional*): defaults to ChatML over the paper's message layout.
        num_visual_tokens (`int`, *optional*, defaults to 256): projector tokens per volume.
        num_slice_tokens (`int`, *optional*, defaults to 8): slice tokens per volume (0 without slice tokens).
    """

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
        return text.replace(IMAGE_BLOCK, f"{VISION_START}\x00{VISION_END}").replace("\x00", self.image_sequence)

    def __call__(
        self,
        volumes=None,
        text: str | Sequence[str] | None = None,
        masks=None,
        return_tensors: str | None = "pt",
        intensity=None,
        rescale=None,
        **kwargs,
    ) -> BatchFeature:
        """Prepare model inputs.

        Args:
            volumes: one volume per image block in `text` (paths, `CTVolume`s or HU arrays), in order.
            text: prompts (e.g. from :meth:`apply_chat_template`), each with zero or more image blocks.
            masks: ROI masks, one per volume (or None), drawn as boundary prompts.
            return_tensors: `"pt"` (default) or `"np"`.
            intensity, rescale: per-volume intensity kind and HU rescale, see `Med3DQwenImageProcessor.preprocess`.
            **kwargs: tokenizer arguments (`padding`, `padding_side`, `truncation` ...). Truncation can cut image
                tokens; the model then raises a token/feature mismatch.

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask` and, when volumes are given, `pixel_values`,
            `covered_fraction` and `roi_empty`.

        Raises:
            ValueError: the number of image blocks in the text differs from the number of volumes.
        """
        if text is None:
            raise ValueError("text is required: the volume goes where the prompt's image block is")
        texts = [text] if isinstance(text, str) else list(text)
        num_blocks = sum(t.count(IMAGE_BLOCK) for t in texts)
        stray = sum(t.count(IMAGE_TOKEN) for t in texts) - num_blocks
        if stray:
            raise ValueError(
                f"found {stray} {IMAGE_TOKEN} outside a {IMAGE_BLOCK} block; write one image block per volume"
            )
        data: dict = {}
        if volumes is not None:
            image_inputs = self.image_processor(
                volumes, masks, return_tensors=return_tensors, intensity=intensity, rescale=rescale
            )
            num_volumes = len(image_inputs["pixel_values"])
            data.update(image_inputs)
        else:
            num_volumes = 0
        if num_blocks != num_volumes:
            raise ValueError(f"the text holds {num_blocks} image block(s) but {num_volumes} volume(s) were given")
        texts = [self.expand_image_tokens(t) for t in texts]
        data.update(self.tokenizer(texts, return_tensors=return_tensors, **kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors)

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
