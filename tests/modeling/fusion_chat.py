"""A tiny Med3DQwen config and ChatML-shaped token sequences for the fusion and PEFT tests."""

import torch

from med3dqwen.modeling.configuration_med3d_qwen import Med3DQwenConfig
from med3dqwen.modeling.modeling_med3d_qwen import Med3DQwenForConditionalGeneration


# Token ids of the tiny vocabulary (99 entries).
PAD, IMAGE, SLICE, V_START, V_END, IM_START, IM_END = 0, 90, 91, 92, 93, 94, 95
ROLE = {"system": 50, "user": 52, "assistant": 53}
NEWLINE = 51
IMAGE_PART = "<image>"


def tiny_config(**overrides) -> Med3DQwenConfig:
    """hidden 32, 3 decoder layers, SSA after blocks 0 and 1, MSSA after block 1, 64³ volumes (4 slice tokens)."""
    kwargs = dict(
        text_config=dict(
            model_type="qwen2",
            vocab_size=99,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            pad_token_id=PAD,
        ),
        vision_config=dict(
            channels=[4, 8, 8, 16, 16],
            depths=[1, 1, 1, 1, 1],
            volume_size=[64, 64, 64],
            low_output_tokens=[6, 4],
            high_output_tokens=[4, 4],
        ),
        image_token_id=IMAGE,
        slice_token_id=SLICE,
        vision_start_token_id=V_START,
        vision_end_token_id=V_END,
        im_start_token_id=IM_START,
        im_end_token_id=IM_END,
        ssa_layers=2,
    )
    kwargs.update(overrides)
    return Med3DQwenConfig(**kwargs)


def make_model(config: Med3DQwenConfig, seed: int = 0) -> Med3DQwenForConditionalGeneration:
    torch.manual_seed(seed)
    return Med3DQwenForConditionalGeneration(config).eval()


def open_fusion(model: Med3DQwenForConditionalGeneration) -> None:
    """Give SSA/MSSA non-zero weights (they start as identities) so that they change the outputs."""
    with torch.no_grad():
        for module in model.model.slice_self_attention or []:
            module.gate.fill_(1e-3)
        if model.model.multi_head_slice_attention is not None:
            torch.nn.init.normal_(model.model.multi_head_slice_attention.w_o.weight, std=0.05)


def image_block(config: Med3DQwenConfig) -> list[int]:
    vision = config.vision_config
    return [V_START] + [IMAGE] * vision.num_visual_tokens + [SLICE] * vision.num_slice_tokens + [V_END]


def chat_ids(config: Med3DQwenConfig, messages: list[tuple[str, list]], add_generation_prompt: bool = False):
    """ChatML as the processor renders it: `messages` = [(role, parts)], a part is a token id or IMAGE_PART."""
    ids = []
    for role, parts in messages:
        ids += [IM_START, ROLE[role], NEWLINE]
        for part in parts:
            ids += image_block(config) if part == IMAGE_PART else [part]
        ids += [IM_END, NEWLINE]
    if add_generation_prompt:
        ids += [IM_START, ROLE["assistant"], NEWLINE]
    return ids


def volumes(config: Med3DQwenConfig, count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, config.vision_config.in_channels, 64, 64, 64, generator=generator)
