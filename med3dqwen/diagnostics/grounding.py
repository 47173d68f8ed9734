"""Grounding diagnostic: per decoder layer, how much of the answer's attention falls on visual tokens whose footprint
lies inside the ROI, with and without the boundary prompt.

The paper motivates boundary prompts by the claim that they steer the decoder's attention to the outlined region, but
never measures it. This measures it::

    # the rows of a built dataset, with their prompt (contour + wording) and without (no contour, no-prompt wording)
    python -m med3dqwen.diagnostics.grounding --model runs/sft --dataset data/phantom --split test \
        --output_dir diag/sft

    # a LoRA adapter on its base; the model's own greedy answer instead of the reference; the first 50 rows
    python -m med3dqwen.diagnostics.grounding --model runs/base --adapter runs/sft/adapter --dataset data/phantom \
        --split test --answer generated --max_samples 50 --output_dir diag/sft-gen

    # the no-prompt side from a second build (e.g. build_phantom.py --prompt none) instead of re-rendering the rows
    python -m med3dqwen.diagnostics.grounding --model runs/sft --dataset data/phantom \
        --compare_dataset data/phantom_none --split test --output_dir diag/sft-vs-none

It writes ``grounding.json`` (the table: per variant and decoder layer, plus every row), ``grounding.png`` (one
panel per layer) and ``layers/layer_<k>.png`` (one plot per layer), all atomically. See ``docs/grounding.md``.

What is measured, per row and decoder layer ``l``:

- **Queries: the answer.** The conversation is run once under teacher forcing (``output_attentions=True``, eager
  attention), on the reference answer (``--answer reference``) or on the model's greedy answer (``--answer
  generated``). The queries are the positions that *produce* the answer tokens: the last prompt token and every answer
  token but the last (``<|im_end|>`` included as a target), i.e. the attention the model uses while it writes the
  answer. Their attention rows are averaged over heads and queries: ``a`` (L,), a distribution over the sequence.
- **Keys: the image tokens.** The visual tokens (``<|image_pad|>`` positions; the j-th gets the projector's j-th
  token) and the slice tokens (``<|vision_pad|>``). Their footprints on the model grid and the fraction-weighted
  "inside" are defined in :mod:`med3dqwen.diagnostics.footprints` (the projector mixes all encoder cells, so a
  visual token's footprint is the projector's weight flow over encoder cells: an approximation).
- ``visual_attention = Σ_j a_j`` over visual tokens; ``inside = Σ_j a_j f_j`` with ``f_j`` the share of token j's
  footprint in the ROI, ``outside = visual_attention − inside``; **``share_inside = inside / visual_attention``**:
  the headline. Uniform attention over the visual tokens gives ``roi_token_fraction = mean_j f_j`` (the baseline);
  ``enrichment = share_inside / roi_token_fraction``. Slice tokens: ``slice_share_roi`` = the share of the slice
  tokens' attention on slabs that hold ROI voxels (baseline ``roi_slice_fraction``).

Variants: ``prompt`` is each row as stored (contour drawn from ``mask_path``, text as written); ``none`` is the same
row with no contour and the no-prompt wording (system prompt without the outline, the question's and open answer's
boundary prefixes removed) or, with ``--compare_dataset``, the rows of that dataset rendered without contour and with
their text as stored. The ROI used for measuring is always the row's own mask. Per variant and layer the table gives
the mean over rows (each row weighs one); ``paired`` gives the mean ``prompt − none`` difference over rows measured
in both variants, paired by (``volume_id``, ``roi``, ``question_type``, occurrence).

Rows without ``mask_path`` (whole-volume questions) and rows whose ROI is empty on the model grid are skipped and
counted; a split where no row is left, a model that returns no attention weights, or a row whose files cannot be read
is an error naming it.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


__all__ = [
    "VARIANTS",
    "GroundingArguments",
    "LayerShares",
    "attention_shares",
    "cli",
    "no_prompt_record",
    "roi_on_model_grid",
    "run_grounding",
    "save_grounding_plot",
    "save_layer_plots",
]

VARIANTS = ("prompt", "none")
"""``prompt``: the rows as stored; ``none``: no contour, no-prompt wording (or the ``--compare_dataset`` rows)."""
ANSWER_MODES = ("reference", "generated")


@dataclass
class GroundingArguments:
    """The options of ``python -m med3dqwen.diagnostics.grounding`` (``HfArgumentParser`` makes them ``--name``)."""

    model: str | None = field(default=None, metadata={"help": "Model folder or Hub id (Med3DQwen)."})
    adapter: str | None = field(default=None, metadata={"help": "PEFT adapter folder to merge into the model."})
    dataset: str | None = field(default=None, metadata={"help": "Built dataset folder (rows with mask_path)."})
    split: str = field(default="test", metadata={"help": "Dataset split to measure."})
    compare_dataset: str | None = field(
        default=None,
        metadata={"help": "A second build (e.g. --prompt none) whose rows form the 'none' variant, without contour."},
    )
    variants: list[str] = field(
        default_factory=lambda: list(VARIANTS),
        metadata={"help": "Variants to measure: prompt and/or none.", "nargs": "+", "choices": list(VARIANTS)},
    )
    answer: str = field(
        default="reference",
        metadata={"help": "Teacher-force the reference answer or the model's greedy one.", "choices": ANSWER_MODES},
    )
    max_new_tokens: int = field(default=32, metadata={"help": "Longest generated answer (--answer generated)."})
    max_samples: int | None = field(default=None, metadata={"help": "Only the first N rows of the split."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Folder for grounding.json, grounding.png and layers/."}
    )
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available, else cpu)."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self) -> None:
        missing = [f"--{n}" for n in ("model", "dataset", "output_dir") if not getattr(self, n)]
        if missing:
            raise ValueError(f"the grounding diagnostic needs {', '.join(missing)}")
        self.variants = list(dict.fromkeys(self.variants))
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"--variants must be among {list(VARIANTS)}, got {self.variants}")
        if self.compare_dataset and "none" not in self.variants:
            raise ValueError("--compare_dataset gives the 'none' variant's rows; keep 'none' in --variants")
        if self.answer not in ANSWER_MODES:
            raise ValueError(f"--answer must be one of {list(ANSWER_MODES)}, got {self.answer!r}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"--max_samples must be >= 1, got {self.max_samples}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")


# ---------------------------------------------------------------------------------------------------------------
# The measure
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class LayerShares:
    """Where one decoder layer's answer attention goes (see the module docstring; shares of ``a``, which sums to 1).

    Attributes:
        visual_attention: attention mass on the visual tokens.
        inside, outside: that mass split by the tokens' footprint fraction inside / outside the ROI.
        share_inside: ``inside / visual_attention`` (None when the visual tokens get no attention at all).
        slice_attention: attention mass on the slice tokens.
        slice_share_roi: the share of it on slabs holding ROI voxels (None without slice tokens or attention on them).
    """

    visual_attention: float
    inside: float
    outside: float
    share_inside: float | None
    slice_attention: float
    slice_share_roi: float | None


def attention_shares(
    attentions: Sequence,
    query_positions: Sequence[int],
    visual_positions: Sequence[int],
    inside_fraction: np.ndarray,
    slice_positions: Sequence[int] = (),
    slice_in_roi: np.ndarray | None = None,
) -> list[LayerShares]:
    """Split each layer's answer attention between visual tokens inside and outside the ROI (and slice tokens).

    Args:
        attentions: one tensor per decoder layer, ``(1, heads, L, L)`` or ``(heads, L, L)`` attention weights
            (rows: queries, columns: keys), as ``output_attentions=True`` returns them.
        query_positions: the positions whose attention rows count (the ones producing the answer).
        visual_positions: (N_v,) positions of the visual tokens, in token order.
        inside_fraction: (N_v,) share of each visual token's footprint inside the ROI, in [0, 1].
        slice_positions: (N_s,) positions of the slice tokens.
        slice_in_roi: (N_s,) bool, each slice token's slab holds ROI voxels.

    Returns:
        One :class:`LayerShares` per layer.

    Raises:
        ValueError: no query position, positions outside the sequence, or token and footprint counts that differ.
    """
    import torch

    queries = torch.as_tensor(list(query_positions), dtype=torch.long)
    visual = torch.as_tensor(list(visual_positions), dtype=torch.long)
    slices = torch.as_tensor(list(slice_positions), dtype=torch.long)
    inside = torch.as_tensor(np.asarray(inside_fraction, dtype=np.float64))
    if len(queries) == 0:
        raise ValueError("no answer query positions: the row has no answer tokens to measure")
    if len(visual) != len(inside):
        raise ValueError(f"{len(visual)} visual token positions but {len(inside)} footprint fractions")
    roi_slices = torch.zeros(len(slices), dtype=torch.bool)
    if slice_in_roi is not None:
        roi_slices = torch.as_tensor(np.asarray(slice_in_roi, dtype=bool))
        if len(roi_slices) != len(slices):
            raise ValueError(f"{len(slices)} slice token positions but {len(roi_slices)} slice ROI flags")
    shares = []
    for index, layer in enumerate(attentions):
        if layer is None:
            raise ValueError(f"decoder layer {index} returned no attention weights")
        weights = layer[0] if layer.dim() == 4 else layer  # (heads, L, L)
        length = weights.shape[-1]
        for name, positions in (("query", queries), ("visual", visual), ("slice", slices)):
            if len(positions) and (int(positions.max()) >= length or int(positions.min()) < 0):
                raise ValueError(f"{name} positions reach {int(positions.max())}, the sequence has {length} tokens")
        row = weights[:, queries, :].double().mean(dim=(0, 1)).cpu()  # (L,): mean over heads and answer queries
        on_visual = row[visual]  # (N_v,)
        mass = float(on_visual.sum())
        inside_mass = float((on_visual * inside).sum())
        on_slices = row[slices]  # (N_s,)
        slice_mass = float(on_slices.sum())
        shares.append(
            LayerShares(
                visual_attention=mass,
                inside=inside_mass,
                outside=mass - inside_mass,
                share_inside=inside_mass / mass if mass > 0 else None,
                slice_attention=slice_mass,
                slice_share_roi=float(on_slices[roi_slices].sum()) / slice_mass if slice_mass > 0 else None,
            )
        )
    return shares


# ---------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------


def no_prompt_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """The row as the no-prompt variant renders it: no contour (``mask_path`` None for the pixels) and the no-prompt
    wording (system prompt without the outline, boundary prefixes of the question and open answer removed; anatomy
    terms as they are). Works on either record layout."""
    from ..data.rewrite import RewriteConfig, rewrite_answer, rewrite_question, system_prompt

    config = RewriteConfig(prompt=False, normalize_anatomy=False)
    answer_type = "closed" if record.get("answer_type") == "closed" else "open"
    rewrite = {
        "system": lambda _text: system_prompt(prompt=False),
        "user": lambda text: rewrite_question(text, config),
        "assistant": lambda text: rewrite_answer(text, answer_type, config),
    }
    messages = []
    for message in record["messages"]:
        change = rewrite.get(message["role"])
        content = message["content"]
        if change is not None:
            if isinstance(content, str):
                content = change(content)
            else:
                content = [
                    {**part, "text": change(part["text"])} if part.get("type") == "text" else part for part in content
                ]
        messages.append({**message, "content": content})
    return {**record, "messages": messages, "mask_path": None}


def _resolve(value: Any, root: Path | None) -> Any:
    if isinstance(value, (str, os.PathLike)) and root is not None and not Path(value).is_absolute():
        return root / value
    return value


def roi_on_model_grid(record: Mapping[str, Any], volume_size: Sequence[int], root: str | os.PathLike | None = None):
    """The row's ROI mask, resized to the model grid as the image processor resizes it (nearest neighbour on the
    volume's grid): ``(D, H, W)`` bool, or None when the row has no ``mask_path``.

    Raises:
        ValueError: the volume or mask cannot be read or do not match (the message names the files).
    """
    from ..processing.ct_io import load_mask, load_volume
    from ..processing.ct_transforms import resize_mask

    if record.get("mask_path") is None:
        return None
    root = None if root is None else Path(root)
    volume_path, mask_path = _resolve(record["volume_path"], root), _resolve(record["mask_path"], root)
    try:
        volume = load_volume(volume_path)
        mask = load_mask(mask_path, like=volume)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the ROI of volume {volume_path} / mask {mask_path}: {err}") from err
    return np.asarray(resize_mask(mask, tuple(volume_size)), dtype=bool)


def _row_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """A pairing key per row: ``volume_id|roi|question_type|n`` (n-th such row), stable across two builds."""
    seen: Counter = Counter()
    keys = []
    for index, record in enumerate(records):
        base = "|".join(str(record.get(k) or "") for k in ("volume_id", "roi", "question_type"))
        if base == "||":
            base = f"row{index:06d}"
        keys.append(f"{base}|{seen[base]}")
        seen[base] += 1
    return keys


def load_rows(dataset: str, split: str, max_samples: int | None) -> tuple[list[dict[str, Any]], Path]:
    """The rows of a built dataset's split (paths as stored) and the folder they are relative to.

    Raises:
        ValueError: the folder or the split does not exist, or the split is empty.
    """
    import datasets

    folder = Path(dataset).expanduser()
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(dataset, repo_type="dataset"))
        except Exception as err:  # offline, unknown id: one line naming the input
            raise ValueError(f"dataset {dataset!r} is not a folder here and could not be fetched: {err}") from err
    loaded = datasets.load_dataset(str(folder))
    if split not in loaded:
        raise ValueError(f"dataset {dataset} has no split {split!r}; it has {sorted(loaded)}")
    rows = loaded[split]
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    if len(rows) == 0:
        raise ValueError(f"split {split!r} of {dataset} is empty: there is nothing to measure")
    return [dict(row) for row in rows], folder


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


def load_model(model_name_or_path: str, adapter: str | None, device: str):
    """The model with eager attention (the only kind that returns attention weights), its adapter merged, in eval
    mode, and its processor."""
    from ..modeling.modeling_med3d_qwen import Med3DQwenForConditionalGeneration
    from ..processing.processing_med3d_qwen import Med3DQwenProcessor

    model = Med3DQwenForConditionalGeneration.from_pretrained(model_name_or_path, attn_implementation="eager")
    if adapter:
        import peft

        model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    processor = Med3DQwenProcessor.from_pretrained(model_name_or_path)
    return model.to(device).eval(), processor


def _eager(model) -> None:
    """Switch the model to eager attention when it runs another kind (SDPA and flash return no weights)."""
    if getattr(model.config, "_attn_implementation", None) != "eager":
        import logging

        logging.getLogger(__name__).info("switching the model to eager attention to read attention weights")
        model.set_attn_implementation("eager")


@dataclass
class _RowInput:
    input_ids: Any  # (L,) the whole conversation
    pixel_values: Any  # (1, C, D, H, W)
    queries: list[int]


def _row_input(model, collator, record: Mapping[str, Any], answer: str, max_new_tokens: int) -> _RowInput:
    """The row's tokens and pixels, and the query positions producing its answer (reference or generated)."""
    import torch

    from ..training.collator import IGNORE_INDEX

    batch = collator([record])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    targets = (labels != IGNORE_INDEX).nonzero()[:, 0]  # answer tokens and their <|im_end|> (unshifted labels)
    if answer == "reference":
        length = int(targets[-1]) + 1
        return _RowInput(ids[:length], batch["pixel_values"], [int(p) - 1 for p in targets])
    prompt = ids[: int(targets[0])]
    device = next(model.parameters()).device
    tokenizer = collator.processor.tokenizer
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.inference_mode():
        out = model.generate(
            input_ids=prompt[None].to(device),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
            pixel_values=batch["pixel_values"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos,
        )[0].cpu()
    new = out[len(prompt) :]
    ends = (new == eos).nonzero()
    if len(ends):
        new = new[: int(ends[0]) + 1]
    if len(new) == 0:
        raise ValueError("the model generated no token")
    full = torch.cat([prompt, new])
    return _RowInput(full, batch["pixel_values"], list(range(len(prompt) - 1, len(full) - 1)))


def _attentions(model, row: _RowInput, where: str) -> tuple:
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(
            input_ids=row.input_ids[None].to(device),
            attention_mask=torch.ones(1, len(row.input_ids), dtype=torch.long, device=device),
            pixel_values=row.pixel_values.to(device),
            output_attentions=True,
            use_cache=False,
        )
    layers = model.config.text_config.num_hidden_layers
    found = out.attentions
    if not found or len(found) != layers or any(a is None for a in found):
        count = "none" if not found else f"{sum(a is not None for a in found)} of {layers} layers"
        raise RuntimeError(
            f"{where}: the model returned no attention weights ({count}); the diagnostic needs eager attention "
            f"(its attention is {getattr(model.config, '_attn_implementation', None)!r})"
        )
    return found


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def _mean(values: list[float | None]) -> float | None:
    """Mean of the values that are not None (None if there are none)."""
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _std(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.pstdev(values) if len(values) > 1 else (0.0 if values else None)


def _summarise(rows: list[dict[str, Any]], num_layers: int) -> list[dict[str, Any]]:
    """Per layer: the mean over rows of each measure (and the std of ``share_inside``)."""
    table = []
    for layer in range(num_layers):
        shares = [r["layers"][layer] for r in rows]
        entry = {"layer": layer}
        for key in ("visual_attention", "inside", "outside", "share_inside", "slice_attention", "slice_share_roi"):
            entry[key] = _mean([s[key] for s in shares])
        entry["share_inside_std"] = _std([s["share_inside"] for s in shares])
        entry["roi_token_fraction"] = _mean([r["roi_token_fraction"] for r in rows])
        entry["enrichment"] = _mean(
            [
                s["share_inside"] / r["roi_token_fraction"]
                for s, r in zip(shares, rows, strict=True)
                if s["share_inside"] is not None and r["roi_token_fraction"] > 0
            ]
        )
        entry["roi_slice_fraction"] = _mean([r["roi_slice_fraction"] for r in rows])
        table.append(entry)
    return table


def _paired(measured: dict[str, list[dict[str, Any]]], num_layers: int) -> dict[str, Any] | None:
    """Mean ``prompt − none`` of ``share_inside`` per layer over the rows measured in both variants."""
    if not {"prompt", "none"} <= set(measured):
        return None
    none = {r["key"]: r for r in measured["none"]}
    pairs = [(r, none[r["key"]]) for r in measured["prompt"] if r["key"] in none]
    if not pairs:
        return {"rows": 0, "share_inside_difference": [None] * num_layers}
    return {
        "rows": len(pairs),
        "share_inside_difference": [
            _mean([_difference(p["layers"][i]["share_inside"], n["layers"][i]["share_inside"]) for p, n in pairs])
            for i in range(num_layers)
        ],
    }


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def run_grounding(args: GroundingArguments, model=None, processor=None) -> dict[str, Any]:
    """Measure every variant over the split and write ``grounding.json``, ``grounding.png`` and one PNG per layer
    (``layers/``); returns the results.

    Args:
        args: the options.
        model, processor: already loaded ones (tests, notebooks); default: loaded from ``args`` (eager attention,
            adapter merged). A given model is switched to eager attention.

    Raises:
        ValueError: no row of a variant has a usable ROI, a dataset or split is missing or empty, or a row's files
            cannot be read (named).
        RuntimeError: the model returns no attention weights.
    """
    import torch
    from tqdm.auto import tqdm

    from ..evaluation.generation import sample_id
    from ..evaluation.runner import library_versions
    from ..io import atomic_output
    from ..training.collator import Med3DQwenCollator, SampleError
    from .footprints import token_footprints

    if (model is None) != (processor is None):
        raise ValueError("give both model and processor, or neither (then they load from args.model)")
    # The rows first: a missing dataset or split fails before the (slower) model load.
    rows, root = load_rows(args.dataset, args.split, args.max_samples)
    compare = load_rows(args.compare_dataset, args.split, args.max_samples) if args.compare_dataset else None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model is None:
        try:
            model, processor = load_model(args.model, args.adapter, device)
        except OSError as err:
            raise ValueError(f"cannot load model {args.model!r} (adapter {args.adapter!r}): {err}") from err
    _eager(model)
    model.eval()
    config = model.config
    footprints = token_footprints(model)
    volume_size = tuple(config.vision_config.volume_size)
    num_layers = config.text_config.num_hidden_layers

    sources = {}
    if "prompt" in args.variants:
        sources["prompt"] = (args.dataset, rows, root)
    if "none" in args.variants:
        sources["none"] = (args.compare_dataset, *compare) if compare else (args.dataset, rows, root)

    measured: dict[str, list[dict[str, Any]]] = {}
    roi_cache: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray] | None] = {}
    skipped: dict[str, Counter] = {}
    total = sum(len(r) for _, r, _ in sources.values())
    with tqdm(total=total, desc="grounding", disable=not args.progress) as bar:
        for variant, (dataset, records, folder) in sources.items():
            collator = Med3DQwenCollator(processor, closed_label_names=(), dataset_root=folder)
            keys = _row_keys(records)
            measured[variant], skipped[variant] = [], Counter()
            for index, (record, key) in enumerate(zip(records, keys, strict=True)):
                bar.update(1)
                where = f"{dataset} split {args.split!r} row {index} ({sample_id(record, index)})"
                if record.get("mask_path") is None:
                    skipped[variant]["no mask_path (whole-volume question)"] += 1
                    continue
                # Many questions share a (volume, mask): keep its token fractions, not the full-size ROI.
                roi_key = (str(folder), str(record["volume_path"]), str(record["mask_path"]))
                if roi_key not in roi_cache:
                    try:
                        roi = roi_on_model_grid(record, volume_size, folder)
                    except ValueError as err:
                        raise ValueError(f"{where}: {err}") from err
                    roi_cache[roi_key] = (
                        (footprints.inside_fractions(roi), footprints.slice_in_roi(roi)) if roi.any() else None
                    )
                if roi_cache[roi_key] is None:
                    skipped[variant]["ROI empty on the model grid"] += 1
                    continue
                inside, in_roi = roi_cache[roi_key]
                # 'none': no contour; re-rendered rows also get the no-prompt wording, compare rows keep theirs.
                shown = record
                if variant == "none":
                    shown = {**record, "mask_path": None} if args.compare_dataset else no_prompt_record(record)
                try:
                    row = _row_input(model, collator, shown, args.answer, args.max_new_tokens)
                except (SampleError, ValueError) as err:
                    raise ValueError(f"{where}: {err}") from err
                attentions = _attentions(model, row, where)
                ids = row.input_ids
                shares = attention_shares(
                    attentions,
                    row.queries,
                    (ids == config.image_token_id).nonzero()[:, 0].tolist(),
                    inside,
                    (ids == config.slice_token_id).nonzero()[:, 0].tolist(),
                    in_roi,
                )
                measured[variant].append(
                    {
                        "id": sample_id(record, index),
                        "key": key,
                        "variant": variant,
                        "volume_id": record.get("volume_id"),
                        "roi": record.get("roi"),
                        "question_type": record.get("question_type"),
                        "answer_tokens": len(row.queries),
                        "roi_token_fraction": float(inside.mean()),
                        "roi_slice_fraction": float(in_roi.mean()) if len(in_roi) else None,
                        "layers": [asdict(s) for s in shares],
                    }
                )
            if not measured[variant]:
                reasons = ", ".join(f"{n} {r}" for r, n in skipped[variant].items())
                raise ValueError(
                    f"no row of {dataset} split {args.split!r} can be measured for variant {variant!r} "
                    f"({len(records)} rows: {reasons}); the diagnostic needs rows with a non-empty ROI mask"
                )

    results = {
        "config": asdict(args),
        "versions": library_versions(),
        "footprint": footprints.describe(),
        "num_layers": num_layers,
        "variants": {
            variant: {
                "dataset": sources[variant][0],
                "rows_measured": len(rows_),
                "rows_skipped": dict(skipped[variant]),
                "answer_tokens_mean": _mean([r["answer_tokens"] for r in rows_]),
                "layers": _summarise(rows_, num_layers),
            }
            for variant, rows_ in measured.items()
        },
        "paired": _paired(measured, num_layers),
        "rows": [row for rows_ in measured.values() for row in rows_],
    }
    output_dir = Path(args.output_dir)
    with atomic_output(output_dir / "grounding.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    save_grounding_plot(results, output_dir / "grounding.png")
    save_layer_plots(results, output_dir / "layers")
    return results


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("the plot needs matplotlib: pip install matplotlib") from err
    return plt


def _draw_layer(ax, results: Mapping[str, Any], layer: int) -> None:
    """One layer's bars: per variant ``share_inside`` (± std over rows) and ``slice_share_roi``, with the
    uniform-attention baselines dashed."""
    variants = list(results["variants"])
    colours = {"prompt": "tab:red", "none": "tab:gray"}
    width = 0.8 / max(len(variants), 1)
    for i, variant in enumerate(variants):
        entry = results["variants"][variant]["layers"][layer]
        values = [entry["share_inside"], entry["slice_share_roi"]]
        ax.bar(
            [g + (i - (len(variants) - 1) / 2) * width for g in (0, 1)],
            [np.nan if v is None else v for v in values],
            width,
            yerr=[entry["share_inside_std"] or 0.0, 0.0],
            color=colours.get(variant),
            label=variant,
            capsize=2,
        )
        for g, base in ((0, entry["roi_token_fraction"]), (1, entry["roi_slice_fraction"])):
            if base is not None:
                ax.hlines(base, g - 0.4, g + 0.4, colors="black", linestyles="dashed", linewidth=1, zorder=3)
    ax.set_title(f"layer {layer}", fontsize=9)
    ax.set_xticks([0, 1], ["visual\nin ROI", "slice\non ROI"], fontsize=8)
    ax.set_ylim(0, 1)
    ax.tick_params(axis="y", labelsize=7)


def _save_figure(figure, path: Path) -> Path:
    from ..io import atomic_output

    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return path


_TITLE = "Answer attention on image tokens inside the ROI\n(dashed: uniform attention)"


def save_grounding_plot(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """One panel per decoder layer: each variant's mean ``share_inside`` (± std over rows) of the visual tokens and
    ``slice_share_roi`` of the slice tokens, with the uniform-attention baselines as dashed lines. Written atomically.

    Raises:
        ImportError: matplotlib is not installed.
    """
    plt = _plt()
    num_layers = results["num_layers"]
    columns = min(num_layers, 6)
    rows = math.ceil(num_layers / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.6 * rows + 0.6), squeeze=False)
    for layer in range(rows * columns):
        ax = axes[layer // columns][layer % columns]
        if layer >= num_layers:
            ax.axis("off")
            continue
        _draw_layer(ax, results, layer)
    axes[0][0].legend(fontsize=7, loc="upper left")
    figure.suptitle(_TITLE, fontsize=10)
    figure.tight_layout()
    try:
        return _save_figure(figure, Path(path))
    finally:
        plt.close(figure)


def save_layer_plots(results: Mapping[str, Any], folder: str | os.PathLike) -> list[Path]:
    """The same bars as :func:`save_grounding_plot`, one PNG per decoder layer: ``folder/layer_<k>.png`` (k
    zero-padded to the layer count's width), each written atomically.

    Raises:
        ImportError: matplotlib is not installed.
    """
    plt = _plt()
    num_layers = results["num_layers"]
    digits = len(str(max(num_layers - 1, 0)))
    paths = []
    for layer in range(num_layers):
        figure, ax = plt.subplots(figsize=(3.4, 3.2))
        _draw_layer(ax, results, layer)
        ax.legend(fontsize=7, loc="upper left")
        figure.suptitle(_TITLE, fontsize=8)
        figure.tight_layout()
        try:
            paths.append(_save_figure(figure, Path(folder) / f"layer_{layer:0{digits}d}.png"))
        finally:
            plt.close(figure)
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the command line, run, print the per-layer table; returns the results."""
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(GroundingArguments).parse_args_into_dataclasses(args=argv)
    results = run_grounding(args)
    for variant, summary in results["variants"].items():
        skipped = sum(summary["rows_skipped"].values())
        print(f"{variant}: {summary['rows_measured']} rows measured, {skipped} skipped {summary['rows_skipped']}")
        for entry in summary["layers"]:
            print(
                f"  layer {entry['layer']:>2}: share inside {_fmt(entry['share_inside'])} "
                f"(uniform {_fmt(entry['roi_token_fraction'])}), visual attention {_fmt(entry['visual_attention'])}, "
                f"slice on ROI {_fmt(entry['slice_share_roi'])}"
            )
    print(f"wrote {Path(args.output_dir) / 'grounding.json'}, grounding.png and layers/layer_<k>.png")
    return results


def _fmt(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:.3f}"


def cli(argv: Sequence[str] | None = None) -> None:
    """The command line: :func:`main`, with bad input (a missing dataset or split, rows without ROI, unreadable files,
    a model without attention weights) reported as one ``error: ...`` line and exit status 1, not a traceback."""
    try:
        main(argv)
    except (ValueError, RuntimeError, OSError) as err:
        raise SystemExit("error: " + " ".join(str(err).split())) from None


if __name__ == "__main__":
    cli()
