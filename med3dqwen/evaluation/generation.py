"""Batched greedy generation over dataset records, and the closed head over each row's allowed labels.

Records become model inputs through the training collator (``med3dqwen.training.Med3DQwenCollator``: the same
chat template, image-token expansion, volume loading, boundary prompt and closed targets as training), so what the
model is evaluated on is exactly what it was trained on. The collator right-pads whole conversations; here each
row's prompt (everything before its answer's first label) is cut out and left-padded, as ``generate`` needs::

    input_ids        (B, P)   left-padded prompts ending with "<|im_start|>assistant\\n"
    attention_mask   (B, P)
    pixel_values     (B, C, D, H, W)
    closed_label_mask (B, K)  from the collator, when the model has a closed head

One :class:`SampleResult` per record comes back: its generated text and, for a closed question on a model with a
closed head, the head's label (argmax over the row's ``closed_choices`` only). The head runs inside ``generate``'s
prefill (the model computes it whenever ``pixel_values`` are given); a forward hook keeps that first output, so the
vision encoder runs once per batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..data.schema import message_texts
from ..training.collator import IGNORE_INDEX, Med3DQwenCollator


__all__ = [
    "REPORT_QUESTION_TYPES",
    "GeneratedBatch",
    "SampleResult",
    "closed_head_labels",
    "generate_batch",
    "generate_batches",
    "sample_id",
    "sample_task",
]

REPORT_QUESTION_TYPES = ("region_report", "report", "report_generation")
"""``question_type`` values scored as report generation (the other open rows are open VQA)."""


def sample_id(record: Mapping[str, Any], index: int) -> str:
    """The id a sample is stored and paired under: the record's ``id`` column if it has one, else its split index."""
    value = record.get("id")
    return str(value) if value not in (None, "") else f"{index:06d}"


def sample_task(record: Mapping[str, Any]) -> str:
    """``"closed"``, ``"report"`` or ``"open"``: which Table-1 group a record is scored in."""
    if record.get("answer_type") == "closed":
        return "closed"
    return "report" if record.get("question_type") in REPORT_QUESTION_TYPES else "open"


