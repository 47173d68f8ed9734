"""Evaluation throughput: ``evaluate.py``'s loop (collate, generate, closed head, score, write) on a tiny model.

Usage (as recorded in BENCHMARKS.md):

    NLTK_DATA=../shared/nltk_data python bench/bench_evaluate.py --samples 24 --batch_size 4 --repeats 5

Builds a phantom dataset (``--num_volumes`` volumes of ``--shape``) and a tiny random Med3DQwen on the real Qwen2.5
vocabulary (the model of ``configs/demo_cpu.yaml``: hidden 32, 2 decoder layers, 64³ volumes: 10 visual + 4 slice
tokens) in a temporary folder, then runs
``med3dqwen.evaluation.runner.evaluate_model`` ``--repeats`` times after one warm-up, each into a fresh output folder
(so nothing is resumed), and prints a markdown row: median samples/s over the whole call (dataset loading, model
loading, generation, scoring, results.json, table and chart), the median per-sample latency the run records
(generation + closed head only), and the peak RSS. Nothing is asserted about timings.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


DEMO_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "demo_cpu.yaml"
"""The recipe whose tiny model is measured: the one ``make demo`` trains (one spelling of its size, not two)."""


def tiny_model_folder(folder: Path) -> Path:
    import json

    import torch
    import yaml

    from med3dqwen.modeling.configuration_med3d_qwen import Med3DQwenConfig
    from med3dqwen.modeling.modeling_med3d_qwen import Med3DQwenForConditionalGeneration
    from med3dqwen.processing.processing_med3d_qwen import Med3DQwenProcessor
    from med3dqwen.processing.tokenization_med3d_qwen import load_qwen2_5_tokenizer

    recipe = yaml.safe_load(DEMO_RECIPE.read_text(encoding="utf-8"))
    config = Med3DQwenConfig.from_preset(recipe["model_preset"], **json.loads(recipe["preset_overrides"]))
    torch.manual_seed(0)
    Med3DQwenForConditionalGeneration(config).save_pretrained(folder)
    Med3DQwenProcessor.from_config(config, tokenizer=load_qwen2_5_tokenizer()).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=24, help="questions evaluated per run (--max_samples)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="measured runs after one warm-up")
    parser.add_argument("--num_volumes", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 64, 64], help="phantom (D, H, W)")
    args = parser.parse_args()

    from med3dqwen.builders.engine import BuildArguments
    from med3dqwen.builders.phantom.dataset import PhantomBuildConfig, build_phantom_dataset
    from med3dqwen.evaluation.runner import EvaluationArguments, evaluate_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "phantom"
        build_phantom_dataset(
            PhantomBuildConfig(output_dir=str(data), num_volumes=args.num_volumes, seed=2, shape=tuple(args.shape)),
            BuildArguments(progress=False),
        )
        model = tiny_model_folder(tmp / "model")
        rates, latencies, results = [], [], None
        for run in range(args.repeats + 1):
            options = EvaluationArguments(
                model_name_or_path=str(model),
                dataset_name=str(data),
                split="train",
                output_dir=str(tmp / f"run{run}"),
                max_samples=args.samples,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                progress=False,
            )
            begin = time.perf_counter()
            results = evaluate_model(options)
            elapsed = time.perf_counter() - begin
            if run:  # the first run warms up
                rates.append(len(results["samples"]) / elapsed)
                latencies.append(results["resources"]["latency_s_per_sample_median"])
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={threads}")
    print("| samples | batch | max_new_tokens | samples/s (median) | latency/sample (median) | peak RSS |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {len(results['samples'])} | {args.batch_size} | {args.max_new_tokens} | "
        f"{statistics.median(rates):.2f} ({min(rates):.2f}–{max(rates):.2f}) | "
        f"{1000 * statistics.median(latencies):.0f} ms | {results['resources']['peak_rss_mib']:.0f} MiB |"
    )


if __name__ == "__main__":
    main()
