"""Tests for med3dqwen.modeling.fusion_med3d_qwen: slice tokens, SSA (eq. 2), MSSA (eqs. 3-4), scatter-back, head."""

import math

import pytest
import torch
from fusion_chat import IM_START, IMAGE_PART, PAD, SLICE, chat_ids, make_model, open_fusion, tiny_config, volumes

from med3dqwen.modeling.fusion_med3d_qwen import (
    Med3DQwenClosedHead,
    Med3DQwenMultiHeadSliceAttention,
    Med3DQwenSliceSelfAttention,
    Med3DQwenSliceSelfAttentionStack,
    Med3DQwenSliceTokenizer,
    apply_grouped_slice_fusion,
    apply_slice_fusion,
    slice_fusion_windows,
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


# ---------------------------------------------------------------------------------------------------------------
# The SSA stack and PEFT-style wrappers
# ---------------------------------------------------------------------------------------------------------------


class FakeModulesToSave(torch.nn.Module):
    """What PEFT's ModulesToSaveWrapper looks like to us: `original_module` plus a call that runs another copy."""

    def __init__(self, module: torch.nn.Module, copy: torch.nn.Module):
        super().__init__()
        self.original_module = module
        self.copy = copy

    def forward(self, *args, **kwargs):
        return self.copy(*args, **kwargs)


def test_ssa_stack_runs_the_module_of_the_given_layer():
    stack = Med3DQwenSliceSelfAttentionStack(H, num_layers=2)
    with torch.no_grad():
        stack[1].gate.fill_(0.5)
    slices, text, text_mask = ssa_inputs()
    torch.testing.assert_close(stack(slices, text, text_mask, layer=0), slices)
    torch.testing.assert_close(stack(slices, text, text_mask, layer=1), stack[1](slices, text, text_mask))
    assert len(stack) == 2 and list(stack) == [stack[0], stack[1]]
    assert [name for name, _ in stack.named_parameters()] == ["0.gate", "1.gate"]
    with pytest.raises(IndexError, match="out of range"):
        stack[2]
    with pytest.raises(ValueError, match="num_layers"):
        Med3DQwenSliceSelfAttentionStack(H, num_layers=-1)


@pytest.mark.parametrize("kind", ["ssa", "stack", "mssa"])
def test_apply_slice_fusion_calls_a_wrapper_not_the_module_inside(kind):
    slice_mask, text_mask = layout_masks(RIGHT_PADDED)
    hidden = randn(2, len(RIGHT_PADDED[0]), H, seed=12)
    if kind == "mssa":
        original, trained = mssa_with_random_wo(0), mssa_with_random_wo(1)
        kwargs = {}
    elif kind == "stack":
        original, trained = Med3DQwenSliceSelfAttentionStack(H, 1, 0.1), Med3DQwenSliceSelfAttentionStack(H, 1, 0.7)
        kwargs = {"layer": 0}
    else:
        original, trained = Med3DQwenSliceSelfAttention(H, 0.1), Med3DQwenSliceSelfAttention(H, 0.7)
        kwargs = {}
    wrapped = apply_slice_fusion(hidden, slice_mask, text_mask, FakeModulesToSave(original, trained), **kwargs)
    torch.testing.assert_close(wrapped, apply_slice_fusion(hidden, slice_mask, text_mask, trained, **kwargs))
    assert not torch.allclose(wrapped, apply_slice_fusion(hidden, slice_mask, text_mask, original, **kwargs))
    with pytest.raises(TypeError, match="SSA or MSSA"):
        apply_slice_fusion(hidden, slice_mask, text_mask, FakeModulesToSave(torch.nn.Linear(H, H), trained))


# ---------------------------------------------------------------------------------------------------------------
# The fusion window T (slice_fusion_windows)
# ---------------------------------------------------------------------------------------------------------------

# One character per token (spaces are for reading only): S <|im_start|>, E <|im_end|>, r role word, n newline,
# v vision start/end, i visual placeholder, s slice token, q the text T must hold, x other text, a answer, p padding.
CHATS = {
    "single_turn": "Srnxx En  Srn viissv qqq En  Srn aa En",
    "generation_prompt": "Srnxx En  Srn viissv qqq En  Srn",
    "later_turns_follow": "Srnxx En  Srn viissv qqq En  Srn aa En  Srn xx En  Srn aa En",
    "image_in_a_later_turn": "Srnxx En  Srn xx En  Srn aa En  Srn viissv qqq En  Srn aa En",
    "question_around_image": "Srnxx En  Srn qq viissv qq En  Srn aa En",
    "left_padded": "pppp Srnxx En  Srn viissv qqq En  Srn aa En",
    "right_padded": "Srnxx En  Srn viissv qqq En  Srn aa En pppp",
    "preamble_closed_by_a_turn": "viissv qqq Srn aa",
    "plain_question_first": "qq viissv aaa",
    "plain_image_first": "viissv aaaa",
}


def chat_masks(layout: str) -> dict[str, torch.Tensor]:
    row = layout.replace(" ", "")
    masks = {c: torch.tensor([[t == c for t in row]]) for c in "SEvisqp"}
    return {
        "slice_mask": masks["s"],
        "image_block_mask": masks["i"] | masks["v"],
        "turn_start_mask": masks["S"],
        "turn_end_mask": masks["E"],
        "attention_mask": (~masks["p"]).long(),
        "expected": masks["q"],
    }


@pytest.mark.parametrize("name", sorted(CHATS))
def test_fusion_window_is_the_text_of_the_turn_holding_the_volume(name):
    masks = chat_masks(CHATS[name])
    expected = masks.pop("expected")
    groups = slice_fusion_windows(**masks)
    assert groups.sample_index.tolist() == [0]
    assert torch.equal(groups.slice_mask, masks["slice_mask"])
    assert torch.equal(groups.text_mask, expected), name


def test_prompt_scope_widens_the_window_to_everything_before_the_turn_end():
    masks = chat_masks(CHATS["later_turns_follow"])
    masks.pop("expected")
    groups = slice_fusion_windows(**masks, scope="prompt")
    row = CHATS["later_turns_follow"].replace(" ", "")
    turn_end = row.index("E", row.index("s"))
    expected = torch.tensor([[i < turn_end and c not in "visp" for i, c in enumerate(row)]])
    assert torch.equal(groups.text_mask, expected)


def test_two_volumes_in_two_turns_are_fused_with_their_own_questions():
    layout = "Srnxx En  Srn viissv qqq En  Srn aa En  Srn viissv qq En  Srn aa En"
    masks = chat_masks(layout)
    masks.pop("expected")
    groups = slice_fusion_windows(**masks)
    row = layout.replace(" ", "")
    second_turn = [i for i, c in enumerate(row) if c == "S"][3]
    first = torch.tensor([[c == "q" and i < second_turn for i, c in enumerate(row)]])
    assert groups.sample_index.tolist() == [0, 0]
    assert torch.equal(groups.text_mask, torch.cat([first, chat_masks(layout)["expected"] & ~first]))
    # grouped application == each turn fused on its own
    hidden = randn(1, len(row), H, seed=13)
    module = mssa_with_random_wo()
    out = apply_grouped_slice_fusion(hidden, groups, module)
    expected = hidden
    for g in range(2):
        expected = apply_slice_fusion(expected, groups.slice_mask[g : g + 1], groups.text_mask[g : g + 1], module)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="overlap"):
        slice_fusion_windows(**masks, scope="prompt")


