"""Deterministic synthetic chest-CT phantoms: ``generate_phantom(seed, config)``, the project's embedded default data.

A phantom is a CT volume in HU with one binary mask per structure (TotalSegmentator v2 names), lesions inside chosen
structures and RadGenome-style questions about them, all from an integer seed. Geometry, structures, intensities,
lesions, determinism and the module layout of this package: ``docs/phantom.md``.
"""

from __future__ import annotations

import numpy as np

from med3dqwen.processing.ct_io import standard_affine

from .config import Phantom, PhantomConfig
from .geometry import Grid
from .lesions import add_lesions
from .organs import build_anatomy
from .render import render_hu


__all__ = ["generate_phantom"]


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


def generate_phantom(seed: int, config: PhantomConfig | None = None) -> Phantom:
    """Generate the phantom of ``seed``; the same seed and config give bit-identical results.

    Args:
        seed: non-negative integer.
        config: generation settings (default: :class:`PhantomConfig()`).

    Returns:
        The phantom: HU volume, structure masks, findings and lesion masks.

    Raises:
        ValueError: ``seed`` is not a non-negative integer.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    config = PhantomConfig() if config is None else config
    anatomy_rng, intensity_rng, lesion_rng, noise_rng = np.random.default_rng(int(seed)).spawn(4)
    grid = Grid(config.shape, config.resolved_spacing)

    anatomy = build_anatomy(grid, anatomy_rng, config)
    volume, tissue_hu = render_hu(grid, anatomy, intensity_rng)
    findings, lesion_masks = add_lesions(grid, anatomy.masks, volume, tissue_hu, lesion_rng, config)
    if config.noise_sigma > 0:
        # (D, H, W) float32 noise; drawn from its own stream so lesions never shift it.
        noise = noise_rng.standard_normal(grid.shape, dtype=np.float32)
        noise *= np.float32(config.noise_sigma)
        volume += noise
    np.maximum(volume, np.float32(-1024.0), out=volume)  # scanners clip at -1024 HU

    spacing = grid.spacing
    centre = (np.array(grid.shape) - 1) / 2
    origin = -(standard_affine(spacing)[:3, :3] @ centre)  # volume centre at world (0, 0, 0)
    return Phantom(
        volume=volume,
        masks=anatomy.masks,
        findings=findings,
        lesion_masks=lesion_masks,
        spacing=spacing,
        affine=standard_affine(spacing, tuple(origin)),
        seed=int(seed),
        config=config,
        tissue_hu=tissue_hu,
    )
