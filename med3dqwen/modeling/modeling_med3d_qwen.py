"""Med3DQwen: a frozen DCFormer 3D encoder and MLP-Mixer projector feeding a Qwen2 decoder, with slice tokens
fused into the decoder by slice self-attention (SSA, eq. 2) and multi-head slice self-attention (MSSA, eqs. 3-4),
and a closed-answer head.

LLaVA layout (what TRL's SFTTrainer expects): ``Med3DQwenForConditionalGeneration.model`` is the backbone
(:class:`Med3DQwenModel`, returns ``last_hidden_state``) and ``lm_head`` sits at the top.

Self-contained for Hub remote code: third-party imports and single-dot sibling imports only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, is_flash_attn_2_available, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .configuration_med3d_qwen import Med3DQwenConfig
from .dcformer_med3d_qwen import DCFormerConvBlock, Med3DQwenVisionEncoder, PromptStem, flatten_stage_tokens
from .fusion_med3d_qwen import (
    Med3DQwenClosedHead,
    Med3DQwenMultiHeadSliceAttention,
    Med3DQwenSliceSelfAttention,
    Med3DQwenSliceSelfAttentionStack,
    Med3DQwenSliceTokenizer,
    SliceFusionGroups,
    apply_grouped_slice_fusion,
    slice_fusion_windows,
)
from .projector_med3d_qwen import Med3DQwenMultiModalProjector


logger = logging.get_logger(__name__)

__all__ = [
    "default_attn_implementation",
    "Med3DQwenCausalLMOutputWithPast",
    "Med3DQwenForConditionalGeneration",
    "Med3DQwenModel",
    "Med3DQwenModelOutputWithPast",
    "Med3DQwenPreTrainedModel",
]

# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Med3DQwenModelOutputWithPast(MultimodalBaseModelOutputWithPast):
    """Backbone output: transformers' multimodal output (`last_hidden_state`, `cache`, `hidden_states`,
    `attentions`, `image_outputs` from :meth:`Med3DQwenModel.get_image_features`) and where the closed head reads.

    Args:
        prompt_positions (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            index of each sample's last prompt token (where the closed head reads).
    """

    prompt_positions: torch.LongTensor | None = None

    @property
    def image_hidden_states(self) -> torch.FloatTensor | None:
        """`(num_volumes, num_image_tokens, hidden_size)`: visual then slice tokens, as spliced into the sequence."""
        return None if self.image_outputs is None else self.image_outputs.pooler_output


@dataclass
class Med3DQwenCausalLMOutputWithPast(MultimodalCausalLMOutputWithPast):
    """Output of :class:`Med3DQwenForConditionalGeneration`: transformers' multimodal causal-LM output plus the
    closed head.

    Args:
        loss (`torch.FloatTensor`, *optional*): what a trainer minimises: `lm_loss + closed_loss`, of those given
            (`labels` and/or `closed_labels`). Trainer and TRL read only `loss`, so the closed head trains only if
            its loss is in it.
        closed_logits (`torch.FloatTensor` of shape `(batch_size, num_closed_labels)`, *optional*):
            the closed-answer head on the last prompt token; `-inf` outside each row's allowed labels when a
            `closed_label_mask` is given.
        lm_loss (`torch.FloatTensor`, *optional*): next-token loss, when `labels` are given.
        closed_loss (`torch.FloatTensor`, *optional*): cross-entropy of the closed head over each row's allowed
            labels, mean over the rows with a closed label, when `closed_labels` are given.
    """

    closed_logits: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    closed_loss: torch.FloatTensor | None = None

    @property
    def image_hidden_states(self) -> torch.FloatTensor | None:
        """`(num_volumes, num_image_tokens, hidden_size)`: visual then slice tokens, as spliced into the sequence."""
        return None if self.image_outputs is None else self.image_outputs.pooler_output


# Keyword arguments the forwards take besides their named ones: what transformers passes to every model
# (`output_hidden_states`, `num_items_in_batch`, flash-attention varlen arguments ...). Anything else is refused.
_MODEL_KWARGS = frozenset(TransformersKwargs.__annotations__)
_LOSS_KWARGS = frozenset({"shift_labels"})


def _refuse_unknown_kwargs(where: str, kwargs: dict, allowed: frozenset[str]) -> None:
    """Raise the TypeError Python raises for an unexpected keyword (model inputs only; no silent drop)."""
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(
            f"{where}() got an unexpected keyword argument {unknown[0]!r}"
            + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
            + "; pass only model inputs (the processor's extras are not model inputs)"
        )


# ---------------------------------------------------------------------------------------------------------------
# Slice fusion inside the decoder
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _FusionContext:
    """What the decoder layers fuse, passed to them as a keyword: the groups (slice tokens and their text window T,
    one group per chat turn that holds slice tokens) and, per decoder block, the fusion modules to run after it.

    The modules are looked up through the owning model when the forward starts (`Med3DQwenModel.fusion_modules`),
    so whatever sits at `model.slice_self_attention` / `model.multi_head_slice_attention` at that moment runs:
    PEFT's `ModulesToSaveWrapper` (its active trainable copy) while an adapter is on, the trained copy after
    `merge_and_unload`.
    """

    groups: SliceFusionGroups
    # block index -> [(module, keyword arguments)] to run after that block; -1: before block 0
    modules: dict[int, list[tuple[nn.Module, dict]]]


class _FusedLayerForward:
    """Replaces a decoder layer's ``forward``: runs the layer, then the slice fusion modules of this block.

    The context travels as the ``med3d_fusion`` keyword through ``Qwen2Model.forward`` (which passes extra keywords
    to its layers) and is popped here so that attention never sees it. Travelling with the call (not as model
    state) keeps gradient checkpointing exact: the recomputation in backward gets the same context. The wrapper
    holds no module, only the block index, so PEFT's copies of the fusion modules are the ones that run; parameters
    stay where they are, so Qwen2 checkpoints load with their own key names.
    """

    def __init__(self, forward, layer_index: int):
        self.forward = forward
        self.layer_index = layer_index

    def __call__(self, *args, med3d_fusion: _FusionContext | None = None, **kwargs):
        if med3d_fusion is not None and self.layer_index == 0 and -1 in med3d_fusion.modules:
            # fusion "after block 0" of the paper (k = 0): on the embeddings, before the first block
            if args:
                args = (self._fuse(args[0], med3d_fusion, med3d_fusion.modules[-1]), *args[1:])
            else:
                kwargs["hidden_states"] = self._fuse(kwargs["hidden_states"], med3d_fusion, med3d_fusion.modules[-1])
        hidden_states = self.forward(*args, **kwargs)
        modules = med3d_fusion.modules.get(self.layer_index, ()) if med3d_fusion is not None else ()
        if not modules:
            return hidden_states
        is_tuple = isinstance(hidden_states, tuple)
        hidden = self._fuse(hidden_states[0] if is_tuple else hidden_states, med3d_fusion, modules)
        return (hidden, *hidden_states[1:]) if is_tuple else hidden

    @staticmethod
    def _fuse(hidden: torch.Tensor, context: _FusionContext, modules: list[tuple[nn.Module, dict]]) -> torch.Tensor:
        for module, module_kwargs in modules:
            hidden = apply_grouped_slice_fusion(hidden, context.groups, module, **module_kwargs)
        return hidden


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def default_attn_implementation() -> str:
    """FlashAttention-2 where it is installed and a GPU is present, else PyTorch SDPA (with a logged note)."""
    if is_flash_attn_2_available() and torch.cuda.is_available():
        return "flash_attention_2"
    logger.info("flash-attn is not available here; using PyTorch scaled_dot_product_attention ('sdpa')")
    return "sdpa"


class Med3DQwenPreTrainedModel(PreTrainedModel):
    config_class = Med3DQwenConfig
    config: Med3DQwenConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    _no_split_modules = ["Qwen2DecoderLayer", "Med3DQwenVisionEncoder"]
    _skip_keys_device_placement = "cache"

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As transformers' ``from_pretrained``; with no attention chosen (neither ``attn_implementation`` nor a
        ``config`` that names one, as the Auto classes pass it) it defaults to :func:`default_attn_implementation`.
        """
        config = kwargs.get("config")
        chosen = isinstance(config, PreTrainedConfig) and config._attn_implementation is not None
        if "attn_implementation" not in kwargs and not chosen:
            kwargs["attn_implementation"] = default_attn_implementation()
        loaded = super().from_pretrained(*args, **kwargs)
        # Loading puts new Parameters (requires_grad=True) in place: freeze the frozen parts again.
        for module in (loaded[0] if isinstance(loaded, tuple) else loaded).modules():
            if isinstance(module, Med3DQwenModel):
                module.freeze_pretrained_parts()
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        # register_for_auto_class records one class per model; name all three so every Auto class finds its own.
        if type(self)._auto_class is not None:
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoConfig": "configuration_med3d_qwen.Med3DQwenConfig",
                "AutoModel": "modeling_med3d_qwen.Med3DQwenModel",
                "AutoModelForImageTextToText": "modeling_med3d_qwen.Med3DQwenForConditionalGeneration",
            }
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # Modules whose start values make the wrapped decoder unchanged at initialisation.
        if isinstance(module, Med3DQwenSliceSelfAttention):
            init.constant_(module.gate, module.gate_init)
        elif isinstance(module, Med3DQwenMultiHeadSliceAttention):
            init.zeros_(module.w_o.weight)
            if module.w_o.bias is not None:
                init.zeros_(module.w_o.bias)
            init.normal_(module.relative_bias, mean=0.0, std=module.init_std)
        elif isinstance(module, PromptStem):
            for kernel in (module.c1, module.c2, module.c3):
                init.zeros_(kernel)
        elif isinstance(module, DCFormerConvBlock):
            init.constant_(module.scale, module.layer_scale_init)


