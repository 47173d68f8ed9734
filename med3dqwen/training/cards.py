"""The model card of a training run and ``--push_to_hub``.

The card is rendered from ``hub_cards/model_card.md`` (package data in ``med3dqwen/builders/templates/``, next to the
dataset card; read as a file, so ``training/`` still imports nothing from ``builders/``) with ``huggingface_hub``'s
``ModelCard``: base model, decoder size, prompt setting, data, metrics when known, ``pipeline_tag:
image-text-to-text`` and ``library_name: peft`` for an adapter (``transformers`` for an aligned full model).

:func:`push_folder` uploads a saved output folder (without ``checkpoint-*`` and the local base copy) after the local
save is complete; without network it raises :class:`PushError`, which says that the local files are intact.

An adapter (sft, distill) records its base as a local folder (``<output_dir>/base``), which nobody else can load.
:func:`push_adapter` therefore pushes that base first, to its own repo (``--hub_base_model_id``, default
``<hub_model_id>-base``), then the adapter from a staged copy (:func:`stage_adapter_for_push`) whose
``adapter_config.json`` names the pushed base and whose card loads it; the local output folder is left as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ..io import atomic_output


__all__ = [
    "MODEL_CARD_TEMPLATE",
    "PushError",
    "push_adapter",
    "push_folder",
    "render_model_card",
    "stage_adapter_for_push",
]

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "builders" / "templates" / "model_card.md"
"""The Jinja template of the model card (``hub_cards/model_card.md``)."""

CITATION = """@article{boundary_guidance_3dct,
  title  = {Boundary Guidance for Efficient 3D CT Vision-Language Reasoning},
  author = {Anonymous},
  year   = {2025}
}"""
"""The paper (the same entry as the dataset cards')."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_STAGE_DESCRIPTIONS = {
    "sft": "LoRA adapter of the SFT stage",
    "distill": "LoRA adapter of the distillation stage (SFT loss + contrastive term against a frozen teacher)",
}
_NOT_PUSHED = (
    "checkpoint-*",
    "checkpoint-*/**",
    "base/**",
    "training_args.bin",
    "runs/**",
    "skipped_samples.jsonl",  # local diagnostics: row names and file paths of the training data
)


class PushError(RuntimeError):
    """Pushing a saved run to the Hub failed; the local folder is complete."""


def is_hub_id(name: str | None) -> bool:
    """``user/name`` that is not an existing local path."""
    return bool(name) and _HUB_ID.match(str(name)) is not None and not Path(str(name)).exists()


def _billions(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e8 else f"{count / 1e6:.1f}M"


def render_model_card(
    out_dir: str | os.PathLike,
    model,
    *,
    stage: str,
    base_model: str | None,
    dataset: str,
    training_args,
    global_step: int,
    epochs: float | None = None,
    metrics: Mapping[str, Any] | None = None,
    lora: Mapping[str, Any] | None = None,
    base_model_path: str | None = None,
    hub_model_id: str | None = None,
    template: str | os.PathLike = MODEL_CARD_TEMPLATE,
) -> Path:
    """Write ``out_dir/README.md``, the card of a run.

    Args:
        out_dir: the run's output folder.
        model: the trained ``Med3DQwenForConditionalGeneration`` (a ``PeftModel`` around it for an adapter).
        stage: ``align`` or ``sft``.
        base_model: what the run started from (``model_name_or_path``, or ``preset <name>``); a Hub id also goes in
            the card's ``base_model`` metadata.
        dataset: ``dataset_name`` (a Hub id also goes in the ``datasets`` metadata).
        training_args: the run's ``SFTConfig`` (optimiser and schedule).
        global_step: optimiser steps taken.
        epochs: epochs trained (default ``training_args.num_train_epochs``).
        metrics: name → value, e.g. the final ``train_loss`` (None: no metrics known).
        lora: ``r``, ``lora_alpha``, ``lora_dropout``, ``modules_to_save`` of the adapter (None: a full model).
        base_model_path: where the adapter's base loads from (its ``base_model_name_or_path``).
        hub_model_id: the Hub id the card's usage loads (None: this folder).
        template: the Jinja template.

    Returns:
        The card path.

    Raises:
        FileNotFoundError: the template is missing.
    """
    template = Path(template)
    if not template.is_file():
        raise FileNotFoundError(f"model card template {template} does not exist")
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config
    text = config.text_config
    decoder_params = sum(p.numel() for p in inner.model.language_model.parameters())
    decoder = (
        f"{_billions(decoder_params)} parameters, {text.num_hidden_layers} layers, hidden size {text.hidden_size}"
    )
    adapter = lora is not None
    card_data = ModelCardData(
        library_name="peft" if adapter else "transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_model if is_hub_id(base_model) else None,
        datasets=[dataset] if is_hub_id(dataset) else None,
        tags=["med3dqwen", "3d-ct", "medical", "vqa", stage] + (["lora"] if adapter else []),
    )
    out = Path(out_dir)
    card = ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=hub_model_id or out.name,
        stage=stage,
        stage_description=_STAGE_DESCRIPTIONS.get(stage, stage) if adapter else "the alignment stage",
        base_model_text=f"`{base_model}`" if base_model else "newly initialised",
        base_model_path=base_model_path or "",
        decoder=decoder,
        prompt_encoding=config.prompt_encoding,
        volume_size="x".join(str(s) for s in config.vision_config.volume_size),
        dataset_text=f"`{dataset}`",
        adapter=adapter,
        lora_r=(lora or {}).get("r"),
        lora_alpha=(lora or {}).get("lora_alpha"),
        lora_dropout=(lora or {}).get("lora_dropout"),
        modules_to_save=", ".join(f"`{m}`" for m in (lora or {}).get("modules_to_save") or []),
        adam_beta2=training_args.adam_beta2,
        learning_rate=training_args.learning_rate,
        weight_decay=training_args.weight_decay,
        warmup_steps=training_args.warmup_steps,
        scheduler=str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)),
        epochs=training_args.num_train_epochs if epochs is None else round(epochs, 2),
        global_step=global_step,
        metrics=dict(metrics or {}),
        load_path=hub_model_id or str(out),
        citation=CITATION,
    )
    path = out / "README.md"
    with atomic_output(path) as tmp:
        tmp.write_text(str(card), encoding="utf-8")
    return path


