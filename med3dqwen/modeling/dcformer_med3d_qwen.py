"""DCFormer 3D CT encoder (decomposed 3D convolutions), parameter-compatible with Med3DVLM's ``decomp_*`` models.

The modules below reproduce the architecture of Med3DVLM's ``src/model/encoder/dcformer.py`` (``DecompModel``,
conv blocks only) with the same parameter names and shapes, so that the released weights
(``MagicXin/DCFormer_SigLIP``, the vision tower of ``MagicXin/Med3DVLM-Qwen-2.5-7B``) load after stripping the
checkpoint's prefix (see ``convert_med3dvlm.py``).

Axis convention. Our tensors are (B, C, D, H, W) with D the slice axis. Med3DVLM permutes its input to
(B, C, H, W, D) before the first convolution, so its axis-wise kernels act on fixed anatomical axes: ``c1``
(kernel k×1×1) convolves along H, ``c2`` (1×k×1) along W and ``c3`` (1×1×k) along D. To give bit-identical
features with released weights, :class:`Med3DQwenVisionEncoder` does the same permutation internally and returns
every stage in our (B, C, D, H, W) order again; :func:`flatten_stage_tokens` flattens a stage depth-major (slice index
outermost, then H, then W), the token order Med3DVLM feeds its projector.

The encoder contains BatchNorm3d and is meant to stay in ``eval()``: ``requires_grad_(False)`` alone does not stop
``model.train()`` from updating the running statistics.

This file imports only third-party packages so that it can be copied next to a saved model
(``trust_remote_code``) and work without the ``med3dqwen`` package.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


__all__ = [
    "DCFORMER_PRESETS",
    "DCFormerBackbone",
    "DCFormerConvBlock",
    "ChannelMLP",
    "DecomposedConv3d",
    "DecomposedStem",
    "PromptStem",
    "Med3DQwenVisionEncoder",
    "flatten_stage_tokens",
]

# Med3DVLM ``dcformer.py``: ``decomp_*`` factory functions (all use the default kernel sizes 13/11/9/7 and conv
# blocks only). Med3DVLM builds ``decomp_small`` (18.24 M parameters).
DCFORMER_PRESETS: dict[str, dict[str, tuple[int, ...]]] = {
    "decomp_nano": {"channels": (32, 32, 64, 128, 256), "depths": (1, 1, 1, 1, 1), "kernel_sizes": (13, 11, 9, 7)},
    "decomp_naive": {"channels": (32, 64, 128, 256, 512), "depths": (1, 2, 2, 2, 2), "kernel_sizes": (13, 11, 9, 7)},
    "decomp_tiny": {"channels": (64, 96, 192, 384, 768), "depths": (1, 2, 3, 3, 2), "kernel_sizes": (13, 11, 9, 7)},
    "decomp_small": {"channels": (64, 96, 192, 384, 768), "depths": (1, 2, 3, 6, 2), "kernel_sizes": (13, 11, 9, 7)},
    "decomp_base": {"channels": (64, 128, 256, 512, 1024), "depths": (1, 2, 6, 6, 2), "kernel_sizes": (13, 11, 9, 7)},
    "decomp_large": {
        "channels": (64, 256, 512, 1024, 2048),
        "depths": (1, 2, 6, 12, 2),
        "kernel_sizes": (13, 11, 9, 7),
    },
}

NUM_STAGES = 5
STEM_STRIDE = 4
STEM_KERNEL_SIZE = 7
# Stem: one 7-wide stride-4 decomposed convolution, then three 3-wide ones.
_STEM_KERNELS = (STEM_KERNEL_SIZE, 3, 3, 3)
# The stem's first convolutions (the only ones that see the input channels), in any checkpoint prefix.


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class DecomposedConv3d(nn.Module):
    """Sum of three axis-wise 3D convolutions (k×1×1, 1×k×1, 1×1×k), each followed by BatchNorm3d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        """
        Args:
            in_channels: input channels.
            out_channels: output channels.
            kernel_size: odd kernel length along the convolved axis (padding ``kernel_size // 2`` keeps the size).
            stride: stride on all three axes (each branch strides every axis, so the branches stay aligned).
            groups: convolution groups (``in_channels`` for a depthwise convolution).
        """
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("kernel_size", kernel_size),
            ("stride", stride),
            ("groups", groups),
        ):
            _check_positive(name, value)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the three branches must keep one size), got {kernel_size}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must divide by {groups=}")
        pad = kernel_size // 2
        # c1 / c2 / c3 convolve along dims 2 / 3 / 4 of the input; inside the encoder those are H / W / D.
        self.c1 = self._branch(in_channels, out_channels, (kernel_size, 1, 1), (pad, 0, 0), stride, groups)
        self.c2 = self._branch(in_channels, out_channels, (1, kernel_size, 1), (0, pad, 0), stride, groups)
        self.c3 = self._branch(in_channels, out_channels, (1, 1, kernel_size), (0, 0, pad), stride, groups)

    @staticmethod
    def _branch(
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, int, int],
        padding: tuple[int, int, int],
        stride: int,
        groups: int,
    ) -> nn.Sequential:
        conv = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=padding, groups=groups)
        return nn.Sequential(conv, nn.BatchNorm3d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, X, Y, Z) -> (B, C_out, X', Y', Z')."""
        return self.c1(x) + self.c2(x) + self.c3(x)


class DecomposedStem(nn.Sequential):
    """Stride-4 stem: a 7-wide decomposed convolution with stride 4, then three 3-wide ones, with no activation.

    Med3DVLM passes ``nn.GELU()`` in the ``norm`` slot of its stem convolutions, so its stem has no activation
    at all; the released weights were trained that way, and so is this stem.
    """

    def __init__(self, in_channels: int, out_channels: int):
        """
        Args:
            in_channels: input channels (image channels for the first stem of the encoder).
            out_channels: output channels.
        """
        _check_positive("in_channels", in_channels)
        _check_positive("out_channels", out_channels)
        super().__init__(
            *(
                DecomposedConv3d(
                    in_channels if i == 0 else out_channels, out_channels, k, STEM_STRIDE if i == 0 else 1
                )
                for i, k in enumerate(_STEM_KERNELS)
            )
        )


class ChannelMLP(nn.Module):
    """Per-voxel channel MLP (Linear → GELU → Linear) on channels-last input."""

    def __init__(self, channels: int, hidden_channels: int, dropout: float = 0.0):
        """
        Args:
            channels: input and output channels.
            hidden_channels: hidden width.
            dropout: dropout after each linear layer (0 in Med3DVLM).
        """
        super().__init__()
        _check_positive("channels", channels)
        _check_positive("hidden_channels", hidden_channels)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        # Indices matter for the state dict: linear layers at mlp.0 and mlp.3.
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden_channels),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_channels, channels),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C)."""
        return self.mlp(x)


class DCFormerConvBlock(nn.Module):
    """Optional max-pool + 1×1×1 conv downsampling, depthwise decomposed conv, channel MLP, layer-scaled residual."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 7,
        downsample: bool = False,
        expansion: int = 4,
        layer_scale_init: float = 1e-6,
    ):
        """
        Args:
            in_channels: input channels.
            out_channels: output channels; must equal ``in_channels`` unless ``downsample``.
            kernel_size: odd kernel length of the depthwise decomposed convolution.
            downsample: halve every spatial size (max-pool 3, stride 2, padding 1) and project to ``out_channels``.
            expansion: hidden width of the channel MLP, as a multiple of ``out_channels``.
            layer_scale_init: initial value of the per-channel ``scale`` on the residual branch.
        """
        super().__init__()
        _check_positive("in_channels", in_channels)
        _check_positive("out_channels", out_channels)
        _check_positive("expansion", expansion)
        if not downsample and in_channels != out_channels:
            raise ValueError(
                f"without downsample, in_channels ({in_channels}) must equal out_channels ({out_channels})"
            )
        self.downsample = downsample
        if downsample:
            self.pool = nn.MaxPool3d(3, 2, 1)
            self.proj = nn.Conv3d(in_channels, out_channels, 1, 1, 0, bias=False)
        self.dwconv = DecomposedConv3d(out_channels, out_channels, kernel_size, groups=out_channels)
        self.mlp = ChannelMLP(out_channels, out_channels * expansion)
        self.layer_scale_init = float(layer_scale_init)
        self.scale = nn.Parameter(torch.full((out_channels,), self.layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, X, Y, Z) -> (B, C_out, X', Y', Z'), with X' = ceil(X / 2) etc. when downsampling."""
        if self.downsample:
            x = self.proj(self.pool(x))
        y = self.dwconv(x).permute(0, 2, 3, 4, 1)  # channels last for the MLP
        y = (self.scale * self.mlp(y)).permute(0, 4, 1, 2, 3)
        return x + y


class DCFormerBackbone(nn.Module):
    """The five DCFormer stages ``s0`` (stem) to ``s4``, in Med3DVLM's internal (B, C, H, W, D) layout."""

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        depths: Sequence[int],
        kernel_sizes: Sequence[int],
        expansion: int = 4,
        layer_scale_init: float = 1e-6,
    ):
        """
        Args:
            in_channels: image channels.
            channels: output channels of the five stages.
            depths: blocks per stage (stem blocks for ``s0``).
            kernel_sizes: depthwise kernel lengths of stages ``s1``–``s4``.
            expansion: channel-MLP width multiple.
            layer_scale_init: initial layer scale of the conv blocks.
        """
        super().__init__()
        # Each stage's first block changes the channels (and downsamples); the others keep them.
        in_ch = [in_channels, *channels[:-1]]
        self.s0 = nn.Sequential(
            *(DecomposedStem(in_ch[0] if i == 0 else channels[0], channels[0]) for i in range(depths[0]))
        )
        for s in range(1, NUM_STAGES):
            blocks = (
                DCFormerConvBlock(
                    in_ch[s] if i == 0 else channels[s],
                    channels[s],
                    kernel_sizes[s - 1],
                    downsample=i == 0,
                    expansion=expansion,
                    layer_scale_init=layer_scale_init,
                )
                for i in range(depths[s])
            )
            self.add_module(f"s{s}", nn.Sequential(*blocks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C_in, H, W, D) -> five stage outputs (B, C_s, H_s, W_s, D_s)."""
        hidden_states = []
        for s in range(NUM_STAGES):
            x = getattr(self, f"s{s}")(x)
            hidden_states.append(x)
        return hidden_states


class PromptStem(nn.Module):
    """Zero-initialised axis-wise convolutions that add prompt channels (the contour) to the stem's first block.

    The ``channel`` prompt encoding feeds the contour as extra input channels. Their kernels live here, apart from
    the pretrained single-channel stem, so the encoder keeps Med3DVLM's keys, equals the pretrained model at
    initialisation, and this module can be the one trainable part of an otherwise frozen encoder.
    """

    def __init__(self, prompt_channels: int, out_channels: int, kernel_size: int = STEM_KERNEL_SIZE):
        """
        Args:
            prompt_channels: extra input channels (1 for a contour channel).
            out_channels: channels of the stem's first block.
            kernel_size: kernel length along each axis (the stem's first block uses 7 with stride 4).
        """
        super().__init__()
        _check_positive("prompt_channels", prompt_channels)
        _check_positive("out_channels", out_channels)
        self.padding = kernel_size // 2
        # Kernels of the three axis-wise convolutions (same geometry as DecomposedConv3d's stride-4 branches; no
        # BatchNorm, no bias). Plain parameters, so that transformers' initialisation reaches them through this module.
        self.c1 = nn.Parameter(torch.zeros(out_channels, prompt_channels, kernel_size, 1, 1))
        self.c2 = nn.Parameter(torch.zeros(out_channels, prompt_channels, 1, kernel_size, 1))
        self.c3 = nn.Parameter(torch.zeros(out_channels, prompt_channels, 1, 1, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, prompt_channels, X, Y, Z) -> (B, out_channels, X', Y', Z') in the stem's layout."""
        p = self.padding
        out = nn.functional.conv3d(x, self.c1, stride=STEM_STRIDE, padding=(p, 0, 0))
        out = out + nn.functional.conv3d(x, self.c2, stride=STEM_STRIDE, padding=(0, p, 0))
        return out + nn.functional.conv3d(x, self.c3, stride=STEM_STRIDE, padding=(0, 0, p))


class Med3DQwenVisionEncoder(nn.Module):
    """DCFormer encoder over (B, C, D, H, W) CT volumes; state dict keys equal Med3DVLM's ``DecompModel``.

    Keep it in ``eval()`` (it has BatchNorm3d). With ``decomp_small`` and a (1, 1, 128, 256, 256) input, stage 3
    is (1, 384, 4, 8, 8) = 256 tokens × 384 and stage 4 is (1, 768, 2, 4, 4) = 32 tokens × 768, the two inputs of
    the Med3DVLM projector.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (64, 96, 192, 384, 768),
        depths: Sequence[int] = (1, 2, 3, 6, 2),
        kernel_sizes: Sequence[int] = (13, 11, 9, 7),
        expansion: int = 4,
        layer_scale_init: float = 1e-6,
        prompt_channels: int = 0,
    ):
        """
        Args:
            in_channels: image channels of the pretrained stem (1 for Med3DVLM weights).
            prompt_channels: extra input channels after the image ones (1 for the ``channel`` prompt encoding),
                handled by a zero-initialised :class:`PromptStem`; the input then has ``in_channels +
                prompt_channels`` channels.
            channels: output channels of the five stages (stem, s1–s4).
            depths: blocks per stage (stem blocks for stage 0, each with stride 4).
            kernel_sizes: odd depthwise kernel lengths of stages 1–4.
            expansion: channel-MLP width multiple of the conv blocks.
            layer_scale_init: initial layer scale of the conv blocks (Med3DVLM: 1e-6).

        Raises:
            ValueError: on a wrong number of stages or non-positive / even sizes.
        """
        super().__init__()
        _check_positive("in_channels", in_channels)
        channels, depths, kernel_sizes = tuple(channels), tuple(depths), tuple(kernel_sizes)
        for name, values, length in (
            ("channels", channels, NUM_STAGES),
            ("depths", depths, NUM_STAGES),
            ("kernel_sizes", kernel_sizes, NUM_STAGES - 1),
        ):
            if len(values) != length:
                raise ValueError(f"{name} needs {length} values, got {len(values)}: {values}")
            for v in values:
                _check_positive(name, v)
        if any(k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes must be odd, got {kernel_sizes}")
        _check_positive("expansion", expansion)
        self.in_channels = in_channels
        self.channels = channels
        self.depths = depths
        self.kernel_sizes = kernel_sizes
        self.encoder = DCFormerBackbone(in_channels, channels, depths, kernel_sizes, expansion, layer_scale_init)
        if prompt_channels < 0:
            raise ValueError(f"prompt_channels must be >= 0, got {prompt_channels}")
        self.prompt_channels = prompt_channels
        self.prompt_stem = PromptStem(prompt_channels, channels[0]) if prompt_channels else None

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Encode a batch of volumes.

        Args:
            pixel_values: (B, C, D, H, W) volumes, C = ``in_channels``.

        Returns:
            Five stage outputs (B, C_s, D_s, H_s, W_s), stem first; views of Med3DVLM's (B, C, H, W, D) tensors.

        Raises:
            ValueError: if the input is not 5-D with ``in_channels`` channels.
        """
        channels = self.in_channels + self.prompt_channels
        if pixel_values.ndim != 5 or pixel_values.shape[1] != channels:
            shape = tuple(pixel_values.shape)
            raise ValueError(f"expected pixel_values of shape (B, {channels}, D, H, W), got {shape}")
        # Med3DVLM runs on (B, C, H, W, D): its k×1×1 kernels act on H, 1×1×k on D.
        x = pixel_values.permute(0, 1, 3, 4, 2)
        if self.prompt_stem is None:
            hidden_states = self.encoder(x)
        else:
            image, prompt = x[:, : self.in_channels], x[:, self.in_channels :]
            first_stem = self.encoder.s0[0]  # DecomposedStem: 4 decomposed convolutions, the first with stride 4
            h = first_stem[0](image) + self.prompt_stem(prompt)
            for block in [*list(first_stem)[1:], *list(self.encoder.s0)[1:]]:
                h = block(h)
            hidden_states = [h]
            for s in range(1, NUM_STAGES):
                hidden_states.append(getattr(self.encoder, f"s{s}")(hidden_states[-1]))
        return tuple(h.permute(0, 1, 4, 2, 3) for h in hidden_states)

    def stage_grid_sizes(self, spatial_size: Sequence[int]) -> tuple[tuple[int, int, int], ...]:
        """(D, H, W) grid of each stage for a (D, H, W) input, without running the model.

        Each stem block divides every size by 4 and each later stage by 2, rounding up.
        """
        if len(spatial_size) != 3:
            raise ValueError(f"spatial_size must be (D, H, W), got {tuple(spatial_size)}")
        for v in spatial_size:
            _check_positive("spatial_size", int(v))
        size = tuple(int(v) for v in spatial_size)
        for _ in range(self.depths[0]):
            size = tuple(math.ceil(v / STEM_STRIDE) for v in size)
        grids = [size]
        for _ in range(1, NUM_STAGES):
            size = tuple(math.ceil(v / 2) for v in size)
            grids.append(size)
        return tuple(grids)

    def get_stage_tokens(self, pixel_values: torch.Tensor, stages: Sequence[int] = (3, 4)) -> tuple[torch.Tensor, ...]:
        """Depth-major tokens (B, D_s·H_s·W_s, C_s) of the given stages (default: the projector's stages 3 and 4)."""
        hidden_states = self(pixel_values)
        return tuple(flatten_stage_tokens(hidden_states[s]) for s in stages)


def flatten_stage_tokens(hidden_state: torch.Tensor) -> torch.Tensor:
    """Flatten a stage output (B, C, D, H, W) to tokens (B, D·H·W, C), depth-major (then H, then W).

    This is Med3DVLM's ``rearrange(x, "b d h w t -> b t h w d")`` + ``pack(..., "b * d")`` on its
    (B, C, H, W, D) tensors, so the same weights give the same token sequence.
    """
    if hidden_state.ndim != 5:
        raise ValueError(f"expected a stage output (B, C, D, H, W), got {tuple(hidden_state.shape)}")
    return hidden_state.permute(0, 2, 3, 4, 1).flatten(1, 3)
