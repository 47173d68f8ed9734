"""Throughput of the training data path, side by side: today's online path, the ISA-L online path, the
decompression floor and the model-grid cache.

Usage (as recorded in BENCHMARKS.md, "Training data path"):

    python bench/bench_data.py                       # CT-RATE size, about 2 minutes
    python bench/bench_data.py --repeats 9 --samples 80
    python bench/bench_data.py --small --repeats 1   # the test suite's smoke run

Writes one synthetic CT-RATE-size chest CT (240×512×512 int16 HU at 1.25/0.75/0.75 mm, stored RAS so that loading
flips and transposes; about 68 MB as ``.nii.gz``) and its liver-like ROI mask (``bench_io.make_case``) into a
temporary folder, then times on one thread, each a median of ``--repeats`` runs taken in turn (so that load from
other processes hits them alike) after one warm-up:

- **before** (the path the collator took before the fast path): nibabel reading through Python's streaming gzip
  into float32, the drain to the gzip trailer, a contiguous reoriented float32 copy, the mask the same way, then the
  image processor (window, resize, contour) on those arrays;
- **online, ISA-L**: ``image_processor([volume_path], [mask_path])`` as the collator calls it now: one-shot ISA-L
  decompression, the window and resize fused on the stored int16 values (``window_and_resize``: in-plane pairs
  summed in integers, no float32 copy at full size), the mask's model-grid voxels picked from its stored labels,
  contour;
- **online, standard library**: the same without ``isal`` (``gzip.decompress`` one shot), the fallback;
- **decompression floor**: ``isal.igzip.decompress`` of the volume and mask files' bytes alone (files read included);
- **cached samples**: the whole collator (chat template, tokens, cached volume and mask, contour drawn online) over
  ``--samples`` question rows that share the volume, through a ``torch.utils.data.DataLoader`` with 0 and with 2
  workers (batch 1); samples per second over the whole loop (worker start included) and in steady state (from the
  first batch on), and the CPU time of one cached sample in this process.

Each in-process time is given as wall time and as this process's CPU time: on a machine shared with other work the
wall times grow with the load, the CPU times much less (page faults and cache misses still do).

Every file is read from the page cache (this measures decoding, not the disk), and so is the cache. It checks that
the online output equals the before-path's to float32 rounding and that the cached sample is within 1e-5 of the
online one (both ≤ 1e-5), prints a markdown table and the two goals of the issue (cached ≥ 20 samples/s with 2
workers, judged in steady state: a training run starts its workers once; online within 1.3× of the floor) with the
measured values; nothing is asserted about timings.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_io, next to this file

from bench_io import make_case, timed  # noqa: E402

from med3dqwen.data.cache import build_model_grid_cache  # noqa: E402
from med3dqwen.data.schema import chat_messages  # noqa: E402
from med3dqwen.modeling.configuration_med3d_qwen import Med3DQwenConfig  # noqa: E402
from med3dqwen.processing import ct_io  # noqa: E402
from med3dqwen.processing.ct_io import CTVolume, LabelMap, select_label, to_canonical  # noqa: E402
from med3dqwen.processing.processing_med3d_qwen import Med3DQwenProcessor  # noqa: E402
from med3dqwen.processing.tokenization_med3d_qwen import load_qwen2_5_tokenizer  # noqa: E402
from med3dqwen.training.collator import Med3DQwenCollator  # noqa: E402


GOAL_CACHED = 20.0  # samples/s with 2 workers
GOAL_RATIO = 1.3  # online / decompression floor


def _stream_read(path: Path, dtype) -> tuple[np.ndarray, np.ndarray]:
    """The former reader: nibabel through one gzip stream (scaled to ``dtype``), then drained to the trailer."""
    image_class = type(nib.load(path))
    with gzip.open(path, "rb") as stream:
        image = image_class.from_stream(stream)
        data = np.asarray(image.dataobj) if dtype is None else np.asarray(image.dataobj, dtype=dtype)
        while stream.read(1 << 20):
            pass
    return data, image.affine.astype(np.float64)


def before_path(processor, volume_path: Path, mask_path: Path) -> np.ndarray:
    """The collator's path before the fast one (see the module docstring); returns (1, C, D, H, W)."""
    data, affine = _stream_read(volume_path, np.float32)
    array, affine = to_canonical(data, affine)  # contiguous float32 copy
    volume = CTVolume(array=array, affine=affine, path=str(volume_path))
    labels, mask_affine = _stream_read(mask_path, None)
    labels, mask_affine = to_canonical(labels, mask_affine)
    label_map = LabelMap(array=labels, affine=mask_affine, header_table={}, path=str(mask_path))
    label_map.check_grid(volume)
    roi = select_label(label_map, None)
    return processor.image_processor([volume], [roi], layout="DHW", return_tensors="np")["pixel_values"]


