"""Speed of ``HUThresholdSource.segment`` (body, lungs, airway, bone from HU thresholds) at the model input size.

Usage (one core, as recorded in BENCHMARKS.md):

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python bench/bench_hu_threshold.py --repeats 7

Generates one phantom chest CT (``generate_phantom(seed, PhantomConfig(shape=...))``, 128×256×256 by default), then
times ``segment`` on it: the median of ``--repeats`` runs after one warm-up (``time.perf_counter``). The masks are
checked against the phantom's own lung masks (Dice, printed) so that a fast but wrong version shows; nothing is
asserted about timings. This replaced a timed test (``min < 1 s``) that failed whenever the machine was busy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from med3dqwen.builders.phantom import PhantomConfig, generate_phantom
from med3dqwen.processing.ct_io import CTVolume
from med3dqwen.segmentation import HUThresholdSource


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 256, 256), help="phantom grid (D, H, W)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs (after one warm-up)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed")
    args = parser.parse_args()

    phantom = generate_phantom(args.seed, PhantomConfig(shape=tuple(args.shape)))
    volume = CTVolume.from_array(phantom.volume, affine=phantom.affine)
    source = HUThresholdSource()
    masks = source.segment(volume)  # warm-up, and the masks the sanity check reads
    for name, mask in masks.items():
        assert mask.shape == volume.shape and mask.dtype == bool, name  # shape check, not a timing assert
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        source.segment(volume)
        times.append(time.perf_counter() - start)

    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())  # other processes on the machine skew the medians
    print(
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs, load average {load}, "
        f"phantom seed {args.seed}, median of {args.repeats} runs"
    )
    print()
    print("| grid (D, H, W) | structures | median ms | min–max ms | lung Dice left / right vs phantom |")
    print("|---|---|---:|---:|---:|")
    lungs = " / ".join(f"{dice(masks[s], phantom.masks[s]):.3f}" for s in ("lung_left", "lung_right"))
    print(
        f"| {'×'.join(map(str, args.shape))} | {', '.join(sorted(masks))} | {1e3 * statistics.median(times):.0f} | "
        f"{1e3 * min(times):.0f}–{1e3 * max(times):.0f} | {lungs} |"
    )


if __name__ == "__main__":
    main()
