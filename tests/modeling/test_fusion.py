"""Tests for med3dqwen.modeling.fusion_med3d_qwen: slice tokens, SSA (eq. 2), MSSA (eqs. 3-4), scatter-back, head."""

import math

import pytest
import torch

from med3dqwen.modeling.fusion_med3d_qwen import (
    Med3DQwenClosedHead,
    Med3DQwenMultiHeadSliceAttention,
    Med3DQwenSliceSelfAttention,
    Med3DQwenSliceTokenizer,
    apply_slice_fusion,
)


H = 8  # hidden size
HEADS = 4
MAX_SLICES = 6


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=seeded(seed))


def mssa_with_random_wo(seed: int = 0) -> Med3DQwenMultiHeadSliceAttention:
    torch.manual_seed(seed)
    module = Med3DQwenMultiHeadSliceAttention(H, num_heads=HEADS, max_slices=MAX_SLICES)
    with torch.no_grad():
        module.w_o.weight.normal_(0.0, 0.3)
        module.relative_bias.normal_(0.0, 1.0)
    return module


# ---------------------------------------------------------------------------------------------------------------
# Direct, slow references of the equations (explicit sums, one sample / head at a time)
# ---------------------------------------------------------------------------------------------------------------


def reference_ssa(slices: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """eq. 2 per sample: out[i] = sum_j [j real] (sum_c V[i,c] T[j,c] / sqrt(d)) T[j]."""
    batch, num_slices, d = slices.shape
    out = torch.zeros(batch, num_slices, d, dtype=torch.float64)
    for b in range(batch):
        for i in range(num_slices):
            for j in range(text.shape[1]):
                if not text_mask[b, j]:
                    continue
                score = sum(float(slices[b, i, c]) * float(text[b, j, c]) for c in range(d)) / math.sqrt(d)
                out[b, i] += score * text[b, j].double()
    return out


def reference_mssa_sample(module: Med3DQwenMultiHeadSliceAttention, slices: torch.Tensor, text: torch.Tensor):
    """eqs. 3-4 (with softmax) for ONE unpadded sample: slices (N_s, H), text (L, H) -> Z + MSSA(Z), (N_s + L, H)."""
    num_slices = slices.shape[0]
    z = torch.cat([slices, text]).double()
    length = z.shape[0]
    hs = module.head_dim
    w_q, w_k, w_v = (m.weight.detach().double() for m in (module.w_q, module.w_k, module.w_v))
    b = module.relative_bias.detach().double()
    head_outputs = []
    for h in range(module.num_heads):
        rows = slice(h * hs, (h + 1) * hs)
        q, k, v = z @ w_q[rows].T, z @ w_k[rows].T, z @ w_v[rows].T  # (Lz, hs)
        scores = torch.zeros(length, length, dtype=torch.float64)
        for i in range(length):
            for j in range(length):
                r = b[h, i - j + module.max_slices - 1] if (i < num_slices and j < num_slices) else 0.0
                scores[i, j] = (q[i] @ k[j]) / math.sqrt(hs) + r
        head_outputs.append(torch.softmax(scores, dim=-1) @ v)
    return z + torch.cat(head_outputs, dim=-1) @ module.w_o.weight.detach().double().T


# ---------------------------------------------------------------------------------------------------------------
# Slice tokenizer
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "encoder_dim, hidden, input_shape, expected_shape",
    [
        (4, 8, (2, 4, 8, 5, 6), (2, 8, 8)),
        (3, 6, (1, 3, 5, 3, 7), (1, 5, 6)),
        (96, 16, (1, 96, 8, 2, 2), (1, 8, 16)),  # DCFormer stage 2 of a 128-slice volume: 8 slices
    ],
)
def test_slice_tokenizer_shapes(encoder_dim, hidden, input_shape, expected_shape):
    tokenizer = Med3DQwenSliceTokenizer(encoder_dim, hidden)
    assert tokenizer(torch.randn(*input_shape)).shape == expected_shape


def test_slice_tokenizer_average_pools_each_depth():
    tokenizer = Med3DQwenSliceTokenizer(3, 3)
    with torch.no_grad():
        tokenizer.proj.weight.copy_(torch.eye(3))
        tokenizer.proj.bias.zero_()
    x = randn(2, 3, 4, 5, 6)
    out = tokenizer(x)
    for b in range(2):
        for depth in range(4):
            for c in range(3):
                expected = sum(float(x[b, c, depth, i, j]) for i in range(5) for j in range(6)) / 30
                assert out[b, depth, c].item() == pytest.approx(expected, abs=1e-5)


