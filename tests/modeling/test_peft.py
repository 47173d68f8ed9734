"""PEFT round trip of the fusion modules (issue #8, item 7): LoRA on the decoder, every trainable non-LoRA part in
`modules_to_save`; after training, the live adapter, a reloaded adapter, the merged model and the merged model saved
and reloaded must give the same logits and closed logits."""

import pytest
import torch
from fusion_chat import IMAGE_PART, PAD, chat_ids, make_model, tiny_config, volumes

from med3dqwen.modeling.fusion_med3d_qwen import (
    Med3DQwenMultiHeadSliceAttention,
    Med3DQwenSliceSelfAttentionStack,
    apply_slice_fusion,
)
from med3dqwen.modeling.modeling_med3d_qwen import Med3DQwenForConditionalGeneration


peft = pytest.importorskip("peft")

DECODER_LORA = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# every trainable part that is not LoRA: SSA stack, MSSA, slice-token projection, closed head, prompt stem
MODULES_TO_SAVE = [
    "slice_self_attention",
    "multi_head_slice_attention",
    "slice_tokenizer",
    "closed_head",
    "prompt_stem",
]


def batch(config):
    rows = [
        chat_ids(config, [("system", [60, 61]), ("user", [IMAGE_PART, 11, 12, 13]), ("assistant", [30, 31])]),
        chat_ids(config, [("system", [60, 61]), ("user", [IMAGE_PART, 14, 15, 13]), ("assistant", [32, 33])]),
    ]
    input_ids = torch.tensor(rows)
    labels = torch.full_like(input_ids, -100)
    labels[:, -4:-2] = input_ids[:, -4:-2]  # the answers
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": volumes(config, 2),
    }, labels


def outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits, out.closed_logits


