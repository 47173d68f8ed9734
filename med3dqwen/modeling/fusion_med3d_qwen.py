"""Slice-text fusion for Med3DQwen: slice tokens, SSA (paper eq. 2), MSSA (eqs. 3-4) and the closed-ended head.

Self-contained on purpose (torch and the standard library only) so it can ship as Hub remote code.

Layout the model is expected to use (docs/fusion.md): the slice tokens V (N_s x H, from
`Med3DQwenSliceTokenizer`) are appended after the 256 visual tokens; `apply_slice_fusion` is called with the SSA
stack (layer i) after each of the first k decoder blocks and with the MSSA module after block k.

`text_mask` must mark the question tokens only, never answer tokens: both modules mix information bidirectionally
(SSA writes text into the slice tokens, which precede the text; MSSA lets every text token see every other one), so
answer tokens in `text_mask` would leak the target into earlier positions under teacher forcing.
`slice_fusion_windows` finds those tokens (the text T of eqs. 2-4) from the token layout.

Every module here may reach `apply_slice_fusion` wrapped by PEFT (`modules_to_save` puts a `ModulesToSaveWrapper`
around it, whose `original_module` is the module and whose call runs the active trainable copy): the wrapper is
called, never unwrapped for the computation.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn


class Med3DQwenSliceTokenizer(nn.Module):
    """per-depth average pooling of an encoder stage map, projected to the decoder width (one token per slice)."""

    def __init__(self, encoder_dim: int, hidden_size: int) -> None:
        """
        Args:
            encoder_dim: channels C of the encoder stage (DCFormer stage 2: 96).
            hidden_size: decoder hidden size H.
        """
        super().__init__()
        if encoder_dim <= 0:
            raise ValueError(f"encoder_dim must be positive, got {encoder_dim}.")
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}.")
        self.encoder_dim = encoder_dim
        self.hidden_size = hidden_size
        self.proj = nn.Linear(encoder_dim, hidden_size)

    def forward(self, stage_features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            stage_features: encoder stage map (B, C, D_s, H_s, W_s).

        Returns:
            slice tokens (B, D_s, hidden_size); stage 2 of a 128-slice volume gives D_s = 8.
        """
        if stage_features.ndim != 5 or stage_features.shape[1] != self.encoder_dim:
            raise ValueError(
                f"expected a (B, {self.encoder_dim}, D, H, W) stage map, got shape {tuple(stage_features.shape)}."
            )
        pooled = stage_features.mean(dim=(-2, -1))  # (B, C, D_s)
        pooled = pooled.transpose(1, 2).to(self.proj.weight.dtype)  # (B, D_s, C)
        return self.proj(pooled)  # (B, D_s, H)


