"""Dual-stream MLP-Mixer projector from DCFormer stages 3 and 4 to the decoder's hidden size.

Same architecture and parameter names as Med3DVLM's ``MixerLowHighHybridMLP`` (``src/model/projector/mlp.py``,
``mm_projector_type="mixer"``), so its released projector loads into ``hidden_size=3584`` (Qwen2.5-7B). For the
smaller decoders every channel-MLP shape depends on the hidden size, so the projector is trained anew.

Each stream is a stack of mixer layers, LayerNorm → token MLP → LayerNorm → channel MLP, with no residuals (both
MLPs change the size). With the defaults: low (B, 256, 384) → (B, 192, H/2) → (B, 128, H); high (B, 32, 768) →
(B, 64, H/2) → (B, 128, H); output ``cat([low, high], dim=1)`` = (B, 256, H).

This file imports only third-party packages so that it can be copied next to a saved model
(``trust_remote_code``) and work without the ``med3dqwen`` package.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


__all__ = ["Med3DQwenMultiModalProjector", "MixerLayer", "MixerMLP"]


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class MixerMLP(nn.Module):
    """Linear, then (GELU → Linear) × (depth − 1), over the last axis."""

    def __init__(self, in_features: int, out_features: int, depth: int = 2):
        """
        Args:
            in_features: input size.
            out_features: output size (and hidden size).
            depth: number of linear layers.
        """
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("depth", depth)):
            _check_positive(name, value)
        # Med3DVLM's ``MultiModalProjector`` layout: mm_projector.0 = Linear, mm_projector.i.1 = Linear (i ≥ 1).
        self.mm_projector = nn.Sequential(
            nn.Linear(in_features, out_features),
            *(nn.Sequential(nn.GELU(), nn.Linear(out_features, out_features)) for _ in range(depth - 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)."""
        return self.mm_projector(x)


class MixerLayer(nn.Module):
    """LayerNorm → token MLP → LayerNorm → channel MLP, no residuals: (B, N, C) → (B, N', C')."""

    def __init__(self, in_tokens: int, in_dim: int, out_tokens: int, out_dim: int, mlp_depth: int = 2):
        """
        Args:
            in_tokens: input token count N.
            in_dim: input channels C.
            out_tokens: output token count N'.
            out_dim: output channels C'.
            mlp_depth: linear layers per MLP.
        """
        super().__init__()
        self.in_tokens, self.in_dim = in_tokens, in_dim
        self.ln1 = nn.LayerNorm(in_dim)
        self.mlp1 = MixerMLP(in_tokens, out_tokens, mlp_depth)  # mixes tokens
        self.ln2 = nn.LayerNorm(in_dim)
        self.mlp2 = MixerMLP(in_dim, out_dim, mlp_depth)  # mixes channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N', C')."""
        x = self.mlp1(self.ln1(x).transpose(1, 2)).transpose(1, 2)  # (B, N', C)
        return self.mlp2(self.ln2(x))


class Med3DQwenMultiModalProjector(nn.Module):
    """Dual-stream MLP-Mixer: stage-3 (low) and stage-4 (high) DCFormer tokens → (B, N_low + N_high, hidden_size)."""

    def __init__(
        self,
        hidden_size: int,
        low_tokens: int = 256,
        low_dim: int = 384,
        high_tokens: int = 32,
        high_dim: int = 768,
        low_output: Sequence[int] = (192, 128),
        high_output: Sequence[int] = (64, 128),
        mlp_depth: int = 2,
    ):
        """
        Args:
            hidden_size: decoder hidden size H; must divide by 2 ** len(low_output) (layer i outputs
                H / 2 ** (depth - 1 - i) channels).
            low_tokens: stage-3 token count (256 for a 128×256×256 volume).
            low_dim: stage-3 channels.
            high_tokens: stage-4 token count (32 for a 128×256×256 volume).
            high_dim: stage-4 channels.
            low_output: token count after each low-stream mixer layer.
            high_output: token count after each high-stream mixer layer (as many layers as ``low_output``).
            mlp_depth: linear layers per token / channel MLP.

        Raises:
            ValueError: on non-positive sizes, streams of different depth, or ``hidden_size`` not divisible.
        """
        super().__init__()
        low_output, high_output = tuple(low_output), tuple(high_output)
        for name, value in (
            ("hidden_size", hidden_size),
            ("low_tokens", low_tokens),
            ("low_dim", low_dim),
            ("high_tokens", high_tokens),
            ("high_dim", high_dim),
            ("mlp_depth", mlp_depth),
            *(("low_output", v) for v in low_output),
            *(("high_output", v) for v in high_output),
        ):
            _check_positive(name, value)
        if not low_output or len(low_output) != len(high_output):
            raise ValueError(f"low_output {low_output} and high_output {high_output} need the same, non-zero length")
        depth = len(low_output)
        if hidden_size % 2**depth:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by 2 ** {depth} = {2**depth}")
        self.hidden_size = hidden_size
        self.low_input_shape = (low_tokens, low_dim)
        self.high_input_shape = (high_tokens, high_dim)
        self.num_output_tokens = low_output[-1] + high_output[-1]
        # Channels grow to H / 2 ** (depth - 1 - i) after layer i: H/2 then H for depth 2.
        dims = [hidden_size // 2 ** (depth - 1 - i) for i in range(depth)]
        self.low_mixer = self._stream(low_tokens, low_dim, low_output, dims, mlp_depth)
        self.high_mixer = self._stream(high_tokens, high_dim, high_output, dims, mlp_depth)

    @staticmethod
    def _stream(
        tokens: int, dim: int, out_tokens: Sequence[int], dims: Sequence[int], mlp_depth: int
    ) -> nn.ModuleList:
        in_shapes = [(tokens, dim), *zip(out_tokens[:-1], dims[:-1], strict=True)]
        return nn.ModuleList(
            MixerLayer(n_in, c_in, n_out, c_out, mlp_depth)
            for (n_in, c_in), n_out, c_out in zip(in_shapes, out_tokens, dims, strict=True)
        )

    def forward(self, low_features: torch.Tensor, high_features: torch.Tensor) -> torch.Tensor:
        """Project the two token streams and concatenate them, low first.

        Args:
            low_features: (B, low_tokens, low_dim) depth-major stage-3 tokens.
            high_features: (B, high_tokens, high_dim) depth-major stage-4 tokens.

        Returns:
            (B, num_output_tokens, hidden_size).

        Raises:
            ValueError: if either input does not have the expected (tokens, channels) or the batches differ; a
                volume of another size than the projector was built for gives other token counts.
        """
        low_ok = low_features.ndim == 3 and tuple(low_features.shape[1:]) == self.low_input_shape
        high_ok = high_features.ndim == 3 and tuple(high_features.shape[1:]) == self.high_input_shape
        if not (low_ok and high_ok) or low_features.shape[0] != high_features.shape[0]:
            raise ValueError(
                f"expected low features (B, {self.low_input_shape[0]}, {self.low_input_shape[1]}) and high features "
                f"(B, {self.high_input_shape[0]}, {self.high_input_shape[1]}) with the same B, got low "
                f"{tuple(low_features.shape)} and high {tuple(high_features.shape)} (token counts depend on the "
                "volume size; 256 + 32 tokens come from 128×256×256)"
            )
        low, high = low_features, high_features
        for low_layer, high_layer in zip(self.low_mixer, self.high_mixer, strict=True):
            low, high = low_layer(low), high_layer(high)
        return torch.cat([low, high], dim=1)
