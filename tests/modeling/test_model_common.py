"""Common model checks in the style of transformers' `ModelTesterMixin` (written for Med3DQwen, tiny configs):
save/load, tuple outputs, inputs_embeds, attention implementations, KV cache, left padding, gradients."""

import pytest
import torch
from test_modeling_med3d_qwen import IM_START, IMAGE, PAD, SLICE, V_END, V_START, Med3DQwenModelTester, open_fusion
from transformers import AutoModelForImageTextToText

from med3dqwen.modeling.configuration_med3d_qwen import Med3DQwenConfig
from med3dqwen.modeling.modeling_med3d_qwen import Med3DQwenForConditionalGeneration, Med3DQwenModel


ALL_MODEL_CLASSES = (Med3DQwenModel, Med3DQwenForConditionalGeneration)
ATOL = 1e-5


def build(model_class, config, seed: int = 0, attn_implementation: str | None = None):
    """A model with its fusion opened (SSA/MSSA start as identities and would hide differences)."""
    torch.manual_seed(seed)
    model = model_class._from_config(config, attn_implementation=attn_implementation or "sdpa").eval()
    open_fusion(model if model_class is Med3DQwenForConditionalGeneration else _Wrapped(model))
    return model


class _Wrapped:
    """`open_fusion` takes a model with a `.model` backbone."""

    def __init__(self, backbone):
        self.model = backbone


def main_output(out):
    return out.logits if "logits" in out else out.last_hidden_state


def sample_ids(config: Med3DQwenConfig, question: list[int], answer: list[int]) -> list[int]:
    vision = config.vision_config
    image = [V_START] + [IMAGE] * vision.num_visual_tokens + [SLICE] * vision.num_slice_tokens + [V_END]
    return image + question + [IM_START, 20, 21] + answer


@pytest.fixture
def config_and_inputs():
    return Med3DQwenModelTester().prepare_config_and_inputs_for_common()


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_save_load(config_and_inputs, model_class, tmp_path):
    config, inputs = config_and_inputs
    config.closed_label_names = ["no", "yes", "mild", "moderate", "severe"]
    model = build(model_class, config)
    model.save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path).eval()
    assert loaded.config.closed_label_names == config.closed_label_names
    assert loaded.config.train_projector is False and loaded.config.ssa_layers == config.ssa_layers
    before, after = model(**inputs), loaded(**inputs)
    torch.testing.assert_close(main_output(after), main_output(before), rtol=0, atol=ATOL)
    if model_class is Med3DQwenForConditionalGeneration:
        torch.testing.assert_close(after.closed_logits, before.closed_logits, rtol=0, atol=ATOL)
        assert isinstance(AutoModelForImageTextToText.from_pretrained(tmp_path), model_class)
    # Every saved tensor comes back (no key silently re-initialised).
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_tuple_and_dict_outputs_are_equivalent(config_and_inputs, model_class):
    config, inputs = config_and_inputs
    model = build(model_class, config)
    extra = {"output_hidden_states": True}
    if model_class is Med3DQwenForConditionalGeneration:
        extra.update(labels=inputs["input_ids"], closed_labels=torch.tensor([0, 1]))
    as_dict = model(**inputs, **extra)
    as_tuple = model(**inputs, **extra, return_dict=False)

    def check(a, b):
        if isinstance(b, (tuple, list)):
            assert len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                check(x, y)
        elif isinstance(b, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    check(as_tuple, as_dict.to_tuple())
    assert not any(v is None for v in as_tuple)


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
@pytest.mark.parametrize("with_volume", [False, True])
def test_inputs_embeds(config_and_inputs, model_class, with_volume):
    config, inputs = config_and_inputs
    model = build(model_class, config)
    if not with_volume:
        inputs.pop("pixel_values")
    ids = inputs.pop("input_ids")
    from_ids = model(input_ids=ids, **inputs)
    from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids), **inputs)
    torch.testing.assert_close(main_output(from_embeds), main_output(from_ids), rtol=0, atol=0)


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_attention_implementations_agree(config_and_inputs, model_class):
    config, inputs = config_and_inputs
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model = build(model_class, config, attn_implementation=implementation)
        assert model.config._attn_implementation == implementation
        backbone = getattr(model, "model", model)
        assert backbone.language_model.config._attn_implementation == implementation
        outputs[implementation] = main_output(model(**inputs))
    torch.testing.assert_close(outputs["sdpa"], outputs["eager"], rtol=1e-4, atol=ATOL)
    # Eager attention returns its weights: one (B, heads, L, L) map per decoder block.
    eager = build(model_class, config, attn_implementation="eager")
    attentions = eager(**inputs, output_attentions=True).attentions
    length = inputs["input_ids"].shape[1]
    assert [a.shape for a in attentions] == [(2, 4, length, length)] * config.text_config.num_hidden_layers


