"""Train Med3DQwen: the alignment stage (projector) or the SFT stage (LoRA + fusion modules + closed head).

Usage (docs/training.md; the recipes are in configs/, the launch configs in configs/accelerate/):

    # the embedded CPU demo: a tiny model on a phantom build, in minutes
    python datasets_scripts/build_phantom.py --output_dir build/phantom --num_volumes 8 --shape 64 64 64
    python train_sft.py --config configs/demo_cpu.yaml --stage align --output_dir runs/demo-align
    python train_sft.py --config configs/demo_cpu.yaml --model_name_or_path runs/demo-align --output_dir runs/demo-sft

    # the paper's recipe on one GPU, then on 8 GPUs with DeepSpeed ZeRO-2
    accelerate launch --config_file configs/accelerate/single_gpu.yaml train_sft.py \
        --config configs/paper_0.5b.yaml --stage align --output_dir runs/align-0.5b
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml train_sft.py \
        --config configs/paper_0.5b.yaml --model_name_or_path runs/align-0.5b --output_dir runs/sft-0.5b

    # volumes from a model-grid cache built once (docs/training.md, "Data path"); bad rows skipped and counted
    med3dqwen-build-cache --dataset_name build/phantom --volume_size 64 64 64 --output_dir build/phantom-cache
    python train_sft.py --config configs/demo_cpu.yaml --stage align --output_dir runs/demo-align \
        --cache_dir build/phantom-cache --skip_bad_samples

    # resume an interrupted run
    python train_sft.py --config configs/demo_cpu.yaml --output_dir runs/demo-sft \
        --resume_from_checkpoint runs/demo-sft/checkpoint-2
"""

from trl import ModelConfig, SFTConfig, TrlParser

from med3dqwen.training.recipe import Med3DQwenScriptArguments, run


def main(script_args: Med3DQwenScriptArguments, training_args: SFTConfig, model_args: ModelConfig):
    """Train the stage ``script_args.stage`` and save it to ``training_args.output_dir``; returns the trainer."""
    return run(script_args, training_args, model_args)


def make_parser(subparsers=None):
    dataclass_types = (Med3DQwenScriptArguments, SFTConfig, ModelConfig)
    if subparsers is not None:
        return subparsers.add_parser("sft", help="Train Med3DQwen", dataclass_types=dataclass_types)
    return TrlParser(dataclass_types)


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args)
