"""The tiny end-to-end Med3DQwen the processor, training and evaluation tests share (tests/ is on ``sys.path``
through its conftest): hidden 32, 2 decoder layers, the real Qwen2.5 vocabulary (so the real tokenizer's ids fit),
64³ volumes giving 10 visual + 4 slice tokens per volume."""

from pathlib import Path

from med3dqwen.modeling.configuration_med3d_qwen import Med3DQwenConfig


def tiny_config(**kwargs) -> Med3DQwenConfig:
    """The tiny preset at test size; ``kwargs`` go to :meth:`Med3DQwenConfig.from_preset` (e.g.
    ``closed_label_names=[]`` for a model without a closed head)."""
    return Med3DQwenConfig.from_preset(
        "tiny",
        text_overrides={"vocab_size": 151665, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2},
        vision_overrides={
            "channels": [4, 8, 8, 16, 16],
            "depths": [1, 1, 1, 1, 1],
            "volume_size": [64, 64, 64],
            "low_output_tokens": [6, 4],
            "high_output_tokens": [4, 4],
        },
        ssa_layers=1,
        **kwargs,
    )


def save_tiny_model(folder: Path, **kwargs) -> Path:
    """A newly initialised tiny model (seed 0) and its processor with the real tokenizer, saved in ``folder`` as a
    user would save a checkpoint; ``kwargs`` go to :func:`tiny_config`."""
    import torch

    from med3dqwen.modeling.modeling_med3d_qwen import Med3DQwenForConditionalGeneration
    from med3dqwen.processing.processing_med3d_qwen import Med3DQwenProcessor
    from med3dqwen.processing.tokenization_med3d_qwen import load_qwen2_5_tokenizer

    config = tiny_config(**kwargs)
    torch.manual_seed(0)
    Med3DQwenForConditionalGeneration(config).save_pretrained(folder)
    Med3DQwenProcessor.from_config(config, tokenizer=load_qwen2_5_tokenizer()).save_pretrained(folder)
    return folder
