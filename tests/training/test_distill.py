"""The distill stage: the SigLIP term against a hand computation, the pooled answer states, a few real steps through
train_sft's ``run`` (teacher frozen and unchanged, head trained, saved beside the adapter, reloaded, resumed)."""

import json
import math

import peft
import pytest
import torch
from test_train_script import losses, run_script, write_recipe
from tiny_models import tiny_config
from train_helpers import build_phantom, tiny_model, tiny_processor

from med3dqwen.modeling.modeling_med3d_qwen import Med3DQwenForConditionalGeneration
from med3dqwen.training.distill import (
    DISTILL_HEAD_FILE,
    DistillationHead,
    check_teacher_fits,
    load_distill_head,
    pool_answer_states,
    siglip_loss,
)
from med3dqwen.training.recipe import BASE_FOLDER


def test_siglip_loss_equals_a_hand_computation():
    student = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, -2.0]])  # normalised: (.6, .8), (1, 0), (0, -1)
    teacher = torch.tensor([[1.0, 0.0], [0.0, 5.0], [-1.0, 1.0]])  # (1, 0), (0, 1), (-1, 1)/√2
    t_prime, bias = math.log(10.0), -10.0
    x = [(0.6, 0.8), (1.0, 0.0), (0.0, -1.0)]
    y = [(1.0, 0.0), (0.0, 1.0), (-1 / math.sqrt(2), 1 / math.sqrt(2))]
    total = 0.0
    for i in range(3):
        for j in range(3):
            z = 1.0 if i == j else -1.0
            logit = math.exp(t_prime) * (x[i][0] * y[j][0] + x[i][1] * y[j][1]) + bias
            total += -math.log(1.0 / (1.0 + math.exp(-z * logit)))
    got = siglip_loss(student, teacher, torch.tensor(t_prime), torch.tensor(bias))
    assert got.item() == pytest.approx(total / 3, rel=1e-6)
    # the head starts at SigLIP's t' = log 10, b = -10 and projects the student's width to the teacher's
    head = DistillationHead(2, 2)
    assert head.logit_scale.item() == pytest.approx(math.log(10.0)) and head.logit_bias.item() == -10.0
    with torch.no_grad():
        head.projection.weight.copy_(torch.eye(2))
    assert head(student, teacher).item() == pytest.approx(total / 3, rel=1e-6)
    with pytest.raises(ValueError, match=r"\(3, 2\) and \(2, 2\)"):
        siglip_loss(student, teacher[:2], torch.tensor(0.0), torch.tensor(0.0))


def test_pooling_means_the_answer_tokens():
    hidden = torch.arange(2 * 4 * 2, dtype=torch.float32).reshape(2, 4, 2)
    labels = torch.tensor([[-100, -100, 7, 8], [-100, -100, -100, -100]])
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    pooled = pool_answer_states(hidden, labels, attention)
    torch.testing.assert_close(pooled[0], hidden[0, 2:].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1, :2].mean(0))  # no answer token: the attended tokens


def _teacher_config(hidden_size: int = 48):
    config = tiny_config()
    config.text_config.hidden_size = hidden_size  # a wider decoder than the student's 32: the head projects
    return config


def test_the_teacher_must_read_the_students_batches():
    student = tiny_config()
    teacher = _teacher_config()
    check_teacher_fits(student, teacher)
    teacher.vision_config.volume_size = [32, 64, 64]
    with pytest.raises(ValueError, match=r"t/ckpt cannot.*volume_size \[32, 64, 64\] \(student \[64, 64, 64\]\)"):
        check_teacher_fits(student, teacher, "t/ckpt")


@pytest.fixture(scope="module")
def distill_workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    data = build_phantom(root / "phantom")
    config = tiny_config()
    tiny_model(config).save_pretrained(root / "student")
    tiny_processor(config).save_pretrained(root / "student")
    tiny_model(_teacher_config(), seed=5).save_pretrained(root / "teacher")
    return root, data


