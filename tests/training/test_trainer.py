"""Med3DQwenTrainer: a real few-step run on the tiny model logs each loss term, decays only LoRA, trains the rest."""

import datasets
import pytest
import torch
from tiny_models import tiny_config
from train_helpers import build_phantom, lora_model, tiny_processor
from transformers import TrainingArguments

from med3dqwen.training.collator import Med3DQwenCollator, count_skipped
from med3dqwen.training.losses import closed_class_weights, lora_parameters
from med3dqwen.training.trainer import LOGGED_TERMS, Med3DQwenTrainer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = tiny_config()
    folder = build_phantom(tmp_path_factory.mktemp("trainer") / "phantom")
    train = datasets.load_dataset(str(folder), split="train")
    # closed rows first, so that each accumulated step sees closed and open rows
    closed = [i for i, t in enumerate(train["answer_type"]) if t == "closed"]
    opened = [i for i, t in enumerate(train["answer_type"]) if t == "open"]
    train = train.select([closed[0], opened[0], closed[1], opened[1], closed[2], opened[2]] * 2)
    collator = Med3DQwenCollator(tiny_processor(config), config.closed_label_names, dataset_root=folder)
    return config, train, collator, closed_class_weights(train, config.closed_label_names)


def arguments(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        train_sampling_strategy="sequential",  # windows of 4 rows, two of them closed
        logging_steps=1,
        learning_rate=1e-2,
        weight_decay=2e-2,
        adam_beta2=0.98,
        remove_unused_columns=False,
        save_strategy="no",
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def test_a_few_steps_log_each_term_and_train_the_intended_parameters(setup, tmp_path):
    config, train, collator, weights = setup
    model = lora_model(config).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    assert stats  # the encoder's BatchNorm statistics
    trainer = Med3DQwenTrainer(
        model=model, args=arguments(tmp_path), train_dataset=train, data_collator=collator, class_weights=weights
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry and "train_runtime" not in entry]
    assert len(logged) == 2
    for entry in logged:
        assert all(entry[name] > 0 for name in LOGGED_TERMS), entry
        total = sum(entry[name] for name in LOGGED_TERMS)
        assert entry["loss"] == pytest.approx(total, rel=1e-3), entry
    # the optimiser: weight decay on LoRA only, the paper's betas
    groups = trainer.optimizer.param_groups
    lora = {id(p) for _, p in lora_parameters(model)}
    decayed = [g for g in groups if g["weight_decay"] > 0]
    assert [g["weight_decay"] for g in decayed] == [2e-2]
    assert {id(p) for p in decayed[0]["params"]} == lora
    assert all(g["betas"] == (0.9, 0.98) for g in groups)
    # LoRA and the closed head trained; the frozen encoder and projector did not move
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any("lora_B" in n for n in changed) and any("closed_head" in n for n in changed)
    assert not [n for n in changed if "vision_encoder" in n or "multi_modal_projector" in n]
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers() if n in stats)
    # the focal term was divided by the closed rows of the Trainer's accumulation window (2 of its 4 rows)
    assert int(trainer._num_closed_in_batch) == 2


def test_the_records_columns_must_reach_the_collator(setup, tmp_path):
    config, train, collator, _ = setup
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        Med3DQwenTrainer(
            model=lora_model(config),
            args=arguments(tmp_path, remove_unused_columns=True),
            train_dataset=train,
            data_collator=collator,
        )


def _accumulated_loss_and_grads(trainer, model, micro_batches):
    """Two micro-batches of one optimiser step, as Trainer.training_step runs them (num_items_in_batch path)."""
    model.zero_grad(set_to_none=True)
    num_items = trainer._get_num_items_in_batch(micro_batches, torch.device("cpu"))
    total, widths = 0.0, []
    for batch in micro_batches:
        loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True, num_items_in_batch=num_items)
        loss.backward()
        total += loss.detach()
        widths.append(outputs.logits.shape[1])
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, grads, widths


def test_logits_only_on_labelled_positions_give_the_same_loss_and_gradients(setup, tmp_path):
    config, train, collator, weights = setup
    rows = [train[i] for i in range(4)]
    micro = [collator(rows[:2]), collator(rows[2:])]
    results = {}
    for labelled in (False, True):
        model = lora_model(config).train()
        trainer = Med3DQwenTrainer(
            model=model,
            args=arguments(tmp_path),
            train_dataset=train,
            data_collator=collator,
            class_weights=weights,
            labelled_logits_only=labelled,
        )
        results[labelled] = _accumulated_loss_and_grads(trainer, model, micro)
    (full, full_grads, full_widths), (kept, kept_grads, kept_widths) = results[False], results[True]
    torch.testing.assert_close(kept, full, rtol=1e-6, atol=1e-6)
    assert full_grads.keys() == kept_grads.keys() and any("lora_B" in n for n in full_grads)
    for name, grad in full_grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # the vocabulary was scored on the answer positions only, far fewer than the whole sequence
    assert full_widths == [b["input_ids"].shape[1] for b in micro]
    assert all(k < f / 2 for k, f in zip(kept_widths, full_widths, strict=True)), (kept_widths, full_widths)


def test_labelled_logits_keep_the_union_of_the_rows_targets():
    from med3dqwen.training.losses import labelled_logits

    labels = torch.tensor([[-100, -100, 5, 6, -100, -100], [-100, -100, -100, 7, 8, 9]])
    kept = labelled_logits(labels)
    assert kept["logits_to_keep"].tolist() == [1, 2, 3, 4]  # position t predicts label t + 1
    assert kept["shift_labels"].tolist() == [[5, 6, -100, -100], [-100, 7, 8, 9]]


def test_steps_of_only_bad_samples_train_nothing_and_keep_the_weights_finite(setup, tmp_path):
    # Every row's volume is missing: with skip_bad_samples each batch is the collator's placeholder row (all labels
    # -100), so a whole optimiser step has no target token. The loss stays 0 (not 0/0) and no weight becomes NaN.
    config, train, collator, weights = setup
    bad = train.map(lambda row: {"volume_path": "volumes/nowhere.nii.gz"})
    log = tmp_path / "skipped.jsonl"
    skipping = Med3DQwenCollator(
        collator.processor,
        config.closed_label_names,
        dataset_root=collator.dataset_root,
        skip_bad_samples=True,
        skip_log=log,
    )
    model = lora_model(config).train()
    trainer = Med3DQwenTrainer(
        model=model,
        args=arguments(tmp_path, gradient_accumulation_steps=1, weight_decay=0.0),
        train_dataset=bad,
        data_collator=skipping,
        class_weights=weights,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry and "train_runtime" not in entry]
    assert [entry["loss"] for entry in logged] == [0.0, 0.0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())  # zero gradients, no decay
    assert count_skipped(log) >= 4  # 2 steps × 2 rows (and the rows of a batch the loader fetched ahead)
