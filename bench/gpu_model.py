"""Peak GPU memory and time of a LoRA training step and of generation, per Med3DQwen preset (random bf16 weights).

Usage (on a machine with a CUDA GPU; about 2-4 minutes on one H200 for all four presets):

    python bench/gpu_model.py --output bench/results/gpu_model.json
    python bench/gpu_model.py --presets qwen2.5-0.5b qwen2.5-1.5b --batch_size 4

CPU smoke run of the script itself (tiny preset, small volumes; numbers meaningless):

    python bench/gpu_model.py --device cpu --presets tiny --volume_size 64 64 64 --steps 1 --new_tokens 4

For each preset: random weights in bf16 (no download), the paper's SFT setting — LoRA r=16 on every linear layer of the
decoder blocks, fusion and closed head trainable, encoder and projector frozen — and a batch of ``--batch_size``
volumes of ``--volume_size`` with an image block (256 visual + 8 slice tokens), a 64-token question and a 32-token
answer. It measures, after ``--warmup`` steps, the median of ``--steps`` forward+backward+AdamW steps and the peak
memory (``torch.cuda.max_memory_allocated``), then greedy generation of ``--new_tokens`` tokens (KV cache) for the same
batch. Prints a markdown table and writes JSON. FlashAttention-2 is used when installed, else SDPA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from med3dqwen import Med3DQwenConfig, Med3DQwenForConditionalGeneration
from med3dqwen.modeling.modeling_med3d_qwen import default_attn_implementation


QUESTION_TOKENS, ANSWER_TOKENS = 64, 32


def make_batch(config: Med3DQwenConfig, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """ChatML-shaped ids: user turn, image block (visual + slice tokens), question, assistant turn, answer."""
    generator = torch.Generator().manual_seed(0)
    vision = config.vision_config
    text = lambda n: torch.randint(100, 150000, (n,), generator=generator).tolist()  # noqa: E731
    prompt = [config.im_start_token_id, 872, 198, config.vision_start_token_id]
    prompt += [config.image_token_id] * vision.num_visual_tokens + [config.slice_token_id] * vision.num_slice_tokens
    prompt += [config.vision_end_token_id, *text(QUESTION_TOKENS), config.im_start_token_id, 77091, 198]
    ids = torch.tensor([prompt + text(ANSWER_TOKENS) for _ in range(batch_size)], device=device)
    labels = ids.clone()
    labels[:, : len(prompt)] = -100
    pixel_values = torch.rand(batch_size, vision.in_channels, *vision.volume_size, generator=generator)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": pixel_values.to(device, torch.bfloat16),
        "prompt_length": torch.tensor(len(prompt)),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def preset_config(name: str, volume_size: list[int]) -> Med3DQwenConfig:
    """The preset's config at ``volume_size``; ``tiny`` also gets a small encoder and projector (CPU smoke runs)."""
    vision = {"volume_size": list(volume_size)}
    if name == "tiny":
        vision.update(channels=[8, 16, 16, 32, 32], depths=[1, 1, 1, 1, 1], low_output_tokens=[8, 8],
                      high_output_tokens=[8, 8])  # fmt: skip
    return Med3DQwenConfig.from_preset(name, vision_overrides=vision)


def bench_preset(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    config = preset_config(name, args.volume_size)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = Med3DQwenForConditionalGeneration._from_config(
        config, dtype=torch.bfloat16, attn_implementation=args.attn_implementation
    ).to(device)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30

    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    )  # fmt: skip
    model = get_peft_model(model, lora)
    backbone = model.base_model.model
    for module in (backbone.model.slice_tokenizer, backbone.model.slice_self_attention,
                   backbone.model.multi_head_slice_attention, backbone.closed_head):  # fmt: skip
        if module is not None:
            module.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-5, betas=(0.9, 0.98))
    model.train()
    batch = make_batch(config, args.batch_size, device)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}

    step_times = []
    for step in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            step_times.append(time.perf_counter() - start)
    train_peak = peak_gib(device)

    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prompt_length = int(batch["prompt_length"])
    prompt = {
        "input_ids": batch["input_ids"][:, :prompt_length],
        "attention_mask": batch["attention_mask"][:, :prompt_length],
        "pixel_values": batch["pixel_values"],
    }
    with torch.no_grad():
        model.generate(**prompt, max_new_tokens=2, do_sample=False)  # warm-up
        sync(device)
        start = time.perf_counter()
        out = model.generate(**prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        sync(device)
    generate_s = time.perf_counter() - start
    result = {
        "preset": name,
        "batch_size": args.batch_size,
        "volume_size": args.volume_size,
        "sequence_length": int(batch["input_ids"].shape[1]),
        "weights_gib": round(weights_gib, 3),
        "train_step_s_median": round(statistics.median(step_times), 4),
        "train_peak_gib": round(train_peak, 3),
        "generate_s": round(generate_s, 4),
        "generate_tokens_per_s": round(args.batch_size * (out.shape[1] - prompt_length) / generate_s, 1),
        "generate_peak_gib": round(peak_gib(device), 3),
        "trainable_params": sum(p.numel() for p in trainable),
    }
    del model, optimizer
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b"])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--volume_size", type=int, nargs=3, default=[128, 256, 256])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--attn_implementation", default=None, help="default: flash_attention_2 if installed, else sdpa"
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark measures GPU memory (use --device cpu for a smoke run)")
    args.attn_implementation = args.attn_implementation or default_attn_implementation()

    results = [bench_preset(name, args, device) for name in args.presets]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{gpu}, torch {torch.__version__}, attention {args.attn_implementation}, batch {args.batch_size}, "
          f"volumes {tuple(args.volume_size)}, sequence {results[0]['sequence_length']} tokens")  # fmt: skip
    columns = ["preset", "bf16 weights GiB", "LoRA step s (median)", "step peak GiB", "generate s", "tokens/s"]
    print("| " + " | ".join([*columns, "generate peak GiB"]) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        cells = [
            r["preset"], f"{r['weights_gib']:.2f}", f"{r['train_step_s_median']:.3f}", f"{r['train_peak_gib']:.2f}",
            f"{r['generate_s']:.2f}", f"{r['generate_tokens_per_s']:.0f}", f"{r['generate_peak_gib']:.2f}",
        ]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"device": gpu, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
