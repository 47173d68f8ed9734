"""Tests for Med3DQwenModel / Med3DQwenForConditionalGeneration (tiny configs, transformers-style common checks)."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, Qwen2Config, Qwen2ForCausalLM

import med3dqwen  # noqa: F401  (registers the Auto classes)
from med3dqwen.modeling.configuration_med3d_qwen import Med3DQwenConfig
from med3dqwen.modeling.modeling_med3d_qwen import Med3DQwenForConditionalGeneration, Med3DQwenModel


# Token ids of the tiny vocabulary.
IMAGE, SLICE, V_START, V_END, IM_START, PAD = 90, 91, 92, 93, 94, 0


class Med3DQwenModelTester:
    """Tiny config (vocab 99, hidden 32, 2 layers, 4 heads, 64³ volumes) and inputs with the image block first."""

    def __init__(self, batch_size: int = 2, **config_overrides):
        self.batch_size = batch_size
        self.config_overrides = config_overrides

    def get_config(self) -> Med3DQwenConfig:
        kwargs = dict(
            text_config=dict(
                model_type="qwen2",
                vocab_size=99,
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
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
            ssa_layers=1,
        )
        kwargs.update(self.config_overrides)
        return Med3DQwenConfig(**kwargs)

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        n_visual, n_slices = config.vision_config.num_visual_tokens, config.vision_config.num_slice_tokens
        # <|vision_start|> visual tokens, slice tokens <|vision_end|> question <|im_start|> assistant \n answer
        prompt = [V_START] + [IMAGE] * n_visual + [SLICE] * n_slices + [V_END, 11, 12, 13, IM_START, 20, 21]
        input_ids = torch.tensor([prompt + [30, 31]] * self.batch_size)
        input_ids[1, -len(prompt) - 2 + len(prompt) - 4] = 14  # the samples differ in one question token
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.rand(self.batch_size, config.vision_config.in_channels, 64, 64, 64),
        }
        return config, inputs


@pytest.fixture
def tester():
    return Med3DQwenModelTester()


def make_model(config, seed: int = 0):
    torch.manual_seed(seed)
    return Med3DQwenForConditionalGeneration(config).eval()


def open_fusion(model):
    """Give SSA/MSSA non-zero weights (they start as identities) so that they affect outputs."""
    with torch.no_grad():
        for module in model.model.slice_self_attention or []:
            module.gate.fill_(1e-3)
        if model.model.multi_head_slice_attention is not None:
            torch.nn.init.normal_(model.model.multi_head_slice_attention.w_o.weight, std=0.05)


def test_model_is_small(tester):
    config, _ = tester.prepare_config_and_inputs_for_common()
    assert sum(p.numel() for p in make_model(config).parameters()) < 1_000_000


def test_forward_shapes_and_hidden_states(tester):
    config, inputs = tester.prepare_config_and_inputs_for_common()
    out = make_model(config)(**inputs, output_hidden_states=True)
    batch, length = inputs["input_ids"].shape
    assert out.logits.shape == (batch, length, 99)
    assert len(out.hidden_states) == config.text_config.num_hidden_layers + 1
    assert all(h.shape == (batch, length, 32) for h in out.hidden_states)
    assert out.image_hidden_states.shape == (batch, config.num_image_tokens, 32)
    assert out.closed_logits.shape == (batch, config.num_closed_labels)


def test_determinism_in_eval(tester):
    config, inputs = tester.prepare_config_and_inputs_for_common()
    model = make_model(config)
    open_fusion(model)
    torch.testing.assert_close(model(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_save_load_round_trip(tester, tmp_path):
    config, inputs = tester.prepare_config_and_inputs_for_common()
    model = make_model(config)
    open_fusion(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForImageTextToText"].endswith("Med3DQwenForConditionalGeneration")
    assert saved["auto_map"]["AutoModel"].endswith("Med3DQwenModel")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, Med3DQwenForConditionalGeneration)
    assert loaded.config._attn_implementation == "sdpa"  # no flash-attn on CPU: the SDPA fallback
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-5)
    assert isinstance(AutoModel.from_pretrained(tmp_path), Med3DQwenModel)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), Med3DQwenConfig)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_exactly_the_trainable_parameters(tester, checkpointing):
    config, inputs = tester.prepare_config_and_inputs_for_common()
    model = make_model(config)
    open_fusion(model)
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    labels = inputs["input_ids"].clone()
    labels[:, :-2] = -100
    # `loss` alone (what Trainer backpropagates) reaches the closed head once closed labels are given.
    model(**inputs, labels=labels, closed_labels=torch.tensor([1, 0])).loss.backward()
    for name, param in model.named_parameters():
        if name.startswith(("model.vision_encoder.", "model.multi_modal_projector.")):
            # Frozen by design: the pretrained encoder (only a prompt stem would train; none with burn_in) and the
            # projector (trained only in the alignment stage).
            assert not param.requires_grad and param.grad is None, name
        else:
            assert param.requires_grad and param.grad is not None, name


def test_gradient_checkpointing_gives_the_same_gradients(tester):
    config, inputs = tester.prepare_config_and_inputs_for_common()
    grads = []
    for checkpointing in (False, True):
        model = make_model(config)
        open_fusion(model)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_encoder_stays_frozen_in_eval_mode(tester):
    config, inputs = tester.prepare_config_and_inputs_for_common()
    model = make_model(config)
    model.train()
    assert model.training and not model.model.vision_encoder.training
    assert not any(m.training for m in model.model.vision_encoder.modules())
    stats = {n: b.clone() for n, b in model.model.vision_encoder.named_buffers()}
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for name, buffer in model.model.vision_encoder.named_buffers():
        assert torch.equal(buffer, stats[name]), f"BatchNorm buffer {name} moved during training"


def test_channel_encoding_trains_only_the_prompt_stem(tester):
    config, inputs = Med3DQwenModelTester(prompt_encoding="channel").prepare_config_and_inputs_for_common()
    assert config.vision_config.in_channels == 2
    model = make_model(config)
    trainable = [n for n, p in model.model.vision_encoder.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("prompt_stem.") for n in trainable)
    # At initialisation the contour channel changes nothing: the model equals the single-channel one.
    with_contour = model(**inputs).logits
    inputs["pixel_values"][:, 1] = 0.0
    torch.testing.assert_close(model(**inputs).logits, with_contour, rtol=0, atol=0)
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert model.model.vision_encoder.prompt_stem.c1.grad is not None


def test_initialisation_with_zero_initializer_range(tester):
    config, _ = tester.prepare_config_and_inputs_for_common()
    # transformers reads `initializer_range or 0.02`, so "zero" is a tiny value (as in its common tests).
    config.text_config.initializer_range = 1e-10
    config.initializer_range = 1e-10
    model = make_model(config)
    for name, param in model.named_parameters():
        if name.endswith("gate") or "w_o" in name or "prompt_stem" in name:
            assert torch.all(param == 0), name  # start values that leave the decoder unchanged
        elif "norm" in name or name.endswith((".1.weight", "ln1.weight", "ln2.weight")) and param.dim() == 1:
            continue  # normalisation scales start at one
        elif name.endswith(".scale"):
            assert torch.allclose(param, torch.full_like(param, 1e-6)), name  # DCFormer layer scale
        elif param.dim() > 1 and "relative_bias" not in name:
            assert param.abs().max() < 1e-8, f"{name} is not initialised from initializer_range"


def test_splice_leaves_text_tokens_untouched(tester):
    config, inputs = tester.prepare_config_and_inputs_for_common()
    model = make_model(config)
    captured = {}

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach()

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    model(**inputs)
    handle.remove()
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    text = (ids != IMAGE) & (ids != SLICE)
    torch.testing.assert_close(captured["embeds"][text], embeds[text], rtol=0, atol=0)
    first_after = int((ids[0] == V_END).nonzero()) + 1  # the first text token after the image block
    torch.testing.assert_close(captured["embeds"][0, first_after], embeds[0, first_after], rtol=0, atol=0)
    features = model.get_image_features(inputs["pixel_values"]).pooler_output
    n_visual = config.vision_config.num_visual_tokens
    torch.testing.assert_close(captured["embeds"][0][ids[0] == IMAGE], features[0, :n_visual])
    torch.testing.assert_close(captured["embeds"][0][ids[0] == SLICE], features[0, n_visual:])


def test_answer_tokens_never_reach_the_slice_tokens(tester):
    # SSA/MSSA mix question text into the slice tokens, which sit before it: answer tokens must stay out.
    config, inputs = tester.prepare_config_and_inputs_for_common()
    model = make_model(config)
    open_fusion(model)
    out_a = model(**inputs, output_hidden_states=True)
    inputs["input_ids"][:, -2:] = torch.tensor([40, 41])  # another answer
    out_b = model(**inputs, output_hidden_states=True)
    prompt_len = inputs["input_ids"].shape[1] - 2
    for h_a, h_b in zip(out_a.hidden_states, out_b.hidden_states, strict=True):
        torch.testing.assert_close(h_a[:, :prompt_len], h_b[:, :prompt_len], rtol=0, atol=0)
    torch.testing.assert_close(out_a.closed_logits, out_b.closed_logits, rtol=0, atol=0)
    # ...while the question does reach them.
    inputs["input_ids"][:, -6] = 15  # a question token (-5 is <|im_start|>)
    out_c = model(**inputs, output_hidden_states=True)
    slice_pos = inputs["input_ids"][0] == SLICE
    assert not torch.allclose(out_c.hidden_states[-1][0][slice_pos], out_b.hidden_states[-1][0][slice_pos])


@pytest.mark.parametrize(("use_ssa", "use_mssa"), [(False, False), (True, False), (False, True)])
def test_fusion_ablation_flags(use_ssa, use_mssa):
    config, inputs = Med3DQwenModelTester(use_ssa=use_ssa, use_mssa=use_mssa).prepare_config_and_inputs_for_common()
    model = make_model(config)
    assert (model.model.slice_self_attention is not None) == use_ssa
    assert (model.model.multi_head_slice_attention is not None) == use_mssa
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_generate_with_and_without_cache_and_volume(tester):
    config, inputs = tester.prepare_config_and_inputs_for_common()
    model = make_model(config)
    open_fusion(model)
    prompt = {k: v[:, :-2] for k, v in inputs.items() if k != "pixel_values"}
    prompt["pixel_values"] = inputs["pixel_values"]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    cached = model.generate(**prompt, **kwargs)
    uncached = model.generate(**prompt, use_cache=False, **kwargs)
    assert cached.shape == (2, prompt["input_ids"].shape[1] + 6)
    assert torch.equal(cached, uncached)
    text_only = model.generate(input_ids=torch.tensor([[11, 12, 13]]), **kwargs)
    assert text_only.shape == (1, 9)


def test_bad_inputs_raise_clear_errors(tester):
    config, inputs = tester.prepare_config_and_inputs_for_common()
    model = make_model(config)
    wrong_count = dict(inputs, input_ids=inputs["input_ids"].clone())
    wrong_count["input_ids"][:, 2] = 11  # one image token fewer per sample
    with pytest.raises(ValueError, match="image tokens"):
        model(**wrong_count)
    with pytest.raises(ValueError, match=r"pixel_values must be \(num_volumes, 1, 64, 64, 64\)"):
        model(**dict(inputs, pixel_values=torch.rand(2, 1, 32, 64, 64)))
    with pytest.raises(ValueError, match="floating point"):
        model(**dict(inputs, pixel_values=torch.zeros(2, 1, 64, 64, 64, dtype=torch.uint8)))
    with pytest.raises(ValueError, match="meta"):
        model(**dict(inputs, pixel_values=torch.empty(2, 1, 64, 64, 64, device="meta")))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()


def test_from_qwen2_pretrained_loads_the_decoder(tmp_path):
    qwen_config = Qwen2Config(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(1)
    qwen = Qwen2ForCausalLM(qwen_config).eval()
    qwen.save_pretrained(tmp_path / "qwen")
    tiny = Med3DQwenModelTester().get_config()
    model = Med3DQwenForConditionalGeneration.from_qwen2_pretrained(
        str(tmp_path / "qwen"), vision_config=tiny.vision_config.to_dict(), image_token_id=IMAGE,
        slice_token_id=SLICE, im_start_token_id=IM_START, ssa_layers=1,
    ).eval()  # fmt: skip
    assert not model.config.tie_word_embeddings
    for name, param in qwen.state_dict().items():
        ours = name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name
        torch.testing.assert_close(model.state_dict()[ours], param, rtol=0, atol=0, msg=name)
    ids = torch.tensor([[11, 12, 13, 14]])
    # Fusion starts as the identity, so on text the composite is exactly the Qwen model.
    torch.testing.assert_close(model(input_ids=ids).logits, qwen(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_presets_hold_the_real_architectures():
    expected = {
        "0.5b": (896, 24, 14, 2, 4864, True),
        "1.5b": (1536, 28, 12, 2, 8960, True),
        "3b": (2048, 36, 16, 2, 11008, True),
        "7b": (3584, 28, 28, 4, 18944, False),
    }
    for name, numbers in expected.items():
        text = Med3DQwenConfig.from_preset(name).text_config
        got = (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
               text.intermediate_size, text.tie_word_embeddings)  # fmt: skip
        assert got == numbers, name
    assert Med3DQwenConfig.from_preset("qwen2.5-1.5b", use_mssa=False).use_mssa is False
    with pytest.raises(ValueError, match="unknown preset"):
        Med3DQwenConfig.from_preset("13b")


def test_config_validation():
    with pytest.raises(ValueError, match="prompt_encoding"):
        Med3DQwenModelTester(prompt_encoding="overlay").get_config()
    with pytest.raises(ValueError, match="ssa_layers"):
        Med3DQwenModelTester(ssa_layers=5).get_config()
    with pytest.raises(ValueError, match="mssa_heads"):
        Med3DQwenModelTester(mssa_heads=5).get_config()
    config = Med3DQwenModelTester().get_config()
    restored = Med3DQwenConfig.from_dict(copy.deepcopy(config.to_dict()))
    assert restored.num_image_tokens == config.num_image_tokens == 8 + 4


@pytest.mark.slow
def test_remote_code_load_without_the_package(tester, tmp_path):
    """A clean interpreter with only torch + transformers (our package hidden) loads the saved folder."""
    config, inputs = tester.prepare_config_and_inputs_for_common()
    model = make_model(config)
    open_fusion(model)
    model.save_pretrained(tmp_path / "ckpt")
    torch.save({**inputs, "logits": model(**inputs).logits}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["med3dqwen"] = None  # any import of our package fails
        import torch
        from transformers import AutoModelForImageTextToText
        model = AutoModelForImageTextToText.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        data = torch.load({str(tmp_path / "expected.pt")!r})
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                       pixel_values=data["pixel_values"]).logits
        torch.testing.assert_close(logits, data["logits"], rtol=0, atol=1e-5)
        print("remote-code OK")
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote-code OK" in result.stdout
    copied = {p.name for p in (tmp_path / "ckpt").glob("*.py")}
    assert {"modeling_med3d_qwen.py", "configuration_med3d_qwen.py", "dcformer_med3d_qwen.py"} <= copied


def test_parameter_report_for_the_real_presets():
    from med3dqwen.modeling.report import format_markdown, parameter_report

    reports = {p: parameter_report(Med3DQwenConfig.from_preset(p), name=p) for p in ("0.5b", "1.5b", "3b", "7b")}
    # Decoder sizes equal the published Qwen2.5 parameter counts (embeddings tied up to 3B).
    assert {p: r.decoder for p, r in reports.items()} == {
        "0.5b": 494_032_768, "1.5b": 1_543_714_304, "3b": 3_085_938_688, "7b": 7_615_616_512,
    }  # fmt: skip
    assert all(r.encoder == 18_244_800 for r in reports.values())
    assert reports["0.5b"].projector == 3_498_240 and reports["7b"].projector == 47_221_248
    # LoRA r=16 on q,k,v,o,gate,up,down of 24 blocks of Qwen2.5-0.5B: 16 * sum(in + out) per block.
    per_block = 16 * ((896 + 896) + (896 + 128) * 2 + (896 + 896) + (896 + 4864) * 2 + (4864 + 896))
    assert reports["0.5b"].lora == 24 * per_block
    assert 2.0 < reports["0.5b"].trainable_percent < 2.6  # the paper reports 2.4 % at 0.5B
    table = format_markdown(list(reports.values()))
    assert table.count("\n") == 5 and "0.00 GiB |" in table.splitlines()[-1]
