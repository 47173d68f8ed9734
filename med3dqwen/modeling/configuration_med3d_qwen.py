"""Configuration of Med3DQwen: a DCFormer 3D encoder + MLP-Mixer projector + slice fusion around a Qwen2 decoder.

Self-contained for Hub remote code: third-party imports and single-dot sibling imports only.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.models.qwen2 import Qwen2Config

from .dcformer_med3d_qwen import DCFORMER_PRESETS
from .fusion_med3d_qwen import FUSION_TEXT_SCOPES


__all__ = ["DEFAULT_CLOSED_LABEL_NAMES", "QWEN2_5_PRESETS", "Med3DQwenConfig", "Med3DQwenVisionConfig"]

# Architecture numbers of the Qwen2.5 decoders (their config.json files), so presets need no download.
_QWEN2_5_COMMON = {
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "attention_dropout": 0.0,
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "pad_token_id": 151643,  # <|endoftext|>, as in the Qwen2.5 tokenizers
}
QWEN2_5_PRESETS: dict[str, dict] = {
    "qwen2.5-0.5b": {
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
    "qwen2.5-1.5b": {
        "vocab_size": 151936,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
    "qwen2.5-3b": {
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
    "qwen2.5-7b": {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
    },
    # A test-sized decoder over the real Qwen2.5 vocabulary (for CPU demos and tests).
    "tiny": {
        "vocab_size": 151936,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
        "max_position_embeddings": 2048,
    },
}

PROMPT_ENCODINGS = ("burn_in", "channel", "rgb")

# The closed-answer label vocabulary: yes/no questions, then the letters of multiple-choice questions. A record
# names its label and the allowed subset (a yes/no question's softmax runs over {no, yes} only).
DEFAULT_CLOSED_LABEL_NAMES = ("no", "yes", "A", "B", "C", "D")


def _closed_label_names(names: list[str] | tuple[str, ...] | None, num_closed_classes: int | None) -> list[str]:
    """Check the closed label vocabulary; `num_closed_classes` (the old field) is accepted only when it agrees."""
    if names is None:
        names = [] if num_closed_classes == 0 else list(DEFAULT_CLOSED_LABEL_NAMES)
    if isinstance(names, str) or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"closed_label_names must be a list of non-empty strings, got {names!r}")
    names = list(names)
    if len(set(names)) != len(names):
        duplicated = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"closed_label_names must be unique, {duplicated} appear more than once")
    if len(names) == 1:
        raise ValueError(f"closed_label_names needs at least 2 labels (or none: no closed head), got {names}")
    if num_closed_classes is not None and num_closed_classes != len(names):
        raise ValueError(
            f"num_closed_classes={num_closed_classes} disagrees with the {len(names)} closed_label_names {names}; "
            "the head size is len(closed_label_names), give only that"
        )
    return names


class Med3DQwenVisionConfig(PreTrainedConfig):
    r"""Vision side: DCFormer encoder, MLP-Mixer projector and slice tokens.

    Args:
        variant (`str`, *optional*, defaults to `"decomp_small"`):
            DCFormer variant; sets `channels`, `depths` and `kernel_sizes` unless they are given.
        channels (`list[int]`, *optional*): channels of the stem and the four stages (5 values).
        depths (`list[int]`, *optional*): blocks per stage (5 values).
        kernel_sizes (`list[int]`, *optional*): decomposed kernel size of stages 1-4 (4 values).
        in_channels (`int`, *optional*, defaults to 1):
            1 for the `burn_in` prompt encoding, 2 for `channel` (image + contour), 3 for `rgb`.
        volume_size (`list[int]`, *optional*, defaults to `[128, 256, 256]`):
            (D, H, W) input; the projector's token counts depend on it.
        low_stage, high_stage (`int`, *optional*, defaults to 3 and 4): encoder stages feeding the projector.
        low_output_tokens, high_output_tokens (`list[int]`, *optional*, defaults to `[192, 128]` and `[64, 128]`):
            token counts of the two mixer layers of each projector stream.
        slice_stage (`int`, *optional*, defaults to 2): encoder stage whose per-depth average gives the slice tokens.
        use_slice_tokens (`bool`, *optional*, defaults to `True`): append slice tokens after the visual tokens.
    """

    model_type = "med3d_qwen_vision"
    base_config_key = "vision_config"

    def __init__(
        self,
        variant: str = "decomp_small",
        channels: list[int] | None = None,
        depths: list[int] | None = None,
        kernel_sizes: list[int] | None = None,
        in_channels: int = 1,
        volume_size: list[int] | tuple[int, int, int] = (128, 256, 256),
        low_stage: int = 3,
        high_stage: int = 4,
        low_output_tokens: list[int] | tuple[int, int] = (192, 128),
        high_output_tokens: list[int] | tuple[int, int] = (64, 128),
        slice_stage: int = 2,
        use_slice_tokens: bool = True,
        **kwargs,
    ):
        if variant not in DCFORMER_PRESETS and (channels is None or depths is None or kernel_sizes is None):
            raise ValueError(f"unknown DCFormer variant {variant!r}; choose from {sorted(DCFORMER_PRESETS)}")
        preset = DCFORMER_PRESETS.get(variant, {})
        self.variant = variant
        self.channels = list(channels if channels is not None else preset["channels"])
        self.depths = list(depths if depths is not None else preset["depths"])
        self.kernel_sizes = list(kernel_sizes if kernel_sizes is not None else preset["kernel_sizes"])
        if len(self.channels) != 5 or len(self.depths) != 5 or len(self.kernel_sizes) != 4:
            raise ValueError("channels and depths need 5 values (stem + 4 stages), kernel_sizes 4")
        if in_channels not in (1, 2, 3):
            raise ValueError(f"in_channels must be 1 (burn_in), 2 (channel) or 3 (rgb), got {in_channels}")
        self.in_channels = in_channels
        self.volume_size = [int(s) for s in volume_size]
        if len(self.volume_size) != 3 or any(s % 64 for s in self.volume_size):
            raise ValueError(f"volume_size must be 3 multiples of 64 (the encoder downsamples 64x), got {volume_size}")
        for name, stage in (("low_stage", low_stage), ("high_stage", high_stage), ("slice_stage", slice_stage)):
            if not 0 <= stage <= 4:
                raise ValueError(f"{name} must be an encoder stage in 0..4, got {stage}")
        self.low_stage, self.high_stage, self.slice_stage = low_stage, high_stage, slice_stage
        self.low_output_tokens = [int(t) for t in low_output_tokens]
        self.high_output_tokens = [int(t) for t in high_output_tokens]
        self.use_slice_tokens = use_slice_tokens
        super().__init__(**kwargs)

    def stage_grid(self, stage: int) -> tuple[int, int, int]:
        """(D, H, W) grid of an encoder stage: the stem downsamples 4x, each later stage 2x more."""
        factor = 4 * 2**stage
        return tuple(s // factor for s in self.volume_size)

    def stage_tokens(self, stage: int) -> int:
        d, h, w = self.stage_grid(stage)
        return d * h * w

    @property
    def num_visual_tokens(self) -> int:
        """Tokens out of the projector: the last mixer layer of both streams."""
        return self.low_output_tokens[-1] + self.high_output_tokens[-1]

    @property
    def num_slice_tokens(self) -> int:
        return self.stage_grid(self.slice_stage)[0] if self.use_slice_tokens else 0


class Med3DQwenConfig(PreTrainedConfig):
    r"""Configuration of [`Med3DQwenForConditionalGeneration`].

    Args:
        text_config (`dict` or `Qwen2Config`, *optional*): the decoder (any Qwen2 config).
        vision_config (`dict` or `Med3DQwenVisionConfig`, *optional*): encoder, projector and slice tokens.
        image_token_id (`int`, *optional*, defaults to 151655): `<|image_pad|>`, one per visual token.
        slice_token_id (`int`, *optional*, defaults to 151654): `<|vision_pad|>`, one per slice token.
        vision_start_token_id, vision_end_token_id (`int`, *optional*): `<|vision_start|>` / `<|vision_end|>`.
        im_start_token_id, im_end_token_id (`int`, *optional*, defaults to 151644 and 151645): ChatML's
            `<|im_start|>` / `<|im_end|>`, which delimit the chat turns (the fusion window and the closed head).
        use_ssa (`bool`, *optional*, defaults to `True`): slice self-attention (eq. 2) after the first `ssa_layers`
            decoder blocks.
        ssa_layers (`int`, *optional*, defaults to 2): the paper's k.
        use_mssa (`bool`, *optional*, defaults to `True`): multi-head slice self-attention (eqs. 3-4) after block k.
        mssa_heads (`int`, *optional*, defaults to 4): heads of the MSSA.
        max_slices (`int`, *optional*, defaults to 64): largest slice distance the MSSA bias covers.
        fusion_text_scope (`str`, *optional*, defaults to `"user_turn"`): the text T that SSA/MSSA fuse with the
            slice tokens (docs/fusion.md): `"user_turn"` = the text of the chat turn that holds the volume (the
            question; no system prompt, chat markup, vision markers or other turns), `"prompt"` = every token
            before the end of that turn except the image block (system prompt and earlier turns included).
        closed_label_names (`list[str]`, *optional*, defaults to `["no", "yes", "A", "B", "C", "D"]`): the
            closed-answer label vocabulary; the closed head has one output per name (an empty list: no head). The
            forward's `closed_labels` index into it and `closed_label_mask` picks each row's allowed subset.
        train_projector (`bool`, *optional*, defaults to `False`): leave the projector trainable at construction
            (the alignment stage); otherwise it is frozen, as after alignment (docs/design.md, "Training recipe").
        prompt_encoding (`str`, *optional*, defaults to `"burn_in"`): how the contour reaches the encoder; sets
            `vision_config.in_channels`.
        tie_word_embeddings (`bool`, *optional*): defaults to the text config's (Qwen2.5 <= 3B are tied).
    """

    model_type = "med3d_qwen"
    sub_configs = {"text_config": AutoConfig, "vision_config": Med3DQwenVisionConfig}

    def __init__(
        self,
        text_config: dict | Qwen2Config | None = None,
        vision_config: dict | Med3DQwenVisionConfig | None = None,
        image_token_id: int = 151655,
        slice_token_id: int = 151654,
        vision_start_token_id: int = 151652,
        vision_end_token_id: int = 151653,
        im_start_token_id: int = 151644,
        im_end_token_id: int = 151645,
        use_ssa: bool = True,
        ssa_layers: int = 2,
        use_mssa: bool = True,
        mssa_heads: int = 4,
        max_slices: int = 64,
        fusion_text_scope: str = "user_turn",
        closed_label_names: list[str] | tuple[str, ...] | None = None,
        train_projector: bool = False,
        prompt_encoding: str = "burn_in",
        tie_word_embeddings: bool | None = None,
        **kwargs,
    ):
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            text_config = AutoConfig.for_model(text_config.pop("model_type", "qwen2"), **text_config)
        elif text_config is None:
            text_config = Qwen2Config(**{**_QWEN2_5_COMMON, **QWEN2_5_PRESETS["qwen2.5-0.5b"]})
        if isinstance(vision_config, dict):
            vision_config = Med3DQwenVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        elif vision_config is None:
            vision_config = Med3DQwenVisionConfig()
        if prompt_encoding not in PROMPT_ENCODINGS:
            raise ValueError(f"prompt_encoding must be one of {PROMPT_ENCODINGS}, got {prompt_encoding!r}")
        expected_channels = {"burn_in": 1, "channel": 2, "rgb": 3}[prompt_encoding]
        if vision_config.in_channels != expected_channels:
            vision_config.in_channels = expected_channels
        layers = text_config.num_hidden_layers
        if (use_ssa or use_mssa) and not 0 <= ssa_layers <= layers:
            raise ValueError(f"ssa_layers must be in 0..{layers} (the decoder's layers), got {ssa_layers}")
        if use_mssa and text_config.hidden_size % mssa_heads:
            raise ValueError(f"hidden_size {text_config.hidden_size} is not divisible by mssa_heads {mssa_heads}")
        if (use_ssa or use_mssa) and not vision_config.use_slice_tokens:
            raise ValueError("use_ssa / use_mssa need slice tokens (vision_config.use_slice_tokens=True)")
        if fusion_text_scope not in FUSION_TEXT_SCOPES:
            raise ValueError(f"fusion_text_scope must be one of {FUSION_TEXT_SCOPES}, got {fusion_text_scope!r}")
        closed_label_names = _closed_label_names(closed_label_names, kwargs.pop("num_closed_classes", None))
        self.text_config = text_config
        self.vision_config = vision_config
        self.image_token_id = image_token_id
        self.slice_token_id = slice_token_id
        self.vision_start_token_id = vision_start_token_id
        self.vision_end_token_id = vision_end_token_id
        self.im_start_token_id = im_start_token_id
        self.im_end_token_id = im_end_token_id
        self.use_ssa = use_ssa
        self.ssa_layers = ssa_layers
        self.use_mssa = use_mssa
        self.mssa_heads = mssa_heads
        self.max_slices = max_slices
        self.fusion_text_scope = fusion_text_scope
        self.closed_label_names = closed_label_names
        self.train_projector = train_projector
        self.prompt_encoding = prompt_encoding
        self.tie_word_embeddings = (
            text_config.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings
        )
        super().__init__(**kwargs)

    @property
    def num_closed_labels(self) -> int:
        """Outputs of the closed head (0: no head)."""
        return len(self.closed_label_names)

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens per volume: the visual tokens, then the slice tokens."""
        return self.vision_config.num_visual_tokens + self.vision_config.num_slice_tokens

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> Med3DQwenConfig:
        """A config with the real architecture of a Qwen2.5 decoder: ``qwen2.5-0.5b``, ``qwen2.5-1.5b``,
        ``qwen2.5-3b``, ``qwen2.5-7b`` (also ``0.5b`` ... ``7b``) or ``tiny``. No download is needed.

        Keyword arguments override the composite config's fields (e.g. ``use_mssa=False``); pass
        ``text_overrides={...}`` / ``vision_overrides={...}`` to change the sub-configs.
        """
        key = name.lower()
        if not key.startswith("qwen2.5-") and key != "tiny":
            key = f"qwen2.5-{key}"
        if key not in QWEN2_5_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(QWEN2_5_PRESETS)}")
        text = {**_QWEN2_5_COMMON, **QWEN2_5_PRESETS[key], **kwargs.pop("text_overrides", {})}
        vision = dict(kwargs.pop("vision_overrides", {}))
        return cls(text_config=Qwen2Config(**text), vision_config=Med3DQwenVisionConfig(**vision), **kwargs)