def test_grouped_fusion_skips_samples_without_volumes():
    rows = [CHATS["single_turn"], "Srnxx En  Srn xxxxxx En  Srn aa En ppp"]
    masks = [chat_masks(r) for r in rows]
    batch = {k: torch.cat([m[k] for m in masks]) for k in masks[0] if k != "expected"}
    groups = slice_fusion_windows(**batch)
    assert groups.sample_index.tolist() == [0]
    hidden = randn(2, batch["slice_mask"].shape[1], H, seed=14)
    out = apply_grouped_slice_fusion(hidden, groups, Med3DQwenSliceSelfAttention(H, gate_init=0.3))
    assert torch.equal(out[1], hidden[1]) and not torch.equal(out[0], hidden[0])


def test_fusion_window_errors():
    masks = chat_masks(CHATS["single_turn"])
    masks.pop("expected")
    with pytest.raises(ValueError, match="fusion_text_scope"):
        slice_fusion_windows(**masks, scope="everything")
    with pytest.raises(ValueError, match="turn_end_mask"):
        slice_fusion_windows(**{**masks, "turn_end_mask": masks["turn_end_mask"][:, 1:]})
    with pytest.raises(ValueError, match="fusion_text_scope"):
        tiny_config(fusion_text_scope="everything")


# ---------------------------------------------------------------------------------------------------------------
# The window inside the model (tiny Med3DQwen, ChatML token layout from fusion_chat)
# ---------------------------------------------------------------------------------------------------------------


