"""Lesions: nodules, masses and pleural effusions drawn inside their host structures."""

from __future__ import annotations

import numpy as np

from .config import Finding, PhantomConfig
from .geometry import Box, Grid, tight_box
from .structures import _EFFUSION_HOSTS, _SOLID_HOSTS


def add_lesions(
    grid: Grid,
    masks: dict[str, np.ndarray],
    volume: np.ndarray,
    tissue: dict[str, float],
    rng: np.random.Generator,
    cfg: PhantomConfig,
) -> tuple[list[Finding], list[np.ndarray]]:
    """Draw and paint the lesions; effusions first, then solid lesions, never overlapping each other."""
    kinds = cfg.lesion_kinds
    # One draw per slot whatever the outcome, so slot i's decision does not depend on the others.
    effusion_draws = rng.random(len(_EFFUSION_HOSTS))
    solid_draws = rng.random(len(_SOLID_HOSTS))
    occupied = np.zeros(grid.shape, dtype=bool)
    findings, lesion_masks = [], []

    def record(kind: str, host: str, box: Box, local: np.ndarray, centre, size: float, hu: float) -> None:
        hu = round(float(hu), 1)  # the recorded value is the painted one
        volume[box][local] = np.float32(hu)
        occupied[box] |= local
        mask = np.zeros(grid.shape, dtype=bool)
        mask[box] = local
        findings.append(Finding(kind, host, tuple(int(c) for c in centre), float(size), hu, int(local.sum())))
        lesion_masks.append(mask)

    if "effusion" in kinds:
        for host, draw in zip(_EFFUSION_HOSTS, effusion_draws, strict=True):
            if draw >= cfg.effusion_probability:
                continue
            thickness = float(round(rng.uniform(*cfg.effusion_size_mm)))
            hu = float(rng.uniform(*cfg.effusion_hu))
            placed = _effusion(grid, masks[host], occupied, thickness)
            if placed is not None:
                record("effusion", host, *placed, thickness, hu)

    solid_kinds = [k for k in ("nodule", "mass") if k in kinds]
    if solid_kinds:
        for host, draw in zip(_SOLID_HOSTS, solid_draws, strict=True):
            if draw >= cfg.lesion_probability:
                continue
            kind = solid_kinds[0]
            if len(solid_kinds) == 2:
                kind = "mass" if rng.random() < cfg.mass_fraction else "nodule"
            if kind == "nodule":
                low, high = cfg.nodule_size_mm
                diameter = float(np.exp(rng.uniform(np.log(low), np.log(high))))  # small nodules are commoner
            else:
                low, high = cfg.mass_size_mm
                diameter = float(rng.uniform(low, high))
            diameter = max(round(diameter), 1.0)
            if host == "liver":
                hu = tissue["liver"] + float(rng.uniform(*cfg.liver_lesion_contrast_hu))
            else:
                hu = float(rng.uniform(*cfg.lung_lesion_hu))
            lobulation = (float(rng.uniform(0.08, 0.15)), float(rng.uniform(0, 2 * np.pi))) if kind == "mass" else None
            placed = _solid_lesion(grid, masks[host], occupied, diameter, max(low, 1.0), lobulation, rng)
            if placed is not None:
                box, local, centre, diameter = placed
                record(kind, host, box, local, centre, diameter, hu)
    return findings, lesion_masks


def _solid_lesion(
    grid: Grid,
    host: np.ndarray,
    occupied: np.ndarray,
    diameter: float,
    min_diameter: float,
    lobulation: tuple[float, float] | None,
    rng: np.random.Generator,
):
    """Place a sphere (lobulated for masses) with its centre in ``host`` and at least 80% of it inside.

    Tries random centres; if none fits, shrinks the diameter by 15% (not below ``min_diameter``) and tries again;
    finally keeps the best candidate seen. The lesion is clipped to the host (minus earlier lesions).

    Returns:
        ``(box, local mask, centre voxel, diameter)``, or None if the host is empty.
    """
    tight = tight_box(host, tuple(slice(0, n) for n in grid.shape))
    if tight is None:
        return None
    best = None
    for _ in range(5):
        r = diameter / 2
        candidates = np.stack([rng.integers(s.start, s.stop, size=48) for s in tight], axis=1)
        for c in candidates:
            c = tuple(int(i) for i in c)
            if not host[c] or occupied[c]:
                continue
            centre_mm = (grid.z[c[0]], grid.y[c[1]], grid.x[c[2]])
            box = grid.around(centre_mm, (r * 1.2, r * 1.2, r * 1.2))
            z, y, x = grid.coords(box)
            dz, dy, dx = z - centre_mm[0], y - centre_mm[1], x - centre_mm[2]
            dist2 = dz * dz + dy * dy + dx * dx
            limit = np.float32(r)
            if lobulation is not None:
                # Lobulated outline: the radius varies by ±amp with three lobes around the axial plane.
                amp, phase = lobulation
                horizontal = np.sqrt(dy * dy + dx * dx)
                lobes = np.cos(3 * np.arctan2(dy, dx) + np.float32(phase)) * horizontal / np.sqrt(dist2 + 1e-6)
                limit = np.float32(r) * (1 + np.float32(amp) * lobes)
            sphere = dist2 <= limit * limit
            free = host[box] & ~occupied[box]
            inside = sphere & free
            fraction = inside.sum() / max(int(sphere.sum()), 1)
            if best is None or fraction > best[0]:
                best = (fraction, box, inside, c, diameter)
            if fraction >= 0.8:
                return box, inside, c, diameter
        if diameter <= min_diameter:
            break
        diameter = float(max(round(diameter * 0.85), min_diameter))
    if best is None:
        return None
    return best[1:]


def _effusion(grid: Grid, lung: np.ndarray, occupied: np.ndarray, thickness: float):
    """Dependent pleural fluid: the posterior layer of the lung, ``thickness`` mm at the base, thinning upwards.

    Returns:
        ``(box, local mask, centre voxel)`` or None if the lung is empty.
    """
    box = tight_box(lung, tuple(slice(0, n) for n in grid.shape))
    if box is None:
        return None
    local = lung[box]
    z, _, _ = grid.coords(box)
    n_h = local.shape[1]
    has = local.any(axis=1)  # (d, w)
    posterior = n_h - 1 - np.argmax(local[:, ::-1, :], axis=1)  # (d, w) last lung row in each column
    depth_mm = (posterior[:, None, :] - np.arange(n_h)[None, :, None]) * grid.spacing[1]  # (d, h, w)
    base = float(z[0, 0, 0])
    height = 3.0 * thickness + 40.0
    layer = thickness * np.clip(1.0 - ((z - base) / height) ** 2, 0.0, 1.0)  # (d, 1, 1)
    fluid = local & has[:, None, :] & (depth_mm < layer) & ~occupied[box]
    if not fluid.any():
        return None
    idx = np.argwhere(fluid)
    nearest = idx[np.argmin(((idx - idx.mean(0)) ** 2).sum(1))]
    centre = tuple(int(s.start + i) for s, i in zip(box, nearest, strict=True))
    return box, fluid, centre
