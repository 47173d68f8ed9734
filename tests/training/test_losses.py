"""The paper's loss terms: focal loss against a hand computation, the class weights, the L2 term on LoRA, a zero that
still reaches the closed head, and gradient accumulation: two micro-batches add up to one big batch, term by term."""

import math

import pytest
import torch
from tiny_models import tiny_config
from train_helpers import build_phantom, load_records, lora_model, tiny_model, tiny_processor
from transformers import Trainer, TrainingArguments

from med3dqwen.data.schema import CLOSED_LABEL_NAMES
from med3dqwen.training.collator import IGNORE_INDEX, Med3DQwenCollator
from med3dqwen.training.losses import (
    closed_class_weights,
    closed_label_counts,
    focal_loss,
    lora_l2,
    lora_parameters,
    sft_loss,
)


def closed_record(answer: str, choices: list[str], volume_id: str = "v") -> dict:
    return {"volume_id": volume_id, "answer_type": "closed", "closed_answer": answer, "closed_choices": choices}


OPEN = {"volume_id": "o", "answer_type": "open", "closed_answer": None, "closed_choices": None}


# ---------------------------------------------------------------------------------------------------------------
# Focal loss and class weights
# ---------------------------------------------------------------------------------------------------------------


def test_focal_loss_equals_a_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0, 3.0, 1.0], [0.3, 0.7, 0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1, 1, 1]])
    labels = torch.tensor([1, IGNORE_INDEX, 3])
    allowed = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 1]], dtype=torch.bool)
    weights = torch.tensor([0.5, 1.5, 1.0, 2.0, 1.0, 1.0])
    # row 0: softmax over {no, yes} = (2, -1); row 2: over {A, B, D} = (1, 1, 1)
    p0 = math.exp(-1.0) / (math.exp(2.0) + math.exp(-1.0))
    p2 = 1.0 / 3.0
    hand0 = -1.5 * (1 - p0) ** 2 * math.log(p0)
    hand2 = -2.0 * (1 - p2) ** 2 * math.log(p2)
    got = focal_loss(logits, labels, allowed, weights, gamma=2.0)
    assert got.item() == pytest.approx((hand0 + hand2) / 2, rel=1e-6)
    # divided by a given count of closed rows instead of this batch's
    assert focal_loss(logits, labels, allowed, weights, num_items=5).item() == pytest.approx((hand0 + hand2) / 5)
    # the model's masked logits (-inf outside the allowed labels) give the same value
    masked = logits.masked_fill(~(allowed | ~allowed.any(1, keepdim=True)), float("-inf"))
    assert focal_loss(masked, labels, allowed, weights).item() == pytest.approx(got.item(), rel=1e-6)


