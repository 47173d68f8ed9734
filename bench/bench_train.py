"""Training step time and peak memory per preset and batch size, the data path's throughput against the step rate, and
the gain of scoring the vocabulary only at labelled positions.

Usage:

    # GPU, once, unattended (within ~8 minutes on one H200; --time_budget_s stops starting new presets after that):
    # Qwen2.5-0.5B/1.5B/3B at batch 4, 128x256x256 volumes, bf16 weights, LoRA r=16, gradient checkpointing,
    # flash_attention_2 when importable else sdpa
    python bench/bench_train.py --device cuda --output bench/results/train_gpu.json

    # CPU: the tiny preset (real 151,936-token vocabulary, hidden 64, 4 layers) at batch 1, 2, 4 on 64^3 volumes
    # (one torch thread: on a shared machine idle OpenMP threads otherwise spin against the other jobs)
    python bench/bench_train.py --device cpu --presets tiny --batch_sizes 1 2 4 --threads 1 \
        --output bench/results/train_cpu.json

What it does:

1. Builds a small phantom dataset at the volume size (or reads ``--dataset_name``, a built dataset folder).
2. For every preset and batch size, in a fresh child process (its own peak memory; a crash or CUDA OOM in one
   configuration is recorded and the next one runs): random weights (no download), the sft stage's real setup
   (``med3dqwen.training.recipe.lora_config``: LoRA r=16 on the decoder's projections, fusion modules, slice
   projection and closed head in full; encoder and projector frozen), the paper's AdamW, and one collated batch of
   real phantom rows. It times ``--warmup`` + ``--steps`` optimiser steps of ``Med3DQwenTrainer.compute_loss`` +
   backward + AdamW (median of the timed ones), once with logits only at labelled positions (the trainer's default)
   and once over every position (``--logits both``). Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU, the
   child's peak RSS on CPU (weights, optimiser and the collated batch included).
3. DataLoader throughput of the training collator (volume read + boundary prompt + chat template) with 0 and 2
   workers (``--data_workers``), set against the samples/s of each step.

Prints markdown tables and writes ``--output`` (JSON) and the same path with ``.md``; both are rewritten after each
configuration, so a run stopped early keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_model's helpers, when run as a script

GPU_PRESETS = ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b"]


# ---------------------------------------------------------------------------------------------------------------
# One configuration (child process)
# ---------------------------------------------------------------------------------------------------------------


def _batch(collator, rows: list[dict], dtype, device) -> dict:
    import torch

    batch = collator(rows)
    return {
        k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def measure(spec: dict) -> dict:
    """Step time and peak memory of one preset and batch size, for each logits mode of ``spec["modes"]``."""
    import peft
    import torch
    from gpu_model import peak_gib, preset_config, sync
    from transformers import TrainingArguments
    from trl import ModelConfig

    from med3dqwen.data.schema import resolve_media
    from med3dqwen.modeling.modeling_med3d_qwen import Med3DQwenForConditionalGeneration
    from med3dqwen.processing.processing_med3d_qwen import Med3DQwenProcessor
    from med3dqwen.processing.tokenization_med3d_qwen import load_qwen2_5_tokenizer
    from med3dqwen.training.collator import IGNORE_INDEX, Med3DQwenCollator
    from med3dqwen.training.losses import labelled_logits
    from med3dqwen.training.optim import make_optimizer
    from med3dqwen.training.recipe import lora_config
    from med3dqwen.training.trainer import Med3DQwenTrainer

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
    torch.manual_seed(0)
    config = preset_config(spec["preset"], spec["volume_size"])
    start = time.perf_counter()
    model = Med3DQwenForConditionalGeneration._from_config(
        config, dtype=dtype, attn_implementation=spec["attn_implementation"]
    )
    model.model.freeze_pretrained_parts()
    if spec["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, lora_config(ModelConfig(lora_r=16, lora_alpha=32, lora_dropout=0.05), config))
    model.to(device)
    init_s = time.perf_counter() - start

    processor = Med3DQwenProcessor.from_config(config, tokenizer=load_qwen2_5_tokenizer())
    folder = Path(spec["dataset"])
    train = resolve_media(load_split(folder), folder)
    collator = Med3DQwenCollator(processor, list(config.closed_label_names))
    stride = len(train) / spec["batch_size"]  # rows spread over the split: a mix of question types and answers
    rows = [train[int((k + 0.5) * stride) % len(train)] for k in range(spec["batch_size"])]
    batch = _batch(collator, rows, dtype, device)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            use_cpu=device.type == "cpu",
            report_to="none",
            remove_unused_columns=False,
            per_device_train_batch_size=spec["batch_size"],
        )
        trainer = Med3DQwenTrainer(model=model, args=args, data_collator=collator)
    optimizer = make_optimizer(model, 2e-5)
    model.train()
    result = {
        key: spec[key] for key in ("preset", "batch_size", "volume_size", "dtype", "attn_implementation", "device")
    }
    result.update(
        gradient_checkpointing=spec["gradient_checkpointing"],
        init_s=round(init_s, 2),
        sequence_length=int(batch["input_ids"].shape[1]),
        labelled_positions=int(labelled_logits(batch["labels"])["logits_to_keep"].numel()),
        target_tokens=int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        modes={},
    )
    for mode in spec["modes"]:
        trainer.labelled_logits_only = mode == "labelled"
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times, cpu_times, losses = [], [], []
        for step in range(spec["warmup"] + spec["steps"]):
            sync(device)
            begin, cpu_begin = time.perf_counter(), time.process_time()
            num_items = trainer._get_num_items_in_batch([batch], device)
            loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            if step >= spec["warmup"]:
                times.append(time.perf_counter() - begin)
                cpu_times.append(time.process_time() - cpu_begin)
            losses.append(float(loss.detach()))
        step_s = statistics.median(times)
        result["modes"][mode] = {
            "step_s_median": round(step_s, 4),
            "step_s_min": round(min(times), 4),
            "step_s_max": round(max(times), 4),
            "samples_per_s": round(spec["batch_size"] / step_s, 3),
            # CPU seconds of this process (all its threads): less sensitive than wall time to other jobs' load
            "cpu_s_median": round(statistics.median(cpu_times), 4),
            "first_loss": round(losses[0], 4),
        }
        if device.type == "cuda":
            result["modes"][mode]["peak_gib"] = round(peak_gib(device), 3)
        else:  # ru_maxrss is in KiB on Linux; on CPU each mode runs in its own child, so this peak is the mode's
            result["modes"][mode]["peak_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Data path (parent process)
# ---------------------------------------------------------------------------------------------------------------


def load_split(folder: Path):
    """The train split, read through a cache of its own: the shared ``datasets`` cache can hand back the rows of an
    older build of a folder with the same name."""
    import datasets

    return datasets.load_dataset(str(folder), split="train", cache_dir=str(Path(folder).parent / "datasets_cache"))


def build_dataset(out: Path, num_volumes: int, shape: list[int], num_proc: int) -> Path:
    from med3dqwen.builders.engine import BuildArguments
    from med3dqwen.builders.phantom.dataset import PhantomBuildConfig, build_phantom_dataset

    # the default PNG montages: resolve_media checks every path the records list, PNGs included
    config = PhantomBuildConfig(output_dir=str(out), num_volumes=num_volumes, seed=0, shape=tuple(shape))
    build_phantom_dataset(config, BuildArguments(progress=False, num_proc=num_proc))
    return out


def data_throughput(folder: Path, preset: str, volume_size: list[int], batch_size: int, workers: int, batches: int):
    """Samples/s of a DataLoader running the training collator over the split (first batch excluded: start-up)."""
    import torch
    from gpu_model import preset_config

    from med3dqwen.data.schema import resolve_media
    from med3dqwen.processing.processing_med3d_qwen import Med3DQwenProcessor
    from med3dqwen.processing.tokenization_med3d_qwen import load_qwen2_5_tokenizer
    from med3dqwen.training.collator import Med3DQwenCollator

    config = preset_config(preset, volume_size)
    processor = Med3DQwenProcessor.from_config(config, tokenizer=load_qwen2_5_tokenizer())
    collator = Med3DQwenCollator(processor, list(config.closed_label_names))
    train = resolve_media(load_split(folder), folder)
    rows = train.select([i % len(train) for i in range((batches + 1) * batch_size)])
    loader = torch.utils.data.DataLoader(rows, batch_size=batch_size, collate_fn=collator, num_workers=workers)
    iterator = iter(loader)
    next(iterator)  # worker start-up and the first batch
    start = time.perf_counter()
    count = sum(len(batch["input_ids"]) for batch in iterator)
    elapsed = time.perf_counter() - start
    return {"workers": workers, "batch_size": batch_size, "samples": count, "samples_per_s": round(count / elapsed, 2)}


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def _step(mode: dict | None) -> str:
    """``median (min)`` step seconds: on a shared machine the minimum is the closer estimate of the idle cost."""
    return "—" if mode is None else f"{mode['step_s_median']:.3f} ({mode['step_s_min']:.3f})"


def markdown(report: dict) -> str:
    lines = [
        f"{report['machine']}; torch {report['torch']}; device {report['device']}; "
        f"torch threads {report.get('threads') or 'default'}; {report['steps']} timed steps after {report['warmup']} "
        "warm-up: median (min) seconds per optimiser step",
        "",
        "| preset | batch | volume | dtype | attention | grad ckpt | seq | logits kept | step s, labelled | "
        "step s, all positions | speed-up | CPU s, labelled / all | samples/s | peak GiB, labelled | peak GiB, all |",
        "|---|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['batch_size']} | {r.get('error')} |" + " |" * 12)
            continue
        lab, full = r["modes"].get("labelled"), r["modes"].get("full")
        unit = " RSS" if r["device"] == "cpu" else ""
        cells = [
            r["preset"], str(r["batch_size"]), "×".join(map(str, r["volume_size"])), r["dtype"],
            r["attn_implementation"], "yes" if r["gradient_checkpointing"] else "no", str(r["sequence_length"]),
            f"{r['labelled_positions']} ({r['target_tokens']} targets)",
            _step(lab), _step(full),
            f"{full['step_s_median'] / lab['step_s_median']:.2f}×" if lab and full else "—",
            " / ".join(f"{m['cpu_s_median']:.2f}" if m else "—" for m in (lab, full)),
            f"{(lab or full)['samples_per_s']:.2f}",
            f"{lab['peak_gib']:.2f}{unit}" if lab else "—", f"{full['peak_gib']:.2f}{unit}" if full else "—",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    if report["data"]:
        rates = [
            r["modes"]["labelled"]["samples_per_s"] for r in report["results"] if "labelled" in r.get("modes", {})
        ]
        lines += [
            "",
            f"Data path: the training collator in a DataLoader over the phantom split (volumes "
            f"{'×'.join(map(str, report['data_volume']))}, read as .nii.gz), against the fastest step rate "
            f"({max(rates) if rates else float('nan'):.2f} samples/s):",
            "",
            "| workers | batch | samples | samples/s | data ÷ fastest step rate |",
            "|---:|---:|---:|---:|---:|",
        ]
        for d in report["data"]:
            ratio = d["samples_per_s"] / max(rates) if rates else float("nan")
            lines.append(f"| {d['workers']} | {d['batch_size']} | {d['samples']} | {d['samples_per_s']:.2f} | "
                         f"{ratio:.2f}× |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write(report: dict, output: Path | None) -> None:
    if output is None:
        return
    from med3dqwen.io import atomic_output

    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(output) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    with atomic_output(output.with_suffix(".md")) as tmp:
        tmp.write_text(markdown(report))


def machine(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {
            "preset": spec["preset"],
            "batch_size": spec["batch_size"],
            "error": f"timed out after {timeout:.0f} s",
        }
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"preset": spec["preset"], "batch_size": spec["batch_size"], "error": last[:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--presets", nargs="+", default=None, help=f"default: {GPU_PRESETS} on cuda, tiny on cpu")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=None, help="default: 4 on cuda, 1 2 4 on cpu")
    parser.add_argument("--volume_size", type=int, nargs=3, default=None, help="default: 128 256 256 / 64 64 64")
    parser.add_argument("--logits", choices=["both", "labelled", "full"], default="both")
    parser.add_argument("--gradient_checkpointing", choices=["auto", "on", "off"], default="auto",
                        help="auto: on for cuda (the paper recipes), off for cpu")  # fmt: skip
    parser.add_argument("--attn_implementation", default=None, help="default: flash_attention_2 if usable, else sdpa")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in each configuration's process (default: torch's); 1 on a shared CPU "
                        "keeps idle OpenMP threads from spinning against other jobs")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dataset_name", default=None, help="a built dataset folder (default: build a phantom)")
    parser.add_argument("--phantom_volumes", type=int, default=2)
    parser.add_argument("--data_workers", type=int, nargs="*", default=[0, 2])
    parser.add_argument("--data_batches", type=int, default=6)
    parser.add_argument("--time_budget_s", type=float, default=480.0,
                        help="start no configuration after this many seconds; each one gets what is left")  # fmt: skip
    parser.add_argument("--output", type=Path, default=None, help="JSON results (and the markdown table beside it)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:  # one configuration, in its own process
        print(json.dumps(measure(json.loads(args.child))))
        return

    import torch

    from med3dqwen.modeling.modeling_med3d_qwen import default_attn_implementation

    started = time.perf_counter()
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu --presets tiny for the CPU table")
    presets = args.presets or (GPU_PRESETS if gpu else ["tiny"])
    batch_sizes = args.batch_sizes or ([4] if gpu else [1, 2, 4])
    volume_size = args.volume_size or ([128, 256, 256] if gpu else [64, 64, 64])
    checkpointing = gpu if args.gradient_checkpointing == "auto" else args.gradient_checkpointing == "on"
    modes = ["labelled", "full"] if args.logits == "both" else [args.logits]
    report = {
        "machine": machine(args.device), "torch": torch.__version__, "device": args.device,
        "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "results": [], "data": [],
        "data_volume": volume_size,
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        if args.dataset_name:
            folder = Path(args.dataset_name)
        else:
            num_proc = max(1, min(args.phantom_volumes, (os.cpu_count() or 1) // 2))
            folder = build_dataset(Path(tmp) / "phantom", args.phantom_volumes, volume_size, num_proc)
        print(f"dataset ready after {time.perf_counter() - started:.0f} s", file=sys.stderr)
        for preset in presets:
            for batch_size in batch_sizes:
                left = args.time_budget_s - (time.perf_counter() - started)
                if left <= 0:
                    report["results"].append({"preset": preset, "batch_size": batch_size, "error": "time budget"})
                    continue
                spec = {
                    "preset": preset, "batch_size": batch_size, "volume_size": volume_size, "device": args.device,
                    "dtype": "bfloat16" if gpu else "float32", "modes": modes, "warmup": args.warmup,
                    "steps": args.steps, "gradient_checkpointing": checkpointing, "dataset": str(folder),
                    "threads": args.threads,
                    "attn_implementation": args.attn_implementation or default_attn_implementation(),
                }  # fmt: skip
                result = {}
                for group in [modes] if gpu else [[mode] for mode in modes]:  # CPU: one child per mode (its RSS)
                    left = args.time_budget_s - (time.perf_counter() - started)
                    part = run_child({**spec, "modes": group}, timeout=max(left, 0) + 60)
                    if "error" in part:
                        result = part
                        break
                    if result:
                        result["modes"].update(part["modes"])
                    else:
                        result = part
                report["results"].append(result)
                print(f"{preset} batch {batch_size}: {result.get('error') or result['modes']}", file=sys.stderr)
                write(report, args.output)
        data_batch = max(batch_sizes)
        for workers in args.data_workers:
            report["data"].append(
                data_throughput(folder, presets[0], volume_size, data_batch, workers, args.data_batches)
            )
            write(report, args.output)
    report["total_s"] = round(time.perf_counter() - started, 1)
    write(report, args.output)
    print(markdown(report))


if __name__ == "__main__":
    main()
