"""Build the model-grid cache of a dataset: every volume windowed and resized once, every ROI mask resized and packed.

Usage:

    # the volume size and window of a saved model or processor
    med3dqwen-build-cache --dataset_name build/phantom --processor runs/demo-align --output_dir build/phantom-cache
    # or stated directly; 8 processes; every split of the dataset
    med3dqwen-build-cache --dataset_name build/ctrate --volume_size 128 256 256 --window chest \
        --output_dir /scratch/ctrate-cache --num_proc 8 --splits train validation test

Then train from it (the contour is still drawn online, so the prompt settings stay free):

    accelerate launch train_sft.py --config configs/paper_1.5b.yaml --cache_dir /scratch/ctrate-cache ...

A killed build resumes where it stopped when run again with the same arguments (finished chunks are kept). Entries
whose files are missing, corrupt or off their volume's grid keep the error; the build lists them and exits with
status 1 unless ``--allow_bad_samples`` (training with ``--skip_bad_samples`` then skips those rows). See
docs/training.md, "Data path".
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from med3dqwen.data.cache import build_model_grid_cache


__all__ = ["CacheArguments", "cli", "main", "make_parser"]


@dataclass
class CacheArguments:
    """What to cache, where, and with which volume size and window."""

    dataset_name: str = field(metadata={"help": "A built dataset folder (its media paths are relative to it)."})
    output_dir: str = field(metadata={"help": "The cache folder (created; a folder of an unfinished build resumes)."})
    processor: str | None = field(
        default=None,
        metadata={"help": "A saved model or processor folder: its image processor's volume size and window."},
    )
    volume_size: list[int] | None = field(
        default=None, metadata={"help": "Model input (D, H, W) without --processor (default 128 256 256)."}
    )
    window: str = field(default="chest", metadata={"help": "HU window preset without --processor."})
    splits: list[str] | None = field(default=None, metadata={"help": "Splits to cache (default: all)."})
    dataset_config: str | None = field(default=None, metadata={"help": "The dataset's config name."})
    num_proc: int = field(default=1, metadata={"help": "Processes of datasets' map."})
    chunk_size: int = field(default=32, metadata={"help": "Volumes per chunk (what a killed build loses at most)."})
    allow_bad_samples: bool = field(
        default=False, metadata={"help": "Exit with status 0 even when some entries could not be made."}
    )


def _image_processor(args: CacheArguments):
    from med3dqwen.processing.image_processing_med3d_qwen import Med3DQwenImageProcessor

    if args.processor:
        if args.volume_size is not None:
            raise ValueError("give --processor or --volume_size, not both")
        from med3dqwen.processing.processing_med3d_qwen import Med3DQwenProcessor

        return Med3DQwenProcessor.from_pretrained(args.processor).image_processor
    return Med3DQwenImageProcessor(volume_size=args.volume_size or (128, 256, 256), window=args.window)


def main(args: CacheArguments) -> int:
    """Build the cache ``args`` describe, print what it holds; returns the exit status."""
    import datasets

    folder = Path(args.dataset_name).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {args.dataset_name} does not exist")
    loaded = datasets.load_dataset(str(folder), name=args.dataset_config)
    splits = args.splits or sorted(loaded)
    missing = [s for s in splits if s not in loaded]
    if missing:
        raise ValueError(f"dataset {folder} has no split(s) {missing} (it has {sorted(loaded)})")
    records = datasets.concatenate_datasets([loaded[s] for s in splits])
    cache = build_model_grid_cache(
        records,
        _image_processor(args),
        args.output_dir,
        dataset_root=folder,
        num_proc=args.num_proc,
        chunk_size=args.chunk_size,
    )
    info = cache.info
    print(
        f"model-grid cache {args.output_dir}: {info['num_volumes']} volumes, {info['num_masks']} masks "
        f"(volume size {info['volume_size']}, window {info['window']}) from splits {splits} of {folder}"
    )
    errors = cache.errors()
    if errors:
        print(f"{len(errors)} entries could not be made:", file=sys.stderr)
        for key, message in errors[:20]:
            print(f"  {key}: {message}", file=sys.stderr)
        if len(errors) > 20:
            print(f"  ... and {len(errors) - 20} more", file=sys.stderr)
        return 0 if args.allow_bad_samples else 1
    return 0


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(CacheArguments)


def cli(argv: Sequence[str] | None = None) -> None:
    """The console script ``med3dqwen-build-cache``."""
    (args,) = make_parser().parse_args_into_dataclasses(args=argv)
    sys.exit(main(args))


if __name__ == "__main__":
    cli()
