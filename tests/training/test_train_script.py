"""train_sft.py: real tiny runs of both stages from a YAML recipe, the saved adapter reloaded in a fresh process,
resume, the recipes in configs/ and the accelerate launch configs."""

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import peft
import pytest
import torch
import yaml
from tiny_models import tiny_config
from train_helpers import tiny_model, tiny_processor
from trl import ModelConfig

from med3dqwen.builders.engine import BuildArguments
from med3dqwen.builders.phantom.dataset import PhantomBuildConfig, build_phantom_dataset
from med3dqwen.modeling.modeling_med3d_qwen import Med3DQwenForConditionalGeneration
from med3dqwen.training.recipe import (
    ALIGN_QUESTION_TYPES,
    BASE_FOLDER,
    DECODER_LORA_TARGETS,
    SKIP_LOG,
    Med3DQwenScriptArguments,
    load_vision_encoder,
    lora_config,
    modules_to_save,
    stage_rows,
)


ROOT = Path(__file__).resolve().parents[2]
SHAPE = (64, 64, 64)  # the tiny model's volume_size: no resampling beyond the processor's own


def _load_script():
    spec = importlib.util.spec_from_file_location("train_sft", ROOT / "train_sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_sft = _load_script()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A phantom build (2 volumes, 64³) and the tiny model + processor saved as a checkpoint folder."""
    root = tmp_path_factory.mktemp("train_script")
    data = root / "phantom"
    build_phantom_dataset(
        PhantomBuildConfig(output_dir=str(data), num_volumes=2, seed=2, shape=SHAPE), BuildArguments(progress=False)
    )
    config = tiny_config()
    model = tiny_model(config)
    model.save_pretrained(root / "tiny")
    tiny_processor(config).save_pretrained(root / "tiny")
    return root, data, root / "tiny"


def write_recipe(path: Path, **fields) -> Path:
    recipe = {
        "learning_rate": 1e-2,
        "weight_decay": 0.02,
        "adam_beta2": 0.98,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0,
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.05,
        "dtype": "float32",
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
        "dataset_kwargs": {"skip_prepare_dataset": True},
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 1,
        "report_to": "none",
        "seed": 0,
        **fields,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_script(*args: str):
    """Parse like ``python train_sft.py ...`` and run ``main``; returns the trainer."""
    script_args, training_args, model_args = train_sft.make_parser().parse_args_and_config(args=list(args))
    return train_sft.main(script_args, training_args, model_args)


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def sft_run(workspace, tmp_path_factory):
    root, data, tiny = workspace
    out = tmp_path_factory.mktemp("sft") / "run"
    recipe = write_recipe(root / "sft.yaml", dataset_name=str(data), model_name_or_path=str(tiny), stage="sft")
    trainer = run_script("--config", str(recipe), "--output_dir", str(out))
    return trainer, out


def test_sft_trains_lora_and_the_full_modules_only(workspace, sft_run):
    _, _, tiny = workspace
    trainer, out = sft_run
    before = Med3DQwenForConditionalGeneration.from_pretrained(tiny).state_dict()
    model = trainer.model
    assert isinstance(model, peft.PeftModel)
    assert "train_loss" in trainer.state.log_history[-1] and trainer.state.global_step == 2
    assert len(losses(trainer)) == 2 and all(loss > 0 for loss in losses(trainer))
    assert all("focal_loss" in e and "l2_loss" in e for e in trainer.state.log_history if "loss" in e)
    # LoRA on the decoder projections only; lora_B starts at zero, so a non-zero one was trained
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all("language_model" in n for n in lora)
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    # the trained copy of the closed head moved; encoder (with BatchNorm statistics), projector and the decoder's
    # own weights did not
    base = model.get_base_model()
    head = base.closed_head.modules_to_save["default"].state_dict()
    assert any(not torch.equal(t, before[f"closed_head.{k}"]) for k, t in head.items())
    for prefix, module in (
        ("model.vision_encoder.", base.model.vision_encoder),
        ("model.multi_modal_projector.", base.model.multi_modal_projector),
    ):
        state = module.state_dict()
        assert state and all(torch.equal(t, before[prefix + k]) for k, t in state.items()), prefix
    q_proj = base.model.language_model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(q_proj, before["model.language_model.layers.0.self_attn.q_proj.weight"])


def test_sft_saves_the_base_adapter_processor_and_checkpoints(sft_run):
    _, out = sft_run
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(out.resolve() / BASE_FOLDER)
    assert adapter["target_modules"] == DECODER_LORA_TARGETS
    assert set(adapter["modules_to_save"]) == {
        "slice_self_attention",
        "multi_head_slice_attention",
        "slice_tokenizer",
        "closed_head",
    }
    for folder in (out, out / "checkpoint-2"):
        assert (folder / "adapter_model.safetensors").is_file() and (folder / "processor_config.json").is_file()
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= {
        p.name for p in (out / "checkpoint-2").iterdir()
    }
    base = out / BASE_FOLDER
    assert (base / "model.safetensors").is_file() and (base / "processor_config.json").is_file()


def test_the_saved_adapter_reloads_in_a_fresh_process_and_merged_with_the_same_logits(workspace, sft_run, tmp_path):
    _, data, _ = workspace
    trainer, out = sft_run
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(rows)
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.save({"batch": dict(batch), "logits": logits}, tmp_path / "expected.pt")
    code = textwrap.dedent(
        f"""
        import torch, peft
        from med3dqwen.modeling.modeling_med3d_qwen import Med3DQwenForConditionalGeneration
        saved = torch.load({str(tmp_path / "expected.pt")!r})
        base = Med3DQwenForConditionalGeneration.from_pretrained({str(out / BASE_FOLDER)!r})
        model = peft.PeftModel.from_pretrained(base, {str(out)!r}).eval()
        inputs = {{k: v for k, v in saved["batch"].items() if k != "labels"}}
        with torch.no_grad():
            logits = model(**inputs).logits
        torch.testing.assert_close(logits, saved["logits"], rtol=0, atol=1e-5)
        merged = model.merge_and_unload()  # LoRA folded into the decoder, the fully trained modules kept
        assert not any("lora_" in name for name, _ in merged.named_parameters())
        with torch.no_grad():
            merged_logits = merged(**inputs).logits
        torch.testing.assert_close(merged_logits, saved["logits"], rtol=0, atol=1e-4)
        print("same logits", tuple(logits.shape), "merged too")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "same logits" in result.stdout and "merged too" in result.stdout


def test_a_resumed_run_reaches_the_same_step_and_loss(workspace, sft_run, tmp_path):
    root, data, tiny = workspace
    uninterrupted, out = sft_run
    recipe = write_recipe(tmp_path / "resume.yaml", dataset_name=str(data), model_name_or_path=str(tiny))
    resumed = run_script(
        "--config",
        str(recipe),
        "--output_dir",
        str(tmp_path / "resumed"),
        "--resume_from_checkpoint",
        str(out / "checkpoint-1"),
    )
    assert resumed.state.global_step == 2
    assert losses(resumed)[-1] == pytest.approx(losses(uninterrupted)[-1], rel=1e-5)


def test_align_trains_the_projector_and_slice_projection_only(workspace, tmp_path):
    root, data, tiny = workspace
    recipe = write_recipe(
        tmp_path / "align.yaml", dataset_name=str(data), model_name_or_path=str(tiny), save_strategy="no"
    )
    trainer = run_script("--config", str(recipe), "--stage", "align", "--output_dir", str(tmp_path / "align"))
    assert "train_loss" in trainer.state.log_history[-1]
    assert set(trainer.train_dataset["question_type"]) <= set(ALIGN_QUESTION_TYPES)
    before = Med3DQwenForConditionalGeneration.from_pretrained(tiny).state_dict()
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.multi_modal_projector.") for k in changed)
    assert any(k.startswith("model.slice_tokenizer.") for k in changed)
    assert all(k.startswith(("model.multi_modal_projector.", "model.slice_tokenizer.")) for k in changed), changed
    # the output folder is the aligned full model, the next stage's base
    saved = Med3DQwenForConditionalGeneration.from_pretrained(tmp_path / "align").state_dict()
    assert all(torch.equal(saved[k], after[k]) for k in changed)


def test_align_rows_are_the_report_rows_or_all_rows():
    records = datasets.Dataset.from_dict({"question_type": ["presence", "region_report", "size", "report"]})
    assert stage_rows(records, "align")["question_type"] == ["region_report", "report"]
    assert stage_rows(records, "sft")["question_type"] == records["question_type"]
    only_vqa = datasets.Dataset.from_dict({"question_type": ["presence", "size"]})
    assert len(stage_rows(only_vqa, "align")) == 2


def test_lora_targets_the_decoder_and_refuses_all_linear():
    config = tiny_config()
    lora = lora_config(ModelConfig(lora_r=16, lora_alpha=32, lora_dropout=0.05), config)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (16, 32, 0.05)
    assert lora.target_modules == DECODER_LORA_TARGETS
    with pytest.raises(ValueError, match="all-linear"):
        lora_config(ModelConfig(lora_target_modules=["all-linear"]), config)
    channel = tiny_config()
    channel.prompt_encoding = "channel"
    assert modules_to_save(channel)[-1] == "prompt_stem"
    assert "prompt_stem" not in modules_to_save(config)


def test_script_arguments_name_the_problem():
    with pytest.raises(ValueError, match="distill"):
        Med3DQwenScriptArguments(dataset_name="x", stage="distill")
    with pytest.raises(ValueError, match="--dataset_name"):
        Med3DQwenScriptArguments(stage="sft")


def test_vision_encoder_weights_must_fit(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model(tiny_config(), seed=1)
    source = tiny_model(tiny_config(), seed=2).model.vision_encoder.state_dict()
    save_file(source, tmp_path / "vision_encoder.safetensors")
    load_vision_encoder(model, tmp_path / "vision_encoder.safetensors")
    assert all(torch.equal(t, source[k]) for k, t in model.model.vision_encoder.state_dict().items())
    save_file({"encoder.unknown": torch.zeros(1)}, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="wrong.safetensors does not fit"):
        load_vision_encoder(model, tmp_path / "wrong.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_vision_encoder(model, tmp_path / "missing.safetensors")


@pytest.mark.parametrize(("recipe", "learning_rate"), [("paper_0.5b", 2e-5), ("paper_1.5b", 2e-5), ("paper_3b", 1e-5)])
def test_paper_recipes_hold_the_papers_hyper_parameters(recipe, learning_rate):
    # bf16 needs a GPU: parse as on this CPU machine, everything else from the file
    script_args, args, model_args = train_sft.make_parser().parse_args_and_config(
        args=["--config", str(ROOT / "configs" / f"{recipe}.yaml"), "--bf16", "false", "--use_cpu", "true"]
    )
    assert args.learning_rate == learning_rate and args.num_train_epochs == 25
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay) == (0.9, 0.98, 0.02)
    assert args.lr_scheduler_type == "cosine" and args.warmup_steps == 500
    assert args.per_device_train_batch_size == 4 and args.remove_unused_columns is False
    assert args.dataset_kwargs == {"skip_prepare_dataset": True}
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) == (16, 32, 0.05)
    assert model_args.lora_target_modules is None  # the decoder regex
    assert yaml.safe_load((ROOT / "configs" / f"{recipe}.yaml").read_text())["bf16"] is True
    assert script_args.stage == "sft"


def test_demo_recipe_builds_a_tiny_cpu_model():
    script_args, args, model_args = train_sft.make_parser().parse_args_and_config(
        args=["--config", str(ROOT / "configs" / "demo_cpu.yaml")]
    )
    assert args.use_cpu and not args.bf16 and args.report_to == []
    assert script_args.model_preset == "tiny" and model_args.model_name_or_path is None
    overrides = json.loads(script_args.preset_overrides)
    assert overrides["vision_overrides"]["volume_size"] == [64, 64, 64]


ACCELERATE_CONFIGS = ["single_gpu", "ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"]


@pytest.mark.parametrize("name", ACCELERATE_CONFIGS)
def test_accelerate_configs_load_with_accelerates_own_loader(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = ROOT / "configs" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))  # a ClusterConfig: unknown top-level keys raise
    parser = launch_command_parser()
    known = {action.dest for action in parser._actions}
    # accelerate copies the nested keys onto launch arguments without checking them: check that each is one
    for key in config.deepspeed_config or {}:
        assert key in known, f"{path}: unknown deepspeed_config key {key}"
    for key in config.fsdp_config or {}:
        assert (key if key.startswith("fsdp_") else f"fsdp_{key}") in known, f"{path}: unknown fsdp_config key {key}"
    args, _, _ = _validate_launch_command(parser.parse_args(["--config_file", str(path), "train_sft.py"]))
    expected = {
        "single_gpu": (1, False, False, False),
        "ddp": (8, True, False, False),
        "deepspeed_zero2": (8, False, True, False),
        "deepspeed_zero3": (8, False, True, False),
        "fsdp": (8, False, False, True),
    }[name]
    assert (args.num_processes, args.multi_gpu, args.use_deepspeed, args.use_fsdp) == expected
    assert args.mixed_precision == "bf16"
    if args.use_deepspeed:
        assert int(args.zero_stage) == int(name[-1])


def test_the_run_writes_a_model_card(sft_run):
    from huggingface_hub import ModelCard

    trainer, out = sft_run
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "image-text-to-text"
    assert card.data.base_model is None  # a local folder is no Hub id
    assert "lora" in card.data.tags and "sft" in card.data.tags
    text = card.text
    assert "LoRA r=4 (alpha 8, dropout 0.05)" in text
    assert "in full: `slice_self_attention`, `multi_head_slice_attention`, `slice_tokenizer`, `closed_head`" in text
    assert "`burn_in` encoding of the ROI contour (volume 64x64x64)" in text
    assert f"| train_loss | {round(trainer.state.log_history[-1]['train_loss'], 4)} |" in text
    assert "2 optimiser steps" in text and "weight decay 0.02 on the LoRA weights only" in text
    assert f'from_pretrained("{out.resolve() / BASE_FOLDER}")' in text


def test_push_without_network_fails_after_a_complete_local_save(workspace, tmp_path, monkeypatch):
    from med3dqwen.training.cards import PushError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, data, tiny = workspace
    recipe = write_recipe(
        tmp_path / "push.yaml", dataset_name=str(data), model_name_or_path=str(tiny), save_strategy="no", max_steps=1
    )
    out = tmp_path / "pushed"
    args = ["--config", str(recipe), "--stage", "align", "--output_dir", str(out), "--push_to_hub", "true"]
    with pytest.raises(PushError, match=f"user/med3dqwen-align.*local save in {out} is complete"):
        run_script(*args, "--hub_model_id", "user/med3dqwen-align")
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and 'from_pretrained("user/med3dqwen-align")' in card
    model = Med3DQwenForConditionalGeneration.from_pretrained(out)  # the local save is whole
    assert model.config.train_projector and (out / "processor_config.json").is_file()


def test_accelerate_launch_cpu_runs_the_script(workspace, tmp_path):
    import os

    root, data, tiny = workspace
    recipe = write_recipe(
        tmp_path / "launch.yaml", dataset_name=str(data), model_name_or_path=str(tiny), save_strategy="no", max_steps=1
    )
    out = tmp_path / "launched"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [str(ROOT / "train_sft.py"), "--config", str(recipe), "--output_dir", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(out / BASE_FOLDER)
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()


_VISION_FIELDS = ("channels", "depths", "volume_size", "low_output_tokens", "high_output_tokens")


def test_load_model_builds_around_a_qwen2_decoder_or_from_a_preset(tmp_path):
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from med3dqwen.training.recipe import load_model

    text = tiny_config().text_config.to_dict()
    vision = {k: v for k, v in tiny_config().vision_config.to_dict().items() if k in _VISION_FIELDS}
    decoder = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in text.items() if k != "model_type"}))
    decoder.save_pretrained(tmp_path / "qwen")
    encoder = tiny_model(tiny_config(), seed=3).model.vision_encoder.state_dict()
    save_file(encoder, tmp_path / "vision_encoder.safetensors")
    script_args = Med3DQwenScriptArguments(
        dataset_name="unused",
        stage="align",
        vision_encoder_weights=str(tmp_path / "vision_encoder.safetensors"),
        preset_overrides=json.dumps({"vision_overrides": vision, "ssa_layers": 1}),
    )
    model = load_model(script_args, ModelConfig(model_name_or_path=str(tmp_path / "qwen"), dtype="float32"))
    q_proj = decoder.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(model.model.language_model.layers[0].self_attn.q_proj.weight, q_proj)
    assert all(torch.equal(t, encoder[k]) for k, t in model.model.vision_encoder.state_dict().items())
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"multi_modal_projector", "slice_tokenizer"}  # the align stage
    preset = Med3DQwenScriptArguments(
        dataset_name="unused", model_preset="tiny", preset_overrides=script_args.preset_overrides
    )
    model = load_model(preset, ModelConfig(dtype="float32"))
    assert model.config.vision_config.volume_size == [64, 64, 64] and model.config._attn_implementation == "sdpa"
    assert not any(p.requires_grad for p in model.model.multi_modal_projector.parameters())  # sft: frozen
    with pytest.raises(ValueError, match="--model_preset"):
        load_model(Med3DQwenScriptArguments(dataset_name="unused"), ModelConfig())


def test_every_checkpoint_holds_the_model_card_and_the_processor(sft_run):
    from huggingface_hub import ModelCard

    _, out = sft_run
    for step in (1, 2):
        folder = out / f"checkpoint-{step}"
        assert (folder / "processor_config.json").is_file() and (folder / "tokenizer.json").is_file()
        card = ModelCard.load(folder / "README.md")
        assert card.data.library_name == "peft" and card.data.pipeline_tag == "image-text-to-text"
        assert f"{step} optimiser steps" in card.text and f"checkpoint-{step}" in card.text
        assert f'from_pretrained("{out.resolve() / BASE_FOLDER}")' in card.text


@pytest.fixture
def local_hub(monkeypatch, tmp_path):
    """``huggingface_hub.HfApi`` replaced by a folder per repo under ``tmp_path / "hub"`` (what would be uploaded,
    filtered by huggingface_hub's own ``filter_repo_objects`` with the push's patterns); no network."""
    import shutil

    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    hub = tmp_path / "hub"
    pushes: list[str] = []

    class LocalApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, repo_id, folder_path, ignore_patterns=None, **kwargs):
            folder = Path(folder_path)
            files = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
            for name in filter_repo_objects(files, ignore_patterns=ignore_patterns):
                (hub / repo_id / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(folder / name, hub / repo_id / name)
            pushes.append(repo_id)

    monkeypatch.setattr(huggingface_hub, "HfApi", LocalApi)
    return hub, pushes


def test_push_of_an_adapter_pushes_its_base_first_and_points_the_pushed_adapter_at_it(workspace, local_hub, tmp_path):
    hub, pushes = local_hub
    root, data, tiny = workspace
    recipe = write_recipe(
        tmp_path / "push.yaml", dataset_name=str(data), model_name_or_path=str(tiny), save_strategy="no", max_steps=1
    )
    out = tmp_path / "run"
    args = ["--config", str(recipe), "--output_dir", str(out), "--push_to_hub", "true", "--hub_model_id", "me/ad"]
    out.mkdir()
    (out / "skipped_samples.jsonl").write_text('{"name": "x", "reason": "/data/private/x.nii.gz missing"}\n')
    trainer = run_script(*args)
    assert not (hub / "me/ad" / "skipped_samples.jsonl").exists()  # local diagnostics stay local
    assert pushes == ["me/ad-base", "me/ad"]  # the base first: the adapter never points at a missing repo
    pushed = json.loads((hub / "me/ad/adapter_config.json").read_text())
    assert pushed["base_model_name_or_path"] == "me/ad-base"
    local = json.loads((out / "adapter_config.json").read_text())
    assert local["base_model_name_or_path"] == str(out.resolve() / BASE_FOLDER)  # the local save is unchanged
    assert {p.name for p in (hub / "me/ad").iterdir()} >= {"adapter_model.safetensors", "README.md"}
    assert not (hub / "me/ad" / BASE_FOLDER).exists() and (hub / "me/ad-base/model.safetensors").is_file()
    assert 'from_pretrained("me/ad-base")' in (hub / "me/ad/README.md").read_text()
    assert f'from_pretrained("{out.resolve() / BASE_FOLDER}")' in (out / "README.md").read_text()
    # a user loads the pushed layout in a fresh process: the base by the adapter's own base_model_name_or_path
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = {k: v for k, v in trainer.data_collator(rows).items() if k != "labels"}
    with torch.no_grad():
        logits = trainer.model.eval()(**batch).logits
    torch.save({"batch": batch, "logits": logits}, tmp_path / "expected.pt")
    code = textwrap.dedent(
        f"""
        import json, torch, peft
        from med3dqwen import Med3DQwenForConditionalGeneration
        saved = torch.load({str(tmp_path / "expected.pt")!r})
        base_id = json.load(open("me/ad/adapter_config.json"))["base_model_name_or_path"]
        model = peft.PeftModel.from_pretrained(Med3DQwenForConditionalGeneration.from_pretrained(base_id), "me/ad")
        with torch.no_grad():
            logits = model.eval()(**saved["batch"]).logits
        torch.testing.assert_close(logits, saved["logits"], rtol=0, atol=1e-5)
        print("loaded", base_id)
        """
    )
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False, cwd=hub, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded me/ad-base" in result.stdout


def test_the_script_reads_a_model_grid_cache_and_counts_skipped_rows(workspace, tmp_path, caplog):
    from med3dqwen.scripts.build_cache import CacheArguments
    from med3dqwen.scripts.build_cache import main as build_cache

    root, data, tiny = workspace
    assert (
        build_cache(CacheArguments(dataset_name=str(data), output_dir=str(tmp_path / "cache"), processor=str(tiny)))
        == 0
    )
    recipe = write_recipe(
        tmp_path / "align.yaml", dataset_name=str(data), model_name_or_path=str(tiny), save_strategy="no", max_steps=1
    )
    out = tmp_path / "align"
    with caplog.at_level("WARNING", logger="med3dqwen.training.recipe"):
        trainer = run_script(
            *["--config", str(recipe), "--stage", "align", "--output_dir", str(out)],
            *["--cache_dir", str(tmp_path / "cache"), "--skip_bad_samples"],
        )  # fmt: skip
    assert trainer.data_collator.cache.cache_dir == tmp_path / "cache"
    assert trainer.data_collator.skip_log == out / SKIP_LOG
    assert "train_loss" in trainer.state.log_history[-1]
    assert "bad sample(s) in this run" not in caplog.text and not (out / SKIP_LOG).exists()  # none were bad


def test_rows_whose_prompt_reaches_max_length_are_skipped_and_counted(workspace, tmp_path, caplog):
    # without --skip_bad_samples: cutting such a prompt would cut image tokens, so the row is left out, not an error
    root, data, tiny = workspace
    recipe = write_recipe(
        tmp_path / "align.yaml", dataset_name=str(data), model_name_or_path=str(tiny), save_strategy="no", max_steps=1
    )
    out = tmp_path / "short"
    with caplog.at_level("WARNING", logger="med3dqwen.training.recipe"):
        args = ["--config", str(recipe), "--stage", "align", "--output_dir", str(out), "--max_length", "8"]
        trainer = run_script(*args)
    assert trainer.state.global_step == 1
    skipped = [json.loads(line) for line in (out / SKIP_LOG).read_text().splitlines()]
    assert skipped and all("max_length=8" in entry["reason"] for entry in skipped)
    assert f"skipped {len(skipped)} bad sample(s) in this run" in caplog.text