def online_path(processor, volume_path: Path, mask_path: Path) -> np.ndarray:
    return processor.image_processor([volume_path], [mask_path], return_tensors="np")["pixel_values"]


def floor(volume_path: Path, mask_path: Path) -> int:
    from isal import igzip

    return len(igzip.decompress(volume_path.read_bytes())) + len(igzip.decompress(mask_path.read_bytes()))


def make_processor(model_size: tuple[int, int, int]) -> Med3DQwenProcessor:
    """A processor for ``model_size`` with the real Qwen2.5 tokenizer (the token counts come from the tiny encoder)."""
    vision = {"volume_size": list(model_size)}
    if min(model_size) < 128:  # the smoke run's 64³: the tests' tiny token counts
        vision.update(channels=[4, 8, 8, 16, 16], depths=[1, 1, 1, 1, 1], low_output_tokens=[6, 4])
        vision.update(high_output_tokens=[4, 4])
    config = Med3DQwenConfig.from_preset("tiny", vision_overrides=vision)
    return Med3DQwenProcessor.from_config(config, tokenizer=load_qwen2_5_tokenizer())


def records(volume_path: Path, mask_path: Path, count: int) -> list[dict]:
    """``count`` question rows on the one volume and ROI (as the many questions of one CT share it)."""
    rows = []
    for i in range(count):
        question = f"Within the red-outlined area of the CT volume, is there a lesion? (question {i})"
        rows.append(
            {
                "messages": chat_messages("You are a radiology assistant.", question, "No" if i % 2 else "Yes"),
                "volume_path": volume_path.name,
                "mask_path": mask_path.name,
                "volume_id": f"bench_{i:04d}",
                "answer_type": "closed",
                "closed_answer": "no" if i % 2 else "yes",
                "closed_choices": ["no", "yes"],
            }
        )
    return rows


