"""Issue #8, model side: the model accepts what transformers' multimodal models accept (LLaVA / Qwen2.5-VL, 5.24),
refuses what it does not use, and trains its closed head through `loss`."""

import pytest
import torch
import torch.nn.functional as F
from test_modeling_med3d_qwen import IM_START, IMAGE, PAD, SLICE, Med3DQwenModelTester, make_model, open_fusion
from transformers import AutoModelForImageTextToText, GenerationConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling

from med3dqwen.modeling.configuration_med3d_qwen import Med3DQwenConfig
from med3dqwen.modeling.modeling_med3d_qwen import Med3DQwenForConditionalGeneration, Med3DQwenModel


GREEDY = dict(max_new_tokens=5, do_sample=False, pad_token_id=PAD)


@pytest.fixture
def config_and_inputs():
    return Med3DQwenModelTester().prepare_config_and_inputs_for_common()


def prompt_only(inputs: dict) -> dict:
    """The inputs without their 2 answer tokens (what generation starts from)."""
    return {k: (v if k == "pixel_values" else v[:, :-2]) for k, v in inputs.items()}


# --- 1. placeholder tokens without volumes are ordinary tokens ---------------------------------------------------


def test_placeholders_without_pixel_values_are_ordinary_tokens(config_and_inputs):
    config, inputs = config_and_inputs
    model = make_model(config)
    open_fusion(model)
    ids = inputs["input_ids"]
    out = model(input_ids=ids, attention_mask=inputs["attention_mask"], output_hidden_states=True)
    # No splice, no fusion: exactly the decoder on the token embeddings.
    plain = model.model.language_model(inputs_embeds=model.get_input_embeddings()(ids), output_hidden_states=True)
    for ours, decoder in zip(out.hidden_states, plain.hidden_states, strict=True):
        torch.testing.assert_close(ours, decoder, rtol=0, atol=0)
    assert out.image_outputs is None and out.closed_logits is None
    # ... while with volumes a wrong placeholder count is still an error.
    one_fewer = ids.clone()
    one_fewer[:, 2] = 11
    with pytest.raises(ValueError, match="image tokens"):
        model(input_ids=one_fewer, pixel_values=inputs["pixel_values"])


def test_generate_with_an_assistant_model(config_and_inputs):
    # The assistant's passes get no pixel_values; with greedy decoding the result is the main model's.
    config, inputs = config_and_inputs
    model = make_model(config)
    open_fusion(model)
    prompt = {k: v[:1] for k, v in prompt_only(inputs).items()}
    expected = model.generate(**prompt, **GREEDY)
    assisted = model.generate(**prompt, assistant_model=make_model(config, seed=1), **GREEDY)
    assert torch.equal(assisted, expected)


# --- 2. inputs_embeds with pixel_values ----------------------------------------------------------------------