def test_slice_tokenizer_errors():
    with pytest.raises(ValueError, match="encoder_dim"):
        Med3DQwenSliceTokenizer(0, 8)
    with pytest.raises(ValueError, match="hidden_size"):
        Med3DQwenSliceTokenizer(4, 0)
    tokenizer = Med3DQwenSliceTokenizer(4, 8)
    with pytest.raises(ValueError, match="stage map"):
        tokenizer(torch.randn(1, 5, 2, 2, 2))
    with pytest.raises(ValueError, match="stage map"):
        tokenizer(torch.randn(4, 2, 2, 2))


# ---------------------------------------------------------------------------------------------------------------
# SSA (eq. 2)
# ---------------------------------------------------------------------------------------------------------------


def ssa_inputs():
    slices, text = randn(2, 3, H, seed=1), randn(2, 5, H, seed=2)
    text_mask = torch.tensor([[True, True, True, False, False], [False, True, True, True, True]])
    return slices, text, text_mask


def test_ssa_matches_direct_sum_with_mask():
    slices, text, text_mask = ssa_inputs()
    ssa = Med3DQwenSliceSelfAttention(H)
    expected = reference_ssa(slices, text, text_mask)
    torch.testing.assert_close(ssa.attention(slices, text, text_mask).double(), expected, rtol=1e-5, atol=1e-5)
    # no mask: every token counts
    full = torch.ones_like(text_mask)
    torch.testing.assert_close(
        ssa.attention(slices, text).double(), reference_ssa(slices, text, full), rtol=1e-5, atol=1e-5
    )


def test_ssa_ignores_masked_tokens():
    slices, text, text_mask = ssa_inputs()
    ssa = Med3DQwenSliceSelfAttention(H, gate_init=1.0)
    changed = text.clone()
    changed[~text_mask] = torch.tensor([1e3, float("inf"), float("nan"), -5.0, 0.0, 1.0, 2.0, 3.0])
    assert torch.equal(ssa(slices, text, text_mask), ssa(slices, changed, text_mask))


def test_ssa_gate_zero_is_identity_and_gate_one_adds_ssa():
    slices, text, text_mask = ssa_inputs()
    ssa = Med3DQwenSliceSelfAttention(H)
    assert ssa.gate.item() == 0.0
    assert torch.equal(ssa(slices, text, text_mask), slices)
    with torch.no_grad():
        ssa.gate.fill_(1.0)
    expected = slices.double() + reference_ssa(slices, text, text_mask)
    torch.testing.assert_close(ssa(slices, text, text_mask).double(), expected, rtol=1e-5, atol=1e-5)
    ssa.reset_parameters()
    assert ssa.gate.item() == 0.0


def test_ssa_gate_gets_gradient_at_init():
    slices, text, text_mask = ssa_inputs()
    ssa = Med3DQwenSliceSelfAttention(H)
    (ssa(slices, text, text_mask) * randn(2, 3, H, seed=3)).sum().backward()
    assert ssa.gate.grad is not None and ssa.gate.grad.abs().item() > 0


def test_ssa_errors():
    with pytest.raises(ValueError, match="hidden_size"):
        Med3DQwenSliceSelfAttention(0)
    with pytest.raises(ValueError, match="gate_init"):
        Med3DQwenSliceSelfAttention(H, gate_init=float("nan"))
    with pytest.raises(ValueError, match="hidden size mismatch"):
        Med3DQwenSliceSelfAttention(H)(torch.randn(1, 2, H), torch.randn(1, 3, H + 1))


# ---------------------------------------------------------------------------------------------------------------
# MSSA (eqs. 3-4)
# ---------------------------------------------------------------------------------------------------------------


def mssa_inputs():
    slices, text = randn(2, 4, H, seed=4), randn(2, 5, H, seed=5)
    text_mask = torch.tensor([[True, True, True, True, True], [True, True, False, False, False]])
    return slices, text, text_mask


