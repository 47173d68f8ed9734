"""Tissue labels → HU volume (before lesions and noise)."""

from __future__ import annotations

import numpy as np

from .geometry import Grid
from .organs import (
    _AIR,
    _AORTA,
    _BRONCHUS_LUMEN,
    _BRONCHUS_WALL,
    _CANAL,
    _DISC,
    _ESOPHAGUS,
    _FAT,
    _HEART_BLOOD,
    _HEART_WALL,
    _LIVER,
    _LUNG_LEFT,
    _LUNG_RIGHT,
    _LUNG_VESSEL_LEFT,
    _LUNG_VESSEL_RIGHT,
    _N_LABELS,
    _RIB_CORTEX,
    _RIB_MARROW,
    _SOFT,
    _SPLEEN,
    _STERNUM_CORTEX,
    _STERNUM_MARROW,
    _STOMACH_FLUID,
    _STOMACH_GAS,
    _STOMACH_WALL,
    _TRACHEA_LUMEN,
    _TRACHEA_WALL,
    _VERT_CANCELLOUS,
    _VERT_CORTEX,
    _VERT_POSTERIOR,
    _VESSEL,
    Anatomy,
)


def render_hu(grid: Grid, anatomy: Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, float]]:
    """HU volume (float32, no noise) from the tissue labels; per-phantom tissue values vary a little."""
    tissue = {
        "fat": -100.0 + float(rng.uniform(-10, 10)),
        "soft": 40.0 + float(rng.uniform(-8, 8)),
        "blood": 50.0 + float(rng.uniform(-8, 8)),
        "liver": 55.0 + float(rng.uniform(-8, 8)),
        "spleen": 45.0 + float(rng.uniform(-5, 5)),
        "lung": -850.0 + float(rng.uniform(-25, 25)),
    }
    lut = np.zeros(_N_LABELS, dtype=np.float32)
    lut[[_AIR, _BRONCHUS_LUMEN, _TRACHEA_LUMEN]] = -1000.0
    lut[_FAT] = tissue["fat"]
    lut[[_SOFT, _HEART_WALL, _ESOPHAGUS, _STOMACH_WALL]] = tissue["soft"]
    lut[[_HEART_BLOOD, _AORTA, _VESSEL, _LUNG_VESSEL_RIGHT, _LUNG_VESSEL_LEFT]] = tissue["blood"]
    lut[_LIVER] = tissue["liver"]
    lut[_SPLEEN] = tissue["spleen"]
    lut[_STOMACH_FLUID], lut[_STOMACH_GAS] = 15.0, -1000.0
    lut[[_LUNG_RIGHT, _LUNG_LEFT]] = tissue["lung"]
    lut[[_BRONCHUS_WALL, _TRACHEA_WALL]] = 60.0
    lut[_DISC], lut[_CANAL] = 90.0, 20.0
    lut[[_VERT_CORTEX, _RIB_CORTEX]] = 800.0
    lut[_VERT_CANCELLOUS], lut[_VERT_POSTERIOR] = 230.0, 650.0
    lut[_RIB_MARROW], lut[_STERNUM_MARROW], lut[_STERNUM_CORTEX] = 280.0, 250.0, 700.0
    volume = lut[anatomy.labels]  # (D, H, W) float32

    # Lung parenchyma: denser posteriorly (gravity) plus smooth low-frequency variation, separable in z, y, x.
    box = anatomy.lung_box
    z, y, x = grid.coords(box)
    texture = np.float32(30.0 / 90.0) * (y - np.float32(np.mean(grid.y[box[1]])))
    for _ in range(3):
        wavelength = rng.uniform(50.0, 140.0, size=3)
        phase = rng.uniform(0.0, 2 * np.pi, size=3)
        amp = np.float32(rng.uniform(4.0, 8.0))
        term = np.cos(z * np.float32(2 * np.pi / wavelength[0]) + np.float32(phase[0])) * amp
        term = term * np.cos(y * np.float32(2 * np.pi / wavelength[1]) + np.float32(phase[1]))
        texture = texture + term * np.cos(x * np.float32(2 * np.pi / wavelength[2]) + np.float32(phase[2]))
    local = anatomy.labels[box]
    lung = (local == _LUNG_RIGHT) | (local == _LUNG_LEFT)
    volume[box] += np.where(lung, texture, np.float32(0.0))
    return volume, tissue
