"""Slice-text fusion for Med3DQwen: slice tokens, SSA (paper eq. 2), MSSA (eqs. 3-4) and the closed-ended head.

Self-contained on purpose (torch and the standard library only) so it can ship as Hub remote code.

Layout the model is expected to use (docs/design.md "Model layout"): the slice tokens V (N_s x H, from
`Med3DQwenSliceTokenizer`) are appended after the 256 visual tokens; `apply_slice_fusion` is called with an SSA
module after each of the first k decoder blocks and with an MSSA module after block k.

`text_mask` must mark the question (prompt) tokens only, never answer tokens: both modules mix information
bidirectionally (SSA writes text into the slice tokens, which precede the text; MSSA lets every text token see every
other one), so answer tokens in `text_mask` would leak the target into earlier positions under teacher forcing.
"""

import math

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


def apply_slice_fusion(
    hidden_states: torch.Tensor,
    slice_mask: torch.Tensor,
    text_mask: torch.Tensor,
    module: Med3DQwenSliceSelfAttention | Med3DQwenMultiHeadSliceAttention,
) -> torch.Tensor:
    """gather V and T from the decoder sequence, apply SSA or MSSA, and scatter the results back (out of place).

    Args:
        hidden_states: decoder hidden states (B, L, H).
        slice_mask: (B, L) bool, True at slice-token positions; every sample must hold the same N_s >= 1.
        text_mask: (B, L) bool, True at the question tokens T (exclude padding, image and slice tokens, and answer
            tokens); counts may differ per sample (T is padded and masked).
        module: a `Med3DQwenSliceSelfAttention` (updates V only) or `Med3DQwenMultiHeadSliceAttention` (V and T).

    Returns:
        new hidden states (B, L, H); positions outside slice_mask | text_mask are the input values.

    Raises:
        ValueError: masks of the wrong shape, overlapping masks, no slice tokens, or different slice counts.
        TypeError: `module` is neither fusion module.
    """
    batch, length, hidden = hidden_states.shape
    if slice_mask.shape != (batch, length) or text_mask.shape != (batch, length):
        raise ValueError(
            f"masks must be (B, L) = {(batch, length)}, got slice_mask {tuple(slice_mask.shape)} "
            f"and text_mask {tuple(text_mask.shape)}."
        )
    if not isinstance(module, (Med3DQwenSliceSelfAttention, Med3DQwenMultiHeadSliceAttention)):
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

    if isinstance(module, Med3DQwenSliceSelfAttention):
        new_slices = module(slices, text, text_valid)
        return hidden_states.masked_scatter(slice_mask[..., None], new_slices.to(hidden_states.dtype))
    new_slices, new_text = module(slices, text, text_valid)
    out = hidden_states.masked_scatter(slice_mask[..., None], new_slices.to(hidden_states.dtype))
    return out.masked_scatter(text_mask[..., None], new_text[text_valid].to(hidden_states.dtype))


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
    "Med3DQwenMultiHeadSliceAttention",
    "apply_slice_fusion",
    "Med3DQwenClosedHead",
]
