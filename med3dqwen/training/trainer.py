"""``Med3DQwenTrainer``: transformers' ``Trainer`` with the paper's loss, each term logged, and LoRA-only decay.

Three hooks, everything else is the Trainer's own:

- ``_get_num_items_in_batch``: besides the target tokens, counts the closed rows of the accumulated micro-batches
  (gathered over processes as the tokens are), so that the focal term is divided exactly as the NLL
  (``med3dqwen.training.losses``);
- ``compute_loss``: ``lm_loss + focal_loss + l2_loss`` (:func:`~med3dqwen.training.losses.sft_loss`), scaled for
  processes as the Trainer scales the model's loss; the terms are summed between two logging steps and ``log`` adds
  their per-step means (``lm_loss``, ``focal_loss``, ``l2_loss``) next to ``loss``;
- ``get_decay_parameter_names``: only the LoRA weights, so the Trainer's own optimiser (``args.optim``,
  ``args.weight_decay``, ``args.adam_beta2``) decays nothing else (set ``weight_decay=0.02, adam_beta2=0.98`` for the
  paper's AdamW; ``lr_scheduler_type="cosine", warmup_steps=500`` for its schedule).

The collator reads the records' own columns (``messages``, ``volume_path``, ...): run with
``remove_unused_columns=False``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import nested_gather

from .collator import IGNORE_INDEX
from .losses import FOCAL_GAMMA, LORA_L2_WEIGHT, lora_parameters, sft_loss


__all__ = ["LOGGED_TERMS", "Med3DQwenTrainer"]

LOGGED_TERMS = ("lm_loss", "focal_loss", "l2_loss")
"""The loss terms logged next to ``loss``."""


class Med3DQwenTrainer(Trainer):
    """``Trainer`` with the paper's loss (see the module docstring).

    Args:
        class_weights: (K,) focal-loss class weights over the model's ``closed_label_names``
            (:func:`~med3dqwen.training.losses.closed_class_weights` of the training split); None: all 1.
        focal_gamma: focal γ (2).
        l2_weight: λ of the L2 term on the LoRA weights (1e-4).
        *args, **kwargs: those of ``transformers.Trainer``.

    Raises:
        ValueError: ``args.remove_unused_columns`` is on (the Trainer would drop the columns the collator reads).
    """

    def __init__(
        self,
        *args,
        class_weights: torch.Tensor | None = None,
        focal_gamma: float = FOCAL_GAMMA,
        l2_weight: float = LORA_L2_WEIGHT,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns:
            raise ValueError(
                "Med3DQwenTrainer needs remove_unused_columns=False: the collator reads the records' messages, "
                "volume_path, mask_path and closed-answer columns, which are no model inputs"
            )
        self.class_weights = class_weights
        self.focal_gamma = focal_gamma
        self.l2_weight = l2_weight
        self._num_closed_in_batch: torch.Tensor | None = None
        self._term_sums: dict[str, torch.Tensor] = {}

    def get_decay_parameter_names(self, model) -> list[str]:
        """Only the LoRA weights decay (``args.weight_decay``); every other trainable parameter decays 0."""
        return [name for name, _ in lora_parameters(model)]

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        num_items = super()._get_num_items_in_batch(batch_samples, device)
        if torch.is_tensor(num_items) and num_items == 0:
            # A step whose every row was a bad sample (the collator's placeholder rows, all labels -100): the loss
            # terms are sums over nothing, 0; dividing them by 1 keeps them 0 where 0/0 would be NaN.
            num_items = torch.ones_like(num_items)
        self._num_closed_in_batch = None
        if num_items is not None and batch_samples and "closed_labels" in batch_samples[0]:
            closed = sum((batch["closed_labels"] != IGNORE_INDEX).sum() for batch in batch_samples)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                closed = self.accelerator.gather(closed.to(device)).sum()
            self._num_closed_in_batch = closed.to(device)
        return num_items

    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        outputs = model(**inputs, **kwargs)
        terms = sft_loss(
            outputs,
            inputs,
            model,
            self.class_weights,
            self.focal_gamma,
            self.l2_weight,
            num_items_in_batch=num_items_in_batch,
            num_closed_in_batch=None if num_items_in_batch is None else self._num_closed_in_batch,
        )
        loss = terms["loss"]
        if num_items_in_batch is None:  # the Trainer divides the loss by the accumulation steps itself
            scale = 1.0 / self.current_gradient_accumulation_steps
        else:  # as Trainer.compute_loss: DDP averages the gradients of losses divided by the global count
            scale = 1.0
            if self.args.average_tokens_across_devices:
                scale = self.accelerator.num_processes // self.get_tp_size()
                loss = loss * scale
        if model.training:  # summed like the Trainer's own loss: over a logging window, per process
            for name in LOGGED_TERMS:
                self._term_sums[name] = self._term_sums.get(name, 0.0) + terms[name].detach() * scale
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._term_sums:
            steps = max(self.state.global_step - self._globalstep_last_logged, 1)
            for name, total in self._term_sums.items():
                logs[name] = round(float(nested_gather(total, self.args.parallel_mode).mean()) / steps, 8)
            self._term_sums = {}
        super().log(logs, start_time)
