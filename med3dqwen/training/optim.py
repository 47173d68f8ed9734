"""The paper's optimiser: AdamW (β = 0.9, 0.98), weight decay 0.02 on the LoRA weights only, warm-up then cosine.

transformers' Trainer decays every weight matrix (all but biases and norms); here the decay is a regulariser of the
adapter alone, so the fully trained modules (SSA/MSSA, slice projection, closed head, a projector in the alignment
stage) decay 0. Pass the pair to ``Trainer(optimizers=(optimizer, scheduler))``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from .losses import lora_parameters


__all__ = ["ADAM_BETAS", "LORA_WEIGHT_DECAY", "WARMUP_STEPS", "make_optimizer", "make_scheduler", "parameter_groups"]

ADAM_BETAS = (0.9, 0.98)
LORA_WEIGHT_DECAY = 2e-2
WARMUP_STEPS = 500


def parameter_groups(model: nn.Module, weight_decay: float = LORA_WEIGHT_DECAY) -> list[dict]:
    """Two AdamW parameter groups: the trainable LoRA weights with ``weight_decay``, every other trainable one with 0.

    Frozen parameters are in neither group.

    Raises:
        ValueError: the model has no trainable parameter.
    """
    lora = {id(param) for _, param in lora_parameters(model)}
    decayed = [param for param in model.parameters() if param.requires_grad and id(param) in lora]
    others = [param for param in model.parameters() if param.requires_grad and id(param) not in lora]
    if not decayed and not others:
        raise ValueError("the model has no trainable parameter: nothing to optimise")
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def make_optimizer(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float = LORA_WEIGHT_DECAY,
    betas: tuple[float, float] = ADAM_BETAS,
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over :func:`parameter_groups` (decay on the LoRA weights only)."""
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=learning_rate, betas=betas, eps=eps)


def make_scheduler(
    optimizer: torch.optim.Optimizer, num_training_steps: int, num_warmup_steps: int = WARMUP_STEPS
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``num_warmup_steps`` then cosine decay to 0 at ``num_training_steps``
    (transformers' ``get_cosine_schedule_with_warmup``)."""
    if num_training_steps < 1 or num_warmup_steps < 0:
        raise ValueError(
            f"need num_training_steps >= 1 and num_warmup_steps >= 0, got {num_training_steps}, {num_warmup_steps}"
        )
    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps)