@pytest.mark.parametrize("model_class", [Med3DQwenModel, Med3DQwenForConditionalGeneration])
def test_inputs_embeds_with_pixel_values_equal_input_ids(config_and_inputs, model_class):
    config, inputs = config_and_inputs
    torch.manual_seed(0)
    model = model_class(config).eval()
    backbone = model if model_class is Med3DQwenModel else model.model
    with torch.no_grad():
        backbone.multi_head_slice_attention.w_o.weight.normal_(std=0.05)
        for ssa in backbone.slice_self_attention:
            ssa.gate.fill_(1e-3)
    ids = inputs.pop("input_ids")
    from_ids = model(input_ids=ids, **inputs)
    from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids), **inputs)
    for name in ("last_hidden_state", "logits", "closed_logits", "prompt_positions"):
        if name in from_ids:
            torch.testing.assert_close(from_embeds[name], from_ids[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_from_inputs_embeds_with_pixel_values(config_and_inputs, num_beams):
    config, inputs = config_and_inputs
    model = make_model(config)
    open_fusion(model)
    prompt = prompt_only(inputs)
    from_ids = model.generate(**prompt, num_beams=num_beams, **GREEDY)
    embeds = model.get_input_embeddings()(prompt.pop("input_ids"))
    from_embeds = model.generate(inputs_embeds=embeds, **prompt, num_beams=num_beams, **GREEDY)
    assert torch.equal(from_embeds, from_ids[:, embeds.shape[1] :])  # only the new tokens come back


# --- 3. get_image_features ------------------------------------------------------------------------------------


def test_get_image_features_returns_the_transformers_output_type(config_and_inputs):
    config, inputs = config_and_inputs
    model = make_model(config)
    vision = config.vision_config
    out = model.get_image_features(inputs["pixel_values"])
    assert isinstance(out, BaseModelOutputWithPooling)
    assert out.pooler_output.shape == (2, config.num_image_tokens, 32)
    assert out.last_hidden_state.shape == (2, vision.stage_tokens(4), vision.channels[4])
    assert out.hidden_states is None and out.attentions is None
    # What the placeholders receive is the pooler output.
    spliced = model(**inputs)
    torch.testing.assert_close(spliced.image_outputs.pooler_output, out.pooler_output, rtol=0, atol=0)
    torch.testing.assert_close(spliced.image_hidden_states, out.pooler_output, rtol=0, atol=0)

    full = model.get_image_features(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
    assert [h.shape for h in full.hidden_states] == [(2, vision.stage_tokens(s), vision.channels[s]) for s in range(5)]
    torch.testing.assert_close(full.hidden_states[-1], full.last_hidden_state, rtol=0, atol=0)
    assert full.attentions == ()  # convolution and MLP-Mixer layers: no attention maps
    as_tuple = model.get_image_features(inputs["pixel_values"], return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    torch.testing.assert_close(as_tuple[1], out.pooler_output, rtol=0, atol=0)
    # The config's default applies when the flag is not given.
    model.config.output_hidden_states = True
    assert len(model.model.get_image_features(inputs["pixel_values"]).hidden_states) == 5


# --- 4. return_dict=False -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", [Med3DQwenModel, Med3DQwenForConditionalGeneration])
def test_return_dict_false_gives_the_tuple(config_and_inputs, model_class):
    config, inputs = config_and_inputs
    torch.manual_seed(0)
    model = model_class(config).eval()
    extra = {"labels": inputs["input_ids"]} if model_class is Med3DQwenForConditionalGeneration else {}
    as_dict = model(**inputs, **extra)
    as_tuple = model(**inputs, **extra, return_dict=False)
    assert isinstance(as_tuple, tuple)
    first = as_dict.loss if extra else as_dict.last_hidden_state
    torch.testing.assert_close(as_tuple[0], first, rtol=0, atol=0)
    assert len(as_tuple) == len(as_dict.to_tuple())
    model.config.return_dict = False  # the config's setting counts too
    assert isinstance(model(**inputs, **extra), tuple)
    assert not isinstance(model(**inputs, **extra, return_dict=True), tuple)


# --- 5. an explicit attention implementation is honoured ------------------------------------------------------


def test_from_pretrained_honours_an_explicit_attn_implementation(config_and_inputs, tmp_path):
    config, _ = config_and_inputs
    make_model(config).save_pretrained(tmp_path)
    assert AutoModelForImageTextToText.from_pretrained(tmp_path).config._attn_implementation == "sdpa"  # default
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="eager")
    assert auto.config._attn_implementation == "eager"
    assert auto.model.language_model.config._attn_implementation == "eager"
    direct = Med3DQwenForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    assert direct.config._attn_implementation == "eager"
    chosen = Med3DQwenConfig.from_pretrained(tmp_path, attn_implementation="eager")
    assert Med3DQwenModel.from_pretrained(tmp_path, config=chosen).config._attn_implementation == "eager"


# --- 6. unknown keyword arguments are refused -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["covered_fraction", "roi_empty", "closed_label"])
def test_unknown_keyword_arguments_are_refused(config_and_inputs, name):
    config, inputs = config_and_inputs
    model = make_model(config)
    value = torch.zeros(2)
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}'"):
        model(**inputs, **{name: value})
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}'"):
        model.model(**inputs, **{name: value})
    with pytest.raises((TypeError, ValueError), match=name):
        model.generate(**prompt_only(inputs), **{name: value}, **GREEDY)


def test_transformers_keyword_arguments_are_accepted(config_and_inputs):
    config, inputs = config_and_inputs
    model = make_model(config)
    out = model(**inputs, labels=inputs["input_ids"], num_items_in_batch=torch.tensor(10), output_hidden_states=True)
    assert out.loss is not None and len(out.hidden_states) == 3
    with pytest.warns(FutureWarning):
        model(**inputs, past_key_values=None)  # the deprecated name of `cache`, as in transformers' models


# --- 8. the closed head: label vocabulary, allowed subsets, loss ----------------------------------------------


def test_closed_label_vocabulary_in_the_config(tmp_path):
    config = Med3DQwenModelTester().get_config()
    assert config.closed_label_names == ["no", "yes", "A", "B", "C", "D"]
    model = make_model(config)
    assert model.closed_head.classifier.out_features == config.num_closed_labels == 6
    custom = Med3DQwenModelTester(closed_label_names=["no", "yes", "mild", "severe"]).get_config()
    assert make_model(custom).closed_head.classifier.out_features == 4
    custom.save_pretrained(tmp_path)
    assert Med3DQwenConfig.from_pretrained(tmp_path).closed_label_names == ["no", "yes", "mild", "severe"]
    assert make_model(Med3DQwenModelTester(closed_label_names=[]).get_config()).closed_head is None
    for names, match in ((["no", "yes", "no"], "unique"), (["yes"], "at least 2"), ("yes/no", "list")):
        with pytest.raises(ValueError, match=match):
            Med3DQwenModelTester(closed_label_names=names).get_config()
    with pytest.raises(ValueError, match="disagrees"):
        Med3DQwenModelTester(num_closed_classes=2).get_config()


def test_closed_loss_over_the_allowed_labels(config_and_inputs):
    config, inputs = config_and_inputs
    model = make_model(config)
    labels = inputs["input_ids"].clone()
    labels[:, :-2] = -100
    closed_labels = torch.tensor([1, 3])  # "yes"; "B"
    allowed = torch.tensor([[True, True, False, False, False, False], [False, False, True, True, True, True]])
    out = model(**inputs, labels=labels, closed_labels=closed_labels, closed_label_mask=allowed)
    raw = model(**inputs).closed_logits  # (2, 6), unmasked
    assert torch.isinf(out.closed_logits[~allowed]).all() and (out.closed_logits[~allowed] < 0).all()
    torch.testing.assert_close(out.closed_logits[allowed], raw[allowed], rtol=0, atol=0)
    expected = (
        F.cross_entropy(raw[0, :2], closed_labels[0]) + F.cross_entropy(raw[1, 2:], closed_labels[1] - 2)
    ) / 2  # softmax over {no, yes} and over {A..D}
    torch.testing.assert_close(out.closed_loss, expected)
    torch.testing.assert_close(out.lm_loss, model(**inputs, labels=labels).loss)
    torch.testing.assert_close(out.loss, out.lm_loss + out.closed_loss)
    # No mask: every label is allowed.
    unmasked = model(**inputs, closed_labels=closed_labels)
    torch.testing.assert_close(unmasked.closed_loss, F.cross_entropy(raw, closed_labels))
    torch.testing.assert_close(unmasked.loss, unmasked.closed_loss)
    assert unmasked.lm_loss is None
    # -100 rows have no closed loss; a row that allows nothing is no closed question and stays unmasked.
    nothing_allowed = torch.stack([torch.zeros_like(allowed[0]), allowed[1]])
    open_row = model(**inputs, closed_labels=torch.tensor([-100, 3]), closed_label_mask=nothing_allowed)
    torch.testing.assert_close(open_row.closed_loss, F.cross_entropy(raw[1:, 2:], closed_labels[1:] - 2))
    torch.testing.assert_close(open_row.closed_logits[0], raw[0], rtol=0, atol=0)
    nothing = model(**inputs, closed_labels=torch.tensor([-100, -100]), closed_label_mask=allowed)
    assert nothing.closed_loss == 0 and torch.isfinite(nothing.closed_loss)


def test_closed_loss_under_gradient_accumulation(config_and_inputs):
    # Trainer passes num_items_in_batch (target tokens of all accumulated micro-batches) and then sums the
    # micro-batch losses undivided: the closed mean is weighted by the micro-batch's share of those tokens.
    config, inputs = config_and_inputs
    model = make_model(config)
    labels = inputs["input_ids"].clone()
    labels[:, :-3] = -100  # 3 targets per row: 6 in this micro-batch
    closed_labels = torch.tensor([1, 0])
    alone = model(**inputs, labels=labels, closed_labels=closed_labels)
    same = model(**inputs, labels=labels, closed_labels=closed_labels, num_items_in_batch=torch.tensor(6))
    torch.testing.assert_close(same.loss, alone.loss)
    half = model(**inputs, labels=labels, closed_labels=closed_labels, num_items_in_batch=torch.tensor(12))
    torch.testing.assert_close(half.lm_loss, alone.lm_loss / 2)
    torch.testing.assert_close(half.closed_loss, alone.closed_loss)  # reported as the plain mean
    torch.testing.assert_close(half.loss, (alone.lm_loss + alone.closed_loss) / 2)


def test_closed_loss_trains_the_head_through_loss(config_and_inputs):
    config, inputs = config_and_inputs
    model = make_model(config).train()
    model(**inputs, closed_labels=torch.tensor([0, 5])).loss.backward()
    assert model.closed_head.classifier.weight.grad is not None
    assert model.closed_head.classifier.weight.grad.abs().sum() > 0


def test_bad_closed_labels_raise_clear_errors(config_and_inputs):
    config, inputs = config_and_inputs
    model = make_model(config)
    yes_no = torch.tensor([[True, True, False, False, False, False]] * 2)
    with pytest.raises(ValueError, match=r"closed_labels\[1\] = 2 \('A'\) is not among the labels"):
        model(**inputs, closed_labels=torch.tensor([1, 2]), closed_label_mask=yes_no)
    with pytest.raises(ValueError, match=r"closed_labels\[0\] = 6 is not an index"):
        model(**inputs, closed_labels=torch.tensor([6, 0]))
    with pytest.raises(ValueError, match="shape"):
        model(**inputs, closed_labels=torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="closed_label_mask must be a bool tensor"):
        model(**inputs, closed_labels=torch.tensor([1, 0]), closed_label_mask=yes_no[:, :2])
    no_head = make_model(Med3DQwenModelTester(closed_label_names=[]).get_config())
    with pytest.raises(ValueError, match="no closed head"):
        no_head(**inputs, closed_labels=torch.tensor([1, 0]))


# --- 10. a frozen projector, presets with a pad token (MSSA placement for k = 0: branch peft-fusion) -----------


def test_projector_is_frozen_unless_the_config_trains_it(config_and_inputs, tmp_path):
    config, _ = config_and_inputs
    model = make_model(config)
    assert not any(p.requires_grad for p in model.model.multi_modal_projector.parameters())
    model.save_pretrained(tmp_path)
    # Loading replaces the parameters; the frozen parts stay frozen (encoder too, except a prompt stem).
    for loaded in (
        Med3DQwenForConditionalGeneration.from_pretrained(tmp_path),
        AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)[0],
        Med3DQwenModel.from_pretrained(tmp_path),
    ):
        backbone = getattr(loaded, "model", loaded)
        assert not any(p.requires_grad for p in backbone.multi_modal_projector.parameters())
        assert not any(p.requires_grad for p in backbone.vision_encoder.parameters())
        assert all(p.requires_grad for p in backbone.language_model.parameters())
    aligning = make_model(Med3DQwenModelTester(train_projector=True).get_config())
    assert all(p.requires_grad for p in aligning.model.multi_modal_projector.parameters())


