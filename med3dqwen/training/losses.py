"""The paper's training loss: token NLL + class-balanced focal loss on the closed head + L2 on the LoRA weights.

The model returns ``lm_loss`` (next-token NLL over the assistant tokens) and the closed head's masked logits
(``closed_logits``, ``-inf`` outside each row's allowed labels); :func:`sft_loss` adds the other two terms:

- :func:`focal_loss`: class-balanced focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection", γ = 2)
  over each row's allowed label set, with class weights from the training split's closed-label counts
  (:func:`closed_class_weights`);
- :func:`lora_l2`: λ·Σ‖W‖² over PEFT's ``lora_A`` / ``lora_B`` weights (λ = 1e-4).

**Gradient accumulation.** transformers 5.24's ``Trainer.training_step`` counts the target tokens of all the
micro-batches of one optimiser step (``num_items_in_batch``, summed over processes when
``average_tokens_across_devices``), passes it to the model, whose NLL is then ``Σ token losses / num_items_in_batch``
— each micro-batch's share of one mean over the whole accumulated batch — and does *not* divide the loss by the
accumulation steps; ``Trainer.compute_loss`` multiplies it by the number of processes, since DDP averages gradients.
Without ``num_items_in_batch`` the loss is a per-micro-batch mean and the Trainer divides it by the accumulation
steps. :func:`sft_loss` divides each term the same way, so that over one optimiser step each adds up to the value it
has on the whole accumulated batch at once:

- focal: ``Σ row losses / num_closed_in_batch`` (closed rows of all the micro-batches) when that count is given;
  otherwise the micro-batch mean weighted by its share of the target tokens, as the model weights its own
  ``closed_loss`` (exact when the closed rows are spread like the tokens);
- L2: one λ·Σ‖W‖² per optimiser step, each micro-batch adding its share of the target tokens (the shares add up to 1).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..data.schema import CLOSED_IGNORE_INDEX, CLOSED_LABEL_NAMES, closed_targets
from .collator import IGNORE_INDEX


__all__ = [
    "DEFAULT_BETA",
    "FOCAL_GAMMA",
    "LORA_L2_WEIGHT",
    "closed_class_weights",
    "closed_label_counts",
    "focal_loss",
    "labelled_logits",
    "lora_l2",
    "lora_parameters",
    "sft_loss",
]

FOCAL_GAMMA = 2.0
"""The focal loss's focusing parameter γ (the paper's value)."""
LORA_L2_WEIGHT = 1e-4
"""λ of the L2 term on the LoRA weights (the paper's value)."""
DEFAULT_BETA = 0.999
"""β of the effective number of samples (Cui et al. 2019 found 0.999-0.9999 best on long-tailed data)."""
_CLOSED_FIELDS = ("volume_id", "answer_type", "closed_answer", "closed_choices")


def closed_label_counts(records: Iterable[Mapping[str, Any]], label_names: Sequence[str] = CLOSED_LABEL_NAMES):
    """How many closed records answer each label of ``label_names`` (open records are not counted).

    Args:
        records: the training split: a ``datasets.Dataset`` (only the closed-answer columns are read, so no volume
            is decoded) or any iterable of records.
        label_names: the closed head's vocabulary (the model config's ``closed_label_names``).

    Returns:
        A ``collections.Counter`` from label name to count (0 for labels no record answers).

    Raises:
        ValueError: a record's closed fields are missing or invalid (the message names it).
    """
    if hasattr(records, "select_columns"):  # a datasets.Dataset: skip the media columns
        records = records.select_columns([c for c in _CLOSED_FIELDS if c in records.column_names])
    names = list(label_names)
    counts = Counter(dict.fromkeys(names, 0))
    for record in records:
        label, _ = closed_targets(record, names)
        if label != CLOSED_IGNORE_INDEX:
            counts[names[label]] += 1
    return counts


def closed_class_weights(
    records: Iterable[Mapping[str, Any]],
    label_names: Sequence[str] = CLOSED_LABEL_NAMES,
    beta: float = DEFAULT_BETA,
) -> torch.Tensor:
    """Class weights of the focal loss from the training split's closed-label counts: the inverse effective number.

    Cui et al. 2019, "Class-Balanced Loss Based on Effective Number of Samples" (CVPR), eq. 5-6: a class with
    ``n`` samples weighs ``(1 - β) / (1 - βⁿ)``, between inverse frequency (β → 1) and no re-weighting (β = 0),
    then the weights are scaled to add up to the number of classes. Here the sum runs over the labels the split
    answers; a label it never answers (it cannot be a training target) gets the weight of a label answered once, so
    a validation row with it is not ignored.

    Args:
        records: the training split (see :func:`closed_label_counts`).
        label_names: the closed head's vocabulary.
        beta: β in [0, 1).

    Returns:
        (K,) float32 weights, one per name of ``label_names``.

    Raises:
        ValueError: ``beta`` outside [0, 1), or no closed record at all (nothing to balance).
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must lie in [0, 1), got {beta}")
    counts = closed_label_counts(records, label_names)
    n = torch.tensor([counts[name] for name in label_names], dtype=torch.float64)  # (K,)
    seen = n > 0
    if not seen.any():
        raise ValueError("the records hold no closed answer: no class weights for the closed head's focal loss")
    effective = (1.0 - beta ** n.clamp(min=1)) / (1.0 - beta)  # (K,) effective number of samples, E_1 = 1
    weights = 1.0 / effective
    weights = weights * (int(seen.sum()) / weights[seen].sum())
    return weights.float()


def focal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    allowed: torch.Tensor | None = None,
    class_weights: torch.Tensor | None = None,
    gamma: float = FOCAL_GAMMA,
    num_items: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Class-balanced focal loss over each row's allowed labels: ``-w_y (1 - p_y)^γ log p_y``.

    Args:
        logits: (B, K) closed-head logits (the model's ``closed_logits``; ``-inf`` entries are allowed).
        labels: (B,) index of each row's answer, or -100 for rows without a closed answer (ignored).
        allowed: (B, K) bool, the labels each row's softmax runs over; a row that allows nothing (an open row) or
            ``None`` uses all labels.
        class_weights: (K,) weights ``w`` (:func:`closed_class_weights`); None: all 1.
        gamma: the focusing parameter; 0 gives the (weighted) cross-entropy.
        num_items: what to divide the sum of the row losses by: the closed rows of all accumulated micro-batches
            (see the module docstring); None: the closed rows of this batch (a mean).

    Returns:
        A scalar. With no closed row: a zero that is still a function of ``logits`` (so the head's parameters take
        part in the backward pass and DDP finds them used).

    Raises:
        ValueError: shapes disagree, or a label is out of range or outside its row's allowed set.
    """
    batch, num_labels = logits.shape
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape (batch_size,) = ({batch},), got {tuple(labels.shape)}")
    if allowed is not None and allowed.shape != logits.shape:
        raise ValueError(f"allowed must have the logits' shape {tuple(logits.shape)}, got {tuple(allowed.shape)}")
    if class_weights is not None and class_weights.shape != (num_labels,):
        raise ValueError(f"class_weights must have shape ({num_labels},), got {tuple(class_weights.shape)}")
    labels = labels.to(logits.device).long()
    rows = labels != IGNORE_INDEX
    if not rows.any():
        return logits.masked_fill(~torch.isfinite(logits), 0.0).sum() * 0.0
    bad = rows & ((labels < 0) | (labels >= num_labels))
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(f"labels[{row}] = {int(labels[row])} is not an index into the {num_labels} closed labels")
    logits = logits.float()
    if allowed is not None:
        allowed = allowed.to(logits.device).bool()
        allowed = allowed | ~allowed.any(dim=1, keepdim=True)  # a row that allows nothing: all labels
        outside = rows & ~allowed.gather(1, labels.clamp(min=0)[:, None])[:, 0]
        if outside.any():
            row = int(outside.nonzero()[0])
            raise ValueError(f"labels[{row}] = {int(labels[row])} is not among the labels allowed[{row}] allows")
        logits = logits.masked_fill(~allowed, float("-inf"))
    log_p = torch.log_softmax(logits[rows], dim=-1).gather(1, labels[rows][:, None])[:, 0]  # (N,) log p_y
    loss = -((1.0 - log_p.exp()) ** gamma) * log_p  # (N,)
    if class_weights is not None:
        loss = loss * class_weights.to(loss.device, loss.dtype)[labels[rows]]
    divisor = rows.sum() if num_items is None else torch.as_tensor(num_items)
    return loss.sum() / divisor.to(loss.device, loss.dtype)


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable LoRA weights of a PEFT model: ``lora_A`` / ``lora_B`` (and their embedding variants)."""
    return [
        (name, param)
        for name, param in model.named_parameters()
        if param.requires_grad and any(f".{kind}." in name for kind in _LORA_KINDS)
    ]


_LORA_KINDS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def lora_l2(model: nn.Module, weight: float = LORA_L2_WEIGHT) -> torch.Tensor:
    """``weight · Σ ‖W‖²`` over the model's trainable LoRA weights (:func:`lora_parameters`); 0 without LoRA."""
    params = [param for _, param in lora_parameters(model)]
    if not params:
        first = next(model.parameters(), None)
        return torch.zeros((), device=None if first is None else first.device)
    return weight * sum(param.float().pow(2).sum() for param in params)


def sft_loss(
    outputs: Any,
    batch: Mapping[str, torch.Tensor],
    model: nn.Module,
    class_weights: torch.Tensor | None = None,
    gamma: float = FOCAL_GAMMA,
    l2_weight: float = LORA_L2_WEIGHT,
    num_items_in_batch: torch.Tensor | int | None = None,
    num_closed_in_batch: torch.Tensor | int | None = None,
) -> dict[str, torch.Tensor]:
    """The paper's loss on one (micro-)batch, term by term: ``loss = lm + focal + l2``.

    Args:
        outputs: the model's output on ``batch`` (its ``lm_loss`` and ``closed_logits``); run it with
            ``num_items_in_batch`` too under gradient accumulation, so its ``lm_loss`` is divided the same way.
        batch: the collator's batch (``labels``, ``closed_labels``, ``closed_label_mask``).
        model: the model (for its LoRA weights).
        class_weights: (K,) focal-loss class weights (:func:`closed_class_weights`).
        gamma: focal γ.
        l2_weight: λ of the LoRA L2 term.
        num_items_in_batch: the Trainer's count of target tokens over the accumulated micro-batches (None without).
        num_closed_in_batch: closed rows over the accumulated micro-batches, if counted (see the module docstring).

    Returns:
        ``{"loss", "lm_loss", "focal_loss", "l2_loss"}``, each divided for gradient accumulation as the Trainer
        divides the NLL; ``loss`` is what to backpropagate.
    """
    lm = outputs.lm_loss
    if lm is None:
        raise ValueError("the model returned no lm_loss: the batch needs labels")
    share = _token_share(batch["labels"], num_items_in_batch, lm)
    closed_labels = batch.get("closed_labels")
    if closed_labels is not None and outputs.closed_logits is not None:
        focal = focal_loss(
            outputs.closed_logits,
            closed_labels,
            batch.get("closed_label_mask"),
            class_weights,
            gamma,
            num_items=num_closed_in_batch,
        )
        if num_closed_in_batch is None:
            focal = focal * share
    else:
        focal = lm.new_zeros(())
    l2 = lora_l2(model, l2_weight).to(lm.device) * share
    return {"loss": lm + focal + l2, "lm_loss": lm, "focal_loss": focal, "l2_loss": l2}


def labelled_logits(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model inputs that score only the positions with a target: ``logits_to_keep`` and ``shift_labels``.

    On the real vocabulary (151,936 tokens) the ``lm_head`` over every position dominates a training step on CPU,
    although only the answer tokens have targets (labels -100 on the system prompt, question, image block and
    padding). The model's ``logits_to_keep`` takes a 1-D tensor of sequence positions, one set for the whole batch,
    so this keeps the union over the rows of the positions whose *next* token has a label (with right padding and
    one chat template, the rows' answers overlap, so the union is little more than the longest answer) and gives
    the model's loss the targets of those positions already shifted (``shift_labels``, -100 where a row has none).
    The loss is the same sum over the same targets, divided by the same count (``num_items_in_batch`` or the number
    of targets), so loss and gradients equal those over the full logits; everything happens inside the model's
    forward, so DDP, DeepSpeed and FSDP see nothing new.

    Args:
        labels: (B, L) the collator's labels (-100 where there is no target).

    Returns:
        ``{"logits_to_keep": (K,) long, "shift_labels": (B, K) long}`` to add to the model inputs (``labels`` stay:
        the model then uses ``shift_labels`` for its loss, and the loss terms count ``labels`` as before).
    """
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]  # (B, L) target of position t
    keep = (shifted != IGNORE_INDEX).any(dim=0).nonzero()[:, 0]  # (K,)
    return {"logits_to_keep": keep, "shift_labels": shifted[:, keep].contiguous()}


def _token_share(labels: torch.Tensor, num_items_in_batch, like: torch.Tensor) -> torch.Tensor:
    """This micro-batch's share of the accumulated target tokens (1 without ``num_items_in_batch``)."""
    if num_items_in_batch is None:
        return like.new_ones(())
    targets = (labels[..., 1:] != IGNORE_INDEX).sum()  # the model's shifted targets
    return targets.to(like.device, like.dtype) / torch.as_tensor(num_items_in_batch).to(like.device, like.dtype)
