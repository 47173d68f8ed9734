"""Shared pieces of the training tests: a tiny model on the real Qwen2.5 vocabulary and a small phantom dataset."""

from pathlib import Path

import datasets
import peft
import torch

from med3dqwen.builders.engine import BuildArguments
from med3dqwen.builders.phantom.dataset import PhantomBuildConfig, build_phantom_dataset
from med3dqwen.modeling.configuration_med3d_qwen import Med3DQwenConfig
from med3dqwen.modeling.modeling_med3d_qwen import Med3DQwenForConditionalGeneration
from med3dqwen.processing.processing_med3d_qwen import Med3DQwenProcessor
from med3dqwen.processing.tokenization_med3d_qwen import load_qwen2_5_tokenizer


SMALL = (32, 64, 64)
DECODER_LORA = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
MODULES_TO_SAVE = ["slice_self_attention", "multi_head_slice_attention", "slice_tokenizer", "closed_head"]


def tiny_model(config: Med3DQwenConfig, seed: int = 0) -> Med3DQwenForConditionalGeneration:
    torch.manual_seed(seed)
    return Med3DQwenForConditionalGeneration(config)


def tiny_processor(config: Med3DQwenConfig) -> Med3DQwenProcessor:
    return Med3DQwenProcessor.from_config(config, tokenizer=load_qwen2_5_tokenizer())


def build_phantom(out: Path, num_volumes: int = 2) -> Path:
    """A small phantom dataset folder (relative paths, closed and open rows)."""
    config = PhantomBuildConfig(output_dir=str(out), num_volumes=num_volumes, seed=2, shape=SMALL)
    build_phantom_dataset(config, BuildArguments(progress=False))
    return out


def load_records(folder: Path) -> list[dict]:
    return list(datasets.load_dataset(str(folder), split="train"))


def lora_model(config: Med3DQwenConfig, seed: int = 0):
    """The tiny model with LoRA (r=4) on the decoder's projections and the fusion modules and head trained in full."""
    base = tiny_model(config, seed)
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=DECODER_LORA,
        modules_to_save=MODULES_TO_SAVE,
        init_lora_weights=False,  # random lora_B too, so that every term has a value and a gradient
    )
    return peft.get_peft_model(base, lora).eval()
