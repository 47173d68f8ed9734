"""Training: the collator, the paper's losses and the optimiser (issue #9; ``docs/training.md``)."""

from .collator import IGNORE_INDEX, Med3DQwenCollator, SampleError
from .losses import closed_class_weights, closed_label_counts, focal_loss, lora_l2, sft_loss
from .optim import make_optimizer, make_scheduler, parameter_groups


__all__ = [
    "IGNORE_INDEX",
    "Med3DQwenCollator",
    "SampleError",
    "closed_class_weights",
    "closed_label_counts",
    "focal_loss",
    "lora_l2",
    "make_optimizer",
    "make_scheduler",
    "parameter_groups",
    "sft_loss",
]