def assert_same(got, expected, what):
    for name, a, b in zip(("logits", "closed_logits"), got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{what}, {n}: {m}")


def test_ssa_stack_is_a_module_modules_to_save_accepts():
    model = make_model(tiny_config())
    stack = model.model.slice_self_attention
    assert isinstance(stack, Med3DQwenSliceSelfAttentionStack) and not isinstance(stack, torch.nn.ModuleList)
    assert [name for name, _ in model.model.named_parameters() if "slice_self_attention" in name] == [
        "slice_self_attention.0.gate",
        "slice_self_attention.1.gate",
    ]  # the keys a ModuleList gave
    wrapper = peft.utils.other.ModulesToSaveWrapper(stack, "default")
    assert wrapper.modules_to_save["default"] is not stack


def test_apply_slice_fusion_runs_the_active_copy_of_a_peft_wrapper():
    torch.manual_seed(0)
    mssa = Med3DQwenMultiHeadSliceAttention(8, num_heads=2, max_slices=4)
    wrapper = peft.utils.other.ModulesToSaveWrapper(mssa, "default")
    with torch.no_grad():
        torch.nn.init.normal_(wrapper.modules_to_save["default"].w_o.weight, std=0.5)
    hidden = torch.randn(1, 6, 8)
    slice_mask = torch.tensor([[False, True, True, False, False, False]])
    text_mask = torch.tensor([[False, False, False, True, True, False]])
    out = apply_slice_fusion(hidden, slice_mask, text_mask, wrapper)
    torch.testing.assert_close(
        out, apply_slice_fusion(hidden, slice_mask, text_mask, wrapper.modules_to_save["default"])
    )
    assert not torch.allclose(out, hidden)
    wrapper.enable_adapters(False)  # the original (W_O = 0: the identity) runs again
    torch.testing.assert_close(apply_slice_fusion(hidden, slice_mask, text_mask, wrapper), hidden)


@pytest.mark.parametrize(
    ("modules_to_save", "checkpointing"),
    [
        (MODULES_TO_SAVE, False),
        (["slice_self_attention.0", "slice_self_attention.1"] + MODULES_TO_SAVE[1:], True),  # as TRL trains
    ],
    ids=["whole-stack", "per-layer-checkpointed"],
)
def test_peft_trains_and_reloads_the_fusion_modules(tmp_path, modules_to_save, checkpointing):
    config = tiny_config(prompt_encoding="channel")
    base = make_model(config)
    base.save_pretrained(tmp_path / "base")
    inputs, labels = batch(config)

    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=DECODER_LORA,
        modules_to_save=modules_to_save,
    )
    model = peft.get_peft_model(base, lora)
    wrappers = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, peft.utils.other.ModulesToSaveWrapper)
    }
    assert len(wrappers) == len(modules_to_save), sorted(wrappers)
    originals = {
        name: {n: p.detach().clone() for n, p in w.original_module.named_parameters()} for name, w in wrappers.items()
    }

    if checkpointing:
        model.enable_input_require_grads()
        model.base_model.model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    closed_targets = torch.tensor([1, 0])
    for _ in range(4):
        optimizer.zero_grad()
        out = model(**inputs, labels=labels)
        loss = out.loss + torch.nn.functional.cross_entropy(out.closed_logits, closed_targets)
        loss.backward()
        for name, wrapper in wrappers.items():
            trained = wrapper.modules_to_save["default"]
            for n, param in trained.named_parameters():
                assert param.requires_grad and param.grad is not None, f"{name}.{n}: the trained copy got no gradient"
            assert all(p.grad is None for p in wrapper.original_module.parameters()), name
        optimizer.step()
    model.eval()

    for name, wrapper in wrappers.items():
        trained = dict(wrapper.modules_to_save["default"].named_parameters())
        for n, before in originals[name].items():
            assert not torch.equal(trained[n].detach(), before), f"{name}.{n} did not change in training"
            assert torch.equal(dict(wrapper.original_module.named_parameters())[n].detach(), before), name

    live = outputs(model, inputs)  # (a)
    with model.disable_adapter():
        untrained = outputs(model, inputs)
    assert (live[0] - untrained[0]).abs().max() > 1e-3 and (live[1] - untrained[1]).abs().max() > 1e-3

    model.save_pretrained(tmp_path / "adapter")
    fresh = Med3DQwenForConditionalGeneration.from_pretrained(tmp_path / "base")
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()  # (b)
    assert_same(outputs(reloaded, inputs), live, "PeftModel.from_pretrained")

    merged = model.merge_and_unload()  # (c)
    assert isinstance(merged, Med3DQwenForConditionalGeneration)
    assert not any(isinstance(m, peft.utils.other.ModulesToSaveWrapper) for m in merged.modules())
    assert_same(outputs(merged, inputs), live, "merge_and_unload")

    merged.save_pretrained(tmp_path / "merged")  # (d)
    loaded = Med3DQwenForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    assert_same(outputs(loaded, inputs), live, "merged, saved and reloaded")


def test_generate_under_peft_runs_the_trained_copies():
    config = tiny_config()
    inputs, _ = batch(config)
    prompt = {k: v[:, :-5] if k != "pixel_values" else v for k, v in inputs.items()}  # up to "assistant\n"
    model = peft.get_peft_model(
        make_model(config),
        peft.LoraConfig(r=4, target_modules=DECODER_LORA, modules_to_save=MODULES_TO_SAVE, task_type="CAUSAL_LM"),
    )
    kwargs = dict(
        max_new_tokens=3, do_sample=False, pad_token_id=PAD, output_logits=True, return_dict_in_generate=True
    )
    before = model.generate(**prompt, **kwargs).logits[0]  # (B, vocab) of the first new token
    with torch.no_grad():
        copy = model.base_model.model.model.multi_head_slice_attention.modules_to_save["default"]
        torch.nn.init.normal_(copy.w_o.weight, std=0.5)  # only the trainable copy changes
    after = model.generate(**prompt, **kwargs).logits[0]
    assert (after - before).abs().max() > 1e-3
