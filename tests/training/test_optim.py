"""The optimiser: weight decay on the LoRA weights only, AdamW's betas, warm-up then cosine."""

import math

import pytest
import torch
from tiny_models import tiny_config
from train_helpers import lora_model, tiny_model

from med3dqwen.training.losses import lora_parameters
from med3dqwen.training.optim import make_optimizer, make_scheduler, parameter_groups


def test_parameter_groups_decay_lora_only():
    model = lora_model(tiny_config())
    groups = parameter_groups(model)
    assert [g["weight_decay"] for g in groups] == [2e-2, 0.0]
    lora = {id(p) for _, p in lora_parameters(model)}
    assert {id(p) for p in groups[0]["params"]} == lora
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in groups[1]["params"]} == trainable - lora
    names = {id(p): n for n, p in model.named_parameters()}
    assert any("closed_head" in names[id(p)] for p in groups[1]["params"])
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and not {id(p) for p in frozen} & {id(p) for g in groups for p in g["params"]}


def test_a_step_with_zero_gradients_decays_only_the_lora_weights():
    model = lora_model(tiny_config())
    optimizer = make_optimizer(model, learning_rate=0.1)
    assert optimizer.defaults["betas"] == (0.9, 0.98)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    lora = {n for n, _ in lora_parameters(model)}
    for name, param in model.named_parameters():
        if name in lora:  # AdamW's decoupled decay: p ← p·(1 − lr·wd); the zero gradient moves nothing else
            torch.testing.assert_close(param, before[name] * (1 - 0.1 * 2e-2), msg=name)
        else:
            assert torch.equal(param, before[name]), name


def test_a_model_without_lora_decays_nothing():
    model = tiny_model(tiny_config())
    groups = parameter_groups(model)
    assert [g["weight_decay"] for g in groups] == [0.0]
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        parameter_groups(model)


def test_warm_up_then_cosine():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
    scheduler = make_scheduler(optimizer, num_training_steps=1500, num_warmup_steps=500)
    rates = []
    for _ in range(1501):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0.0 and rates[250] == pytest.approx(1e-5) and rates[500] == pytest.approx(2e-5)
    assert rates[1000] == pytest.approx(1e-5)  # half way through the cosine
    assert rates[750] == pytest.approx(2e-5 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert rates[1500] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="num_training_steps"):
        make_scheduler(optimizer, num_training_steps=0)