class Med3DQwenSliceSelfAttention(nn.Module):
    """slice self-attention (paper eq. 2): V <- V + gate * (V T^T / sqrt(d)) T, with no softmax, as printed."""

    def __init__(self, hidden_size: int, gate_init: float = 0.0) -> None:
        """
        Args:
            hidden_size: decoder hidden size H (the d of eq. 2).
            gate_init: initial value of the learnable scalar gate. Our choice, not the paper's (it gives no scale):
                the un-normalised product grows like |V| |T|^2 L / sqrt(d), easily 1e3-1e6 on decoder hidden
                states, so it cannot be added as is. The default 0.0 makes the wrapped decoder exactly unchanged at
                initialisation; the gate still receives a gradient, so it opens during training.
        """
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}.")
        if not math.isfinite(gate_init):
            raise ValueError(f"gate_init must be finite, got {gate_init}.")
        self.hidden_size = hidden_size
        self.gate_init = float(gate_init)
        self.gate = nn.Parameter(torch.tensor(self.gate_init))

    def reset_parameters(self) -> None:
        """gate back to `gate_init` (call it from the model's `_init_weights`)."""
        nn.init.constant_(self.gate, self.gate_init)

    def attention(
        self, slices: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            slices: slice-token hidden states V (B, N_s, H).
            text: text-token hidden states T (B, L, H).
            text_mask: (B, L) bool, True for real text tokens; padding (and anything else False) contributes nothing.

        Returns:
            SSA(V, T) (B, N_s, H) in float32 (the raw product overflows float16 easily).
        """
        if slices.shape[-1] != self.hidden_size or text.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden size mismatch: module {self.hidden_size}, slices {slices.shape[-1]}, text {text.shape[-1]}."
            )
        text = text.float()
        if text_mask is not None:
            # where(), not a product, so masked positions holding inf/nan still contribute exactly zero
            text = torch.where(text_mask[..., None], text, torch.zeros_like(text))  # (B, L, H)
        scores = slices.float() @ text.transpose(1, 2) / math.sqrt(self.hidden_size)  # (B, N_s, L)
        return scores @ text  # (B, N_s, H)

    def forward(self, slices: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            slices: slice-token hidden states V (B, N_s, H).
            text: text-token hidden states T (B, L, H).
            text_mask: (B, L) bool, True for real text tokens.

        Returns:
            updated slice tokens V + gate * SSA(V, T), (B, N_s, H), in the dtype of `slices`.
        """
        update = self.gate.float() * self.attention(slices, text, text_mask)  # (B, N_s, H)
        return (slices.float() + update).to(slices.dtype)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, gate_init={self.gate_init}"


class Med3DQwenSliceSelfAttentionStack(nn.Module):
    """the SSA modules of the first k decoder blocks, one per block, called by block index.

    Not an `nn.ModuleList`, so PEFT's `modules_to_save` accepts the whole stack ("slice_self_attention") as well as
    one element ("slice_self_attention.0"); the children are named "0".."k-1" as a ModuleList's would be, so
    checkpoint keys read `slice_self_attention.<i>.gate` either way.
    """

    def __init__(self, hidden_size: int, num_layers: int, gate_init: float = 0.0) -> None:
        """
        Args:
            hidden_size: decoder hidden size H.
            num_layers: number of SSA modules (the paper's k); 0 gives an empty stack.
            gate_init: initial gate of every module (see `Med3DQwenSliceSelfAttention`).
        """
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"num_layers must be non-negative, got {num_layers}.")
        for i in range(num_layers):
            self.add_module(str(i), Med3DQwenSliceSelfAttention(hidden_size, gate_init))

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, index: int) -> nn.Module:
        if not 0 <= index < len(self):
            raise IndexError(f"SSA layer {index} out of range for a stack of {len(self)}.")
        return self._modules[str(index)]

    def __iter__(self):
        return iter(self._modules.values())

    def forward(
        self, slices: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None, *, layer: int
    ) -> torch.Tensor:
        """
        Args:
            slices, text, text_mask: as `Med3DQwenSliceSelfAttention.forward`.
            layer: index of the decoder block whose SSA module runs.

        Returns:
            updated slice tokens (B, N_s, H).
        """
        return self[layer](slices, text, text_mask)


