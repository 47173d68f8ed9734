"""What ``train_sft.py`` wires together: the stages, model and data loading, the trainer, saving the base.

The script only parses ``TrlParser((Med3DQwenScriptArguments, SFTConfig, ModelConfig))`` and calls :func:`run`;
everything a stage decides lives here so that it is tested without the script:

- **align**: the projector (``config.train_projector=True``) and the slice-token projection train, everything else
  is frozen (encoder, decoder, fusion modules, closed head); rows whose ``question_type`` is a report or caption
  (:data:`ALIGN_QUESTION_TYPES`), or every row when the split has none. The output folder is a full model, the base
  of the sft stage.
- **sft**: LoRA on the decoder's projections only (:data:`DECODER_LORA_TARGETS`, never ``all-linear``), the fusion
  modules, slice projection and closed head trained in full (:func:`modules_to_save`, plus the ``channel``
  encoding's ``prompt_stem``); encoder and projector frozen. The base model is saved under ``<output_dir>/base``
  with its ``name_or_path`` set before wrapping, so the adapter's config points at it.
- **distill**: the sft stage's setup plus a frozen teacher (``--teacher_model_name_or_path``, any Med3DQwen
  checkpoint or adapter folder) and a SigLIP-style contrastive term between the student's and the teacher's pooled
  answer-token states (:mod:`~med3dqwen.training.distill`); the distillation head is saved beside the adapter.

Every saved folder (``checkpoint-N/`` and the final one) holds the processor and the model card.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import peft
import torch
from trl import ModelConfig, ScriptArguments, SFTConfig

from ..data.loading import load_local_dataset
from ..data.schema import resolve_media
from ..modeling.configuration_med3d_qwen import Med3DQwenConfig
from ..modeling.modeling_med3d_qwen import Med3DQwenForConditionalGeneration, default_attn_implementation
from ..processing.processing_med3d_qwen import Med3DQwenProcessor
from ..processing.tokenization_med3d_qwen import load_qwen2_5_tokenizer
from .cards import push_adapter, push_folder, render_model_card
from .collator import Med3DQwenCollator, count_skipped
from .distill import check_teacher_fits, load_teacher
from .losses import closed_class_weights
from .trainer import Med3DQwenTrainer


__all__ = [
    "ADAPTER_STAGES",
    "ALIGN_QUESTION_TYPES",
    "BASE_FOLDER",
    "DECODER_LORA_TARGETS",
    "FUSION_MODULES_TO_SAVE",
    "SKIP_LOG",
    "STAGES",
    "Med3DQwenScriptArguments",
    "build_trainer",
    "load_model",
    "load_processor",
    "load_train_split",
    "load_vision_encoder",
    "lora_config",
    "modules_to_save",
    "prepare_align",
    "run",
    "save_base",
    "stage_rows",
    "write_card",
]

logger = logging.getLogger(__name__)

STAGES = ("align", "sft", "distill")
"""``--stage`` values."""
ADAPTER_STAGES = ("sft", "distill")
"""The stages that train a LoRA adapter on a saved base (``<output_dir>/base``)."""
DECODER_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
"""LoRA targets: the decoder's attention and MLP projections only (``all-linear`` would also hit the encoder,
projector, MSSA and closed head)."""
FUSION_MODULES_TO_SAVE = ("slice_self_attention", "multi_head_slice_attention", "slice_tokenizer", "closed_head")
"""Modules trained in full next to LoRA in the sft stage (saved with the adapter)."""
ALIGN_QUESTION_TYPES = ("report", "region_report", "whole_report", "caption")
"""``question_type`` values of the report and caption rows the align stage trains on."""
BASE_FOLDER = "base"
"""Sub-folder of ``output_dir`` holding the sft stage's base model (the adapter's ``base_model_name_or_path``)."""
SKIP_LOG = "skipped_samples.jsonl"
"""File in ``output_dir`` listing the rows the collator left out (one JSON line each: name, reason): prompts that
reach ``max_length`` always, unreadable rows with ``--skip_bad_samples``."""


@dataclass
class Med3DQwenScriptArguments(ScriptArguments):
    """``ScriptArguments`` of TRL plus the stage and a from-scratch model preset.

    ``dataset_name`` is a local built dataset folder (its media paths are resolved against it) or a Hub id.
    """

    stage: str = field(default="sft", metadata={"help": f"Training stage: one of {STAGES}."})
    model_preset: str | None = field(
        default=None,
        metadata={
            "help": "Build a newly initialised model from a Med3DQwenConfig preset (tiny, 0.5b, 1.5b, 3b, 7b) when "
            "model_name_or_path is not given (the embedded CPU demo)."
        },
    )
    preset_overrides: str | None = field(
        default=None,
        metadata={
            "help": "JSON object of Med3DQwenConfig.from_preset keyword arguments for model_preset, e.g. "
            '{"vision_overrides": {"volume_size": [64, 64, 64]}}; around a Qwen2 model_name_or_path, the same '
            "without text_overrides."
        },
    )
    vision_encoder_weights: str | None = field(
        default=None,
        metadata={
            "help": "vision_encoder.safetensors written by med3dqwen-convert-med3dvlm, loaded into a model built "
            "around a Qwen2 decoder or from a preset (a Med3DQwen checkpoint already holds its encoder)."
        },
    )
    prompt_encoding: str | None = field(
        default=None,
        metadata={"help": "Prompt encoding of a model built from model_preset (burn_in, channel, rgb)."},
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "distill stage: the frozen teacher, a Med3DQwen checkpoint or an sft/distill output folder (its "
            "adapter is merged into its base); it must read the student's batches (same volume and image tokens)."
        },
    )
    distill_weight: float = field(
        default=1.0, metadata={"help": "distill stage: weight of the contrastive term added to the SFT loss."}
    )
    hub_base_model_id: str | None = field(
        default=None,
        metadata={
            "help": "With --push_to_hub, sft/distill: the Hub repo the adapter's base (<output_dir>/base) is pushed "
            "to first (default: <hub_model_id>-base); the pushed adapter_config.json points at it."
        },
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "A model-grid cache of the dataset (med3dqwen-build-cache) built with the model's volume size and "
            "window: volumes and masks are read from it instead of decoded online (the contour is still drawn)."
        },
    )
    skip_bad_samples: bool = field(
        default=False,
        metadata={
            "help": "Leave out, log and count the rows that cannot become samples (missing or corrupt volume or "
            f"mask) instead of stopping with an error; listed in <output_dir>/{SKIP_LOG}, counted at the end. Rows "
            "whose prompt alone reaches max_length are always left out and counted (their image tokens cannot be cut)."
        },
    )

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {STAGES}, got {self.stage!r}")
        if self.stage == "distill" and not self.teacher_model_name_or_path:
            raise ValueError("--stage distill needs --teacher_model_name_or_path (a Med3DQwen checkpoint)")
        if self.dataset_name is None:
            raise ValueError("--dataset_name is required: a built dataset folder or a Hub dataset id")


def _preset_kwargs(script_args: Med3DQwenScriptArguments) -> dict:
    if not script_args.preset_overrides:
        kwargs = {}
    elif isinstance(script_args.preset_overrides, dict):  # a YAML mapping set as the field's default
        kwargs = dict(script_args.preset_overrides)
    else:
        try:
            kwargs = json.loads(script_args.preset_overrides)
        except json.JSONDecodeError as err:
            raise ValueError(f"--preset_overrides is not a JSON object: {err}") from err
    if not isinstance(kwargs, dict):
        raise ValueError(f"--preset_overrides must be a JSON object, got {script_args.preset_overrides!r}")
    if script_args.prompt_encoding is not None:
        kwargs["prompt_encoding"] = script_args.prompt_encoding
    return kwargs


def _dtype(model_args: ModelConfig):
    if model_args.dtype in (None, "auto"):
        return model_args.dtype
    return getattr(torch, model_args.dtype)


def load_model(
    script_args: Med3DQwenScriptArguments, model_args: ModelConfig, stage: str | None = None
) -> Med3DQwenForConditionalGeneration:
    """The model a stage starts from.

    ``model_name_or_path`` is a Med3DQwen checkpoint (a previous stage's output) or a Qwen2 / Qwen2.5 causal LM
    (built around it with :meth:`~Med3DQwenForConditionalGeneration.from_qwen2_pretrained`); without it, a newly
    initialised model from ``model_preset``. ``attn_implementation`` defaults to ``flash_attention_2`` when installed
    on a GPU, else ``sdpa`` (the model's own default).

    Raises:
        ValueError: neither ``model_name_or_path`` nor ``model_preset`` is given.
    """
    stage = stage or script_args.stage
    load = {"dtype": _dtype(model_args), "revision": model_args.model_revision}
    if model_args.attn_implementation is not None:
        load["attn_implementation"] = model_args.attn_implementation
    if model_args.model_name_or_path:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
        if config.model_type == Med3DQwenConfig.model_type:
            model = Med3DQwenForConditionalGeneration.from_pretrained(model_args.model_name_or_path, **load)
        else:
            kwargs = _preset_kwargs(script_args)
            if kwargs.pop("text_overrides", None):
                raise ValueError("preset_overrides cannot change the text config of a pretrained Qwen2 decoder")
            model = Med3DQwenForConditionalGeneration.from_qwen2_pretrained(
                model_args.model_name_or_path, vision_config=kwargs.pop("vision_overrides", None), **load, **kwargs
            )
    elif script_args.model_preset:
        config = Med3DQwenConfig.from_preset(script_args.model_preset, **_preset_kwargs(script_args))
        config._attn_implementation = load.get("attn_implementation") or default_attn_implementation()
        model = Med3DQwenForConditionalGeneration(config)
        if load["dtype"] not in (None, "auto"):
            model = model.to(load["dtype"])
    else:
        raise ValueError("give --model_name_or_path (a checkpoint or a Qwen2 model) or --model_preset")
    if script_args.vision_encoder_weights:
        load_vision_encoder(model, script_args.vision_encoder_weights)
    model.config.train_projector = stage == "align"
    model.model.freeze_pretrained_parts()
    if stage == "align":
        prepare_align(model)
    return model


def load_vision_encoder(model: Med3DQwenForConditionalGeneration, path: str | os.PathLike) -> None:
    """Load converted encoder weights (``med3dqwen-convert-med3dvlm``'s ``vision_encoder.safetensors``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file misses encoder weights or holds unknown ones (the message lists them).
    """
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"vision encoder weights {path} do not exist")
    encoder = model.model.vision_encoder
    state = load_file(str(path))
    expected = set(encoder.state_dict())
    # the prompt stem belongs to the channel encoding, not to the converted (one-channel) encoder
    missing = sorted(k for k in expected - set(state) if not k.startswith("prompt_stem."))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the vision encoder: missing {missing[:5]}, unexpected {unexpected[:5]}")
    encoder.load_state_dict(state, strict=False)


def load_processor(model: Med3DQwenForConditionalGeneration, model_args: ModelConfig) -> Med3DQwenProcessor:
    """The checkpoint's processor when it has one, else one matching the model's config and the Qwen2.5 tokenizer."""
    path = model_args.model_name_or_path
    if path and Path(path, "processor_config.json").is_file():
        return Med3DQwenProcessor.from_pretrained(path)
    tokenizer = load_qwen2_5_tokenizer(path if path and Path(path, "tokenizer.json").is_file() else None)
    return Med3DQwenProcessor.from_config(model.config, tokenizer=tokenizer)


def prepare_align(model: Med3DQwenForConditionalGeneration) -> None:
    """Freeze everything but the projector and the slice-token projection (the alignment stage)."""
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if model.model.slice_tokenizer is not None:
        model.model.slice_tokenizer.requires_grad_(True)
    model.model.freeze_vision_encoder()


def modules_to_save(config: Med3DQwenConfig) -> list[str]:
    """The sft stage's fully trained modules that the model has (+ ``prompt_stem`` for the ``channel`` encoding)."""
    present = {
        "slice_self_attention": config.use_ssa,
        "multi_head_slice_attention": config.use_mssa,
        "slice_tokenizer": config.vision_config.use_slice_tokens,
        "closed_head": config.num_closed_labels > 0,
    }
    names = [name for name in FUSION_MODULES_TO_SAVE if present[name]]
    if config.prompt_encoding == "channel":
        names.append("prompt_stem")
    return names


def lora_config(model_args: ModelConfig, config: Med3DQwenConfig) -> peft.LoraConfig:
    """LoRA (``lora_r``, ``lora_alpha``, ``lora_dropout`` of ``ModelConfig``) on :data:`DECODER_LORA_TARGETS`.

    Raises:
        ValueError: ``lora_target_modules`` asks for ``all-linear``.
    """
    targets = model_args.lora_target_modules or DECODER_LORA_TARGETS
    if targets == "all-linear" or (isinstance(targets, list) and "all-linear" in targets):
        raise ValueError(
            "lora_target_modules=all-linear would put LoRA on the encoder, projector, MSSA and closed head; "
            "leave it unset (the decoder's projections)"
        )
    return peft.LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        modules_to_save=list(model_args.lora_modules_to_save or modules_to_save(config)),
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
    )


def load_train_split(script_args: Med3DQwenScriptArguments) -> datasets.Dataset:
    """``dataset_train_split`` of a built dataset folder (media resolved against it) or of a Hub dataset."""
    name = script_args.dataset_name
    if Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
        dataset = load_local_dataset(folder, name=script_args.dataset_config)  # never another folder's cache
        if script_args.dataset_train_split not in dataset:
            raise ValueError(
                f"dataset {name} has no split {script_args.dataset_train_split!r} (it has {sorted(dataset)})"
            )
        return resolve_media(dataset[script_args.dataset_train_split], folder)
    return datasets.load_dataset(name, name=script_args.dataset_config, split=script_args.dataset_train_split)


def stage_rows(train: datasets.Dataset, stage: str) -> datasets.Dataset:
    """The rows a stage trains on: align keeps the report/caption rows (all rows when there are none)."""
    if stage != "align" or "question_type" not in train.column_names:
        return train
    keep = [i for i, kind in enumerate(train["question_type"]) if kind in ALIGN_QUESTION_TYPES]
    if not keep:
        logger.warning("no report or caption rows: the align stage trains on all %d rows", len(train))
        return train
    return train.select(keep)


def save_base(model: Med3DQwenForConditionalGeneration, processor: Med3DQwenProcessor, folder: str | os.PathLike):
    """Save the base model (with our code) and processor to ``folder`` and point the model's ``name_or_path`` at it,
    so that an adapter made from it records where its base is."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    model.name_or_path = str(folder)
    model.config._name_or_path = str(folder)


def _class_weights(train: datasets.Dataset, names: list[str]) -> torch.Tensor | None:
    """Focal-loss class weights from the split's closed answers; None (all 1) without a head or closed rows."""
    if not names or "answer_type" not in train.column_names or "closed" not in set(train["answer_type"]):
        return None
    return closed_class_weights(train, names)


def build_trainer(
    script_args: Med3DQwenScriptArguments, training_args: SFTConfig, model_args: ModelConfig
) -> Med3DQwenTrainer:
    """Model, processor, data, stage and the trainer; for sft the base is saved first (see :func:`save_base`)."""
    from transformers import set_seed

    if training_args.remove_unused_columns:
        training_args.remove_unused_columns = False  # the collator reads the records' own columns
    set_seed(training_args.seed)  # a model built from a preset starts from the same weights when a run resumes
    model = load_model(script_args, model_args)
    processor = load_processor(model, model_args)
    train = stage_rows(load_train_split(script_args), script_args.stage)
    names = list(model.config.closed_label_names)
    adapter = script_args.stage in ADAPTER_STAGES
    weights = _class_weights(train, names) if adapter else None  # align: the head is frozen
    teacher = None
    if script_args.stage == "distill":
        teacher = load_teacher(
            script_args.teacher_model_name_or_path, _dtype(model_args), model_args.attn_implementation
        )
        check_teacher_fits(model.config, teacher.config, script_args.teacher_model_name_or_path)
    if adapter:
        base = Path(training_args.output_dir).expanduser().resolve() / BASE_FOLDER
        if training_args.process_index == 0:
            save_base(model, processor, base)
        else:  # the main process writes it
            model.name_or_path = model.config._name_or_path = str(base)
        model = peft.get_peft_model(model, lora_config(model_args, model.config))
    # Rows whose prompt alone reaches max_length are always skipped (their image tokens cannot be cut); with
    # --skip_bad_samples unreadable rows too. Either way they are listed here and counted at the end.
    skip_log = Path(training_args.output_dir).expanduser() / SKIP_LOG
    skip_log.parent.mkdir(parents=True, exist_ok=True)
    collator = Med3DQwenCollator(
        processor,
        names,
        max_length=training_args.max_length,
        cache=script_args.cache_dir,
        skip_bad_samples=script_args.skip_bad_samples,
        skip_log=skip_log,
    )
    return Med3DQwenTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=collator,
        processing_class=processor,
        class_weights=weights,
        teacher=teacher,
        distill_weight=script_args.distill_weight,
        card_writer=lambda folder, trainer: write_card(folder, trainer, script_args, model_args),
    )


def write_card(
    folder: str | os.PathLike,
    trainer: Med3DQwenTrainer,
    script_args: Med3DQwenScriptArguments,
    model_args: ModelConfig,
    metrics: dict | None = None,
    hub_model_id: str | None = None,
    base_model_path: str | None = None,
):
    """Render the model card of ``trainer``'s model as it is now into ``folder`` (a checkpoint or the output).

    ``base_model_path`` overrides where the card says the adapter's base loads from (a pushed copy: the Hub id).
    """
    peft_config = getattr(trainer.model, "peft_config", {}).get("default")
    if base_model_path is None and peft_config is not None:
        base_model_path = getattr(trainer.model.get_base_model(), "name_or_path", None)
    return render_model_card(
        folder,
        trainer.model,
        stage=script_args.stage,
        base_model=model_args.model_name_or_path or f"preset {script_args.model_preset}",
        dataset=script_args.dataset_name,
        training_args=trainer.args,
        global_step=trainer.state.global_step,
        epochs=trainer.state.epoch,
        metrics=metrics,
        lora=None if peft_config is None else vars(peft_config),
        base_model_path=base_model_path,
        hub_model_id=hub_model_id,
    )


def run(script_args: Med3DQwenScriptArguments, training_args: SFTConfig, model_args: ModelConfig):
    """Train one stage, save the result to ``output_dir`` (adapter + trained modules + processor + card, or the aligned
    full model), push it when asked, and return the trainer.

    ``--push_to_hub`` runs after the local save (the Trainer's own push would reach the Hub before training). An
    adapter's base (``<output_dir>/base``) is pushed first, to ``--hub_base_model_id`` (default
    ``<hub_model_id>-base``), and the pushed ``adapter_config.json`` and card name that repo, not the local folder
    (:func:`~med3dqwen.training.cards.push_adapter`).

    Raises:
        PushError: the push failed; the local save is complete.
    """
    push, training_args.push_to_hub = training_args.push_to_hub, False
    trainer = build_trainer(script_args, training_args, model_args)
    skip_log = trainer.data_collator.skip_log
    skipped = count_skipped(skip_log) if skip_log else 0
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if skip_log and trainer.is_world_process_zero():
        skipped = count_skipped(skip_log) - skipped
        if skipped:
            logger.warning(
                "skipped %d bad sample(s) in this run (a bad row counts once per epoch); see %s", skipped, skip_log
            )
    out = training_args.output_dir
    trainer.save_model(out)
    if trainer.is_world_process_zero():
        metrics = {"train_loss": round(result.training_loss, 4)}
        write_card(
            out, trainer, script_args, model_args, metrics, hub_model_id=training_args.hub_model_id if push else None
        )
        if push:
            repo_id = training_args.hub_model_id or Path(out).name
            hub = {"token": training_args.hub_token, "private": training_args.hub_private_repo}
            if script_args.stage in ADAPTER_STAGES:  # the base first, then the adapter pointing at it

                def card(folder, base_id):
                    write_card(folder, trainer, script_args, model_args, metrics, repo_id, base_model_path=base_id)

                push_adapter(out, repo_id, script_args.hub_base_model_id, base_folder=BASE_FOLDER, card=card, **hub)
            else:
                push_folder(out, repo_id, **hub)
    training_args.push_to_hub = push
    return trainer
