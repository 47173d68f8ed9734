"""Parameter and weight-memory table of the Med3DQwen presets, computed on the meta device (no weights, no GPU).

Usage:

    python -m med3dqwen.modeling.report                 # markdown table for 0.5B, 1.5B, 3B, 7B
    python -m med3dqwen.modeling.report --lora_rank 8   # another LoRA rank

Counts per part: DCFormer encoder, MLP-Mixer projector, decoder (Qwen2.5, incl. an untied LM head), fusion (slice
token projection, SSA gates, MSSA) and the closed head; LoRA with rank r on every linear layer of the decoder blocks
(q, k, v, o, gate, up, down); "trainable" is the SFT recipe of docs/design.md (LoRA + fusion + closed head; encoder,
projector and decoder frozen). Weight memory is bf16 (2 bytes per parameter) of the full model.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn

from .configuration_med3d_qwen import Med3DQwenConfig
from .modeling_med3d_qwen import Med3DQwenForConditionalGeneration


__all__ = ["ParameterReport", "format_markdown", "parameter_report"]

PRESETS = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b")
_DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ParameterReport:
    """Parameter counts of one configuration (integers) and its bf16 weight memory."""

    name: str
    encoder: int
    projector: int
    decoder: int
    fusion: int
    closed_head: int
    lora: int
    lora_rank: int

    @property
    def total(self) -> int:
        """All weights of the model, LoRA excluded."""
        return self.encoder + self.projector + self.decoder + self.fusion + self.closed_head

    @property
    def trainable(self) -> int:
        return self.lora + self.fusion + self.closed_head

    @property
    def trainable_percent(self) -> float:
        """Trainable share of all parameters during SFT (model + LoRA)."""
        return 100.0 * self.trainable / (self.total + self.lora)

    @property
    def bf16_gib(self) -> float:
        return 2 * (self.total + self.lora) / 2**30


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _lora_parameters(decoder: nn.Module, rank: int) -> int:
    """A (r × in) + B (out × r) for every linear layer of the decoder blocks."""
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in decoder.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in _DECODER_LINEARS
    )


def parameter_report(config: Med3DQwenConfig, name: str = "", lora_rank: int = 16) -> ParameterReport:
    """Count the parameters of a configuration without allocating weights (meta device).

    Args:
        config: the model configuration (e.g. ``Med3DQwenConfig.from_preset("qwen2.5-1.5b")``).
        name: row label.
        lora_rank: LoRA rank on the decoder's linear layers (0: no LoRA).

    Returns:
        A :class:`ParameterReport`.
    """
    with torch.device("meta"):
        model = Med3DQwenForConditionalGeneration(config)
    backbone = model.model
    fusion = _count(backbone.slice_tokenizer) + _count(backbone.slice_self_attention)
    fusion += _count(backbone.multi_head_slice_attention)
    decoder = _count(backbone.language_model)
    if not config.tie_word_embeddings:
        decoder += _count(model.lm_head)
    return ParameterReport(
        name=name,
        encoder=_count(backbone.vision_encoder),
        projector=_count(backbone.multi_modal_projector),
        decoder=decoder,
        fusion=fusion,
        closed_head=_count(model.closed_head),
        lora=_lora_parameters(backbone.language_model, lora_rank) if lora_rank else 0,
        lora_rank=lora_rank,
    )


def format_markdown(reports: list[ParameterReport]) -> str:
    """A markdown table, with the bf16 memory saved against the largest model in the list."""
    largest = max(r.bf16_gib for r in reports)
    header = (
        f"| model | total | encoder | projector | decoder | fusion | closed head | LoRA r={reports[0].lora_rank} "
        "| trainable (SFT) | trainable % | bf16 weights | saved vs largest |"
    )
    lines = [header, "|---|" + "---:|" * 11]

    def m(n: int) -> str:
        return f"{n / 1e6:,.2f} M"

    for r in reports:
        saved = largest - r.bf16_gib
        lines.append(
            f"| {r.name} | {m(r.total)} | {m(r.encoder)} | {m(r.projector)} | {m(r.decoder)} | {m(r.fusion)} | "
            f"{r.closed_head:,} | {m(r.lora)} | {m(r.trainable)} | {r.trainable_percent:.2f} % | "
            f"{r.bf16_gib:.2f} GiB | {saved:.2f} GiB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    args = parser.parse_args(argv)
    reports = [
        parameter_report(
            Med3DQwenConfig.from_preset(p),
            name=p.replace("qwen2.5-", "Qwen2.5-").replace("b", "B"),
            lora_rank=args.lora_rank,
        )
        for p in args.presets
    ]
    print(format_markdown(reports))


if __name__ == "__main__":
    main()