def loader_rate(collator, rows: list[dict], workers: int) -> tuple[float, float]:
    """Samples per second of a DataLoader over ``rows`` (batch 1): over the whole loop (worker start included) and
    in steady state (from the first batch on)."""
    loader = torch.utils.data.DataLoader(rows, batch_size=1, collate_fn=collator, num_workers=workers)
    start = time.perf_counter()
    iterator = iter(loader)
    count = next(iterator)["input_ids"].shape[0]
    first = time.perf_counter()
    rest = sum(batch["input_ids"].shape[0] for batch in iterator)
    end = time.perf_counter()
    return (count + rest) / (end - start), rest / (end - first)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 512, 512], help="source (D, H, W)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.25, 0.75, 0.75], help="mm along (D, H, W)")
    parser.add_argument("--model_size", type=int, nargs=3, default=[128, 256, 256], help="model input (D, H, W)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per online path (median)")
    parser.add_argument("--samples", type=int, default=60, help="cached samples per DataLoader run")
    parser.add_argument("--loader_repeats", type=int, default=3, help="DataLoader runs per worker count (median)")
    parser.add_argument("--small", action="store_true", help="a 24×48×48 case on a 64³ model grid (smoke run)")
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.small:
        args.shape, args.spacing, args.model_size = [24, 48, 48], [5.0, 3.0, 3.0], [64, 64, 64]
        args.samples = min(args.samples, 8)
    torch.set_num_threads(1)  # one core per sample, as in a DataLoader worker

    processor = make_processor(tuple(args.model_size))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        case = make_case(folder, "ct", tuple(args.shape), tuple(args.spacing))
        volume_path, mask_path = case.volume_path, case.mask_path
        sizes = volume_path.stat().st_size + mask_path.stat().st_size

        # Same outputs before any timing: the fast path equals the former one to float32 rounding (the fused window
        # and resize sums the same taps in another order).
        reference = before_path(processor, volume_path, mask_path)
        fast = online_path(processor, volume_path, mask_path)
        online_difference = float(np.abs(reference - fast).max())
        if online_difference > 1e-5:
            raise SystemExit(f"the online path differs from the former one by {online_difference}")

        isal_gzip = ct_io._isal_gzip

        def stdlib_path():
            ct_io._isal_gzip = None
            try:
                return online_path(processor, volume_path, mask_path)
            finally:
                ct_io._isal_gzip = isal_gzip

        paths = {
            "before: streaming gzip + float32 copy": lambda: before_path(processor, volume_path, mask_path),
            "online, ISA-L one-shot + int16 windowing": lambda: online_path(processor, volume_path, mask_path),
            "online, standard-library one-shot + int16 windowing": stdlib_path,
            "decompression floor (ISA-L one-shot, volume + mask)": lambda: floor(volume_path, mask_path),
        }
        times = {name: [] for name in paths}
        for fn in paths.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in paths.items():
                times[name].append(timed(fn))
        medians = {name: statistics.median(wall for wall, _ in values) for name, values in times.items()}
        cpu = {name: statistics.median(c for _, c in values) for name, values in times.items()}

        cache = build_model_grid_cache(records(volume_path, mask_path, 1), processor.image_processor, folder / "cache",
                                       dataset_root=folder)  # fmt: skip
        rows = records(volume_path, mask_path, args.samples)
        online_collator = Med3DQwenCollator(processor, dataset_root=folder)
        cached_collator = Med3DQwenCollator(processor, dataset_root=folder, cache=cache)
        online, cached = online_collator(rows[:1]), cached_collator(rows[:1])
        difference = float((online["pixel_values"] - cached["pixel_values"]).abs().max())
        if difference > 1e-5 or not torch.equal(online["input_ids"], cached["input_ids"]):
            raise SystemExit(f"the cached sample differs from the online one by {difference}")
        rates, steady = {}, {}
        for workers in (0, 2):
            runs = [loader_rate(cached_collator, rows, workers) for _ in range(args.loader_repeats)]
            rates[workers] = statistics.median(whole for whole, _ in runs)
            steady[workers] = statistics.median(rate for _, rate in runs)
        cached_cpu = statistics.median(timed(lambda: cached_collator(rows[:1]))[1] for _ in range(args.repeats))
        load = os.getloadavg()[0]

    floor_s = medians["decompression floor (ISA-L one-shot, volume + mask)"]
    print(
        f"\nSource {'×'.join(map(str, args.shape))} int16 .nii.gz + mask ({sizes / 1e6:.1f} MB gz) → "
        f"prompted (1, {'×'.join(map(str, args.model_size))}); one thread; medians of {args.repeats} runs; "
        f"load average {load:.1f} on {os.cpu_count()} cores at the end\n"
    )
    print("| path | median ms (wall) | median ms (CPU) | samples/s (wall) | × floor (wall) | × floor (CPU) |")
    print("|---|---:|---:|---:|---:|---:|")
    cpu_floor = cpu["decompression floor (ISA-L one-shot, volume + mask)"]
    for name, value in medians.items():
        print(
            f"| {name} | {value * 1e3:.1f} | {cpu[name] * 1e3:.1f} | {1 / value:.2f} | {value / floor_s:.2f} | "
            f"{cpu[name] / cpu_floor:.2f} |"
        )
    print(f"| cached sample, whole collator, in process | — | {cached_cpu * 1e3:.1f} | — | — | — |")
    print("\n| cached samples through a DataLoader (batch 1) | samples/s, whole loop | samples/s, steady state |")
    print("|---|---:|---:|")
    for workers, rate in rates.items():
        print(f"| {workers} workers | {rate:.1f} | {steady[workers]:.1f} |")
    online_s = medians["online, ISA-L one-shot + int16 windowing"]
    ratio = online_s / floor_s
    cpu_ratio = cpu["online, ISA-L one-shot + int16 windowing"] / cpu_floor
    print(
        f"\ncached sample vs online: max |Δ pixel_values| = {difference:.2e} (≤ 1e-5); "
        f"online vs the former path: max |Δ| = {online_difference:.2e} (≤ 1e-5).\n"
        f"goal: cached ≥ {GOAL_CACHED:.0f} samples/s with 2 workers: {steady[2]:.1f} in steady state, {rates[2]:.1f} "
        f"with the workers' start ({'met' if steady[2] >= GOAL_CACHED else 'NOT met'}); "
        f"online within {GOAL_RATIO}× of the floor: {ratio:.2f}× wall, {cpu_ratio:.2f}× CPU "
        f"({'met' if ratio <= GOAL_RATIO else 'NOT met'})"
    )
    result = {
        "shape": args.shape,
        "model_size": args.model_size,
        "repeats": args.repeats,
        "median_s": medians,
        "median_cpu_s": cpu,
        "cached_collator_cpu_s": cached_cpu,
        "cached_samples_per_s": {str(k): v for k, v in rates.items()},
        "cached_samples_per_s_steady": {str(k): v for k, v in steady.items()},
        "online_over_floor": ratio,
        "online_over_floor_cpu": cpu_ratio,
        "load_average": load,
        "cached_max_abs_difference": difference,
        "online_max_abs_difference": online_difference,
        "cpu_count": os.cpu_count(),
    }
    if args.output:
        args.output.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