def test_mssa_bias_shape_and_zero_output_projection():
    mssa = Med3DQwenMultiHeadSliceAttention(H, num_heads=HEADS, max_slices=MAX_SLICES)
    assert mssa.relative_bias.shape == (HEADS, 2 * MAX_SLICES - 1)
    assert torch.count_nonzero(mssa.w_o.weight) == 0
    assert mssa.w_o.bias is None


def test_mssa_is_identity_at_init():
    slices, text, text_mask = mssa_inputs()
    mssa = Med3DQwenMultiHeadSliceAttention(H, num_heads=HEADS, max_slices=MAX_SLICES)
    new_slices, new_text = mssa(slices, text, text_mask)
    assert torch.equal(new_slices, slices) and torch.equal(new_text, text)


def test_mssa_matches_reference_per_sample():
    slices, text, text_mask = mssa_inputs()
    mssa = mssa_with_random_wo()
    new_slices, new_text = mssa(slices, text, text_mask)
    for b in range(2):
        expected = reference_mssa_sample(mssa, slices[b], text[b][text_mask[b]])
        got = torch.cat([new_slices[b], new_text[b][text_mask[b]]]).double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_mssa_bias_is_relative_and_shift_invariant():
    mssa = mssa_with_random_wo()
    index = torch.arange(5)
    bias = mssa.slice_bias(index)
    assert bias.shape == (HEADS, 5, 5)
    for h in range(HEADS):
        for i in range(5):
            for j in range(5):
                assert bias[h, i, j] == mssa.relative_bias[h, i - j + MAX_SLICES - 1]
    assert torch.equal(mssa.slice_bias(index + 7), bias)  # only differences matter
    slices, text, text_mask = mssa_inputs()
    default = mssa(slices, text, text_mask)
    shifted = mssa(slices, text, text_mask, slice_index=torch.arange(4) + 11)
    assert torch.equal(default[0], shifted[0]) and torch.equal(default[1], shifted[1])


def test_mssa_bias_changes_slice_outputs_only():
    slices, text, text_mask = mssa_inputs()
    mssa = mssa_with_random_wo()
    before_slices, before_text = mssa(slices, text, text_mask)
    with torch.no_grad():
        mssa.relative_bias.add_(torch.randn(mssa.relative_bias.shape, generator=seeded(6)))
    after_slices, after_text = mssa(slices, text, text_mask)
    assert not torch.allclose(before_slices, after_slices)
    # text queries have zero bias to every key, so the text path does not see R at all
    assert torch.equal(before_text, after_text)


def test_mssa_key_padding_mask():
    slices, text, text_mask = mssa_inputs()
    mssa = mssa_with_random_wo()
    new_slices, new_text = mssa(slices, text, text_mask)
    changed = text.clone()
    changed[~text_mask] = 100.0 * randn(int((~text_mask).sum()), H, seed=7)
    other_slices, other_text = mssa(slices, changed, text_mask)
    assert torch.equal(new_slices, other_slices)
    assert torch.equal(new_text[text_mask], other_text[text_mask])
    assert torch.equal(other_text[~text_mask], changed[~text_mask])  # padded positions keep their values


def test_mssa_gradients_at_init_reach_only_wo():
    slices, text, text_mask = mssa_inputs()
    mssa = Med3DQwenMultiHeadSliceAttention(H, num_heads=HEADS, max_slices=MAX_SLICES)
    new_slices, new_text = mssa(slices, text, text_mask)
    loss = (new_slices * randn(*new_slices.shape, seed=8)).sum() + (new_text * randn(*new_text.shape, seed=9)).sum()
    loss.backward()
    assert mssa.w_o.weight.grad.abs().sum() > 0
    # Everything upstream of W_O = 0 is multiplied by zero, so Q/K/V and R get exactly zero gradient at init;
    # they start learning once W_O has moved (as LoRA's A does while B = 0).
    for param in (mssa.relative_bias, mssa.w_q.weight, mssa.w_k.weight, mssa.w_v.weight):
        assert param.grad is not None and torch.count_nonzero(param.grad) == 0