class Med3DQwenMultiHeadSliceAttention(nn.Module):
    """multi-head slice self-attention (paper eqs. 3-4) over Z = [V; T] with a learnable slice-relative bias R.

    Two deliberate deviations from the equations as printed:
    - softmax: eq. 3 reads H_i = (Q_i K_i^T / sqrt(d_k) + R) V_i with no normaliser; unnormalised scores scale with
      the sequence length and the hidden-state norms and are unstable, so we use softmax(Q K^T / sqrt(d_k) + R) V,
      as in every relative-position transformer the paper cites as its analogue.
    - W_O starts at zero, so Z + MSSA(Z) = Z and the wrapped decoder is exactly unchanged at initialisation. At
      init only W_O gets a gradient (Q/K/V and R get zero gradients because the output is multiplied by W_O = 0);
      they start learning after the first update of W_O, as with LoRA's zero-initialised B.

    R[h, i, j] = b[h, (slice_i - slice_j) + max_slices - 1] for slice-slice pairs and 0 for any pair involving a
    text token. Projections are named w_q/w_k/w_v/w_o (not q_proj, ...) so LoRA target patterns for the decoder do
    not pick them up by accident. No biases in the projections (eq. 3 has none).
    """

    def __init__(self, hidden_size: int, num_heads: int = 4, max_slices: int = 64, init_std: float = 0.02) -> None:
        """
        Args:
            hidden_size: decoder hidden size H; must be divisible by num_heads.
            num_heads: number of heads h (paper: 4).
            max_slices: largest number of slice tokens; R covers relative distances -(max_slices-1)..max_slices-1.
            init_std: std of the normal initialisation of R.
        """
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}.")
        if num_heads <= 0 or hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by a positive num_heads ({num_heads}).")
        if max_slices <= 0:
            raise ValueError(f"max_slices must be positive, got {max_slices}.")
        if init_std < 0:
            raise ValueError(f"init_std must be non-negative, got {init_std}.")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.max_slices = max_slices
        self.init_std = init_std
        self.w_q = nn.Linear(hidden_size, hidden_size, bias=False)
        self.w_k = nn.Linear(hidden_size, hidden_size, bias=False)
        self.w_v = nn.Linear(hidden_size, hidden_size, bias=False)
        self.w_o = nn.Linear(hidden_size, hidden_size, bias=False)
        self.relative_bias = nn.Parameter(torch.empty(num_heads, 2 * max_slices - 1))  # b: (nh, 2*max_slices-1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """zero W_O and a small normal R (call it from the model's `_init_weights`, after the Linear children)."""
        nn.init.zeros_(self.w_o.weight)
        nn.init.normal_(self.relative_bias, mean=0.0, std=self.init_std)

    def slice_bias(self, slice_index: torch.Tensor) -> torch.Tensor:
        """
        Args:
            slice_index: (N_s,) integer slice positions of the slice tokens.

        Returns:
            R restricted to slice-slice pairs, (nh, N_s, N_s); depends only on index differences.
        """
        if slice_index.ndim != 1:
            raise ValueError(f"slice_index must be 1-D (N_s,), got shape {tuple(slice_index.shape)}.")
        relative = slice_index[:, None] - slice_index[None, :]  # (N_s, N_s)
        if relative.numel() and int(relative.abs().max()) > self.max_slices - 1:
            raise ValueError(
                f"slice distance {int(relative.abs().max())} exceeds max_slices - 1 = {self.max_slices - 1}."
            )
        return self.relative_bias[:, relative + self.max_slices - 1]  # (nh, N_s, N_s)

    def forward(
        self,
        slices: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        slice_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            slices: slice-token hidden states V (B, N_s, H).
            text: text-token hidden states T (B, L, H).
            text_mask: (B, L) bool key padding mask, True for real text tokens; padded tokens get no attention and
                keep their values.
            slice_index: (N_s,) slice positions for R; defaults to 0..N_s-1.

        Returns:
            (V', T') with Z' = Z + MSSA(Z) split back into slices (B, N_s, H) and text (B, L, H).
        """
        batch, num_slices, hidden = slices.shape
        if num_slices == 0:
            raise ValueError("MSSA needs at least one slice token.")
        if num_slices > self.max_slices:
            raise ValueError(f"got {num_slices} slice tokens, more than max_slices={self.max_slices}.")
        if hidden != self.hidden_size or text.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden size mismatch: module {self.hidden_size}, slices {hidden}, text {text.shape[-1]}."
            )
        text_len = text.shape[1]
        if text_mask is None:
            text_mask = torch.ones(batch, text_len, dtype=torch.bool, device=text.device)
        if slice_index is None:
            slice_index = torch.arange(num_slices, device=slices.device)

        z = torch.cat([slices, text], dim=1)  # (B, Lz, H), Lz = N_s + L
        valid = torch.cat([text_mask.new_ones(batch, num_slices), text_mask.bool()], dim=1)  # (B, Lz)
        length = z.shape[1]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, Lz, hs)

        q, k, v = heads(self.w_q(z)), heads(self.w_k(z)), heads(self.w_v(z))
        scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(self.head_dim)  # (B, nh, Lz, Lz)
        # R on the slice-slice block only; zero for every pair that involves a text token
        bias = nn.functional.pad(self.slice_bias(slice_index).float(), (0, text_len, 0, text_len))  # (nh, Lz, Lz)
        scores = scores + bias
        # slice keys are always valid, so no row is fully masked
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        attn = scores.softmax(dim=-1).to(v.dtype)
        out = (attn @ v).transpose(1, 2).reshape(batch, length, hidden)  # (B, Lz, H)
        out = self.w_o(out) * valid[..., None].to(out.dtype)  # padded positions keep their values
        z = z + out
        return z[:, :num_slices], z[:, num_slices:]

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, max_slices={self.max_slices}"


FUSION_MODULES = (Med3DQwenSliceSelfAttention, Med3DQwenSliceSelfAttentionStack, Med3DQwenMultiHeadSliceAttention)


def unwrap_fusion_module(module: nn.Module) -> nn.Module:
    """the fusion module inside any PEFT `ModulesToSaveWrapper` layers (their `original_module`)."""
    while not isinstance(module, FUSION_MODULES) and isinstance(getattr(module, "original_module", None), nn.Module):
        module = module.original_module
    return module


def apply_slice_fusion(
    hidden_states: torch.Tensor,
    slice_mask: torch.Tensor,
    text_mask: torch.Tensor,
    module: nn.Module,
    **module_kwargs,
) -> torch.Tensor:
    """gather V and T from the decoder sequence, apply SSA or MSSA, and scatter the results back (out of place).

    Args:
        hidden_states: decoder hidden states (B, L, H).
        slice_mask: (B, L) bool, True at slice-token positions; every sample must hold the same N_s >= 1.
        text_mask: (B, L) bool, True at the question tokens T (exclude padding, image and slice tokens, and answer
            tokens); counts may differ per sample (T is padded and masked).
        module: a `Med3DQwenSliceSelfAttention` or `Med3DQwenSliceSelfAttentionStack` (update V only) or a
            `Med3DQwenMultiHeadSliceAttention` (V and T), or PEFT's `ModulesToSaveWrapper` around one of them: the
            module is called as given, so a wrapper runs its active trainable copy.
        **module_kwargs: passed to the module (the stack needs `layer=`).

    Returns:
        new hidden states (B, L, H); positions outside slice_mask | text_mask are the input values.

    Raises:
        ValueError: masks of the wrong shape, overlapping masks, no slice tokens, or different slice counts.
        TypeError: `module` is no fusion module (wrapped or not).
    """
    batch, length, hidden = hidden_states.shape
    if slice_mask.shape != (batch, length) or text_mask.shape != (batch, length):
        raise ValueError(
            f"masks must be (B, L) = {(batch, length)}, got slice_mask {tuple(slice_mask.shape)} "
            f"and text_mask {tuple(text_mask.shape)}."
        )
    kind = unwrap_fusion_module(module)
    if not isinstance(kind, FUSION_MODULES):
        raise TypeError(f"module must be an SSA or MSSA module, got {type(module).__name__}.")
    slice_mask, text_mask = slice_mask.bool(), text_mask.bool()
    if (slice_mask & text_mask).any():
        raise ValueError("slice_mask and text_mask overlap; a position is either a slice or a text token.")
    slice_counts = slice_mask.sum(dim=1).tolist()
    if not slice_counts or min(slice_counts) == 0 or len(set(slice_counts)) != 1:
        raise ValueError(
            f"slice fusion needs the same positive number of slice tokens per sample, got {slice_counts}."
        )
    num_slices = slice_counts[0]

    # boolean indexing is row-major, so each sample's tokens come out in sequence order
    slices = hidden_states[slice_mask].view(batch, num_slices, hidden)  # (B, N_s, H)
    text_counts = text_mask.sum(dim=1)  # (B,)
    text_len = int(text_counts.max())
    text_valid = torch.arange(text_len, device=hidden_states.device)[None, :] < text_counts[:, None]  # (B, Lt)
    text = hidden_states.new_zeros(batch, text_len, hidden).masked_scatter(
        text_valid[..., None], hidden_states[text_mask]
    )  # (B, Lt, H), left-aligned per sample

    if not isinstance(kind, Med3DQwenMultiHeadSliceAttention):
        new_slices = module(slices, text, text_valid, **module_kwargs)
        return hidden_states.masked_scatter(slice_mask[..., None], new_slices.to(hidden_states.dtype))
    new_slices, new_text = module(slices, text, text_valid, **module_kwargs)
    out = hidden_states.masked_scatter(slice_mask[..., None], new_slices.to(hidden_states.dtype))
    return out.masked_scatter(text_mask[..., None], new_text[text_valid].to(hidden_states.dtype))


# ---------------------------------------------------------------------------------------------------------------
# The fusion window: which tokens are T
# ---------------------------------------------------------------------------------------------------------------

FUSION_TEXT_SCOPES = ("user_turn", "prompt")

#: ChatML turn header: <|im_start|>, the role word and "\n" (Qwen2.5's tokenizer gives "user\n" as 2 tokens).
CHAT_HEADER_TOKENS = 3


@dataclass
class SliceFusionGroups:
    """One fusion group per chat turn that holds slice tokens: its slices V and its text window T.

    Attributes:
        sample_index: (G,) batch row of each group.
        slice_mask: (G, L) bool, the group's slice tokens.
        text_mask: (G, L) bool, the group's text window T.
    """

    sample_index: torch.Tensor
    slice_mask: torch.Tensor
    text_mask: torch.Tensor

    def one_per_sample(self, batch_size: int) -> bool:
        """True when group g is batch row g for every one of `batch_size` rows (no gather / scatter needed)."""
        rows = torch.arange(batch_size, device=self.sample_index.device)
        return self.sample_index.shape == rows.shape and bool(torch.equal(self.sample_index, rows))


def slice_fusion_windows(
    slice_mask: torch.Tensor,
    image_block_mask: torch.Tensor,
    turn_start_mask: torch.Tensor,
    turn_end_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scope: str = "user_turn",
) -> SliceFusionGroups:
    """group the slice tokens by chat turn and find each group's text window T (docs/fusion.md).

    A turn starts at a `<|im_start|>` token (tokens before the first one form turn 0, the preamble). For each turn
    that holds slice tokens, the window ends at the first `<|im_end|>` after the turn's last image block, or at the
    next `<|im_start|>`; the answer always lies beyond that end. A turn that is never closed (plain text without
    chat markup, "question <image> answer...") cannot tell its question from its answer, so there the window ends
    where the turn's last image block starts: put the question before the volume in plain-text prompts.

    Scopes:
        "user_turn": the text of that turn inside the window: no turn header (`<|im_start|>user\n`), no
            `<|im_end|>`, no image block (visual and slice tokens, `<|vision_start|>` / `<|vision_end|>`), no
            padding. The system prompt, earlier turns (and their answers) and later turns are outside.
        "prompt": every attended token before the window's end except the image blocks: system prompt, chat
            markup and earlier turns included (one image-holding turn per sample, since windows would overlap).

    Args:
        slice_mask: (B, L) bool, slice tokens.
        image_block_mask: (B, L) bool, the other tokens of the image blocks (visual placeholders and the vision
            start / end markers); slice tokens may be included too.
        turn_start_mask: (B, L) bool, `<|im_start|>` tokens.
        turn_end_mask: (B, L) bool, `<|im_end|>` tokens.
        attention_mask: (B, L), 1 for real tokens (left or right padding); None means no padding.
        scope: "user_turn" or "prompt".

    Returns:
        the groups, in batch order then sequence order; a sample without slice tokens has none.

    Raises:
        ValueError: unknown scope, masks of different shapes, or windows that overlap ("prompt" scope with more
            than one image-holding turn in a sample).
    """
    if scope not in FUSION_TEXT_SCOPES:
        raise ValueError(f"fusion_text_scope must be one of {FUSION_TEXT_SCOPES}, got {scope!r}.")
    masks = {"image_block_mask": image_block_mask, "turn_start_mask": turn_start_mask, "turn_end_mask": turn_end_mask}
    if attention_mask is not None:
        masks["attention_mask"] = attention_mask
    for name, mask in masks.items():
        if mask.shape != slice_mask.shape:
            raise ValueError(f"{name} must be {tuple(slice_mask.shape)} like slice_mask, got {tuple(mask.shape)}.")
    batch, length = slice_mask.shape
    device = slice_mask.device
    attended = torch.ones_like(slice_mask, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    slices = slice_mask.bool() & attended
    block = (image_block_mask.bool() | slices) & attended  # (B, L), every image-block token
    starts = turn_start_mask.bool() & attended
    ends = turn_end_mask.bool() & attended
    turn = starts.long().cumsum(dim=1)  # (B, L), 0 = preamble, t = after the t-th <|im_start|>
    positions = torch.arange(length, device=device)  # (L,)
    # a block's first token: in the block, and the token before it is not
    block_start = block & ~torch.cat([block.new_zeros(batch, 1), block[:, :-1]], dim=1)  # (B, L)
    text = attended & ~block & ~starts & ~ends  # (B, L), candidate T tokens

    sample_index, group_slices, group_text = [], [], []
    for b in range(batch):
        turns_with_slices = turn[b][slices[b]].unique().tolist()  # sorted
        last_turn = int(turn[b].max())
        for t in turns_with_slices:
            in_turn = turn[b] == t  # (L,)
            turn_positions = positions[in_turn]
            first, stop = int(turn_positions[0]), int(turn_positions[-1]) + 1  # turns are contiguous
            last_block = int(positions[block[b] & in_turn].max())
            closers = positions[ends[b] & in_turn & (positions > last_block)]
            if closers.numel():
                window_end = int(closers[0])  # the turn's <|im_end|>
            elif t < last_turn:
                window_end = stop  # the next <|im_start|>
            else:
                window_end = int(positions[block_start[b] & in_turn].max())  # unclosed: before the last block
            before_end = positions < window_end
            if scope == "user_turn":
                header_end = first + CHAT_HEADER_TOKENS if t > 0 else first
                window = text[b] & in_turn & (positions >= header_end) & before_end
            else:
                window = attended[b] & ~block[b] & before_end
            sample_index.append(b)
            group_slices.append(slices[b] & in_turn)
            group_text.append(window)

    if not sample_index:
        empty = slice_mask.new_zeros(0, length, dtype=torch.bool)
        return SliceFusionGroups(torch.zeros(0, dtype=torch.long, device=device), empty, empty.clone())
    groups = SliceFusionGroups(
        sample_index=torch.tensor(sample_index, dtype=torch.long, device=device),
        slice_mask=torch.stack(group_slices),
        text_mask=torch.stack(group_text),
    )
    for b in set(sample_index):
        rows = groups.text_mask[groups.sample_index == b]  # (G_b, L)
        if rows.shape[0] > 1 and bool((rows.long().sum(dim=0) > 1).any()):
            raise ValueError(
                f"sample {b}: the fusion windows of its {rows.shape[0]} image-holding turns overlap; with "
                f"fusion_text_scope={scope!r} put all volumes of a sample in one turn."
            )
    return groups


def apply_grouped_slice_fusion(
    hidden_states: torch.Tensor, groups: SliceFusionGroups, module: nn.Module, **module_kwargs
) -> torch.Tensor:
    """`apply_slice_fusion` once per group (chat turn holding slice tokens), results scattered back (out of place).

    Args:
        hidden_states: decoder hidden states (B, L, H).
        groups: from `slice_fusion_windows`; the groups of one sample touch disjoint positions.
        module, module_kwargs: as `apply_slice_fusion`.

    Returns:
        new hidden states (B, L, H); rows without groups are unchanged.
    """
    if groups.sample_index.numel() == 0:
        return hidden_states
    if groups.one_per_sample(hidden_states.shape[0]):
        return apply_slice_fusion(hidden_states, groups.slice_mask, groups.text_mask, module, **module_kwargs)
    rows = hidden_states[groups.sample_index]  # (G, L, H)
    fused = apply_slice_fusion(rows, groups.slice_mask, groups.text_mask, module, **module_kwargs)  # (G, L, H)
    group, position = (groups.slice_mask | groups.text_mask).nonzero(as_tuple=True)  # (N,), (N,)
    return hidden_states.index_put((groups.sample_index[group], position), fused[group, position])


class Med3DQwenClosedHead(nn.Module):
    """linear classifier on the hidden state of each sample's last real token (closed-ended VQA)."""

    def __init__(self, hidden_size: int, num_classes: int) -> None:
        """
        Args:
            hidden_size: decoder hidden size H.
            num_classes: size of the closed label set (e.g. yes/no, A-D, ordinal grades).
        """
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}.")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.classifier = nn.Linear(hidden_size, num_classes)

    @staticmethod
    def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) 0/1 mask -> (B,) index of the last non-padding position (left or right padding)."""
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (L,)
        return (positions[None, :] * attention_mask.bool().long()).amax(dim=1)  # (B,)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: last decoder hidden states (B, L, H).
            attention_mask: (B, L), 1 for real tokens; None means no padding (last position).
            positions: optional (B,) explicit positions to classify from (e.g. the last prompt token when the
                sequence also holds the answer); overrides attention_mask.

        Returns:
            logits (B, num_classes).
        """
        batch, length, _ = hidden_states.shape
        if positions is None:
            if attention_mask is None:
                positions = torch.full((batch,), length - 1, dtype=torch.long, device=hidden_states.device)
            else:
                if attention_mask.shape != (batch, length):
                    raise ValueError(f"attention_mask must be {(batch, length)}, got {tuple(attention_mask.shape)}.")
                positions = self.last_token_index(attention_mask)
        pooled = hidden_states[torch.arange(batch, device=hidden_states.device), positions]  # (B, H)
        return self.classifier(pooled.to(self.classifier.weight.dtype))  # (B, num_classes)


__all__ = [
    "Med3DQwenSliceTokenizer",
    "Med3DQwenSliceSelfAttention",
    "Med3DQwenSliceSelfAttentionStack",
    "Med3DQwenMultiHeadSliceAttention",
    "FUSION_TEXT_SCOPES",
    "SliceFusionGroups",
    "apply_grouped_slice_fusion",
    "apply_slice_fusion",
    "slice_fusion_windows",
    "unwrap_fusion_module",
    "Med3DQwenClosedHead",
]
