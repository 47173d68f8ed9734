"""The training collator: dataset records → one padded batch of model inputs, labels and closed-head targets.

One record is one conversation (system, user with one ``{"type": "image"}`` placeholder, assistant) plus its volume
(``volume_path``) and ROI mask (``mask_path``, or None), as the builders write it (``docs/dataset_format.md``); the
contour is drawn unless the record's ``boundary_prompt`` is ``"none"`` (a no-prompt build keeps its masks). The
collator runs in the DataLoader workers: it loads and prompts the volume through the processor's image processor,
renders the conversation with the processor's chat template, and builds::

    input_ids        (B, L)   right-padded with the tokenizer's pad token
    attention_mask   (B, L)   1 on tokens, 0 on padding
    pixel_values     (B, C, D, H, W)
    labels           (B, L)   the answer and its <|im_end|>; -100 on everything else
    closed_labels    (B,)     index into the model config's closed_label_names, -100 for open rows
    closed_label_mask (B, K)  the labels each row allows (all False for open rows)

nothing else, so ``model(**batch)`` takes it as it is.

Why not TRL's ``DataCollatorForVisionLanguageModeling``: the processor works with it
(``assistant_only_loss=True`` gives the same labels as this collator, see the tests), but it cannot do this job:

- **Truncation.** It passes ``truncation=True, max_length=...`` to the tokenizer, which cuts the whole sequence at
  ``max_length``: a prompt longer than that loses image or slice tokens, and the model's splice then fails on a
  token/feature count mismatch deep inside the forward. Here only the answer is cut; a row whose prompt does not
  fit is skipped, logged and counted (or, with ``skip_long_prompts=False``, an error naming the row).
- **Closed labels.** It returns ``input_ids``, ``attention_mask``, ``pixel_values`` and ``labels`` only; the closed
  head needs ``closed_labels`` / ``closed_label_mask`` from each record's ``closed_answer`` / ``closed_choices``.
- **Masks.** It hands the processor one ``images`` list per row; the ROI mask (the boundary prompt) and a dataset
  root for relative paths have no place there.
- **Errors.** A missing volume or a conversation whose prompt is not a token prefix of the whole would surface as a
  raw exception without the row it came from.

So this collator does the same steps itself, with the same pieces: the processor's chat template, its image-token
expansion and its image processor.

**Two sources, one output.** Without ``cache`` the volume and mask files are read and brought to the model grid
online (the image processor's ``model_grid``); with a model-grid cache (``med3dqwen.data.cache``, built once by
``med3dqwen-build-cache``) the windowed, resized volume and mask are read from it (milliseconds instead of hundreds).
Either way the contour is drawn here with the processor's prompt settings, so both give the same ``pixel_values``
within the cache's quantisation (≤ 7.7e-6) and the identical contour.

**Bad samples.** By default a record that cannot become a sample raises :class:`SampleError` naming it. With
``skip_bad_samples`` it is left out of the batch instead, logged with its name and reason, and counted
(``num_skipped`` in this process; one JSON line per skip in ``skip_log``, which collects the count across DataLoader
workers and processes). A batch whose every record is bad becomes one placeholder row — a zero volume behind the
image block, every label -100 — so each process still runs its forward and backward (DDP stays in step) and the
step learns nothing from it (``Med3DQwenTrainer`` keeps the loss at 0 rather than 0/0).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.cache import CachedSampleError, CacheMismatchError, ModelGridCache, media_key
from ..data.schema import CLOSED_LABEL_NAMES, closed_targets, prompt_mask_path, volume_settings


__all__ = ["IGNORE_INDEX", "Med3DQwenCollator", "PromptTooLongError", "SampleError", "count_skipped"]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of a token that is not trained on (``torch.nn.CrossEntropyLoss``'s ``ignore_index``)."""

_VOLUME_ID_KEYS = ("volume_id", "id")
IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"


class SampleError(ValueError):
    """A record the collator cannot turn into a training sample; the message names it.

    Attributes:
        row: the record's position in the batch handed to the collator.
        name: how the record is named in the message (its ``volume_id``, or its volume path).
    """

    def __init__(self, row: int, name: str, problem: str):
        super().__init__(f"training sample {row} ({name}): {problem}")
        self.row = row
        self.name = name


class PromptTooLongError(SampleError):
    """A record whose prompt alone reaches ``max_length``: keeping an answer would mean cutting image or slice tokens
    (and a crash in the model's splice). The collator skips and counts it by default (``skip_long_prompts``)."""