@pytest.fixture(scope="module")
def distill_run(distill_workspace):
    root, data = distill_workspace
    recipe = write_recipe(
        root / "distill.yaml",
        dataset_name=str(data),
        model_name_or_path=str(root / "student"),
        stage="distill",
        teacher_model_name_or_path=str(root / "teacher"),
    )
    out = root / "run"
    trainer = run_script("--config", str(recipe), "--output_dir", str(out))
    return trainer, out, recipe


def test_distill_steps_train_student_and_head_and_leave_the_teacher_alone(distill_workspace, distill_run):
    root, _ = distill_workspace
    trainer, out, _ = distill_run
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 2 and all(e["distill_loss"] > 0 and e["lm_loss"] > 0 for e in logged)
    assert all(e["loss"] == pytest.approx(e["lm_loss"] + e["focal_loss"] + e["l2_loss"] + e["distill_loss"], rel=1e-3)
               for e in logged)  # fmt: skip
    assert all("distill_temperature" in e and "distill_bias" in e for e in logged)
    # the teacher: frozen, no gradient, every weight and buffer as saved
    teacher = trainer.teacher
    saved = Med3DQwenForConditionalGeneration.from_pretrained(root / "teacher").state_dict()
    assert not any(p.requires_grad or p.grad is not None for p in teacher.parameters())
    assert all(torch.equal(t, saved[k]) for k, t in teacher.state_dict().items())
    # the head trained from SigLIP's init: projection 32 -> 48, temperature and bias moved
    head = trainer.model.distill_head
    assert tuple(head.projection.weight.shape) == (48, 32)
    assert head.logit_scale.item() != pytest.approx(math.log(10.0)) and head.logit_bias.item() != -10.0
    # the optimiser holds the head (no weight decay: only LoRA decays)
    groups = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert groups[id(head.projection.weight)] == 0.0 and groups[id(head.logit_scale)] == 0.0


def test_distill_saves_the_head_beside_the_adapter_and_both_reload(distill_run):
    trainer, out, _ = distill_run
    for folder in (out, out / "checkpoint-1", out / "checkpoint-2"):
        assert (folder / DISTILL_HEAD_FILE).is_file() and (folder / "adapter_model.safetensors").is_file()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(out.resolve() / BASE_FOLDER)
    head = DistillationHead(32, 48)
    load_distill_head(head, out)
    for name, tensor in trainer.model.distill_head.state_dict().items():
        assert torch.equal(head.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match="hidden size 32 to 48, this run 32 to 64"):
        load_distill_head(DistillationHead(32, 64), out)
    # the adapter loads on its base like an sft adapter, with the trained student's logits
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = {k: v for k, v in trainer.data_collator(rows).items() if k != "labels"}
    base = Med3DQwenForConditionalGeneration.from_pretrained(out / BASE_FOLDER)
    reloaded = peft.PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        expected = trainer.model.eval()(**batch).logits
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=0, atol=1e-5)


def test_a_resumed_distill_run_restores_the_head(distill_run, tmp_path):
    uninterrupted, out, recipe = distill_run
    resumed = run_script(
        "--config", str(recipe), "--output_dir", str(tmp_path / "resumed"),
        "--resume_from_checkpoint", str(out / "checkpoint-1"),
    )  # fmt: skip
    assert resumed.state.global_step == 2
    assert losses(resumed)[-1] == pytest.approx(losses(uninterrupted)[-1], rel=1e-5)
    for name, tensor in uninterrupted.model.distill_head.state_dict().items():
        torch.testing.assert_close(resumed.model.distill_head.state_dict()[name], tensor, rtol=1e-5, atol=1e-7)


def test_an_adapter_folder_is_a_teacher_too(distill_run):
    from med3dqwen.training.distill import load_teacher

    trainer, out, _ = distill_run
    teacher = load_teacher(out)  # the adapter merged into the base it names
    assert isinstance(teacher, Med3DQwenForConditionalGeneration) and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = {k: v for k, v in trainer.data_collator(rows).items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(teacher(**batch).logits, trainer.model.eval()(**batch).logits, rtol=0, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="teacher ./missing does not exist"):
        load_teacher("./missing")
