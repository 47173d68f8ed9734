"""Our image processor side by side with the MONAI pipeline a user would otherwise write, on the same files.

Usage (as recorded in BENCHMARKS.md, "Side by side with MONAI"):

    python bench/bench_monai.py                      # CT-RATE size, about 1 minute
    python bench/bench_monai.py --repeats 9
    python bench/bench_monai.py --small --repeats 1  # the test suite's smoke run

Writes one synthetic CT-RATE-size chest CT (240×512×512 int16 HU at 1.25/0.75/0.75 mm, stored RAS so that the
canonical layout flips and transposes; ``bench_io.make_case``) and its liver-like ROI mask as ``.nii.gz`` into a
temporary folder, then brings it to the prompted model input (1, 128, 256, 256) two ways, on one thread:

- **med3dqwen**: ``Med3DQwenImageProcessor()(volume_path, mask_path)`` with its defaults (chest window, red burn-in
  contour 3 px, inner band);
- **MONAI**: ``LoadImaged`` → ``EnsureChannelFirstd`` → ``Orientationd(axcodes="SPL")`` →
  ``ScaleIntensityRanged(a_min=-1000, a_max=200, b_min=0, b_max=1, clip=True)`` → ``Resized`` (image trilinear, mask
  ``nearest-exact``) → our ``DrawBoundaryPromptd`` with the same prompt settings: the recipe
  ``med3dqwen.processing.monai_transforms`` documents, with resizing. The orientation is our canonical one (S, P, L
  = D, H, W): at an exact factor of two a nearest-neighbour pick is a tie between two voxels and torch takes the
  upper one, so a mask resized in another layout (a user's usual ``axcodes="RAS"``) differs from ours by a voxel
  along the flipped axes — same anatomy, another half-voxel choice. Ours always resizes in the canonical layout, so
  the storage order of a file never changes its mask.

Before timing, it checks that the two outputs agree: MONAI's (1, S, P, L) tensor must equal ours within 1e-5 (the
same window, the same trilinear taps, the same mask, the same contour).
Then it times each path ``--repeats`` times in turn (so that other load hits both alike) after one warm-up, as wall
and CPU time (``time.process_time``), and measures each path's peak of traced allocations (``tracemalloc``: numpy's
arrays; torch's own buffers are not traced) in one extra run. Prints a markdown table and the ratio; nothing is
asserted about timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_io, next to this file

from bench_io import make_case, timed  # noqa: E402

from med3dqwen.processing.ct_transforms import WINDOW_PRESETS  # noqa: E402
from med3dqwen.processing.image_processing_med3d_qwen import Med3DQwenImageProcessor  # noqa: E402


def monai_pipeline(model_size: tuple[int, int, int], window: str, thickness: int):
    """The MONAI recipe of ``monai_transforms``' docstring, with resizing to the model grid.

    ``Resized`` takes the spatial size in the file's axis order, so the canonical (D, H, W) size is permuted with the
    file's affine at call time (``spatial_for``)."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        Resized,
        ScaleIntensityRanged,
    )

    from med3dqwen.processing.monai_transforms import DrawBoundaryPromptd

    low, high = WINDOW_PRESETS[window]
    return Compose(
        [
            LoadImaged(keys=["image", "roi"], image_only=True),
            EnsureChannelFirstd(keys=["image", "roi"]),
            Orientationd(keys=["image", "roi"], axcodes="SPL"),  # (X, Y, Z) = our (D, H, W)
            ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
            Resized(keys="image", spatial_size=model_size, mode="trilinear"),
            Resized(keys="roi", spatial_size=model_size, mode="nearest-exact"),
            DrawBoundaryPromptd(keys="image", mask_key="roi", thickness=thickness, info_key_postfix=None),
        ]
    )


def traced_peak(fn) -> float:
    """Peak MB of traced (numpy and Python) allocations during one call."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 512, 512], help="source (D, H, W)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.25, 0.75, 0.75], help="mm along (D, H, W)")
    parser.add_argument("--model_size", type=int, nargs=3, default=[128, 256, 256], help="model input (D, H, W)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per path (median)")
    parser.add_argument("--small", action="store_true", help="a 24×48×48 case on a 12×24×24 grid (smoke run)")
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.small:
        args.shape, args.spacing, args.model_size = [24, 48, 48], [5.0, 3.0, 3.0], [12, 24, 24]
    torch.set_num_threads(1)  # one core per sample, as in a DataLoader worker
    model_size = tuple(args.model_size)

    processor = Med3DQwenImageProcessor(volume_size=model_size)
    monai = monai_pipeline(model_size, processor.window, processor.contour_thickness)
    with tempfile.TemporaryDirectory() as tmp:
        case = make_case(Path(tmp), "ct", tuple(args.shape), tuple(args.spacing))
        volume_path, mask_path = case.volume_path, case.mask_path

        def ours() -> np.ndarray:
            return processor(volume_path, mask_path, return_tensors="np")["pixel_values"][0]

        def theirs() -> np.ndarray:
            return monai({"image": str(volume_path), "roi": str(mask_path)})["image"].as_tensor().numpy()

        difference = float(np.abs(ours() - theirs()).max())
        if difference > 1e-5:
            raise SystemExit(f"med3dqwen and MONAI disagree by {difference}")
        paths = {"med3dqwen image processor": ours, "MONAI pipeline (+ DrawBoundaryPromptd)": theirs}
        times = {name: [] for name in paths}
        for _ in range(args.repeats):
            for name, fn in paths.items():
                times[name].append(timed(fn))
        peaks = {name: traced_peak(fn) for name, fn in paths.items()}
        load = os.getloadavg()[0]

    wall = {name: statistics.median(w for w, _ in values) for name, values in times.items()}
    cpu = {name: statistics.median(c for _, c in values) for name, values in times.items()}
    ours_name, theirs_name = list(paths)
    print(
        f"\nSource {'×'.join(map(str, args.shape))} int16 .nii.gz + mask ({case.compressed_bytes / 1e6:.1f} MB gz) → "
        f"prompted (1, {'×'.join(map(str, model_size))}); one thread; medians of {args.repeats} runs; "
        f"load average {load:.1f} on {os.cpu_count()} cores at the end\n"
    )
    print("| path | median ms (wall) | median ms (CPU) | peak traced MB |")
    print("|---|---:|---:|---:|")
    for name in paths:
        print(f"| {name} | {wall[name] * 1e3:.1f} | {cpu[name] * 1e3:.1f} | {peaks[name]:.0f} |")
    speedup = wall[theirs_name] / wall[ours_name]
    print(
        f"\noutputs agree: max |Δ| = {difference:.2e} (≤ 1e-5); med3dqwen is {speedup:.2f}× faster (wall), "
        f"{cpu[theirs_name] / cpu[ours_name]:.2f}× (CPU), peak traced memory "
        f"{peaks[ours_name]:.0f} vs {peaks[theirs_name]:.0f} MB"
    )
    result = {
        "shape": args.shape,
        "model_size": list(model_size),
        "repeats": args.repeats,
        "median_s": wall,
        "median_cpu_s": cpu,
        "peak_traced_mb": peaks,
        "speedup_wall": speedup,
        "max_abs_difference": difference,
        "load_average": load,
        "cpu_count": os.cpu_count(),
    }
    if args.output:
        args.output.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