def test_mssa_gradients_reach_all_parameters_when_wo_is_set():
    slices, text, text_mask = mssa_inputs()
    mssa = mssa_with_random_wo()
    new_slices, new_text = mssa(slices, text, text_mask)
    (new_slices.square().sum() + new_text.square().sum()).backward()
    for name, param in mssa.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # only relative distances present in the batch (|i - j| <= 3 for 4 slices) receive gradient
    used = torch.zeros(2 * MAX_SLICES - 1, dtype=torch.bool)
    used[MAX_SLICES - 1 - 3 : MAX_SLICES + 3] = True
    assert torch.count_nonzero(mssa.relative_bias.grad[:, ~used]) == 0
    assert bool((mssa.relative_bias.grad[:, used] != 0).all())


def test_mssa_reset_parameters_restores_zero_wo():
    mssa = mssa_with_random_wo()
    mssa.reset_parameters()
    assert torch.count_nonzero(mssa.w_o.weight) == 0


def test_mssa_errors():
    with pytest.raises(ValueError, match="divisible"):
        Med3DQwenMultiHeadSliceAttention(10, num_heads=4)
    with pytest.raises(ValueError, match="max_slices"):
        Med3DQwenMultiHeadSliceAttention(H, max_slices=0)
    mssa = Med3DQwenMultiHeadSliceAttention(H, num_heads=HEADS, max_slices=3)
    with pytest.raises(ValueError, match="more than max_slices"):
        mssa(torch.randn(1, 4, H), torch.randn(1, 2, H))
    with pytest.raises(ValueError, match="exceeds max_slices"):
        mssa(torch.randn(1, 2, H), torch.randn(1, 2, H), slice_index=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="at least one slice"):
        mssa(torch.randn(1, 0, H), torch.randn(1, 2, H))


# ---------------------------------------------------------------------------------------------------------------
# apply_slice_fusion (gather, fuse, scatter back)
# ---------------------------------------------------------------------------------------------------------------

# token kinds: p = padding, i = image, s = slice, t = question text, a = other (e.g. chat-template tokens)
RIGHT_PADDED = ["iisssatttta", "iisssattaap"]
LEFT_PADDED = ["ppiisssatta", "iisssattttt"]


def layout_masks(rows: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    slice_mask = torch.tensor([[c == "s" for c in row] for row in rows])
    text_mask = torch.tensor([[c == "t" for c in row] for row in rows])
    return slice_mask, text_mask


@pytest.mark.parametrize("rows", [RIGHT_PADDED, LEFT_PADDED], ids=["right_padded", "left_padded"])
@pytest.mark.parametrize("kind", ["ssa", "mssa"])
def test_apply_slice_fusion_scatters_back_to_the_right_positions(rows, kind):
    slice_mask, text_mask = layout_masks(rows)
    hidden = randn(2, len(rows[0]), H, seed=10)
    if kind == "ssa":
        module = Med3DQwenSliceSelfAttention(H, gate_init=0.5)
    else:
        module = mssa_with_random_wo()
    out = apply_slice_fusion(hidden, slice_mask, text_mask, module)
    assert out.shape == hidden.shape
    untouched = ~(slice_mask | text_mask)
    assert torch.equal(out[untouched], hidden[untouched])
    if kind == "ssa":
        assert torch.equal(out[text_mask], hidden[text_mask])
    else:
        assert not torch.allclose(out[text_mask], hidden[text_mask])
    assert not torch.allclose(out[slice_mask], hidden[slice_mask])
    # each sample on its own, unpadded, gives the same values at its slice and text positions
    for b in range(2):
        slices, text = hidden[b][slice_mask[b]][None], hidden[b][text_mask[b]][None]
        if kind == "ssa":
            expected_slices, expected_text = module(slices, text), text
        else:
            expected_slices, expected_text = module(slices, text)
        torch.testing.assert_close(out[b][slice_mask[b]], expected_slices[0])
        torch.testing.assert_close(out[b][text_mask[b]], expected_text[0])


def test_apply_slice_fusion_is_autograd_safe():
    slice_mask, text_mask = layout_masks(LEFT_PADDED)
    hidden = randn(2, len(LEFT_PADDED[0]), H, seed=11).requires_grad_(True)
    out = apply_slice_fusion(hidden * 1.0, slice_mask, text_mask, mssa_with_random_wo())
    out = apply_slice_fusion(out, slice_mask, text_mask, Med3DQwenSliceSelfAttention(H, gate_init=0.1))
    out.square().sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_apply_slice_fusion_errors():
    hidden = torch.randn(2, 6, H)
    ssa = Med3DQwenSliceSelfAttention(H)
    slice_mask, text_mask = layout_masks(["sstttp", "sssttt"])
    with pytest.raises(ValueError, match=r"same positive number of slice tokens.*\[2, 3\]"):
        apply_slice_fusion(hidden, slice_mask, text_mask, ssa)
    slice_mask, text_mask = layout_masks(["tttttp", "tttttt"])
    with pytest.raises(ValueError, match="slice tokens"):
        apply_slice_fusion(hidden, slice_mask, text_mask, ssa)
    slice_mask, text_mask = layout_masks(["sstttp", "sstttt"])
    with pytest.raises(ValueError, match="overlap"):
        apply_slice_fusion(hidden, slice_mask, text_mask | slice_mask, ssa)
    with pytest.raises(ValueError, match="masks must be"):
        apply_slice_fusion(hidden, slice_mask[:, :5], text_mask, ssa)
    with pytest.raises(TypeError, match="SSA or MSSA"):
        apply_slice_fusion(hidden, slice_mask, text_mask, torch.nn.Linear(H, H))


# ---------------------------------------------------------------------------------------------------------------
# Closed-ended head
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attention_mask, expected_index",
    [
        ([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], [3, 5]),  # right padding
        ([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], [5, 5]),  # left padding
    ],
    ids=["right_padded", "left_padded"],
)
def test_closed_head_uses_last_real_token(attention_mask, expected_index):
    head = Med3DQwenClosedHead(H, num_classes=3)
    hidden = randn(2, 6, H, seed=12)
    mask = torch.tensor(attention_mask)
    logits = head(hidden, mask)
    assert logits.shape == (2, 3)
    for b, index in enumerate(expected_index):
        torch.testing.assert_close(logits[b], head.classifier(hidden[b, index]))
    torch.testing.assert_close(head(hidden, positions=torch.tensor(expected_index)), logits)


