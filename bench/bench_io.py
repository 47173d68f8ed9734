"""Throughput of the input path: ``.nii.gz`` on disk → model-ready ``torch.float32`` tensor (1, 1, 128, 256, 256).

Usage (one core, then two, as recorded in BENCHMARKS.md):

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python bench/bench_io.py
    OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 python bench/bench_io.py --repeats 5

First writes two synthetic chest CTs as gzip NIfTI (int16 HU, RAS on disk so loading must flip and transpose) into a
temporary folder, each with a gzip liver-like ROI mask:

- a CT-RATE-like volume: 512×512 pixels of 0.75 mm, 240 slices of 1.25 mm;
- the same field of view resampled to 1.5 mm isotropic: 256×256×200.

Both hold noisy soft tissue, air, lungs, spine, aorta and the ROI, so gzip has real work to do (about 1.9:1). It times
each stage on the same inputs (median of ``--repeats`` runs after one warm-up, ``time.perf_counter``) and the whole
path end to end: ``load_volume`` (gzip read + reorient), ``load_mask``, ``window_hu(…, "chest")``,
``resize_volume(…, (128, 256, 256))``, ``resize_mask``, ``render_prompt`` (burn-in, default arguments) and the
conversion to a (1, 1, 128, 256, 256) float32 tensor. The files are read back from the page cache right after being
written, so the numbers measure decoding, not the disk. Prints a markdown table (stage medians, their share of the
total median, and the total's spread); nothing is asserted about timings.

A second table prices the gzip CRC check of ``.nii.gz`` reads: nibabel's own read (which stops before the gzip
trailer) against the reader ``load_volume`` uses (the same read, then drained to the end of the stream so gzip
verifies CRC-32 and length), timed in alternating pairs (ABBA order) so that other load on the machine hits both
alike; it prints both medians and the median of the paired differences. ``--small`` runs one 24×48×48 case (the test
suite's smoke run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from med3dqwen.processing.ct_io import CTVolume, _read_nifti, load_mask, load_volume, standard_affine
from med3dqwen.processing.ct_transforms import render_prompt, resize_mask, resize_volume, window_hu


MODEL_SIZE = (128, 256, 256)  # (D, H, W) model input
TOTAL = "total (end to end)"


# ---------------------------------------------------------------------------------------------------------------
# Synthetic cases
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """A synthetic CT written to disk: volume and ROI mask paths, their grid and compressed sizes."""

    name: str
    shape: tuple[int, int, int]  # canonical (D, H, W)
    spacing: tuple[float, float, float]  # mm along (D, H, W)
    volume_path: Path
    mask_path: Path
    compressed_bytes: int = 0  # volume + mask files, recorded once written


def make_chest(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A noisy chest-like CT in canonical (D, H, W) int16 HU, and a liver-like bool ROI on the same grid.

    Geometry is defined in mm, so two spacings of the same field of view show the same anatomy.
    """
    rng = np.random.default_rng(seed)
    depth, height, width = shape
    sd, sh, sw = spacing
    # Voxel-centre coordinates in mm, centred on the field of view; d: inferior→superior, h: A→P, w: R→L.
    z = ((np.arange(depth, dtype=np.float32) - (depth - 1) / 2) * sd)[:, None, None]
    y = ((np.arange(height, dtype=np.float32) - (height - 1) / 2) * sh)[None, :, None]
    x = ((np.arange(width, dtype=np.float32) - (width - 1) / 2) * sw)[None, None, :]

    def ellipse(cy: float, cx: float, ry: float, rx: float) -> np.ndarray:  # (1, H, W)
        return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0

    def ellipsoid(cz: float, cy: float, cx: float, rz: float, ry: float, rx: float) -> np.ndarray:  # (D, H, W)
        return ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0

    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = np.broadcast_to(ellipse(0.0, 0.0, 120.0, 170.0), shape)
    hu[body] = 40.0
    hu[ellipsoid(40.0, -10.0, -75.0, 120.0, 75.0, 55.0)] = -850.0  # right lung
    hu[ellipsoid(40.0, -10.0, 75.0, 120.0, 75.0, 50.0)] = -850.0  # left lung
    hu[np.broadcast_to(ellipse(75.0, 0.0, 18.0, 18.0), shape)] = 600.0  # vertebral column
    hu[np.broadcast_to(ellipse(45.0, 20.0, 12.0, 12.0), shape)] = 220.0  # contrast-filled aorta
    roi = ellipsoid(-90.0, 10.0, -60.0, 50.0, 60.0, 70.0) & body  # liver-like ROI in the lower slices
    hu[roi] = 60.0
    noise = rng.normal(0.0, 18.0, size=shape).astype(np.float32)
    hu += noise
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), roi


