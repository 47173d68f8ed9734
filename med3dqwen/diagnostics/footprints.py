"""Where each visual and slice token of Med3DQwen comes from in the volume: its footprint on the model grid.

The grounding diagnostic (:mod:`med3dqwen.diagnostics.grounding`) asks how much of the answer's attention falls on
tokens that "look at" the ROI. A token's receptive field, strictly, is the whole volume: the projector is an
MLP-Mixer whose token MLPs mix every encoder cell into every output token. So we use an approximation, stated here
and in ``docs/grounding.md``:

- **Encoder cell → voxels.** An encoder stage ``s`` cell ``(d, h, w)`` stands for the block of the model-grid volume
  it strides over: ``(4·2^s)³`` voxels (``vision_config.stage_grid``; stage 3 of a 128×256×256 input: a 4×8×8 grid
  of 32³ blocks). The convolutions' wider receptive field (the decomposed kernels reach a few cells further) is
  ignored.
- **Visual token → encoder cells (the projector).** Each stream (low: stage ``low_stage``, high: stage
  ``high_stage``) mixes tokens only in the token MLPs of its mixer layers (LayerNorm and the channel MLP act per
  token). We compose the absolute weight matrices of those linear layers, ``|W_k| ⋯ |W_1|`` over every layer of the
  stream, and normalise each row to sum to 1: the **weight flow** from encoder cells to each output token. It ignores
  the biases, GELU slopes and LayerNorms (input-dependent factors) and counts positive and negative paths alike, so it
  measures how much a cell *can* move a token, not the sign. It depends on the weights only (the same for every
  sample). With the projector's own order: the low stream's tokens first, then the high stream's.
- **Slice token → voxels.** Slice token ``s`` is the average over H and W of encoder stage ``slice_stage`` at depth
  ``s``: its footprint is the slab of ``4·2^slice_stage`` model-grid slices at that depth, whole in-plane.

"Inside the ROI" is then fraction-weighted, never thresholded: a visual token is inside by the share of its weight
flow that comes from ROI voxels (``Σ_c flow[c] · roi_fraction(cell c)``, with ``roi_fraction`` the share of the
cell's voxels in the ROI mask resized to the model grid), outside by the rest. A slice token is on an ROI slab when
its slab holds any ROI voxel (the slices the boundary prompt is drawn on); slice tokens are reported apart from the
visual tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


__all__ = ["TokenFootprints", "cell_roi_fractions", "mixer_weight_flow", "token_footprints"]


def mixer_weight_flow(layers) -> torch.Tensor:
    """The weight flow of one projector stream: ``(N_out, N_in)``, each row a distribution over the stream's input
    tokens (encoder cells, depth-major), composed from the absolute weights of every mixer layer's token MLP.

    Args:
        layers: the stream's mixer layers (``projector.low_mixer`` or ``projector.high_mixer``), each with a token MLP
            ``mlp1`` whose ``nn.Linear`` layers act on the token axis, in order.

    Raises:
        ValueError: a mixer layer has no linear token layer, or an output token gets no flow at all (all-zero rows,
            which would make its footprint undefined).
    """
    flow = None
    for index, layer in enumerate(layers):
        linears = [module for module in layer.mlp1.modules() if isinstance(module, nn.Linear)]
        if not linears:
            raise ValueError(f"mixer layer {index} has no linear token layer; cannot trace tokens through it")
        for linear in linears:
            weight = linear.weight.detach().abs().double().cpu()  # (out_tokens, in_tokens)
            flow = weight if flow is None else weight @ flow
    if flow is None:
        raise ValueError("the projector stream has no mixer layers")
    total = flow.sum(dim=1, keepdim=True)  # (N_out, 1)
    if bool((total <= 0).any()):
        empty = (total[:, 0] <= 0).nonzero()[:, 0].tolist()
        raise ValueError(f"projector output tokens {empty} get no weight from any encoder cell (all-zero token MLP)")
    return (flow / total).float()


def cell_roi_fractions(roi: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    """Share of each encoder cell's voxel block inside the ROI: ``(d·h·w,)`` float, depth-major like the tokens.

    Args:
        roi: (D, H, W) bool ROI on the model grid (``vision_config.volume_size``).
        grid: (d, h, w) the stage's cell grid; each of D, H, W must be a multiple of it.
    """
    d, h, w = grid
    depth, height, width = roi.shape
    if depth % d or height % h or width % w:
        raise ValueError(f"ROI grid {roi.shape} is not a whole number of {grid} encoder cells")
    blocks = roi.reshape(d, depth // d, h, height // h, w, width // w)  # (d, bd, h, bh, w, bw)
    return blocks.mean(axis=(1, 3, 5), dtype=np.float64).reshape(-1)


@dataclass
class TokenFootprints:
    """The footprints of one model's image tokens (see the module docstring).

    Attributes:
        volume_size: (D, H, W) model grid the footprints live on.
        low_grid, high_grid: (d, h, w) cell grids of the two projector streams' encoder stages.
        low_flow: (N_low_out, d·h·w) weight flow of the low stream; ``high_flow`` likewise.
        slice_depth: model-grid slices per slice token (``volume_size[0] // num_slice_tokens``); 0 without slice
            tokens.
        num_slice_tokens: slice tokens per volume.
    """

    volume_size: tuple[int, int, int]
    low_grid: tuple[int, int, int]
    high_grid: tuple[int, int, int]
    low_flow: torch.Tensor
    high_flow: torch.Tensor
    slice_depth: int
    num_slice_tokens: int

    @property
    def num_visual_tokens(self) -> int:
        return self.low_flow.shape[0] + self.high_flow.shape[0]

    def inside_fractions(self, roi: np.ndarray) -> np.ndarray:
        """(N_visual,) the share of each visual token's footprint inside ``roi`` (low stream tokens, then high).

        Args:
            roi: (D, H, W) bool ROI on the model grid.

        Raises:
            ValueError: ``roi`` is not on the model grid.
        """
        if tuple(roi.shape) != self.volume_size:
            raise ValueError(f"ROI shape {tuple(roi.shape)} differs from the model grid {self.volume_size}")
        roi = np.asarray(roi, dtype=bool)
        low = self.low_flow.double().numpy() @ cell_roi_fractions(roi, self.low_grid)  # (N_low_out,)
        high = self.high_flow.double().numpy() @ cell_roi_fractions(roi, self.high_grid)  # (N_high_out,)
        return np.concatenate([low, high])

    def slice_in_roi(self, roi: np.ndarray) -> np.ndarray:
        """(N_slices,) bool: the slab of each slice token holds an ROI voxel."""
        if tuple(roi.shape) != self.volume_size:
            raise ValueError(f"ROI shape {tuple(roi.shape)} differs from the model grid {self.volume_size}")
        if not self.num_slice_tokens:
            return np.zeros(0, dtype=bool)
        slabs = np.asarray(roi, dtype=bool).reshape(self.num_slice_tokens, self.slice_depth, -1)  # (N_s, k, H·W)
        return slabs.any(axis=(1, 2))

    def describe(self) -> dict:
        """The footprint settings, for the results file."""
        return {
            "method": "projector weight flow (|W| products of the mixer token MLPs), stage cells as stride blocks",
            "volume_size": list(self.volume_size),
            "low_grid": list(self.low_grid),
            "low_cell_voxels": [s // g for s, g in zip(self.volume_size, self.low_grid, strict=True)],
            "high_grid": list(self.high_grid),
            "high_cell_voxels": [s // g for s, g in zip(self.volume_size, self.high_grid, strict=True)],
            "num_visual_tokens": self.num_visual_tokens,
            "num_slice_tokens": self.num_slice_tokens,
            "slice_depth_voxels": self.slice_depth,
            "inside": "fraction-weighted (no threshold); slice tokens: slab holds any ROI voxel",
        }


def token_footprints(model) -> TokenFootprints:
    """The footprints of a Med3DQwen model's image tokens.

    Args:
        model: a ``Med3DQwenForConditionalGeneration`` or ``Med3DQwenModel``, or a PEFT model around one whose
            projector is not an adapter target (the projector's weights are read directly; merge adapters first).
    """
    get_base = getattr(model, "get_base_model", None)
    model = get_base() if callable(get_base) else model
    backbone = getattr(model, "model", model)
    config = backbone.config
    vision = config.vision_config
    projector = backbone.multi_modal_projector
    low_flow = mixer_weight_flow(projector.low_mixer)
    high_flow = mixer_weight_flow(projector.high_mixer)
    low_grid, high_grid = vision.stage_grid(vision.low_stage), vision.stage_grid(vision.high_stage)
    for name, flow, grid in (("low", low_flow, low_grid), ("high", high_flow, high_grid)):
        if flow.shape[1] != int(np.prod(grid)):
            raise ValueError(
                f"the projector's {name} stream reads {flow.shape[1]} tokens but encoder stage grid {grid} has "
                f"{int(np.prod(grid))} cells"
            )
    if low_flow.shape[0] + high_flow.shape[0] != vision.num_visual_tokens:
        raise ValueError(
            f"the projector gives {low_flow.shape[0] + high_flow.shape[0]} visual tokens, the config "
            f"{vision.num_visual_tokens}"
        )
    num_slices = vision.num_slice_tokens
    size = tuple(vision.volume_size)
    return TokenFootprints(
        volume_size=size,
        low_grid=low_grid,
        high_grid=high_grid,
        low_flow=low_flow,
        high_flow=high_flow,
        slice_depth=size[0] // num_slices if num_slices else 0,
        num_slice_tokens=num_slices,
    )