def identity_decoder(model) -> None:
    """Replace every decoder block by the identity (the fusion after it still runs): only the fusion can then carry
    information between positions, so what reaches the slice tokens is exactly what the fusion window holds."""
    for layer in model.model.language_model.layers:
        layer.forward.forward = lambda hidden_states, *args, **kwargs: hidden_states


def fused_states(model, row: list[int]) -> torch.Tensor:
    """last hidden states (L, H) of one token row, with the same volume for every row."""
    with torch.no_grad():
        out = model.model(input_ids=torch.tensor([row]), pixel_values=volumes(model.config, 1))
    return out.last_hidden_state[0]


def slice_states(model, messages_list) -> list[torch.Tensor]:
    """the slice tokens' last hidden states (N_s, H) of each chat, each run on its own."""
    rows = [chat_ids(model.config, messages) for messages in messages_list]
    return [fused_states(model, row)[torch.tensor(row) == SLICE] for row in rows]


def assert_same_slices(a: torch.Tensor, b: torch.Tensor) -> None:
    # float noise only (different sequence lengths change reduction orders); a leak moves them by > 1e-3
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def assert_moved(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() > 1e-3


@pytest.fixture
def fusion_only_model():
    model = make_model(tiny_config())
    open_fusion(model)
    identity_decoder(model)
    return model


def test_system_prompt_does_not_reach_the_slice_tokens(fusion_only_model):
    user = ("user", [IMAGE_PART, 11, 12, 13])
    short, long = ("system", [60, 61]), ("system", [62, 63, 64, 65, 66, 67])
    other_question = ("user", [IMAGE_PART, 14, 12, 13])
    states = slice_states(fusion_only_model, [[short, user], [long, user], [short, other_question]])
    assert_same_slices(states[0], states[1])
    assert_moved(states[0], states[2])  # ...while the question does


def test_prompt_scope_lets_the_system_prompt_in():
    model = make_model(tiny_config(fusion_text_scope="prompt"))
    open_fusion(model)
    identity_decoder(model)
    user = ("user", [IMAGE_PART, 11, 12, 13])
    states = slice_states(model, [[("system", [60, 61]), user], [("system", [62, 61]), user]])
    assert_moved(states[0], states[1])


def test_answers_and_later_turns_do_not_reach_the_slice_tokens(fusion_only_model):
    def chat(answer, follow_up):
        return [
            ("system", [60, 61]),
            ("user", [IMAGE_PART, 11, 12, 13]),
            ("assistant", answer),
            ("user", follow_up),
            ("assistant", [30, 31]),
        ]

    states = slice_states(fusion_only_model, [chat([30, 31], [16, 17]), chat([40, 41, 42], [18, 19])])
    assert_same_slices(states[0], states[1])


def test_earlier_answers_do_not_reach_the_slice_tokens_of_a_later_turn(fusion_only_model):
    def chat(answer):
        return [
            ("system", [60, 61]),
            ("user", [16, 17]),
            ("assistant", answer),
            ("user", [IMAGE_PART, 11, 12, 13]),
            ("assistant", [30, 31]),
        ]

    states = slice_states(fusion_only_model, [chat([30, 31]), chat([40, 41, 42, 43])])
    assert_same_slices(states[0], states[1])


def test_plain_text_answer_does_not_reach_the_slice_tokens():
    # Without chat markup the question goes before the volume: what follows the last image block is the answer.
    model = make_model(tiny_config())
    open_fusion(model)
    block = chat_ids(model.config, [("user", [IMAGE_PART])])[3:-2]  # the image block alone
    rows = [[11, 12] + block + [30, 31], [11, 12] + block + [40, 41, 42], [14, 12] + block + [30, 31]]
    prompt = len(rows[0]) - 2
    states = [fused_states(model, row) for row in rows]
    assert_same_slices(states[0][:prompt], states[1][:prompt])  # every position before the answer
    identity_decoder(model)
    slices = [fused_states(model, row)[torch.tensor(row) == SLICE] for row in rows]
    assert_same_slices(slices[0], slices[1])
    assert_moved(slices[0], slices[2])  # the question before the volume does reach them


def test_fusion_window_from_embeddings_equals_the_one_from_ids():
    model = make_model(tiny_config())
    rows = [
        chat_ids(model.config, [("system", [60]), ("user", [IMAGE_PART, 11, 12]), ("assistant", [30])]),
        chat_ids(model.config, [("user", [16]), ("assistant", [31]), ("user", [IMAGE_PART, 13])]),
    ]
    length = max(map(len, rows))
    input_ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
    attention_mask = (input_ids != PAD).long()
    image_mask, slice_mask = input_ids == model.config.image_token_id, input_ids == SLICE
    by_ids = model.model.fusion_context(image_mask, slice_mask, attention_mask, input_ids=input_ids)
    embeds = model.get_input_embeddings()(input_ids)
    by_embeds = model.model.fusion_context(image_mask, slice_mask, attention_mask, inputs_embeds=embeds)
    for field in ("sample_index", "slice_mask", "text_mask"):
        assert torch.equal(getattr(by_ids.groups, field), getattr(by_embeds.groups, field)), field
    assert by_ids.groups.text_mask.sum(dim=1).tolist() == [2, 1]
    with pytest.raises(ValueError, match="input_ids or inputs_embeds"):
        model.model.fusion_context(image_mask, slice_mask, attention_mask)
    no_fusion = make_model(tiny_config(use_ssa=False, use_mssa=False))
    assert no_fusion.model.fusion_context(image_mask, slice_mask, attention_mask, input_ids=input_ids) is None


def left_pad(rows):
    length = max(map(len, rows))
    input_ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
    return input_ids, (torch.arange(length)[None, :] >= torch.tensor([length - len(r) for r in rows])[:, None]).long()


def test_left_padded_batch_equals_single_samples():
    model = make_model(tiny_config())
    open_fusion(model)
    config = model.config
    rows = [
        chat_ids(config, [("system", [60, 61]), ("user", [IMAGE_PART, 11, 12, 13])], add_generation_prompt=True),
        chat_ids(
            config,
            [("system", [60]), ("user", [16]), ("assistant", [30]), ("user", [IMAGE_PART, 14, 15])],
            add_generation_prompt=True,
        ),
    ]
    pixel_values = volumes(config, 2)
    input_ids, attention_mask = left_pad(rows)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, pixel_values=pixel_values
        )
        for b, row in enumerate(rows):
            single = model(input_ids=torch.tensor([row]), pixel_values=pixel_values[b : b + 1])
            torch.testing.assert_close(batched.logits[b, -len(row) :], single.logits[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(batched.closed_logits[b], single.closed_logits[0], rtol=1e-4, atol=1e-5)


def test_cached_generation_equals_uncached_on_a_multi_turn_chat():
    model = make_model(tiny_config())
    open_fusion(model)
    config = model.config
    rows = [
        chat_ids(config, [("user", [IMAGE_PART, 11, 12]), ("assistant", [30, 31]), ("user", [16, 17])], True),
        chat_ids(config, [("system", [60]), ("user", [IMAGE_PART, 13])], add_generation_prompt=True),
    ]
    input_ids, attention_mask = left_pad(rows)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=volumes(config, 2),
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=PAD,
        output_logits=True,
        return_dict_in_generate=True,
    )
    cached, uncached = model.generate(**kwargs), model.generate(**kwargs, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step_cached, step_uncached in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(step_cached, step_uncached, rtol=1e-4, atol=1e-5)
    assert IM_START in input_ids


def test_fusion_window_on_the_real_qwen_tokens_is_the_question():
    # The real tokenizer and its chat template (the processor's too): the window must decode to the question exactly.
    from med3dqwen.modeling.configuration_med3d_qwen import Med3DQwenConfig
    from med3dqwen.processing.processing_med3d_qwen import IMAGE_TOKEN, SLICE_TOKEN
    from med3dqwen.processing.tokenization_med3d_qwen import load_qwen2_5_tokenizer

    tokenizer = load_qwen2_5_tokenizer()
    config = Med3DQwenConfig()
    messages = [
        {"role": "system", "content": "You are a radiologist."},
        {"role": "user", "content": "Describe the scan."},
        {"role": "assistant", "content": "A chest CT."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nIs there a pleural effusion?"}]},
        {"role": "assistant", "content": "Yes."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    text = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * 4 + SLICE_TOKEN * 2)
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])

    def is_token(token_id):
        return input_ids == token_id

    groups = slice_fusion_windows(
        is_token(config.slice_token_id),
        is_token(config.image_token_id)
        | is_token(config.vision_start_token_id)
        | is_token(config.vision_end_token_id),
        is_token(config.im_start_token_id),
        is_token(config.im_end_token_id),
    )
    assert groups.sample_index.tolist() == [0]
    assert groups.slice_mask.sum() == 2
    window = tokenizer.decode(input_ids[0][groups.text_mask[0]])
    assert window.strip() == "Is there a pleural effusion?"


def test_mssa_with_zero_ssa_layers_runs_before_the_first_block():
    # k = 0: "MSSA after block k" is MSSA on the embeddings, before any decoder block (not after block 1).
    model = make_model(tiny_config(ssa_layers=0))
    open_fusion(model)
    seen = {}

    def grab_embeddings(module, args, kwargs):
        seen["embeddings"] = kwargs["inputs_embeds"].detach()

    first_block = model.model.language_model.layers[0].forward
    inner = first_block.forward

    def grab_block_input(hidden_states, *args, **kwargs):
        seen["block_input"] = hidden_states.detach()
        return inner(hidden_states, *args, **kwargs)

    first_block.forward = grab_block_input
    handle = model.model.language_model.register_forward_pre_hook(grab_embeddings, with_kwargs=True)
    row = chat_ids(model.config, [("system", [60]), ("user", [IMAGE_PART, 11, 12, 13])], add_generation_prompt=True)
    input_ids = torch.tensor([row])
    with torch.no_grad():
        model(input_ids=input_ids, pixel_values=volumes(model.config, 1))
    handle.remove()
    context = model.model.fusion_context(
        input_ids == model.config.image_token_id, input_ids == SLICE, input_ids=input_ids
    )
    assert list(context.modules) == [-1]
    expected = apply_grouped_slice_fusion(seen["embeddings"], context.groups, model.model.multi_head_slice_attention)
    torch.testing.assert_close(seen["block_input"], expected)
    assert not torch.allclose(seen["block_input"], seen["embeddings"], rtol=0, atol=1e-6)  # MSSA did change them
