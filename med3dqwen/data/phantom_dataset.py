"""Build the phantom VQA dataset: the embedded default data behind ``datasets_scripts/build_phantom.py``.

Layout of the output folder (loads with ``datasets.load_dataset(output_dir)``):

```
README.md                           dataset card with ``configs:`` (train / validation / test)
data/{train,validation,test}.jsonl  one question per line: messages + structured fields (paths relative here)
volumes/<volume_id>/volume.nii.gz   int16 HU, plus masks/<structure>.nii.gz, lesions.nii.gz, findings.json
prompts/<volume_id>/<roi>_montage.png (and <roi>_NNNN.png with --write_png stack), once per (volume, ROI)
```
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from med3dqwen.data.cards import render_dataset_card
from med3dqwen.data.phantom import PhantomConfig, generate_phantom, generate_questions
from med3dqwen.data.radlex import RadLexNormalizer
from med3dqwen.data.rewrite import RewriteConfig, build_record, rewrite_qa, write_jsonl
from med3dqwen.data.splits import DEFAULT_RATIOS, SPLIT_NAMES, assign_split
from med3dqwen.processing.ct_transforms import prompt_png_stack


__all__ = ["PhantomBuildConfig", "BuildSummary", "build_phantom_dataset", "volume_seed"]

logger = logging.getLogger(__name__)

PROMPTS = ("red", "blue", "none")
PNG_MODES = ("none", "montage", "stack")


@dataclass
class PhantomBuildConfig:
    """What to build.

    Args:
        output_dir: the dataset folder (created).
        num_volumes: number of phantoms, one patient each.
        seed: master seed; volume ``i`` uses :func:`volume_seed` ``(seed, i)`` and splits are hashed with it.
        prompt: contour colour ``red`` / ``blue`` (rewritten questions) or ``none`` (the no-prompt variant).
        write_png: ``none``, ``montage`` (one montage per volume and ROI) or ``stack`` (montage + every ROI slice).
        shape: phantom grid (D, H, W).
        thickness: contour thickness in px for the PNGs.
        split_ratios: train / validation / test fractions of patients.
    """

    output_dir: str
    num_volumes: int = 20
    seed: int = 0
    prompt: str = "red"
    write_png: str = "montage"
    shape: tuple[int, int, int] = (128, 256, 256)
    thickness: int = 3
    split_ratios: tuple[float, float, float] = DEFAULT_RATIOS
    phantom: PhantomConfig | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {PROMPTS}, got {self.prompt!r}")
        if self.write_png not in PNG_MODES:
            raise ValueError(f"write_png must be one of {PNG_MODES}, got {self.write_png!r}")
        if self.num_volumes < 1:
            raise ValueError(f"num_volumes must be >= 1, got {self.num_volumes}")
        self.shape = tuple(int(s) for s in self.shape)
        self.split_ratios = tuple(float(r) for r in self.split_ratios)
        if self.phantom is None:
            self.phantom = PhantomConfig(shape=self.shape)


@dataclass
class BuildSummary:
    """Counts of a finished build."""

    output_dir: Path
    questions: dict[str, int]
    volumes: dict[str, int]
    question_types: dict[str, int]
    unknown_anatomy_terms: dict[str, int]


def volume_seed(seed: int, index: int) -> int:
    """The phantom seed of volume ``index``: independent streams per (master seed, index)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0])


def build_phantom_dataset(config: PhantomBuildConfig) -> BuildSummary:
    """Generate phantoms, their masks, rewritten questions and prompt PNGs; write JSONL splits and the card.

    Args:
        config: see :class:`PhantomBuildConfig`.

    Returns:
        A :class:`BuildSummary`.
    """
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompted = config.prompt != "none"
    rewrite = RewriteConfig(color=config.prompt if prompted else "red", prompt=prompted)
    # Whole-volume questions have no ROI, so no contour: they keep the no-prompt wording even in a prompted build.
    unprompted = RewriteConfig(prompt=False)
    normalizer = RadLexNormalizer()
    records: dict[str, list[dict]] = {name: [] for name in SPLIT_NAMES}

    for index in range(config.num_volumes):
        volume_id = f"phantom_{index:05d}"
        patient_id = volume_id  # one volume per synthetic patient
        split = assign_split(patient_id, config.seed, config.split_ratios)
        phantom = generate_phantom(volume_seed(config.seed, index), config.phantom)
        volume_dir = Path("volumes") / volume_id
        phantom.save(out / volume_dir)

        pngs: dict[str, list[str]] = {}
        for question in (questions := generate_questions(phantom)):
            roi = question["roi"]
            if roi is None or roi in pngs:
                continue
            pngs[roi] = []
            if prompted and config.write_png != "none":
                written = prompt_png_stack(
                    phantom.volume,
                    phantom.masks[roi],
                    out / "prompts" / volume_id,
                    color=config.prompt,
                    thickness=config.thickness,
                    write_slices=config.write_png == "stack",
                    prefix=roi,
                )
                files = written.slices + ([written.montage] if written.montage else [])
                pngs[roi] = [os.path.relpath(p, out) for p in files]

        for question in questions:
            roi = question["roi"]
            qa = rewrite_qa(
                question["question"],
                question["answer"],
                answer_type=question["answer_type"],
                config=rewrite if roi is not None else unprompted,
                normalizer=normalizer,
            )
            records[split].append(
                build_record(
                    qa,
                    volume_path=(volume_dir / "volume.nii.gz").as_posix(),
                    mask_path=None if roi is None else (volume_dir / "masks" / f"{roi}.nii.gz").as_posix(),
                    mask_source=None if roi is None else "phantom",
                    roi=roi,
                    question_type=question["question_type"],
                    split=split,
                    patient_id=patient_id,
                    volume_id=volume_id,
                    prompt_pngs=pngs.get(roi, []) if roi is not None else [],
                    roi_empty=roi is not None and not phantom.masks[roi].any(),
                    extra={"anatomy": question["anatomy"]},
                )
            )
        logger.info("built %s (%s, %d questions)", volume_id, split, len(questions))

    for name, rows in records.items():
        if rows:
            write_jsonl(out / "data" / f"{name}.jsonl", rows)
    variant = (
        f'Boundary prompts in **{config.prompt}**: questions are rewritten ("Within the {config.prompt}-outlined '
        f'area of the CT volume, ...") and each ROI has a {config.thickness}-px contour montage under `prompts/`.'
        if prompted
        else "No prompt: questions keep their wording (RadLex-normalised) and no contour is drawn."
    )
    render_dataset_card(
        out,
        records,
        pretty_name="Med3DQwen synthetic chest-CT phantom VQA",
        summary=(
            f"{config.num_volumes} deterministic synthetic chest-CT phantoms (grid {config.shape}, seed "
            f"{config.seed}) with per-structure masks (TotalSegmentator names), lesions (nodules, masses, pleural "
            "effusions) and RadGenome-style questions (presence, abnormality, location, size, region report). "
            "It exercises the whole pipeline offline; it is not evidence about real CT."
        ),
        builder="datasets_scripts/build_phantom.py",
        prompt_description=variant,
        source="Synthetic, generated by `med3dqwen.data.phantom` from the seed above; no patient data.",
        license="apache-2.0",
        tags=["synthetic"],
    )
    counts = Counter(r["question_type"] for rows in records.values() for r in rows)
    return BuildSummary(
        output_dir=out,
        questions={name: len(rows) for name, rows in records.items()},
        volumes={name: len({r["volume_id"] for r in rows}) for name, rows in records.items()},
        question_types=dict(counts),
        unknown_anatomy_terms=dict(normalizer.unknown_terms),
    )