@pytest.mark.parametrize("preset", ["0.5b", "1.5b", "3b", "7b", "tiny"])
def test_presets_have_the_qwen_pad_token(preset):
    config = Med3DQwenConfig.from_preset(preset)
    assert config.text_config.pad_token_id == 151643  # <|endoftext|>
    assert GenerationConfig.from_model_config(config).pad_token_id == 151643


def test_prompt_mask_from_embeddings_finds_the_assistant_turn(config_and_inputs):
    config, inputs = config_and_inputs
    model = make_model(config)
    ids = inputs["input_ids"]
    recovered = model.model.special_token_ids(model.get_input_embeddings()(ids))
    assert torch.equal(recovered == IM_START, ids == IM_START)
    assert torch.equal(recovered == SLICE, ids == SLICE) and torch.equal(recovered == IMAGE, ids == IMAGE)
    assert (recovered[(ids < 90)] == -1).all()  # ordinary text is not taken for a special token


def test_trainer_trains_the_closed_head(config_and_inputs, tmp_path):
    # Trainer passes closed_labels / closed_label_mask through (they are forward arguments) and backpropagates `loss`.
    from transformers import Trainer, TrainingArguments

    config, inputs = config_and_inputs
    model = make_model(config).train()
    rows = []
    for i in range(4):
        row = {k: v[i % 2] for k, v in inputs.items()}
        row["labels"] = row["input_ids"].masked_fill(torch.arange(row["input_ids"].shape[0]) < 20, -100)
        row["closed_labels"] = torch.tensor(i % 2)
        row["closed_label_mask"] = torch.tensor([True, True, False, False, False, False])
        rows.append(row)
    before = model.closed_head.classifier.weight.detach().clone()
    frozen = {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
        learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=rows).train()
    assert not torch.equal(model.closed_head.classifier.weight, before)
    for name, value in model.model.multi_modal_projector.state_dict().items():
        assert torch.equal(value, frozen[name]), f"frozen projector weight {name} moved"


def test_token_ids_outside_the_vocabulary_are_skipped_from_embeddings():
    # A config may name a special token the (tiny) vocabulary lacks; it cannot be in the input, nor break the lookup.
    config, inputs = Med3DQwenModelTester(vision_end_token_id=1000).prepare_config_and_inputs_for_common()
    model = make_model(config)
    ids = inputs.pop("input_ids")
    from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids), **inputs)
    torch.testing.assert_close(from_embeds.logits, model(input_ids=ids, **inputs).logits, rtol=0, atol=0)
