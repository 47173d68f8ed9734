"""Grid and shape helpers of the phantom: the mm grid, bounding boxes, ellipses, tubes, Bézier curves."""

from __future__ import annotations

import math

import numpy as np


Box = tuple[slice, slice, slice]


class Grid:
    """Voxel-centre coordinates in mm relative to the volume centre: z superior, y posterior, x patient-left."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
        self.shape = tuple(int(s) for s in shape)
        self.spacing = tuple(float(s) for s in spacing)
        self.z, self.y, self.x = (
            ((np.arange(n) - (n - 1) / 2) * s).astype(np.float32)
            for n, s in zip(self.shape, self.spacing, strict=True)
        )

    def box(self, low: tuple[float, float, float], high: tuple[float, float, float]) -> Box:
        """Index slices of the voxels whose centres lie in [low, high] mm along (z, y, x) (maybe empty)."""
        slices = []
        for lo, hi, n, s in zip(low, high, self.shape, self.spacing, strict=True):
            start = max(math.ceil(lo / s + (n - 1) / 2 - 1e-6), 0)
            stop = min(math.floor(hi / s + (n - 1) / 2 + 1e-6) + 1, n)
            slices.append(slice(start, max(start, stop)))
        return tuple(slices)

    def around(self, centre: tuple[float, float, float], half: tuple[float, float, float]) -> Box:
        return self.box(
            tuple(c - h for c, h in zip(centre, half, strict=True)),
            tuple(c + h for c, h in zip(centre, half, strict=True)),
        )

    def coords(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(z, y, x) of ``box`` shaped (d, 1, 1), (1, h, 1), (1, 1, w) for broadcasting."""
        return self.z[box[0]][:, None, None], self.y[box[1]][None, :, None], self.x[box[2]][None, None, :]


def union_box(a: Box, b: Box) -> Box:
    """Smallest box holding both boxes."""
    return tuple(slice(min(p.start, q.start), max(p.stop, q.stop)) for p, q in zip(a, b, strict=True))


def tight_box(mask: np.ndarray, box: Box) -> Box | None:
    """Smallest box holding the True voxels of ``mask`` inside ``box``; None when there are none."""
    local = mask[box]
    slices = []
    for axis in range(3):
        hit = np.flatnonzero(local.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return None
        slices.append(slice(box[axis].start + int(hit[0]), box[axis].start + int(hit[-1]) + 1))
    return tuple(slices)


def paint(labels: np.ndarray, box: Box, where: np.ndarray, label: int) -> None:
    """Set ``labels[box]`` to ``label`` where ``where`` (shaped like the box) is True, in place."""
    np.copyto(labels[box], np.uint8(label), where=where)


def ellipse2d(y: np.ndarray, x: np.ndarray, centre: tuple[float, float], semi: tuple[float, float]) -> np.ndarray:
    """Normalised squared radius ((y - cy)/sy)² + ((x - cx)/sx)² (broadcast shapes)."""
    return ((y - centre[0]) / semi[0]) ** 2 + ((x - centre[1]) / semi[1]) ** 2


def tube(
    grid: Grid, labels: np.ndarray, points: np.ndarray, radius: np.ndarray, label: int, within: int | None = None
) -> Box:
    """Paint a tube along a polyline and return its bounding box.

    Each segment is a capsule whose radius varies linearly from one vertex to the next, rasterised in its own
    bounding box.

    Args:
        points: (N, 3) polyline vertices in mm (z, y, x).
        radius: (N,) radius in mm at each vertex.
        label: tissue label painted.
        within: only paint voxels that currently hold this label (None: paint over anything).
    """
    points = np.asarray(points, dtype=np.float32)
    radius = np.asarray(radius, dtype=np.float32)
    total = None
    for a, b, ra, rb in zip(points[:-1], points[1:], radius[:-1], radius[1:], strict=True):
        r = max(ra, rb)
        box = grid.box(tuple(np.minimum(a, b) - r), tuple(np.maximum(a, b) + r))
        z, y, x = grid.coords(box)
        ab = b - a
        pz, py, px = z - a[0], y - a[1], x - a[2]
        t = (pz * ab[0] + py * ab[1] + px * ab[2]) / max(float(ab @ ab), 1e-6)
        np.clip(t, 0.0, 1.0, out=t)  # (d, h, w) position of the nearest point along the segment
        d2 = (pz - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (px - t * ab[2]) ** 2
        inside = d2 <= (ra + t * (rb - ra)) ** 2
        if within is not None:
            inside &= labels[box] == within
        paint(labels, box, inside, label)
        total = box if total is None else union_box(total, box)
    return total


def bezier(p0, p1, p2, n: int = 24) -> np.ndarray:
    """(n, 3) points of the quadratic Bézier curve p0 → p2 with control point p1."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    p0, p1, p2 = (np.asarray(p, dtype=float) for p in (p0, p1, p2))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
