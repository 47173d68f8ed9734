"""Time of the weight-free HU-threshold mask source on a model-size chest phantom (128×256×256).

Usage (as recorded in BENCHMARKS.md):

    OMP_NUM_THREADS=2 python bench/bench_hu_threshold.py --repeats 5

Generates phantom 0 at the model grid, then times ``HUThresholdSource().segment(volume)`` (body, lungs, airway and
bone in one pass): median and spread of ``--repeats`` runs after one warm-up, ``time.perf_counter``. Prints a
markdown row; nothing is asserted about timings.
"""

from __future__ import annotations

import argparse
import statistics
import time

from med3dqwen.builders.phantom import PhantomConfig, generate_phantom
from med3dqwen.processing.ct_io import CTVolume
from med3dqwen.segmentation import HUThresholdSource


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up")
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 256, 256), help="phantom grid (D, H, W)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    phantom = generate_phantom(0, PhantomConfig(shape=tuple(args.shape)))
    volume = CTVolume.from_array(phantom.volume, affine=phantom.affine)
    source = HUThresholdSource()
    source.segment(volume)  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        source.segment(volume)
        times.append(time.perf_counter() - start)
    shape = "×".join(str(n) for n in args.shape)
    print("| grid | runs | median | min | max |")
    print("|---|---:|---:|---:|---:|")
    print(f"| {shape} | {args.repeats} | {statistics.median(times):.3f} s | {min(times):.3f} s | {max(times):.3f} s |")


if __name__ == "__main__":
    main()
