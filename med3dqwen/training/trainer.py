"""``Med3DQwenTrainer``: transformers' ``Trainer`` with the paper's loss, each term logged, and LoRA-only decay.

Three hooks, everything else is the Trainer's own:

- ``_get_num_items_in_batch``: besides the target tokens, counts the closed rows of the accumulated micro-batches
  (gathered over processes as the tokens are), so that the focal term is divided exactly as the NLL
  (``med3dqwen.training.losses``);
- ``compute_loss``: ``lm_loss + focal_loss + l2_loss`` (:func:`~med3dqwen.training.losses.sft_loss`), scaled for
  processes as the Trainer scales the model's loss; the terms are summed between two logging steps and ``log`` adds
  their per-step means (``lm_loss``, ``focal_loss``, ``l2_loss``) next to ``loss``;
- ``compute_loss`` in training (``labelled_logits_only``, on by default) scores the vocabulary only at the positions
  that have a target (:func:`~med3dqwen.training.losses.labelled_logits`): the same loss and gradients, without the
  ``lm_head`` over every image and prompt token (the bulk of a CPU step on the real vocabulary);
- ``get_decay_parameter_names``: only the LoRA weights, so the Trainer's own optimiser (``args.optim``,
  ``args.weight_decay``, ``args.adam_beta2``) decays nothing else (set ``weight_decay=0.02, adam_beta2=0.98`` for the
  paper's AdamW; ``lr_scheduler_type="cosine", warmup_steps=500`` for its schedule).

With a ``teacher`` (the distill stage) a SigLIP-style contrastive term between the student's and the teacher's
pooled answer-token states is added (``distill_loss``; :mod:`~med3dqwen.training.distill`); its head
(``model.distill_head``) is saved beside the adapter in every checkpoint and read back on resume.

``card_writer`` (optional) writes the model card into every folder the Trainer saves (the ``checkpoint-N/`` folders
too), next to the weights and the processor that ``Trainer._save`` already writes.

The collator reads the records' own columns (``messages``, ``volume_path``, ...): run with
``remove_unused_columns=False``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_pt_utils import nested_gather

from .collator import IGNORE_INDEX
from .distill import DistillationHead, load_distill_head, pool_answer_states, save_distill_head
from .losses import FOCAL_GAMMA, LORA_L2_WEIGHT, _token_share, labelled_logits, lora_parameters, sft_loss


__all__ = ["LOGGED_TERMS", "Med3DQwenTrainer"]

LOGGED_TERMS = ("lm_loss", "focal_loss", "l2_loss")
"""The loss terms logged next to ``loss`` (plus ``distill_loss`` with a teacher)."""
DISTILL_TERM = "distill_loss"


class Med3DQwenTrainer(Trainer):
    """``Trainer`` with the paper's loss (see the module docstring).

    Args:
        class_weights: (K,) focal-loss class weights over the model's ``closed_label_names``
            (:func:`~med3dqwen.training.losses.closed_class_weights` of the training split); None: all 1.
        focal_gamma: focal γ (2).
        l2_weight: λ of the L2 term on the LoRA weights (1e-4).
        labelled_logits_only: in training, compute the logits only where labels are not -100 (same loss and
            gradients; ``outputs.logits`` then holds those positions only). Evaluation always scores every position.
        teacher: a frozen Med3DQwen model (:func:`~med3dqwen.training.distill.load_teacher`): adds the distillation
            term; the model gets a ``distill_head`` (:class:`~med3dqwen.training.distill.DistillationHead`) when it
            has none.
        distill_weight: weight of the distillation term.
        card_writer: ``card_writer(folder, trainer)`` writes the model card into each saved folder (None: no card).
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
        labelled_logits_only: bool = True,
        teacher: nn.Module | None = None,
        distill_weight: float = 1.0,
        card_writer: Callable[[str, Trainer], None] | None = None,
        **kwargs,
    ):
        model = kwargs.get("model", args[0] if args else None)
        if teacher is not None:
            if model is None or not hasattr(model, "config"):
                raise ValueError("distillation needs the student model passed to the trainer")
            if getattr(model, "distill_head", None) is None:  # before the Trainer places and wraps the model
                model.distill_head = DistillationHead(
                    model.config.text_config.hidden_size, teacher.config.text_config.hidden_size
                )
        super().__init__(*args, **kwargs)
        if teacher is not None:
            if self.is_fsdp_enabled:
                raise ValueError(
                    "the distill stage runs its teacher and head outside the model's forward, which FSDP shards: "
                    "use DDP or DeepSpeed (configs/accelerate/ddp.yaml, deepspeed_zero2.yaml, deepspeed_zero3.yaml)"
                )
            teacher.requires_grad_(False)
            teacher = teacher.eval().to(self.args.device)
        self.teacher = teacher
        self.distill_weight = distill_weight
        self.card_writer = card_writer
        self.logged_terms = LOGGED_TERMS + ((DISTILL_TERM,) if teacher is not None else ())
        if self.args.remove_unused_columns:
            raise ValueError(
                "Med3DQwenTrainer needs remove_unused_columns=False: the collator reads the records' messages, "
                "volume_path, mask_path and closed-answer columns, which are no model inputs"
            )
        self.class_weights = class_weights
        self.focal_gamma = focal_gamma
        self.l2_weight = l2_weight
        self.labelled_logits_only = labelled_logits_only
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
        if self.labelled_logits_only and model.training and inputs.get("labels") is not None:
            if "shift_labels" not in inputs and "logits_to_keep" not in inputs:
                kwargs.update(labelled_logits(inputs["labels"]))
        if self.teacher is not None:
            kwargs["output_hidden_states"] = True  # the student's last hidden states, for its pooled embedding
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
        if self.teacher is not None:
            distill = self.distill_weight * self.distill_term(model, inputs, outputs)
            terms[DISTILL_TERM] = distill * _token_share(inputs["labels"], num_items_in_batch, distill)
            terms["loss"] = terms["loss"] + terms[DISTILL_TERM]
        loss = terms["loss"]
        if num_items_in_batch is None:  # the Trainer divides the loss by the accumulation steps itself
            scale = 1.0 / self.current_gradient_accumulation_steps
        else:  # as Trainer.compute_loss: DDP averages the gradients of losses divided by the global count
            scale = 1.0
            if self.args.average_tokens_across_devices:
                scale = self.accelerator.num_processes // self.get_tp_size()
                loss = loss * scale
        if model.training:  # summed like the Trainer's own loss: over a logging window, per process
            for name in self.logged_terms:
                self._term_sums[name] = self._term_sums.get(name, 0.0) + terms[name].detach() * scale
        return (loss, outputs) if return_outputs else loss

    @property
    def distill_head(self) -> DistillationHead | None:
        """The distillation head on the (unwrapped) model; None without a teacher."""
        if self.teacher is None:
            return None
        return self.accelerator.unwrap_model(self.model).distill_head

    def distill_term(self, model, inputs: dict[str, Any], outputs) -> torch.Tensor:
        """The SigLIP loss between the student's and the teacher's answer-token states pooled over this batch."""
        labels, attention_mask = inputs["labels"], inputs.get("attention_mask")
        student = pool_answer_states(outputs.hidden_states[-1], labels, attention_mask)  # (B, H_s)
        teacher_inputs = {k: inputs[k] for k in ("input_ids", "pixel_values", "attention_mask") if k in inputs}
        with torch.no_grad():
            hidden = self.teacher.model(**teacher_inputs).last_hidden_state  # (B, L, H_t): no lm_head needed
        teacher = pool_answer_states(hidden, labels.to(hidden.device), attention_mask)  # (B, H_t)
        head = self.accelerator.unwrap_model(model).distill_head
        return head(student, teacher.to(student.device))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._term_sums:
            steps = max(self.state.global_step - self._globalstep_last_logged, 1)
            for name, total in self._term_sums.items():
                logs[name] = round(float(nested_gather(total, self.args.parallel_mode).mean()) / steps, 8)
            self._term_sums = {}
            head = self.distill_head
            if head is not None:
                logs["distill_temperature"] = round(float(head.logit_scale.detach().exp()), 6)
                logs["distill_bias"] = round(float(head.logit_bias.detach()), 6)
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The Trainer's save (weights or adapter, processor), plus the distillation head and the model card."""
        super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.distill_head is not None:
            save_distill_head(self.distill_head, output_dir)
        if self.card_writer is not None:
            self.card_writer(output_dir, self)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        if self.distill_head is not None:
            load_distill_head(self.distill_head, resume_from_checkpoint)