def test_closed_head_without_mask_and_errors():
    head = Med3DQwenClosedHead(H, num_classes=2)
    hidden = randn(2, 4, H, seed=13)
    torch.testing.assert_close(head(hidden), head.classifier(hidden[:, -1]))
    with pytest.raises(ValueError, match="attention_mask"):
        head(hidden, torch.ones(2, 5))
    with pytest.raises(ValueError, match="num_classes"):
        Med3DQwenClosedHead(H, num_classes=1)


# ---------------------------------------------------------------------------------------------------------------
# Tiny end-to-end backward: every parameter gets a gradient
# ---------------------------------------------------------------------------------------------------------------


def causal_mean_block(hidden: torch.Tensor) -> torch.Tensor:
    """stand-in for a decoder block: each position adds the mean of itself and everything before it."""
    counts = torch.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype)[None, :, None]
    return hidden + hidden.cumsum(dim=1) / counts


def test_every_parameter_gets_a_gradient_end_to_end():
    torch.manual_seed(0)
    rows = ["ppiisssattt", "iissstttttt"]  # the last real token is question text
    slice_mask, text_mask = layout_masks(rows)
    attention_mask = torch.tensor([[c != "p" for c in row] for row in rows]).long()
    tokenizer = Med3DQwenSliceTokenizer(encoder_dim=5, hidden_size=H)
    ssa = Med3DQwenSliceSelfAttention(H, gate_init=0.1)
    mssa = mssa_with_random_wo()
    head = Med3DQwenClosedHead(H, num_classes=3)
    modules = {"tokenizer": tokenizer, "ssa": ssa, "mssa": mssa, "head": head}

    slice_tokens = tokenizer(torch.randn(2, 5, 3, 4, 4))  # (B, 3 slices, H)
    hidden = torch.randn(2, len(rows[0]), H).masked_scatter(slice_mask[..., None], slice_tokens)
    hidden = causal_mean_block(apply_slice_fusion(hidden, slice_mask, text_mask, ssa))
    hidden = causal_mean_block(apply_slice_fusion(hidden, slice_mask, text_mask, mssa))
    loss = torch.nn.functional.cross_entropy(head(hidden, attention_mask), torch.tensor([0, 2]))
    loss.backward()
    for module_name, module in modules.items():
        for name, param in module.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{module_name}.{name}"