@dataclass
class SampleResult:
    """What one record gave: the fields scored and reported per sample in ``predictions.jsonl``.

    Attributes:
        id: :func:`sample_id`.
        task: :func:`sample_task`.
        question_type, roi: the record's fields (``roi`` None for whole-volume questions).
        question, reference: the user's question and the assistant's answer of the record.
        prediction: the generated text (special tokens removed, stripped).
        closed_answer: the record's closed label (``"yes"``, ``"B"``), None for open questions.
        closed_prediction: the closed head's label over the row's choices; None without a head or for open rows.
        latency_s: the batch's wall time divided by its size (generation and closed head).
    """

    id: str
    task: str
    question_type: str | None
    roi: str | None
    question: str
    reference: str
    prediction: str
    closed_answer: str | None
    closed_prediction: str | None
    latency_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generate_batches(
    model,
    processor,
    records: Sequence[Mapping[str, Any]],
    ids: Sequence[str],
    *,
    batch_size: int = 4,
    max_new_tokens: int = 64,
    dataset_root: str | None = None,
) -> Iterator[list[SampleResult]]:
    """Generate answers for ``records``, ``batch_size`` at a time, yielding each batch's results as it finishes.

    Args:
        model: a ``Med3DQwenForConditionalGeneration`` (or a PEFT model around one), in eval mode.
        processor: its ``Med3DQwenProcessor``.
        records: dataset records (``trl`` or ``paper`` layout) whose media resolve (``resolve_media`` or
            ``dataset_root``).
        ids: one id per record (:func:`sample_id`).
        batch_size: records per ``generate`` call.
        max_new_tokens: the longest answer, in tokens.
        dataset_root: the folder relative media paths are relative to (None after ``resolve_media``).

    Yields:
        One list of :class:`SampleResult` per batch, in record order.

    Raises:
        ValueError: ``batch_size`` or ``max_new_tokens`` below 1, or ``ids`` not one per record.
        med3dqwen.training.SampleError: a record the collator cannot read (the message names it).
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    if len(ids) != len(records):
        raise ValueError(f"{len(ids)} ids for {len(records)} records: give one id per record")
    names = closed_head_labels(model)
    collator = Med3DQwenCollator(processor, closed_label_names=names, dataset_root=dataset_root)
    for start in range(0, len(records), batch_size):
        batch_records = records[start : start + batch_size]
        begin = time.perf_counter()
        batch = generate_batch(model, collator, batch_records, max_new_tokens=max_new_tokens)
        closed = [None] * len(batch_records)
        if batch.closed_logits is not None:
            best = batch.closed_logits.argmax(dim=-1).tolist()
            closed = [
                names[k] if r.get("answer_type") == "closed" else None
                for k, r in zip(best, batch_records, strict=True)
            ]
        latency = (time.perf_counter() - begin) / len(batch_records)
        yield [
            _result(record, ids[start + i], text, closed[i], latency) for i, (record, text) in enumerate(
                zip(batch_records, batch.texts, strict=True)
            )
        ]  # fmt: skip


def closed_head_labels(model) -> tuple[str, ...]:
    """The closed head's label names (the model config's ``closed_label_names``); ``()`` for a model without one."""
    label_names = tuple(getattr(getattr(model, "config", None), "closed_label_names", None) or ())
    return label_names if getattr(_base_model(model), "closed_head", None) is not None else ()


@dataclass
class GeneratedBatch:
    """What :func:`generate_batch` gives for one batch of records.

    Attributes:
        texts: the generated answers, special tokens removed (not stripped), in record order.
        closed_logits: (B, K) float32 closed-head logits over :func:`closed_head_labels`, ``-inf`` outside each
            row's allowed labels (all ``-inf`` for open rows); None for a model without a closed head.
        pixel_values: (B, C, D, H, W) the volumes as the model saw them (boundary prompt drawn in), on its device.
    """

    texts: list[str]
    closed_logits: torch.Tensor | None
    pixel_values: torch.Tensor


def generate_batch(
    model, collator: Med3DQwenCollator, records: Sequence[Mapping[str, Any]], *, max_new_tokens: int = 64
) -> GeneratedBatch:
    """Greedy answers for one batch of records, and the closed head's logits read from the same prefill.

    Args:
        model: a ``Med3DQwenForConditionalGeneration`` (or a PEFT model around one), in eval mode.
        collator: a :class:`~med3dqwen.training.Med3DQwenCollator` of the model's processor whose
            ``closed_label_names`` are :func:`closed_head_labels` of the model.
        records: the records (their assistant turn is needed only to find where the prompt ends; its text is
            ignored).
        max_new_tokens: the longest answer, in tokens.

    Raises:
        med3dqwen.training.SampleError: a record the collator cannot read (the message names it).
        RuntimeError: the model has a closed head that did not run during the prefill.
    """
    tokenizer = collator.processor.tokenizer
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    device = next(model.parameters()).device
    has_head = bool(collator.closed_label_names) and bool(closed_head_labels(model))
    inputs = _left_padded_prompts(collator(list(records)), tokenizer.pad_token_id)
    inputs = {name: value.to(device) for name, value in inputs.items()}
    captured: list[torch.Tensor] = []  # the head runs in generate's prefill: keep its first output
    hook = _base_model(model).closed_head.register_forward_hook(_keep_first(captured)) if has_head else None
    try:
        with torch.inference_mode():
            output = model.generate(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                pixel_values=inputs["pixel_values"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
            )  # (B, P + new)
    finally:
        if hook is not None:
            hook.remove()
    logits = _allowed_logits(captured, inputs["closed_label_mask"]) if has_head else None
    texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return GeneratedBatch(texts=texts, closed_logits=logits, pixel_values=inputs["pixel_values"])


def _base_model(model):
    """The ``Med3DQwenForConditionalGeneration`` inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _keep_first(store: list):
    """A forward hook that appends the module's first output to ``store`` and ignores later calls."""

    def hook(_module, _inputs, output):
        if not store:
            store.append(output)

    return hook


def _left_padded_prompts(batch: Mapping[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Each row's prompt (the tokens before its first answer label) of a collator batch, left-padded."""
    prompts = []
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        answer = (labels != IGNORE_INDEX).nonzero()
        if not len(answer):  # the collator always labels the answer and its <|im_end|>; no labels: no answer turn
            raise ValueError("a collated row has no answer labels, so its prompt cannot be found")
        prompts.append(ids[: int(answer[0])])  # labels sit on the answer tokens themselves (unshifted)
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, length - len(prompt) :] = prompt
        attention_mask[i, length - len(prompt) :] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": batch["pixel_values"]}
    if "closed_label_mask" in batch:
        out["closed_label_mask"] = batch["closed_label_mask"]
    return out


def _allowed_logits(captured: list[torch.Tensor], allowed: torch.Tensor) -> torch.Tensor:
    """The closed head's first output, (B, K) float32 on the CPU, ``-inf`` outside each row's allowed labels.

    Raises:
        RuntimeError: the head did not run during the prefill (a model whose forward skips it).
    """
    if not captured:
        raise RuntimeError("the closed head did not run while generating; cannot read closed answers from it")
    logits = captured[0].float().masked_fill(~allowed.to(captured[0].device), float("-inf"))  # (B, K)
    return logits.cpu()


def _result(record: Mapping[str, Any], id_: str, text: str, closed: str | None, latency: float) -> SampleResult:
    texts = message_texts(record)
    return SampleResult(
        id=id_,
        task=sample_task(record),
        question_type=record.get("question_type"),
        roi=record.get("roi"),
        question=texts.get("user", ""),
        reference=texts.get("assistant", ""),
        prediction=text.strip(),
        closed_answer=record.get("closed_answer"),
        closed_prediction=closed,
        latency_s=latency,
    )