def test_focal_loss_with_gamma_0_and_no_weights_is_the_models_cross_entropy():
    config = tiny_config()
    model = tiny_model(config)
    logits = torch.randn(4, 6)
    labels = torch.tensor([0, 3, IGNORE_INDEX, 1])
    allowed = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1], [0] * 6, [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    masked = model._mask_closed_logits(logits, allowed)
    expected = model._closed_loss(masked, labels, allowed)
    torch.testing.assert_close(focal_loss(masked, labels, allowed, gamma=0.0), expected)


def test_focal_loss_without_closed_rows_is_a_zero_that_reaches_the_head():
    head = torch.nn.Linear(4, 6)
    logits = head(torch.randn(3, 4)).masked_fill(torch.tensor([False, False, True, True, True, True]), float("-inf"))
    loss = focal_loss(logits, torch.full((3,), IGNORE_INDEX), torch.zeros(3, 6, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert head.weight.grad is not None and torch.equal(head.weight.grad, torch.zeros_like(head.weight))


def test_focal_loss_refuses_bad_labels():
    with pytest.raises(ValueError, match=r"labels\[1\] = 7"):
        focal_loss(torch.zeros(2, 6), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"labels\[0\] = 2 is not among the labels allowed\[0\]"):
        focal_loss(torch.zeros(1, 6), torch.tensor([2]), torch.tensor([[True, True, False, False, False, False]]))
    with pytest.raises(ValueError, match="shape"):
        focal_loss(torch.zeros(2, 6), torch.tensor([0, 1]), class_weights=torch.ones(5))


def test_class_weights_are_the_inverse_effective_number():
    records = [closed_record("yes", ["no", "yes"])] * 8 + [closed_record("no", ["no", "yes"])] * 2
    records += [closed_record("B", ["A", "B", "C", "D"])] + [OPEN] * 5
    counts = closed_label_counts(records)
    assert counts == {"no": 2, "yes": 8, "A": 0, "B": 1, "C": 0, "D": 0}
    beta = 0.9
    raw = {name: (1 - beta) / (1 - beta ** max(n, 1)) for name, n in counts.items()}
    scale = 3 / (raw["no"] + raw["yes"] + raw["B"])  # the three labels the split answers add up to 3
    weights = closed_class_weights(records, beta=beta)
    expected = torch.tensor([raw[name] * scale for name in CLOSED_LABEL_NAMES])
    torch.testing.assert_close(weights, expected)
    assert weights[1] < weights[0] < weights[3]  # the frequent class weighs least
    assert weights[2] == weights[3]  # an unanswered label weighs as a label answered once
    # beta = 0: no re-weighting
    torch.testing.assert_close(closed_class_weights(records, beta=0.0), torch.ones(6))
    with pytest.raises(ValueError, match="no closed answer"):
        closed_class_weights([OPEN])
    with pytest.raises(ValueError, match="beta"):
        closed_class_weights(records, beta=1.0)


def test_class_weights_read_a_dataset_without_decoding_its_volumes():
    import datasets

    rows = [closed_record("yes", ["no", "yes"]), closed_record("A", ["A", "B"]), OPEN]
    ds = datasets.Dataset.from_list([{**r, "volume_path": "/nowhere/ct.nii.gz"} for r in rows])
    ds = ds.cast_column("volume_path", datasets.Nifti())  # decoding it would fail: the file does not exist
    assert closed_label_counts(ds) == closed_label_counts(rows)


# ---------------------------------------------------------------------------------------------------------------
# L2 on LoRA, and gradient accumulation on the tiny model
# ---------------------------------------------------------------------------------------------------------------


def test_l2_is_lambda_times_the_squared_norm_of_the_lora_weights():
    model = lora_model(tiny_config())
    names = [name for name, _ in lora_parameters(model)]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert all("language_model" in n for n in names)
    expected = sum(
        p.detach().double().pow(2).sum() for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n
    )
    assert lora_l2(model, 1e-4).item() == pytest.approx(1e-4 * expected.item(), rel=1e-6)
    assert lora_l2(model).item() == pytest.approx(1e-4 * expected.item(), rel=1e-6)  # λ = 1e-4 by default
    assert lora_l2(tiny_model(tiny_config())).item() == 0.0  # no adapter, no term


@pytest.fixture(scope="module")
def accumulation_setup(tmp_path_factory):
    config = tiny_config()
    folder = build_phantom(tmp_path_factory.mktemp("ga") / "phantom")
    rows = load_records(folder)
    closed = [r for r in rows if r["answer_type"] == "closed"]
    opened = [r for r in rows if r["answer_type"] == "open"]
    # micro-batches of different token counts and closed-row counts, so that a plain mean would differ
    picked = [closed[0], opened[0], opened[1], closed[1], closed[2], opened[2]]
    collator = Med3DQwenCollator(tiny_processor(config), config.closed_label_names, dataset_root=folder)
    full, micro = collator(picked), [collator(picked[:2]), collator(picked[2:])]
    weights = closed_class_weights(rows, config.closed_label_names)
    return config, full, micro, weights


def terms_and_grads(model, batch, weights, **counts):
    terms = sft_loss(model(**batch, num_items_in_batch=counts.get("num_items_in_batch")), batch, model, weights,
                     **counts)  # fmt: skip
    terms["loss"].backward()
    return terms


def test_two_micro_batches_add_up_to_one_big_batch_term_by_term(accumulation_setup):
    config, full, micro, weights = accumulation_setup
    big = lora_model(config)
    whole = terms_and_grads(big, full, weights)

    small = lora_model(config)
    tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
    closed = sum(int((b["closed_labels"] != IGNORE_INDEX).sum()) for b in micro)
    summed = {}
    for b in micro:
        terms = terms_and_grads(small, b, weights, num_items_in_batch=tokens, num_closed_in_batch=closed)
        for key, value in terms.items():
            summed[key] = summed.get(key, 0.0) + value.detach()
    for key in ("lm_loss", "focal_loss", "l2_loss", "loss"):
        assert whole[key].item() > 0, key
        torch.testing.assert_close(summed[key], whole[key].detach(), rtol=1e-5, atol=1e-6, msg=key)
    grads = {n: p.grad for n, p in big.named_parameters() if p.grad is not None}
    assert any("lora_B" in n for n in grads) and any("closed_head" in n for n in grads)
    for name, param in small.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_without_a_closed_count_the_focal_term_takes_the_token_share(accumulation_setup):
    # As the model weights its own closed_loss: each micro-batch's mean times its share of the target tokens.
    config, _, micro, weights = accumulation_setup
    model = lora_model(config)
    tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
    for b in micro:
        out = model(**b, num_items_in_batch=tokens)
        share = int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) / tokens
        mean = focal_loss(out.closed_logits, b["closed_labels"], b["closed_label_mask"], weights)
        terms = sft_loss(out, b, model, weights, num_items_in_batch=tokens)
        torch.testing.assert_close(terms["focal_loss"], mean * share)
        torch.testing.assert_close(terms["l2_loss"], lora_l2(model) * share)


def test_the_token_count_is_the_trainers(accumulation_setup, tmp_path):
    # num_items_in_batch as transformers' Trainer counts it over the accumulated micro-batches.
    config, _, micro, _ = accumulation_setup
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", gradient_accumulation_steps=2)
    trainer = Trainer(model=tiny_model(config), args=args)
    counted = trainer._get_num_items_in_batch(micro, torch.device("cpu"))
    assert int(counted) == sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)


def test_a_batch_without_closed_rows_still_uses_the_head(accumulation_setup):
    config, _, micro, weights = accumulation_setup
    model = lora_model(config)
    batch = {k: v[1:2] for k, v in micro[0].items()}  # the open row
    assert (batch["closed_labels"] == IGNORE_INDEX).all()
    terms = terms_and_grads(model, batch, weights)
    assert terms["focal_loss"].item() == 0.0
    head = [p for n, p in model.named_parameters() if "closed_head" in n and p.requires_grad]
    assert head and all(p.grad is not None for p in head)