def write_ras(path: Path, canonical: np.ndarray, spacing: tuple[float, float, float]) -> None:
    """Write a canonical (D, H, W) array as gzip NIfTI stored RAS on disk (i → R, j → A, k → S)."""
    affine = standard_affine(spacing, origin=(180.0, 190.0, -300.0))
    depth, height, width = canonical.shape
    # index map (i, j, k) → (d, h, w): d = k, h = H-1-j, w = W-1-i
    index_map = np.array([[0, 0, 1, 0], [0, -1, 0, height - 1], [-1, 0, 0, width - 1], [0, 0, 0, 1]], dtype=np.float64)
    data = np.ascontiguousarray(canonical[:, ::-1, ::-1].transpose(2, 1, 0))
    image = nib.Nifti1Image(data, affine @ index_map)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def make_case(folder: Path, name: str, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Case:
    hu, roi = make_chest(shape, spacing)
    case = Case(name, shape, spacing, folder / f"{name}.nii.gz", folder / f"{name}_roi.nii.gz")
    write_ras(case.volume_path, hu, spacing)
    write_ras(case.mask_path, roi.astype(np.uint8), spacing)
    case.compressed_bytes = case.volume_path.stat().st_size + case.mask_path.stat().st_size
    return case


# ---------------------------------------------------------------------------------------------------------------
# The path being timed
# ---------------------------------------------------------------------------------------------------------------


def to_tensor(pixel_values: np.ndarray) -> torch.Tensor:
    """(1, D, H, W) numpy → (1, 1, D, H, W) contiguous float32 tensor (batch of one)."""
    return torch.from_numpy(pixel_values).to(torch.float32).unsqueeze(0).contiguous()


def full_path(case: Case) -> torch.Tensor:
    volume = load_volume(case.volume_path)
    mask = load_mask(case.mask_path, like=volume)
    image = resize_volume(window_hu(volume.array, "chest"), MODEL_SIZE)
    roi = resize_mask(mask, MODEL_SIZE)
    return to_tensor(render_prompt(image, roi).pixel_values)


def timeit(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, CPU) seconds of one call; CPU time of this process, which other load on the machine does not inflate."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def bench_case(case: Case, repeats: int) -> dict[str, list[float]]:
    """Run times in seconds per stage (each on the previous stage's output) and for the whole path."""
    volume: CTVolume = load_volume(case.volume_path)
    mask = load_mask(case.mask_path, like=volume)
    windowed = window_hu(volume.array, "chest")
    resized = resize_volume(windowed, MODEL_SIZE)
    roi = resize_mask(mask, MODEL_SIZE)
    pixel_values = render_prompt(resized, roi).pixel_values
    assert to_tensor(pixel_values).shape == (1, 1, *MODEL_SIZE)  # shape check, not a timing assert

    def raw_read() -> np.ndarray:
        return np.asarray(nib.load(case.volume_path).dataobj, dtype=np.float32)

    return {
        "load_volume (gzip read + reorient)": timeit(lambda: load_volume(case.volume_path), repeats),
        "  of which nibabel read (gzip + scaling)": timeit(raw_read, repeats),
        "load_mask (gzip read + reorient + grid check)": timeit(
            lambda: load_mask(case.mask_path, like=volume), repeats
        ),
        'window_hu(…, "chest")': timeit(lambda: window_hu(volume.array, "chest"), repeats),
        "resize_volume(…, (128, 256, 256))": timeit(lambda: resize_volume(windowed, MODEL_SIZE), repeats),
        "resize_mask(…, (128, 256, 256))": timeit(lambda: resize_mask(mask, MODEL_SIZE), repeats),
        "render_prompt (burn-in on a copy)": timeit(lambda: render_prompt(resized, roi), repeats),
        "to torch float32 (1, 1, 128, 256, 256)": timeit(lambda: to_tensor(pixel_values), repeats),
        TOTAL: timeit(lambda: full_path(case), repeats),
    }


def crc_pairs(case: Case, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of nibabel's read and of the CRC-checked read of the volume, in ABBA-ordered pairs."""

    def nibabel_only() -> np.ndarray:  # what load_volume read before the CRC check
        return np.asarray(nib.load(case.volume_path).dataobj, dtype=np.float32)

    def with_crc() -> np.ndarray:  # what load_volume reads now (the private reader: the read alone, no reorient)
        return _read_nifti(case.volume_path, np.float32)[0]

    assert np.array_equal(nibabel_only(), with_crc())  # same voxels, not a timing assert
    old, new = [], []
    for i in range(repeats):
        order = ((nibabel_only, old), (with_crc, new)) if i % 2 == 0 else ((with_crc, new), (nibabel_only, old))
        for fn, times in order:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return old, new


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per stage (after one warm-up)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the synthetic files (temp dir)")
    parser.add_argument("--crc_repeats", type=int, default=20, help="ABBA pairs for the CRC-check table")
    parser.add_argument("--small", action="store_true", help="one small 24×48×48 case (smoke run)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        if args.small:
            cases = [make_case(folder, "small", (24, 48, 48), (1.5, 1.5, 1.5))]
        else:
            cases = [
                make_case(folder, "ctrate_like", (240, 512, 512), (1.25, 0.75, 0.75)),
                make_case(folder, "iso_1p5mm", (200, 256, 256), (1.5, 1.5, 1.5)),
            ]
        results = [bench_case(case, args.repeats) for case in cases]
        crc = [crc_pairs(case, args.crc_repeats) for case in cases]

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())  # other processes on the machine skew the medians
    print(
        f"OMP_NUM_THREADS={threads}, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
        f"load average {load}, median of {args.repeats} runs"
    )
    print()
    header = " | ".join(
        f"{c.name} {'×'.join(map(str, c.shape))} @ {'/'.join(f'{s:g}' for s in c.spacing)} mm, "
        f"{c.compressed_bytes / 1e6:.1f} MB gz"
        for c in cases
    )
    print(f"| stage (D, H, W) | {header} |")
    print("|---|" + "---:|" * len(cases))
    medians = [{stage: statistics.median(times) for stage, times in result.items()} for result in results]
    for stage in medians[0]:
        cells = []
        for median in medians:
            share = "" if stage.startswith("total") else f" ({100 * median[stage] / median[TOTAL]:.0f}%)"
            cells.append(f"{1e3 * median[stage]:.1f} ms{share}")
        print(f"| {stage} | " + " | ".join(cells) + " |")
    spread = [f"{1e3 * min(r[TOTAL]):.0f}–{1e3 * max(r[TOTAL]):.0f} ms" for r in results]
    print("| total, min–max over runs | " + " | ".join(spread) + " |")
    rates = [1.0 / m[TOTAL] for m in medians]
    print("| volumes/s | " + " | ".join(f"{r:.2f}" for r in rates) + " |")
    mbps = [c.compressed_bytes / 1e6 * r for c, r in zip(cases, rates, strict=True)]
    print("| MB/s of compressed input (volume + mask) | " + " | ".join(f"{m:.1f}" for m in mbps) + " |")
    print()
    print(f"gzip CRC check on the volume read: {args.crc_repeats} ABBA-ordered pairs")
    print()
    print("| case | nibabel read, median ms | read + CRC check, median ms | median paired difference |")
    print("|---|---:|---:|---:|")
    for case, (old, new) in zip(cases, crc, strict=True):
        diff = statistics.median(n - o for o, n in zip(old, new, strict=True))
        print(
            f"| {case.name} | {1e3 * statistics.median(old):.1f} | {1e3 * statistics.median(new):.1f} | "
            f"{1e3 * diff:+.1f} ms ({100 * diff / statistics.median(old):+.1f} %) |"
        )


if __name__ == "__main__":
    main()
