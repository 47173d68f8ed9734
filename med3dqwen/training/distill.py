"""The distill stage: a SigLIP-style sigmoid contrastive loss between the student's and a frozen teacher's pooled
embeddings, added to the SFT loss.

The paper (and DESIGN.md) says only "SigLIP-style sigmoid contrastive loss between the student's and a frozen
teacher's pooled embeddings"; what this module decides where they are silent:

- **Pooled embedding**: the mean of the decoder's last hidden states (after the final norm) over the *answer tokens*
  (``labels != -100``: the assistant's tokens and its ``<|im_end|>``), for student and teacher alike, on the same
  batch. The projected visual tokens would be no use here: encoder and projector are frozen in this stage, so only
  the decoder's reading of volume, question and answer can move. A row without answer tokens (never made by the
  collator) pools over all its attended tokens.
- **Widths**: the student's embedding goes through a learned linear projection (no bias) to the teacher's hidden
  size, also when the sizes are equal; the teacher's is used as it is. Both are L2-normalised.
- **Loss** (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", eq. 1): with ``x_i`` the projected
  student embedding and ``y_j`` the teacher's of the batch's rows, ``z_ij = 1`` if ``i = j`` else ``-1``,
  ``L = -(1/B) Σ_i Σ_j log σ(z_ij (exp(t') x_i·y_j + b))`` with a learnable log-temperature ``t'`` (init log 10)
  and bias ``b`` (init -10), as SigLIP. The negatives are the other rows of the (micro-)batch on this process
  (SigLIP's chunked exchange across devices is not done); with one row per batch only the positive pair remains.
- **Weight and accumulation**: ``distill_weight · L`` (default 1) is added to ``lm + focal + l2`` and divided for
  gradient accumulation as the L2 term is (each micro-batch's share of the target tokens; see ``losses``).
- **Saving**: projection, ``t'`` and ``b`` (:class:`DistillationHead`) sit on the trained model as
  ``distill_head`` (so the Trainer optimises them, DDP reduces their gradients and the optimiser state resumes), but
  they are not part of the adapter: the trainer writes them to ``distill_head.safetensors`` in the output folder and
  in every checkpoint, and reads them back on resume. An adapter made by this stage loads like an sft one.
- **Logging**: ``distill_loss`` next to the other terms, and the current temperature ``exp(t')`` and bias.

The teacher (``--teacher_model_name_or_path``) is any Med3DQwen checkpoint (a full model, or an sft/distill output
folder holding an adapter, merged into its base), loaded frozen in ``eval()`` under ``torch.no_grad``; only its
backbone runs (no ``lm_head``). It must read the same inputs as the student: same volume size, input channels and
image-token layout (checked up front).

Its forward runs outside the student's, in the Trainer's ``compute_loss``: fine with DDP and DeepSpeed ZeRO-1/2/3
(DeepSpeed gathers each module's parameters in its own hooks); FSDP would leave the head sharded outside the
model's forward, so the stage refuses FSDP.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.configuration_med3d_qwen import Med3DQwenConfig
from ..modeling.modeling_med3d_qwen import Med3DQwenForConditionalGeneration
from .collator import IGNORE_INDEX


__all__ = [
    "DISTILL_HEAD_FILE",
    "LOGIT_BIAS_INIT",
    "LOGIT_SCALE_INIT",
    "DistillationHead",
    "check_teacher_fits",
    "load_distill_head",
    "load_teacher",
    "pool_answer_states",
    "save_distill_head",
    "siglip_loss",
]

LOGIT_SCALE_INIT = math.log(10.0)
"""SigLIP's initial log-temperature t' (temperature exp(t') = 10)."""
LOGIT_BIAS_INIT = -10.0
"""SigLIP's initial bias b (the many negatives start with a small loss)."""
DISTILL_HEAD_FILE = "distill_head.safetensors"
"""The distillation head's weights in an output folder or checkpoint (beside the adapter)."""


def pool_answer_states(
    hidden_states: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of ``hidden_states`` over each row's answer tokens (``labels != -100``), in float32.

    Args:
        hidden_states: (B, L, H) last hidden states.
        labels: (B, L) the collator's labels.
        attention_mask: (B, L) used for a row without answer tokens (all its attended tokens); None: all tokens.

    Returns:
        (B, H) float32.
    """
    if hidden_states.shape[:2] != labels.shape:
        raise ValueError(
            f"hidden states {tuple(hidden_states.shape)} and labels {tuple(labels.shape)} cover different tokens"
        )
    mask = (labels != IGNORE_INDEX).to(hidden_states.device)  # (B, L)
    empty = ~mask.any(dim=1)
    if empty.any():
        fallback = torch.ones_like(mask) if attention_mask is None else attention_mask.to(mask.device).bool()
        mask = torch.where(empty[:, None], fallback, mask)
    weights = mask.float()[..., None]  # (B, L, 1)
    return (hidden_states.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def siglip_loss(
    student: torch.Tensor, teacher: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """SigLIP's sigmoid loss between row-paired embeddings: ``-(1/B) Σ_ij log σ(z_ij (exp(t') x_i·y_j + b))``.

    Args:
        student: (B, D) student embeddings (already at the teacher's width); L2-normalised here.
        teacher: (B, D) teacher embeddings; L2-normalised here.
        logit_scale: scalar log-temperature t'.
        logit_bias: scalar bias b.

    Returns:
        A scalar (float32).
    """
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(
            f"student and teacher embeddings must both be (batch, width), got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    x = F.normalize(student.float(), dim=-1)
    y = F.normalize(teacher.float(), dim=-1)
    logits = logit_scale.float().exp() * x @ y.T + logit_bias.float()  # (B, B)
    signs = 2.0 * torch.eye(len(x), device=x.device) - 1.0  # (B, B) z_ij
    return -F.logsigmoid(signs * logits).sum() / len(x)


class DistillationHead(nn.Module):
    """Linear projection from the student's width to the teacher's, and SigLIP's learnable temperature and bias.

    Args:
        student_size: the student decoder's hidden size.
        teacher_size: the teacher decoder's hidden size.
        logit_scale_init: initial log-temperature t'.
        logit_bias_init: initial bias b.
    """

    def __init__(
        self,
        student_size: int,
        teacher_size: int,
        logit_scale_init: float = LOGIT_SCALE_INIT,
        logit_bias_init: float = LOGIT_BIAS_INIT,
    ):
        super().__init__()
        if student_size < 1 or teacher_size < 1:
            raise ValueError(f"hidden sizes must be positive, got student {student_size}, teacher {teacher_size}")
        self.projection = nn.Linear(student_size, teacher_size, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.logit_bias = nn.Parameter(torch.tensor(float(logit_bias_init)))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """(B, H_s) pooled student and (B, H_t) pooled teacher embeddings → the SigLIP loss."""
        projected = self.projection(student.to(self.projection.weight.dtype))  # (B, H_t)
        return siglip_loss(projected, teacher.to(projected.device), self.logit_scale, self.logit_bias)


def save_distill_head(head: DistillationHead, folder: str | os.PathLike) -> Path:
    """Write ``folder/distill_head.safetensors`` (sizes in its metadata); returns the path."""
    from safetensors.torch import save_file

    from ..io import atomic_output

    path = Path(folder) / DISTILL_HEAD_FILE
    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    student_size, teacher_size = head.projection.in_features, head.projection.out_features
    meta = {"student_size": str(student_size), "teacher_size": str(teacher_size)}
    with atomic_output(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def load_distill_head(head: DistillationHead, folder: str | os.PathLike) -> None:
    """Load ``folder/distill_head.safetensors`` into ``head`` (in place).

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: it was saved for other sizes (the message gives both).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / DISTILL_HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {folder} was not saved by the distill stage")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    saved = (int(meta.get("student_size", -1)), int(meta.get("teacher_size", -1)))
    expected = (head.projection.in_features, head.projection.out_features)
    if saved != expected:
        raise ValueError(
            f"{path} projects hidden size {saved[0]} to {saved[1]}, this run {expected[0]} to {expected[1]}"
        )
    head.load_state_dict(load_file(str(path)))  # copies into the head's own device and dtype


_TEACHER_FIELDS = (
    ("prompt_encoding", lambda c: c.prompt_encoding),
    ("vision_config.in_channels", lambda c: c.vision_config.in_channels),
    ("vision_config.volume_size", lambda c: list(c.vision_config.volume_size)),
    ("vision_config.num_visual_tokens", lambda c: c.vision_config.num_visual_tokens),
    ("vision_config.num_slice_tokens", lambda c: c.vision_config.num_slice_tokens),
    ("image_token_id", lambda c: c.image_token_id),
    ("slice_token_id", lambda c: c.slice_token_id),
)


def check_teacher_fits(student: Med3DQwenConfig, teacher: Med3DQwenConfig, teacher_path: str = "the teacher") -> None:
    """The teacher must read the student's batches: same prompt encoding, volume and image-token layout.

    Raises:
        ValueError: a field differs (the message names each, with both values).
    """
    differ = [
        f"{name} {get(teacher)!r} (student {get(student)!r})"
        for name, get in _TEACHER_FIELDS
        if get(teacher) != get(student)
    ]
    if differ:
        raise ValueError(f"{teacher_path} cannot read the student's batches: " + "; ".join(differ))


def load_teacher(
    path: str | os.PathLike, dtype: torch.dtype | str | None = None, attn_implementation: str | None = None
) -> Med3DQwenForConditionalGeneration:
    """A frozen teacher in ``eval()``: a Med3DQwen checkpoint, or a folder holding an adapter (merged into its base).

    Raises:
        FileNotFoundError: a local ``path`` that does not exist.
    """
    load = {} if dtype in (None, "auto") else {"dtype": dtype}
    if attn_implementation is not None:
        load["attn_implementation"] = attn_implementation
    folder = Path(path).expanduser()
    if str(path).startswith((".", "/", "~")) and not folder.exists():
        raise FileNotFoundError(f"teacher {path} does not exist")
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        import peft

        base_path = json.loads(adapter.read_text())["base_model_name_or_path"]
        base = Med3DQwenForConditionalGeneration.from_pretrained(base_path, **load)
        teacher = peft.PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    else:
        teacher = Med3DQwenForConditionalGeneration.from_pretrained(str(path), **load)
    teacher.requires_grad_(False)
    return teacher.eval()