@dataclass
class Med3DQwenCollator:
    """Turns a list of records into a training batch (see the module docstring for what it returns).

    Picklable (a dataclass of the processor and plain values), so it runs in DataLoader workers under ``fork`` and
    ``spawn``.

    Args:
        processor: a ``Med3DQwenProcessor`` matching the model (token counts, volume size, prompt encoding).
        closed_label_names: the model config's ``closed_label_names`` (the closed head's vocabulary); empty for a
            model without a closed head (no ``closed_labels`` / ``closed_label_mask`` are returned then).
        max_length: the longest sequence in tokens; only the answer is cut to fit (``SFTConfig.max_length`` is not
            applied by TRL with a custom collator: pass it here). None: no limit.
        dataset_root: the folder that relative ``volume_path`` / ``mask_path`` values are relative to (the built
            dataset's folder). Not needed after ``med3dqwen.data.resolve_media`` (absolute paths or nibabel images).
        cache: a model-grid cache (a ``ModelGridCache`` or its folder) built with this processor's volume size and
            window; the volumes and masks are then read from it (the files need not exist). None: read online.
        skip_bad_samples: leave out (log and count) the records that cannot become samples instead of raising.
        skip_long_prompts: leave out (log and count) a record whose prompt alone reaches ``max_length``
            (:class:`PromptTooLongError`) even without ``skip_bad_samples``; False: raise it.
        skip_log: a file that gets one JSON line (``name``, ``reason``) per skipped record (appended; see
            :func:`count_skipped`). None: only logged and counted in this process.

    Raises:
        CacheMismatchError: the cache was built for another volume size or window.
    """

    processor: Any
    closed_label_names: Sequence[str] = CLOSED_LABEL_NAMES
    max_length: int | None = None
    dataset_root: str | os.PathLike | None = None
    cache: ModelGridCache | str | os.PathLike | None = None
    skip_bad_samples: bool = False
    skip_long_prompts: bool = True
    skip_log: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be a positive number of tokens or None, got {self.max_length}")
        if self.cache is not None and not isinstance(self.cache, ModelGridCache):
            self.cache = ModelGridCache(self.cache)
        if self.cache is not None:
            self.cache.check_settings(self.processor.image_processor)
        self.num_skipped = 0
        self._placeholder: tuple[list[int], list[int]] | None = None
        self.closed_label_names = tuple(self.closed_label_names)
        tokenizer = self.processor.tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError("the processor's tokenizer has no pad token; right padding needs one")
        self._im_end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self._volume_tokens = (self.processor.image_token_id, self.processor.slice_token_id)
        self._tokens_per_volume = self.processor.num_visual_tokens + self.processor.num_slice_tokens

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate ``examples`` (records) into a batch.

        Raises:
            SampleError: a record without one image placeholder or a final assistant turn, whose volume or mask
                cannot be read, whose prompt is not a token prefix of its conversation, or whose closed fields are
                invalid (unless ``skip_bad_samples``); whose prompt alone reaches ``max_length`` (only with
                ``skip_long_prompts=False``). The message names the record.
        """
        if not examples:
            raise ValueError("the collator got an empty batch")
        pixels = _pixel_buffer(len(examples), self.processor.image_processor)  # (N, C, D, H, W)
        rows, targets = [], []
        for i, example in enumerate(examples):
            try:
                row = self._sample(i, example, pixels[len(rows)])
                target = self._closed(i, example) if self.closed_label_names else None
            except SampleError as err:
                too_long = isinstance(err, PromptTooLongError) and self.skip_long_prompts
                if not (self.skip_bad_samples or too_long):
                    raise
                self._skip(err)
                continue
            rows.append(row)
            targets.append(target)
        if not rows:  # every record was bad: one placeholder row that trains nothing
            rows = [self._placeholder_row()]
            pixels[0].zero_()
            targets = [(IGNORE_INDEX, [False] * len(self.closed_label_names))]
        length = max(len(ids) for ids, _ in rows)
        pad = self.processor.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, row_labels) in enumerate(rows):  # right padding
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
            labels[i, : len(ids)] = torch.tensor(row_labels)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixels[: len(rows)],  # (B, C, D, H, W)
            "labels": labels,
        }
        if self.closed_label_names:
            batch["closed_labels"] = torch.tensor([label for label, _ in targets], dtype=torch.long)  # (B,)
            batch["closed_label_mask"] = torch.tensor([allowed for _, allowed in targets], dtype=torch.bool)  # (B, K)
        return batch

    # -- bad records ----------------------------------------------------------------------------------------------

    def _skip(self, err: SampleError) -> None:
        """Log, count and record one skipped record."""
        self.num_skipped += 1
        reason = str(err).split(": ", 1)[-1]
        logger.warning("skipped a bad training sample (%s): %s", err.name, reason)
        if self.skip_log is not None:
            line = json.dumps({"name": err.name, "reason": reason}) + "\n"
            # One small O_APPEND write per line: lines from several workers and processes never interleave.
            fd = os.open(self.skip_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    def _placeholder_row(self) -> tuple[list[int], list[int]]:
        """A row that trains nothing: the image block (over a zero volume), every label -100."""
        if self._placeholder is None:
            ids = self._tokens(f"<|im_start|>user\n{IMAGE_BLOCK}<|im_end|>\n")
            self._placeholder = (ids, [IGNORE_INDEX] * len(ids))
        return self._placeholder

    # -- one record -----------------------------------------------------------------------------------------------

    def _sample(self, row: int, example: Mapping[str, Any], out: torch.Tensor) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one record, the answer cut to ``max_length``; its pixel values go to ``out``
        (C, D, H, W)."""
        name = _record_name(example)
        messages = example.get("messages")
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
            raise SampleError(row, name, "its messages must be a conversation that ends with the assistant's answer")
        prompt_text = self._render(messages[:-1], add_generation_prompt=True)
        blocks = prompt_text.count(IMAGE_BLOCK)
        if blocks != 1:
            raise SampleError(row, name, f"a training record holds one image placeholder, its prompt has {blocks}")
        prompt_ids = self._tokens(prompt_text)
        full_ids = self._tokens(self._render(messages, add_generation_prompt=False))
        if full_ids[: len(prompt_ids)] != prompt_ids:
            at = next(i for i, (a, b) in enumerate(zip(prompt_ids, full_ids, strict=False)) if a != b)
            raise SampleError(
                row,
                name,
                f"the prompt is not a token prefix of the conversation (they differ at token {at}: "
                f"{self.processor.tokenizer.decode(prompt_ids[at : at + 5])!r} vs "
                f"{self.processor.tokenizer.decode(full_ids[at : at + 5])!r}); the chat template renders the "
                "turns before the answer differently with and without it",
            )
        volume_tokens = sum(1 for token in prompt_ids if token in self._volume_tokens)
        if volume_tokens != self._tokens_per_volume:
            raise SampleError(
                row, name, f"its prompt holds {volume_tokens} image/slice tokens, the model expects "
                f"{self._tokens_per_volume}"
            )  # fmt: skip
        answer = full_ids[len(prompt_ids) :]
        if self._im_end_id not in answer:
            raise SampleError(row, name, "the rendered answer has no <|im_end|>; is the chat template ChatML?")
        trained = answer.index(self._im_end_id) + 1  # the answer and its <|im_end|>; what follows is not learnt
        if self.max_length is not None:
            if len(prompt_ids) >= self.max_length:
                raise PromptTooLongError(
                    row,
                    name,
                    f"its prompt is {len(prompt_ids)} tokens (with {volume_tokens} image and slice tokens), which "
                    f"leaves no room for the answer within max_length={self.max_length}; raise max_length",
                )
            full_ids = full_ids[: self.max_length]
            trained = min(trained, self.max_length - len(prompt_ids))
        labels = [IGNORE_INDEX] * len(full_ids)
        labels[len(prompt_ids) : len(prompt_ids) + trained] = full_ids[len(prompt_ids) : len(prompt_ids) + trained]
        self._pixels(row, name, example, out)
        return full_ids, labels

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """``messages`` rendered with the processor's chat template (either record layout)."""
        render = self.processor.apply_chat_template
        return render(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _tokens(self, text: str) -> list[int]:
        """Token ids of a rendered conversation, its image block expanded to the visual and slice tokens."""
        expanded = self.processor.expand_image_tokens(text)
        return self.processor.tokenizer(expanded, add_special_tokens=False)["input_ids"]

    def _pixels(self, row: int, name: str, example: Mapping[str, Any], out: torch.Tensor) -> None:
        """The record's prompted volume, written to ``out`` (C, D, H, W)."""
        if example.get("volume_path") is None:
            raise SampleError(row, name, "it has no volume_path")
        try:
            settings = volume_settings(example)  # intensity kind and HU rescale, as the builder recorded them
        except ValueError as err:
            raise SampleError(row, name, str(err)) from err
        if self.cache is not None:
            return self._cached_pixels(row, name, example, settings, out)
        volume = self._media(row, name, example["volume_path"], "volume_path")
        mask = self._prompt_mask(row, name, example)
        mask = None if mask is None else self._media(row, name, mask, "mask_path")
        try:
            processed = self.processor.image_processor(
                [volume], [mask], return_tensors="pt", intensity=settings["intensity"], rescale=settings["rescale"]
            )
        except (OSError, ValueError, RuntimeError, TypeError) as err:  # unreadable, corrupt or mismatched files
            raise SampleError(row, name, f"cannot load its volume or mask: {err}") from err
        out.copy_(processed["pixel_values"][0])

    def _cached_pixels(
        self, row: int, name: str, example: Mapping[str, Any], settings: Mapping[str, Any], out: torch.Tensor
    ) -> None:
        """The record's prompted volume from the model-grid cache: its volume and mask read, the contour drawn here,
        straight into ``out`` (C, D, H, W)."""
        root = self.cache.dataset_root if self.dataset_root is None else self.dataset_root
        target = out.numpy()  # (C, D, H, W), the batch's own memory
        try:
            volume_key = media_key(example["volume_path"], root)
            mask_path = self._prompt_mask(row, name, example)
            mask_key = media_key(mask_path, root)
            source = _source(example["volume_path"], root)
            image = self.cache.volume(volume_key, source, out=target[0], settings=settings)
            roi = None if mask_key is None else self.cache.mask(volume_key, mask_key, _source(mask_path, root))
        except CachedSampleError as err:  # the build could not read it: the error the online path gives
            raise SampleError(
                row, name, f"cannot load its volume or mask: {err} (recorded by the cache build)"
            ) from err
        except CacheMismatchError as err:
            raise SampleError(row, name, str(err)) from err
        pixels = self.processor.image_processor.draw_prompt(image, roi).pixel_values  # (C, D, H, W)
        if not np.shares_memory(pixels, target):  # burn_in draws in place; the other encodings stack new channels
            target[...] = pixels

    @staticmethod
    def _prompt_mask(row: int, name: str, example: Mapping[str, Any]) -> Any:
        """The mask the contour is drawn from: None for whole-volume and no-prompt rows (``boundary_prompt`` =
        ``"none"`` keeps ``mask_path`` as the ROI's name but nothing is drawn, see ``prompt_mask_path``)."""
        try:
            return prompt_mask_path(example)
        except ValueError as err:
            raise SampleError(row, name, str(err)) from err

    def _media(self, row: int, name: str, value: Any, column: str) -> Any:
        """A path made absolute against ``dataset_root`` and checked to exist; decoded media as they are."""
        if not isinstance(value, (str, os.PathLike)):
            return value  # a nibabel image from a resolved Nifti column, or an array-like
        path = Path(value)
        if not path.is_absolute():
            if self.dataset_root is None:
                raise SampleError(
                    row, name, f"{column} {str(value)!r} is relative; pass dataset_root= (the dataset folder) or "
                    "use med3dqwen.data.resolve_media"
                )  # fmt: skip
            path = Path(self.dataset_root) / path
        if not path.exists():
            raise SampleError(row, name, f"{column} {str(value)!r} does not exist ({path})")
        return str(path)

    def _closed(self, row: int, example: Mapping[str, Any]) -> tuple[int, list[bool]]:
        try:
            label, allowed = closed_targets(example, self.closed_label_names)
        except ValueError as err:
            raise SampleError(row, _record_name(example), str(err)) from err
        return label, allowed


def _pixel_buffer(rows: int, image_processor) -> torch.Tensor:
    """An uninitialised (rows, C, D, H, W) float32 batch; in a DataLoader worker it is allocated in shared memory, so
    the batch reaches the main process without the copy into shared memory that sending it would make (as
    ``torch.utils.data.default_collate`` does)."""
    shape = (rows, image_processor.num_channels, *image_processor.volume_size)
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape)
    numel = int(np.prod(shape))
    empty = torch.empty(0)
    return empty.new(empty._typed_storage()._new_shared(numel, device=empty.device)).view(shape)


def count_skipped(skip_log: str | os.PathLike) -> int:
    """How many records the collators that share ``skip_log`` skipped (0 when the file does not exist)."""
    try:
        with open(skip_log, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def _source(value: Any, root: str | os.PathLike | None) -> str | None:
    """The file behind a record's media value when it is at hand (to check the cache entry is not stale)."""
    if hasattr(value, "get_filename"):
        value = value.get_filename()
    if not isinstance(value, (str, os.PathLike)):
        return None
    path = Path(value)
    if not path.is_absolute():
        if root is None:
            return None
        path = Path(root) / path
    return str(path)


def _record_name(example: Mapping[str, Any]) -> str:
    for key in _VOLUME_ID_KEYS:
        if example.get(key):
            return f"{key} {example[key]!r}"
    path = example.get("volume_path")
    return f"volume_path {str(path)!r}" if isinstance(path, (str, os.PathLike)) else "a record without volume_id"
