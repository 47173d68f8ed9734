"""BERTScore of the ``m3d`` protocol: what M3D-LaMed's and Med3DVLM's evaluation scripts add to BLEU/ROUGE/METEOR.

Their ``eval_caption.py`` / ``eval_vqa.py`` call ``evaluate.load("bertscore").compute(predictions=[pred],
references=[[answer]], lang="en")`` once per sample on stripped texts and average the F1 over the samples.
``evaluate``'s module is a thin wrapper of ``bert_score.score``; with ``lang="en"`` and no ``model_type`` that is
``roberta-large``, hidden states of layer 17, no idf weighting, no baseline rescaling. Here the same call is made with
a **local** model folder (nothing can be downloaded): point ``--bertscore_model`` at a saved ``roberta-large`` to get
their numbers. The layer is bert_score's own choice for a folder named like a model it knows (``roberta-large``: 17),
else ``num_layers`` must be given. BERTScore of one sample does not depend on the others in its batch (no idf), so
scoring every sample in one call equals their per-sample calls.

Needs the ``bert_score`` package (``pip install bert-score``, the ``bertscore`` extra); the rest of the evaluation
does not.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


__all__ = ["bertscore_f1", "bertscore_layers"]


def _bert_score():
    try:
        import bert_score
    except ImportError as err:
        raise ImportError(
            "--bertscore_model needs the bert_score package: pip install bert-score (or .[bertscore])"
        ) from err
    return bert_score


def bertscore_layers(model_path: str | os.PathLike, num_layers: int | None = None) -> int:
    """The hidden layer BERTScore reads: ``num_layers``, else bert_score's table entry for the folder's name.

    Raises:
        ValueError: no ``num_layers`` and a folder name bert_score does not know.
    """
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"--bertscore_num_layers must be >= 1, got {num_layers}")
        return num_layers
    name = Path(model_path).name
    known = _bert_score().utils.model2layers
    if name not in known:
        raise ValueError(
            f"bert_score has no default layer for a model folder named {name!r}: give --bertscore_num_layers "
            "(roberta-large, M3D's model: 17)"
        )
    return known[name]


def bertscore_f1(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    model_path: str | os.PathLike,
    *,
    num_layers: int | None = None,
    batch_size: int = 64,
    device: str | None = None,
) -> list[float]:
    """Per-sample BERTScore F1 of stripped ``predictions`` against their stripped ``references`` (the best
    reference when there are several), with the model in the local folder ``model_path``; 0 for an empty prediction
    or reference (bert_score's own rule).

    Raises:
        FileNotFoundError: ``model_path`` is not a folder (no download is attempted).
        ValueError: lengths differ, an empty list, or no layer (see :func:`bertscore_layers`).
        ImportError: bert_score is not installed.
    """
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"BERTScore needs one reference per prediction, got {len(predictions)} and {len(references)}")
    if not Path(model_path).is_dir():
        raise FileNotFoundError(f"--bertscore_model {model_path} is not a local model folder (nothing is downloaded)")
    layers = bertscore_layers(model_path, num_layers)
    candidates = [p.strip() for p in predictions]
    refs = [[r.strip()] if isinstance(r, str) else [x.strip() for x in r] for r in references]
    # bert_score sets the F1 of an empty candidate or reference to 0, but with transformers 5 it fails to encode the
    # empty text first (no build_inputs_with_special_tokens): score those 0 here, the others in one call
    scored = [i for i, (c, r) in enumerate(zip(candidates, refs, strict=True)) if c and all(r)]
    f1 = [0.0] * len(candidates)
    if scored:
        _, _, values = _bert_score().score(
            [candidates[i] for i in scored], [refs[i] for i in scored], model_type=str(model_path),
            num_layers=layers, lang="en", batch_size=batch_size, device=device,
        )  # fmt: skip
        for i, value in zip(scored, values.tolist(), strict=True):
            f1[i] = float(value)
    return f1