def push_folder(
    out_dir: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    retry_hint: str | None = None,
) -> str:
    """Upload a saved run folder (adapter or model, processor, code, card) to the Hub model repo ``repo_id``.

    Args:
        out_dir: the folder (``checkpoint-*``, ``base/``, ``training_args.bin`` and ``runs/`` stay local).
        repo_id: ``name`` or ``namespace/name``.
        token, private: as ``huggingface_hub.HfApi``.
        retry_hint: what the error message tells the user to run later (default ``hf upload <repo_id> <out_dir>``).

    Returns:
        The full repo id (``namespace/name``) as the Hub created it.

    Raises:
        PushError: the Hub cannot be reached (offline, no network, no rights); the message names the intact local
            folder and how to push it later.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        full_id = getattr(url, "repo_id", None) or repo_id
        api.upload_folder(
            repo_id=full_id,
            folder_path=str(out_dir),
            repo_type="model",
            ignore_patterns=list(_NOT_PUSHED),
            commit_message="Upload Med3DQwen training output",
        )
        return full_id
    except Exception as err:  # offline mode, connection and HTTP errors all end the same way for the user
        hint = retry_hint or f"hf upload {repo_id} {out_dir}"
        raise PushError(
            f"could not push {out_dir} to the Hub repo {repo_id}: {type(err).__name__}: {err}. The local save in "
            f"{out_dir} is complete; push it later with `{hint}`"
        ) from err


def stage_adapter_for_push(out_dir: str | os.PathLike, staging: str | os.PathLike, base_repo_id: str) -> Path:
    """Copy into ``staging`` what :func:`push_folder` would upload from an adapter folder, with the copy's
    ``adapter_config.json`` naming ``base_repo_id`` as ``base_model_name_or_path`` (``out_dir`` is not changed).

    Returns:
        ``staging``.

    Raises:
        FileNotFoundError: ``out_dir`` holds no ``adapter_config.json``.
    """
    from huggingface_hub.utils import filter_repo_objects

    out, staging = Path(out_dir), Path(staging)
    config_path = out / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{out} holds no adapter_config.json: not an adapter folder")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    for name in filter_repo_objects(files, ignore_patterns=list(_NOT_PUSHED)):
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / name, target)
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_repo_id
    (staging / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return staging


def push_adapter(
    out_dir: str | os.PathLike,
    repo_id: str,
    base_repo_id: str | None = None,
    token: str | None = None,
    private: bool | None = None,
    base_folder: str = "base",
    card: Callable[[Path, str], Any] | None = None,
) -> tuple[str, str]:
    """Push an adapter run so that a user can load it: its base (``out_dir/base_folder``) to ``base_repo_id``, then
    the adapter, whose pushed ``adapter_config.json`` names the pushed base.

    Args:
        out_dir: the run's output folder (adapter, processor, card, ``base/``).
        repo_id: the adapter's Hub repo.
        base_repo_id: the base's Hub repo (default ``<repo_id>-base``).
        token, private: as ``huggingface_hub.HfApi``.
        base_folder: the base's sub-folder of ``out_dir``.
        card: ``card(staged_folder, pushed_base_id)`` re-renders the staged copy's model card (its usage then loads
            the pushed base); None keeps the local card.

    Returns:
        ``(adapter repo id, base repo id)`` as the Hub created them.

    Raises:
        FileNotFoundError: ``out_dir`` is no adapter folder or has no base folder.
        PushError: a push failed (the local folder is intact).
    """
    out = Path(out_dir)
    base = out / base_folder
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{base} holds no saved base model (config.json): nothing to push as the base")
    base_repo_id = base_repo_id or f"{repo_id}-base"
    hint = f"train_sft.py's push again, or med3dqwen.training.cards.push_adapter({str(out)!r}, {repo_id!r})"
    pushed_base = push_folder(base, base_repo_id, token=token, private=private, retry_hint=hint)
    with tempfile.TemporaryDirectory(prefix="med3dqwen-push-") as tmp:
        staged = stage_adapter_for_push(out, Path(tmp) / out.name, pushed_base)
        if card is not None:
            card(staged, pushed_base)
        pushed = push_folder(staged, repo_id, token=token, private=private, retry_hint=hint)
    return pushed, pushed_base
