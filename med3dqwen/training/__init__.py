"""Training: the collator, the paper's losses, the optimiser and the Trainer subclass (see docs/training.md)."""

from .collator import IGNORE_INDEX, Med3DQwenCollator, SampleError
from .losses import closed_class_weights, closed_label_counts, focal_loss, lora_l2, sft_loss
from .optim import make_optimizer, make_scheduler, parameter_groups
from .trainer import Med3DQwenTrainer


__all__ = [
    "IGNORE_INDEX",
    "Med3DQwenCollator",
    "Med3DQwenTrainer",
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