def test_cache_equals_no_cache(config_and_inputs):
    config, inputs = config_and_inputs
    model = build(Med3DQwenForConditionalGeneration, config)
    full = model(**inputs, use_cache=False)
    assert full.cache is None
    # The prompt (with its volume) first, then the answer tokens one at a time from the KV cache.
    split = inputs["input_ids"].shape[1] - 2
    step = model(
        input_ids=inputs["input_ids"][:, :split],
        attention_mask=inputs["attention_mask"][:, :split],
        pixel_values=inputs["pixel_values"],
        use_cache=True,
    )
    torch.testing.assert_close(step.logits, full.logits[:, :split], rtol=0, atol=ATOL)
    torch.testing.assert_close(step.closed_logits, full.closed_logits, rtol=0, atol=ATOL)
    cache = step.cache
    for position in range(split, inputs["input_ids"].shape[1]):
        step = model(
            input_ids=inputs["input_ids"][:, position : position + 1],
            attention_mask=inputs["attention_mask"][:, : position + 1],
            cache=cache,
            use_cache=True,
        )
        cache = step.cache
        torch.testing.assert_close(step.logits[:, -1], full.logits[:, position], rtol=0, atol=ATOL)


def test_left_padding(config_and_inputs):
    config, inputs = config_and_inputs
    model = build(Med3DQwenForConditionalGeneration, config)
    short, long = sample_ids(config, [11, 12, 13], [30, 31]), sample_ids(config, [11, 14, 15, 16, 13], [30, 31])
    pad = len(long) - len(short)
    input_ids = torch.tensor([[PAD] * pad + short, long])
    attention_mask = torch.tensor([[0] * pad + [1] * len(short), [1] * len(long)])
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as transformers' left-padding test
    batched = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        pixel_values=inputs["pixel_values"],
    )
    for row, ids in enumerate((short, long)):
        alone = model(input_ids=torch.tensor([ids]), pixel_values=inputs["pixel_values"][row : row + 1])
        torch.testing.assert_close(batched.logits[row, -len(ids) :], alone.logits[0], rtol=1e-4, atol=ATOL)
        torch.testing.assert_close(batched.closed_logits[row], alone.closed_logits[0], rtol=1e-4, atol=ATOL)
    # Generation pads on the left too and gives each sample its own continuation.
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    generated = model.generate(
        input_ids=input_ids[:, :-2],
        attention_mask=attention_mask[:, :-2],
        pixel_values=inputs["pixel_values"],
        **kwargs,
    )
    for row, ids in enumerate((short, long)):
        alone = model.generate(
            input_ids=torch.tensor([ids[:-2]]), pixel_values=inputs["pixel_values"][row : row + 1], **kwargs
        )
        assert torch.equal(generated[row, -4:], alone[0, -4:])


def test_static_cache_generates_what_the_dynamic_cache_does(config_and_inputs):
    """With a static (compilable) cache, generation hands the model 4D masks (or a dict of them) instead of the
    (B, L) padding mask; the prompt and fusion masks used to call ``.bool()`` on that dict and crash."""
    config, inputs = config_and_inputs
    model = build(Med3DQwenForConditionalGeneration, config)
    short, long = sample_ids(config, [11, 12, 13], []), sample_ids(config, [11, 14, 15, 16, 13], [])
    pad = len(long) - len(short)
    input_ids = torch.tensor([[PAD] * pad + short, long])
    attention_mask = torch.tensor([[0] * pad + [1] * len(short), [1] * len(long)])
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=inputs["pixel_values"],
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=PAD,
    )
    dynamic = model.generate(**kwargs)
    static = model.generate(**kwargs, cache_implementation="static")
    assert torch.equal(static, dynamic)


