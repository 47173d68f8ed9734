"""The tiny end-to-end Med3DQwen the processor, training and evaluation tests share (tests/ is on ``sys.path``
through its conftest): hidden 32, 2 decoder layers, the real Qwen2.5 vocabulary (so the real tokenizer's ids fit),
64³ volumes giving 10 visual + 4 slice tokens per volume."""

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