class Med3DQwenModel(Med3DQwenPreTrainedModel):
    """Backbone: vision encoder → projector (+ slice tokens) spliced into the Qwen2 decoder's embeddings."""

    def __init__(self, config: Med3DQwenConfig):
        super().__init__(config)
        vision, hidden = config.vision_config, config.text_config.hidden_size
        # One pretrained image channel; extra channels (the `channel` prompt encoding) go through a zero-initialised
        # prompt stem, the only trainable part of the otherwise frozen encoder.
        self.vision_encoder = Med3DQwenVisionEncoder(
            in_channels=1,
            channels=tuple(vision.channels),
            depths=tuple(vision.depths),
            kernel_sizes=tuple(vision.kernel_sizes),
            prompt_channels=vision.in_channels - 1,
        )
        self.multi_modal_projector = Med3DQwenMultiModalProjector(
            hidden_size=hidden,
            low_tokens=vision.stage_tokens(vision.low_stage),
            low_dim=vision.channels[vision.low_stage],
            high_tokens=vision.stage_tokens(vision.high_stage),
            high_dim=vision.channels[vision.high_stage],
            low_output=tuple(vision.low_output_tokens),
            high_output=tuple(vision.high_output_tokens),
        )
        self.slice_tokenizer = (
            Med3DQwenSliceTokenizer(vision.channels[vision.slice_stage], hidden) if vision.use_slice_tokens else None
        )
        # A named stack, not an nn.ModuleList: PEFT's modules_to_save refuses ModuleLists.
        self.slice_self_attention = (
            Med3DQwenSliceSelfAttentionStack(hidden, config.ssa_layers) if config.use_ssa else None
        )
        self.multi_head_slice_attention = (
            Med3DQwenMultiHeadSliceAttention(hidden, num_heads=config.mssa_heads, max_slices=config.max_slices)
            if config.use_mssa
            else None
        )
        self.language_model = AutoModel.from_config(config.text_config)
        self._install_fusion()
        self.post_init()
        self.freeze_pretrained_parts()

    def freeze_pretrained_parts(self) -> None:
        """Freeze the vision encoder (see :meth:`freeze_vision_encoder`) and the projector, which is trained only
        in the alignment stage (`config.train_projector`; docs/design.md, "Training recipe")."""
        self.freeze_vision_encoder()
        self.multi_modal_projector.requires_grad_(self.config.train_projector)

    def freeze_vision_encoder(self) -> None:
        """Freeze the encoder (except its prompt stem) and keep it in eval mode: its BatchNorm statistics and
        weights are the pretrained ones (Med3DVLM trained its "frozen" tower by mistake; we do not)."""
        self.vision_encoder.requires_grad_(False)
        if self.vision_encoder.prompt_stem is not None:
            self.vision_encoder.prompt_stem.requires_grad_(True)
        self.vision_encoder.eval()

    def _install_fusion(self) -> None:
        """Let every decoder block run the fusion modules the forward hands it (see :meth:`fusion_modules`)."""
        for i, layer in enumerate(self.language_model.layers):
            layer.forward = _FusedLayerForward(layer.forward, i)

    def fusion_modules(self) -> dict[int, list[tuple[nn.Module, dict]]]:
        """SSA after each of the first k decoder blocks and MSSA after block k (docs/fusion.md); with k = 0 MSSA
        runs on the embeddings, before the first block.

        Looked up now, through this model's attributes, so PEFT's wrappers (or, after ``merge_and_unload``, the
        trained copies) are what runs.

        Returns:
            block index (0-based; -1 = before block 0) -> [(module, keyword arguments for :func:`apply_slice_fusion`)]
            to run after that block, in order of application.
        """
        per_layer: dict[int, list[tuple[nn.Module, dict]]] = {}
        if self.slice_self_attention is not None:
            for i in range(self.config.ssa_layers):
                per_layer.setdefault(i, []).append((self.slice_self_attention, {"layer": i}))
        if self.multi_head_slice_attention is not None:
            per_layer.setdefault(self.config.ssa_layers - 1, []).append((self.multi_head_slice_attention, {}))
        return per_layer

    def _special_token_mask(
        self, token_id: int | None, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, L) True where the token is `token_id`: by id, or (no ids) where the embedding equals its row."""
        if input_ids is not None:
            return input_ids == token_id if token_id is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        if token_id is None or not 0 <= token_id < self.config.text_config.vocab_size:
            return torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        row = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))  # (H,)
        return (inputs_embeds == row.to(inputs_embeds.dtype)).all(dim=-1)  # (B, L)

    def fusion_context(
        self,
        image_mask: torch.Tensor,
        slice_mask: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> _FusionContext | None:
        """The fusion groups (slice tokens + text window T per chat turn) and modules for one prompt pass.

        Args:
            image_mask: (B, L) bool, visual placeholder tokens.
            slice_mask: (B, L) bool, slice placeholder tokens.
            attention_mask: (B, L), 1 for real tokens.
            input_ids: (B, L) token ids; without them the chat and vision markers are found in `inputs_embeds`
                (the embeddings as given, before the image features are spliced in).
            inputs_embeds: (B, L, H), needed when `input_ids` is None.

        Returns:
            None when the model has no fusion module or no sample holds slice tokens.
        """
        modules = self.fusion_modules()
        if not modules:
            return None
        if input_ids is None and inputs_embeds is None:
            raise ValueError("fusion_context needs input_ids or inputs_embeds to find the chat markers")

        def mask_of(name: str) -> torch.Tensor:
            return self._special_token_mask(getattr(self.config, name, None), input_ids, inputs_embeds)

        markers = mask_of("vision_start_token_id") | mask_of("vision_end_token_id")
        groups = slice_fusion_windows(
            slice_mask,
            image_mask | markers,
            mask_of("im_start_token_id"),
            mask_of("im_end_token_id"),
            attention_mask=attention_mask,
            scope=self.config.fusion_text_scope,
        )
        if groups.sample_index.numel() == 0:
            return None
        return _FusionContext(groups=groups, modules=modules)

    # The encoder is frozen: BatchNorm statistics must never move, whatever model.train() says.
    def train(self, mode: bool = True):
        super().train(mode)
        self.vision_encoder.eval()
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> tuple | BaseModelOutputWithPooling:
        """Encode volumes into the tokens that replace the image placeholders.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_volumes, in_channels, D, H, W)`): windowed volumes in
                [0, 1] with the prompt drawn in (see the processor).
            output_hidden_states (`bool`, *optional*): also return every encoder stage (defaults to the config's).
            output_attentions (`bool`, *optional*): the encoder and the projector are convolution and MLP-Mixer
                layers, so there are no attention maps: `attentions` is then an empty tuple.
            return_dict (`bool`, *optional*): `False` gives the fields as a tuple (None fields left out).

        Returns:
            `BaseModelOutputWithPooling` with
            - `pooler_output` `(num_volumes, num_visual_tokens + num_slice_tokens, hidden_size)`: the projector's
              visual tokens, then one token per encoder slice of `slice_stage` (what the placeholders receive);
            - `last_hidden_state` `(num_volumes, N_4, C_4)`: the last encoder stage as depth-major tokens;
            - `hidden_states` (on request): the 5 encoder stages (stem + 4), each `(num_volumes, N_s, C_s)`;
            - `attentions` (on request): `()`.
        """
        vision = self.config.vision_config
        if output_hidden_states is None:
            output_hidden_states = bool(getattr(self.config, "output_hidden_states", False))
        if output_attentions is None:
            output_attentions = bool(getattr(self.config, "output_attentions", False))
        if pixel_values.dim() != 5 or tuple(pixel_values.shape[1:]) != (vision.in_channels, *vision.volume_size):
            raise ValueError(
                f"pixel_values must be (num_volumes, {vision.in_channels}, {', '.join(map(str, vision.volume_size))}) "
                f"for this model's projector, got {tuple(pixel_values.shape)}"
            )
        encoder_param = next(self.vision_encoder.parameters())
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be floating point in [0, 1], got dtype {pixel_values.dtype}")
        if pixel_values.device != encoder_param.device:
            raise ValueError(
                f"pixel_values are on {pixel_values.device} but the vision encoder is on {encoder_param.device}"
            )
        stages = self.vision_encoder(pixel_values.to(encoder_param.dtype))  # 5 maps (B, C_s, D_s, H_s, W_s)
        projector_dtype = next(self.multi_modal_projector.parameters()).dtype
        low = flatten_stage_tokens(stages[vision.low_stage]).to(projector_dtype)  # (B, N_low, C_low), depth-major
        high = flatten_stage_tokens(stages[vision.high_stage]).to(projector_dtype)
        features = [self.multi_modal_projector(low, high)]  # (B, 256, H)
        if self.slice_tokenizer is not None:
            stage = stages[vision.slice_stage].to(next(self.slice_tokenizer.parameters()).dtype)
            features.append(self.slice_tokenizer(stage).to(features[0].dtype))  # (B, N_s, H)
        return BaseModelOutputWithPooling(
            last_hidden_state=flatten_stage_tokens(stages[-1]),  # (B, N_4, C_4)
            pooler_output=torch.cat(features, dim=1),  # (B, N_visual + N_slices, H)
            hidden_states=tuple(flatten_stage_tokens(s) for s in stages) if output_hidden_states else None,
            attentions=() if output_attentions else None,
        )

    def special_token_ids(self, inputs_embeds: torch.Tensor) -> torch.LongTensor:
        """Recover the special tokens from embeddings (when `inputs_embeds` come instead of `input_ids`).

        As LLaVA's ``get_placeholder_mask``: a position holds a special token where its embedding equals that
        token's row of the embedding table. The special tokens are the config's ``*_token_id`` fields (image and
        slice placeholders, vision markers, chat markers), which is all the placeholder and prompt masks read.

        Args:
            inputs_embeds: `(B, L, H)` input embeddings.

        Returns:
            `(B, L)` the special token id at each such position, -1 elsewhere.
        """
        table = self.get_input_embeddings()
        ids = sorted(
            {
                value
                for key, value in vars(self.config).items()
                if key.endswith("_token_id") and isinstance(value, int) and 0 <= value < table.num_embeddings
            }
        )  # ids outside the vocabulary cannot be in the input
        found = torch.full(inputs_embeds.shape[:2], -1, dtype=torch.long, device=inputs_embeds.device)
        for token_id in ids:
            token = table(torch.tensor(token_id, device=inputs_embeds.device)).to(inputs_embeds.dtype)  # (H,)
            found = found.masked_fill((inputs_embeds == token).all(-1), token_id)
        return found

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) masks of the visual and slice placeholder tokens, checked against the features to splice.

        Found from `input_ids`, or from `inputs_embeds` when no ids are given (see :meth:`special_token_ids`).
        """
        if input_ids is None:
            input_ids = self.special_token_ids(inputs_embeds)
        vision = self.config.vision_config
        image_mask = input_ids == self.config.image_token_id
        slice_mask = input_ids == self.config.slice_token_id
        num_volumes = image_features.shape[0]
        expected = (num_volumes * vision.num_visual_tokens, num_volumes * vision.num_slice_tokens)
        found = (int(image_mask.sum()), int(slice_mask.sum()))
        if found != expected:
            raise ValueError(
                f"Image features and image tokens do not match: the text holds {found[0]} image tokens and "
                f"{found[1]} slice tokens, the {num_volumes} volume(s) give {expected[0]} visual and {expected[1]} "
                "slice features. Let the processor expand the image placeholder."
            )
        return image_mask, slice_mask

    def prompt_mask(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, L) True for attended tokens up to the end of the prompt ("<|im_start|>assistant\\n").

        Tokens after the last ``<|im_start|>`` + 2 are the answer (teacher-forced or generated): they must not
        reach the slice tokens, which sit earlier in the sequence. Without a chat template every token counts.
        """
        batch, length = input_ids.shape
        attended = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        is_start = input_ids == self.config.im_start_token_id
        starts = torch.where(is_start, positions, torch.full_like(positions, -1)).amax(dim=1)
        end = torch.where(starts >= 0, starts + 2, torch.full_like(starts, length - 1))  # (B,)
        return attended & (positions <= end[:, None])

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | Med3DQwenModelOutputWithPast:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(num_volumes, in_channels, D, H, W)`, *optional*):
            prompted volumes, one per image placeholder block. Without them, placeholder tokens are ordinary
            tokens (as in LLaVA): no splice and no slice fusion.
        inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
            instead of `input_ids`; the placeholders are then found from the embeddings.
        kwargs: what transformers passes to its models (`output_hidden_states`, `output_attentions`,
            `num_items_in_batch`, ...); any other keyword is a TypeError.
        """
        _refuse_unknown_kwargs(f"{type(self).__name__}.forward", kwargs, _MODEL_KWARGS)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        # Token ids for the masks; from embeddings, only the special tokens can be recovered (all that is needed).
        ids = input_ids if input_ids is not None else self.special_token_ids(inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_outputs = None
        fusion = None
        padding = _padding_mask(attention_mask, ids.shape[1])  # (B, L) for our masks; the decoder gets the original
        prompt = self.prompt_mask(ids, padding)
        if pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values, return_dict=True)
            image_features = image_outputs.pooler_output.to(inputs_embeds.device, inputs_embeds.dtype)
            image_mask, slice_mask = self.get_placeholder_mask(ids, inputs_embeds, image_features)
            num_visual = self.config.vision_config.num_visual_tokens
            visual, slices = image_features[:, :num_visual], image_features[:, num_visual:]
            # Splice by token id (never by offset): each placeholder gets its feature, the text stays untouched.
            inputs_embeds = inputs_embeds.masked_scatter(image_mask[..., None], visual.flatten(0, 1))
            if slices.shape[1]:
                inputs_embeds = inputs_embeds.masked_scatter(slice_mask[..., None], slices.flatten(0, 1))
            fusion = self.fusion_context(image_mask, slice_mask, padding, input_ids=ids)

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            med3d_fusion=fusion,
            **kwargs,
        )
        return Med3DQwenModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=image_outputs,
            prompt_positions=self.closed_positions(prompt),
        )

    @staticmethod
    def closed_positions(prompt_mask: torch.Tensor) -> torch.LongTensor:
        """(B,) index of the last prompt token of each sample."""
        positions = torch.arange(prompt_mask.shape[1], device=prompt_mask.device)
        return (positions[None, :] * prompt_mask.long()).amax(dim=1)


def _padding_mask(attention_mask, length: int) -> torch.Tensor | None:
    """The (B, L) padding mask (True for real tokens) of whatever attention mask the decoder is given.

    Usually that is the (B, L) mask itself. With a static (compilable) cache, generation builds the decoder's 4D
    masks up front and passes them as a tensor (B, 1, Q, K) or a dict by attention type; a query then attends its
    own key position exactly when it is a real token, so the diagonal gives the padding mask (as Qwen2.5-VL reads
    it). In the prompt pass, the only one with an image block, queries and keys start at position 0.
    """
    if isinstance(attention_mask, Mapping):
        masks = [attention_mask.get("full_attention"), *attention_mask.values()]
        attention_mask = next((mask for mask in masks if mask is not None), None)
    if not isinstance(attention_mask, torch.Tensor):  # None, or a mask we cannot read (flex attention's BlockMask):
        return None  # every token counts as real; the decoder still applies the mask it was given
    if attention_mask.dim() == 2:
        return attention_mask
    if attention_mask.dim() != 4:
        shape = tuple(attention_mask.shape)
        raise ValueError(f"attention_mask must be (B, L) or a 4D decoder mask, got shape {shape}")
    own = torch.diagonal(attention_mask[:, 0], dim1=1, dim2=2)[:, :length]  # (B, Q) -> (B, L)
    return own if own.dtype == torch.bool else own == 0  # additive float masks: 0 attends, a large negative not


class Med3DQwenForConditionalGeneration(Med3DQwenPreTrainedModel, GenerationMixin):
    """Med3DQwen with a language-modelling head and the closed-answer head."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: Med3DQwenConfig):
        super().__init__(config)
        hidden = config.text_config.hidden_size
        self.model = Med3DQwenModel(config)
        self.lm_head = nn.Linear(hidden, config.text_config.vocab_size, bias=False)
        self.closed_head = Med3DQwenClosedHead(hidden, config.num_closed_labels) if config.num_closed_labels else None
        self.post_init()

    @classmethod
    def from_qwen2_pretrained(
        cls, qwen_name_or_path: str, vision_config: dict | None = None, **kwargs
    ) -> Med3DQwenForConditionalGeneration:
        """Build Med3DQwen around a pretrained Qwen2 / Qwen2.5 causal LM (local folder or Hub id).

        The decoder's weights load through a key mapping (``model.*`` → ``model.language_model.*``; ``lm_head`` as
        is); the vision side, fusion and closed head are newly initialised (load encoder weights with
        ``convert_med3dvlm_checkpoint``). Config fields (``use_mssa=False`` ...) and loading options (``dtype``,
        ``attn_implementation``, ``device_map``) go in ``kwargs``.
        """
        from transformers import AutoConfig

        load_keys = {
            "dtype",
            "attn_implementation",
            "device_map",
            "revision",
            "cache_dir",
            "local_files_only",
            "token",
        }
        load_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in load_keys}
        text_config = AutoConfig.from_pretrained(
            qwen_name_or_path,
            **{k: v for k, v in load_kwargs.items() if k in ("revision", "cache_dir", "local_files_only", "token")},
        )
        config = Med3DQwenConfig(text_config=text_config, vision_config=vision_config, **kwargs)
        return cls.from_pretrained(
            qwen_name_or_path, config=config, key_mapping={r"^model\.": "model.language_model."}, **load_kwargs
        )

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> tuple | BaseModelOutputWithPooling:
        """See :meth:`Med3DQwenModel.get_image_features`."""
        return self.model.get_image_features(
            pixel_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=return_dict,
        )

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        closed_labels: torch.LongTensor | None = None,
        closed_label_mask: torch.BoolTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | Med3DQwenCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            next-token targets; -100 marks positions without loss (prompt, image tokens, padding).
        closed_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            index into `config.closed_label_names` of each row's closed answer; -100 for rows without one.
        closed_label_mask (`torch.BoolTensor` of shape `(batch_size, num_closed_labels)`, *optional*):
            the labels each row may take (a yes/no question: `no`, `yes`); the closed logits are `-inf` elsewhere,
            so softmax and loss run over the allowed labels only. Missing: every label is allowed. A row that
            allows nothing is no closed question: it is left unmasked and must have `closed_labels` -100.
        kwargs: what transformers passes to its models (`output_hidden_states`, `num_items_in_batch`, ...) and
            `shift_labels` for the loss; any other keyword is a TypeError.
        """
        _refuse_unknown_kwargs(f"{type(self).__name__}.forward", kwargs, _MODEL_KWARGS | _LOSS_KWARGS)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **{k: v for k, v in kwargs.items() if k not in _LOSS_KWARGS},
        )
        hidden_states = outputs.last_hidden_state
        # Only compute the logits that are needed (generation keeps the last position).
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        lm_loss = None
        if labels is not None:
            lm_loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )

        closed_logits = closed_loss = None
        if closed_labels is not None and self.closed_head is None:
            raise ValueError("closed_labels were given but this model has no closed head (closed_label_names=[])")
        # The head reads the last prompt token: on a prompt with its volume (prefill), or when asked for its loss.
        if self.closed_head is not None and (pixel_values is not None or closed_labels is not None):
            closed_logits = self.closed_head(hidden_states, positions=outputs.prompt_positions)  # (B, K)
            if closed_label_mask is not None:
                closed_logits = self._mask_closed_logits(closed_logits, closed_label_mask)
            if closed_labels is not None:
                closed_loss = self._closed_loss(closed_logits, closed_labels, closed_label_mask)
        return Med3DQwenCausalLMOutputWithPast(
            loss=self._total_loss(lm_loss, closed_loss, labels, kwargs),
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
            closed_logits=closed_logits,
            lm_loss=lm_loss,
            closed_loss=closed_loss,
        )

    @staticmethod
    def _total_loss(
        lm_loss: torch.Tensor | None, closed_loss: torch.Tensor | None, labels: torch.Tensor | None, kwargs: dict
    ) -> torch.Tensor | None:
        """`lm_loss + closed_loss` (those given): Trainer and TRL backpropagate `loss` only.

        Under gradient accumulation Trainer passes `num_items_in_batch` (the target tokens of all accumulated
        micro-batches) and no longer divides `loss` by the number of steps, since the LM loss is already a share of
        the whole. The closed loss, a mean over this micro-batch, is then weighted by the micro-batch's share of
        those tokens, so that over the accumulated batch it adds up to one mean too (weight 1 without
        accumulation).
        """
        if closed_loss is None:
            return lm_loss
        if lm_loss is None:
            return closed_loss
        num_items = kwargs.get("num_items_in_batch")
        if num_items is not None:
            targets = kwargs.get("shift_labels")
            targets = labels[..., 1:] if targets is None else targets
            share = (targets != -100).sum().to(closed_loss.device) / torch.as_tensor(num_items).to(closed_loss.device)
            closed_loss = closed_loss * share
        return lm_loss + closed_loss

    def _mask_closed_logits(self, closed_logits: torch.Tensor, closed_label_mask: torch.Tensor) -> torch.Tensor:
        """`-inf` outside each row's allowed labels; rows that allow nothing stay as they are."""
        if closed_label_mask.shape != closed_logits.shape or closed_label_mask.dtype != torch.bool:
            raise ValueError(
                f"closed_label_mask must be a bool tensor of shape (batch_size, num_closed_labels) = "
                f"{tuple(closed_logits.shape)}, got {closed_label_mask.dtype} {tuple(closed_label_mask.shape)}"
            )
        allowed = closed_label_mask.to(closed_logits.device)
        allowed = allowed | ~allowed.any(dim=1, keepdim=True)  # (B, K)
        return closed_logits.masked_fill(~allowed, float("-inf"))

    def _closed_loss(
        self, closed_logits: torch.Tensor, closed_labels: torch.Tensor, closed_label_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Cross-entropy over each row's allowed labels, mean over the rows with a closed label (0 if none)."""
        batch, num_labels = closed_logits.shape
        if closed_labels.shape != (batch,) or closed_labels.is_floating_point() or closed_labels.is_complex():
            raise ValueError(
                f"closed_labels must be an integer tensor of shape (batch_size,) = ({batch},), "
                f"got {closed_labels.dtype} {tuple(closed_labels.shape)}"
            )
        closed_labels = closed_labels.to(closed_logits.device).long()
        rows = closed_labels != -100
        bad = rows & ((closed_labels < 0) | (closed_labels >= num_labels))
        if bad.any():
            row = int(bad.nonzero()[0])
            raise ValueError(
                f"closed_labels[{row}] = {int(closed_labels[row])} is not an index into the {num_labels} "
                f"closed_label_names {self.config.closed_label_names} (or -100 for no closed answer)"
            )
        if closed_label_mask is not None:
            allowed = closed_label_mask.to(closed_logits.device)
            outside = rows & ~allowed.gather(1, closed_labels.clamp(min=0)[:, None])[:, 0]
            if outside.any():
                row = int(outside.nonzero()[0])
                raise ValueError(
                    f"closed_labels[{row}] = {int(closed_labels[row])} "
                    f"({self.config.closed_label_names[int(closed_labels[row])]!r}) is not among the labels "
                    f"closed_label_mask[{row}] allows"
                )
        if not rows.any():
            # No closed row in this batch: zero, still on the graph (masked -inf logits would make 0 * sum nan).
            return closed_logits.masked_fill(closed_logits.isinf(), 0.0).sum() * 0.0
        return F.cross_entropy(closed_logits[rows].float(), closed_labels[rows])