@pytest.mark.parametrize("mask_form", ["2d", "4d-bool", "4d-float", "dict"])
def test_the_padding_mask_is_read_from_every_mask_form(mask_form):
    from med3dqwen.modeling.modeling_med3d_qwen import _padding_mask

    padding = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    causal = torch.ones(5, 8, dtype=torch.bool).tril()  # keys beyond the prompt: a static cache's empty slots
    full = causal[None, None] & torch.nn.functional.pad(padding, (0, 3))[:, None, None, :]  # (B, 1, Q, K)
    given = {
        "2d": padding.long(),
        "4d-bool": full,
        "4d-float": torch.zeros(full.shape).masked_fill(~full, torch.finfo(torch.float32).min),
        "dict": {"full_attention": full},
    }[mask_form]
    assert torch.equal(_padding_mask(given, 5).bool(), padding)
    assert _padding_mask(None, 5) is None
    assert torch.equal(_padding_mask({"full_attention": None, "sliding_attention": full}, 5), padding)
    assert _padding_mask(object(), 5) is None  # a mask it cannot read (flex attention's BlockMask): no padding info


@pytest.mark.parametrize("checkpointing", [None, "non-reentrant", "reentrant"])
@pytest.mark.parametrize("prompt_encoding", ["burn_in", "channel"])
def test_every_trainable_parameter_gets_a_gradient(prompt_encoding, checkpointing):
    config, inputs = Med3DQwenModelTester(prompt_encoding=prompt_encoding).prepare_config_and_inputs_for_common()
    model = build(Med3DQwenForConditionalGeneration, config).train()
    if prompt_encoding == "channel":
        with torch.no_grad():  # the zero-initialised prompt stem passes no gradient to its inner kernels at init
            for kernel in (model.model.vision_encoder.prompt_stem.c1, model.model.vision_encoder.prompt_stem.c2):
                kernel.normal_(std=0.05)
    if checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
        )
        if checkpointing == "reentrant":
            model.enable_input_require_grads()  # as Trainer/PEFT do for reentrant checkpointing
    labels = inputs["input_ids"].clone()
    labels[:, :-2] = -100
    out = model(**inputs, labels=labels, closed_labels=torch.tensor([1, 0]))
    out.loss.backward()  # what Trainer backpropagates: LM loss + closed loss
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    assert "closed_head.classifier.weight" in trainable
    assert (prompt_encoding == "channel") == any(n.startswith("model.vision_encoder.prompt_stem") for n in trainable)
    for name in trainable:
        grad = dict(model.named_parameters())[name].grad
        assert torch.isfinite(grad).all(), name


def test_resize_token_embeddings_keeps_the_tie_and_the_config(config_and_inputs):
    config, inputs = config_and_inputs
    model = build(Med3DQwenForConditionalGeneration, config)
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(old + 10)
    assert model.config.text_config.vocab_size == old + 10
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied (0.5B ties them)
    assert model(**inputs).logits.shape[-1] == old + 10


def test_batched_rows_equal_each_row_alone(config_and_inputs):
    config, inputs = config_and_inputs
    model = build(Med3DQwenForConditionalGeneration, config)
    batched = model(**inputs)
    for row in range(inputs["input_ids"].shape[0]):
        alone = model(**{key: value[row : row + 1] for key, value in inputs.items()})
        torch.testing.assert_close(alone.logits, batched.logits[row : row + 1], rtol=1e-5, atol=ATOL)
        torch.testing.assert_close(alone.closed_logits, batched.closed_logits[row : row + 1], rtol=1e-5, atol=ATOL)


def test_device_map_auto_loads_and_gives_the_same_logits(config_and_inputs, tmp_path):
    """``from_pretrained(..., device_map="auto")`` (accelerate's big-model loading, which respects
    ``_no_split_modules``) on the CPU."""
    config, inputs = config_and_inputs
    model = build(Med3DQwenForConditionalGeneration, config)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, device_map="auto").eval()
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=ATOL)
