"""Boundary-prompt speed: our vectorised contour vs a per-slice scikit-image loop computing the same mask.

Usage (one core, as recorded in BENCHMARKS.md):

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python bench/bench_contour.py --repeats 15

Times, on a 128×256×256 HU volume whose ROI (a lobulated organ plus a small satellite component) spans
about 80 axial slices, the whole prompt step: HU window → boundary band → burn-in. The reference does the
band with ``skimage.measure.label`` + ``skimage.segmentation.find_boundaries`` + ``skimage.morphology.binary_dilation``
slice by slice; both must produce the identical band (checked before timing). Prints a markdown table, then the
price of the NaN/inf input checks (``check_finite``, on by default in ``window_hu`` and ``render_prompt``): the prompt
step with and without them, timed in alternating (ABBA) pairs so that other load on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from skimage.measure import label
from skimage.morphology import binary_dilation
from skimage.segmentation import find_boundaries

from med3dqwen.processing.ct_transforms import boundary_mask, render_prompt, window_hu


def make_case(shape=(128, 256, 256), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy HU volume and an ROI spanning ~80 slices: a lobulated ellipsoid plus a small satellite blob."""
    rng = np.random.default_rng(seed)
    volume = rng.normal(40.0, 20.0, size=shape).astype(np.float32)
    d, h, w = np.ogrid[: shape[0], : shape[1], : shape[2]]
    cd, ch, cw = shape[0] / 2, shape[1] / 2, shape[2] / 2
    theta = np.arctan2(h - ch, w - cw)
    radius = 1.0 + 0.12 * np.sin(5 * theta)  # lobulated outline so the boundary is not a plain ellipse
    roi = ((d - cd) / 40.0) ** 2 + ((h - ch) / (70.0 * radius)) ** 2 + ((w - cw) / (85.0 * radius)) ** 2 <= 1.0
    roi |= ((d - cd) / 6.0) ** 2 + ((h - 40) / 8.0) ** 2 + ((w - 40) / 8.0) ** 2 <= 1.0  # satellite component
    volume[~roi] = -850.0
    return volume, roi


def reference_band(roi: np.ndarray, thickness: int = 3) -> np.ndarray:
    """Per-slice loop: largest 8-connected component, inner 8-neighbour boundary, 3x3 dilation kept inside."""
    band = np.zeros_like(roi)
    footprint = np.ones((3, 3), dtype=bool)
    for z in np.flatnonzero(roi.any(axis=(1, 2))):
        labels = label(roi[z], connectivity=2)
        largest = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
        # Pad so that voxels beyond the image edge count as background, as in boundary_mask.
        edge = find_boundaries(np.pad(largest, 1), connectivity=2, mode="inner")[1:-1, 1:-1]
        for _ in range(thickness - 1):
            edge = binary_dilation(edge, footprint) & largest
        band[z] = edge
    return band


def ours(volume: np.ndarray, roi: np.ndarray) -> np.ndarray:
    image = window_hu(volume, "chest")
    return render_prompt(image, roi, inplace=True).pixel_values


def ours_unchecked(volume: np.ndarray, roi: np.ndarray) -> np.ndarray:
    image = window_hu(volume, "chest", check_finite=False)
    return render_prompt(image, roi, inplace=True, check_finite=False).pixel_values


def reference(volume: np.ndarray, roi: np.ndarray) -> np.ndarray:
    image = window_hu(volume, "chest")
    image[reference_band(roi)] = 1.0
    return image[None]


def timeit(fn, *args, repeats: int) -> list[float]:
    fn(*args)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--reference_repeats", type=int, default=5)
    args = parser.parse_args()

    volume, roi = make_case()
    slices = int(roi.any(axis=(1, 2)).sum())
    assert np.array_equal(boundary_mask(roi), reference_band(roi)), "band differs from the reference"
    assert np.array_equal(ours(volume, roi), reference(volume, roi)), "prompted volume differs from the reference"

    rows = [
        ("window + boundary + burn-in (ours)", timeit(ours, volume, roi, repeats=args.repeats)),
        ("window + boundary + burn-in (skimage loop)", timeit(reference, volume, roi, repeats=args.reference_repeats)),
        ("boundary_mask only (ours)", timeit(boundary_mask, roi, repeats=args.repeats)),
        ("boundary only (skimage loop)", timeit(reference_band, roi, repeats=args.reference_repeats)),
        ("window_hu only", timeit(window_hu, volume, repeats=args.repeats)),
    ]
    medians = {name: statistics.median(t) * 1e3 for name, t in rows}
    print(f"volume {volume.shape}, ROI spans {slices} slices, {int(roi.sum())} voxels")
    print("| step | median ms | runs |")
    print("|---|---:|---:|")
    for name, times in rows:
        print(f"| {name} | {medians[name]:.1f} | {len(times)} |")
    full = medians[rows[1][0]] / medians[rows[0][0]]
    band = medians[rows[3][0]] / medians[rows[2][0]]
    print(f"\nspeed-up, full prompt step: {full:.1f}x; band alone: {band:.1f}x")

    checked, unchecked = [], []
    for i in range(args.repeats):
        order = ((ours, checked), (ours_unchecked, unchecked))
        for fn, times in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fn(volume, roi)
            times.append(time.perf_counter() - start)
    diff = statistics.median(c - u for c, u in zip(checked, unchecked, strict=True)) * 1e3
    print(
        f"NaN/inf checks ({args.repeats} ABBA pairs): prompt step {statistics.median(checked) * 1e3:.1f} ms checked, "
        f"{statistics.median(unchecked) * 1e3:.1f} ms unchecked, median paired difference {diff:+.1f} ms"
    )


if __name__ == "__main__":
    main()
