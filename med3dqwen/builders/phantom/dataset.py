"""Build the phantom VQA dataset: the embedded default data behind ``datasets_scripts/build_phantom.py``.

Layout of the output folder (loads with ``datasets.load_dataset(output_dir)``):

```
README.md                           dataset card with ``configs:`` (train / validation / test) and features
data/{train,validation,test}.jsonl  one question per line: messages + structured fields (paths relative here)
skipped.jsonl                       empty: the generator never produces a bad row
volumes/<volume_id>/volume.nii.gz   int16 HU, plus masks/<structure>.nii.gz, lesions.nii.gz, findings.json
prompts/<volume_id>/<roi>_montage.png (and <roi>_NNNN.png with --write_png stack), once per (volume, ROI)
.work/                              resumable build state (see med3dqwen.builders.engine)
```

One work unit is one phantom (``phantom_<index:05d>``, one synthetic patient each), so the build is resumable,
parallel (``num_proc``) and shardable like every builder of :mod:`med3dqwen.builders.engine`. An ROI whose mask is
empty on a coarse grid keeps its questions, flagged ``roi_empty=True`` (synthetic data: nothing is wrong upstream).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from med3dqwen.anatomy.radlex import RadLexNormalizer
from med3dqwen.builders.engine import (
    PNG_MODES,
    PROMPTS,
    BuildArguments,
    BuildSummary,
    DatasetBuilder,
    Plan,
    UnitResult,
    WorkUnit,
    rewrite_configs,
    run_build,
    write_prompt_pngs,
)
from med3dqwen.builders.phantom import PhantomConfig, generate_phantom, generate_questions
from med3dqwen.data.rewrite import build_record, rewrite_qa
from med3dqwen.data.splits import DEFAULT_RATIOS, assign_split


__all__ = ["PhantomBuildConfig", "PhantomBuilder", "BuildSummary", "build_phantom_dataset", "volume_seed"]

logger = logging.getLogger(__name__)


@dataclass
class PhantomBuildConfig:
    """What to build: one field per setting, declared once; its ``help`` says what it does, and the build
    command (``--help``) takes it as an option of the same name.

    ``phantom`` (not a command-line option) replaces the generator's :class:`PhantomConfig`; by default it is
    the generator's defaults on the grid ``shape``. Volume ``i`` uses the seed :func:`volume_seed` ``(seed, i)``.
    """

    output_dir: str = field(metadata={"help": "Folder to write the dataset to (created)."})
    num_volumes: int = field(default=20, metadata={"help": "Number of phantoms (one synthetic patient each)."})
    seed: int = field(default=0, metadata={"help": "Master seed of phantoms, templates and the patient split."})
    prompt: str = field(
        default="red", metadata={"help": "Contour colour (red | blue) or 'none' for the no-prompt variant."}
    )
    write_png: str = field(
        default="montage", metadata={"help": "Prompt PNGs: none | montage (one per volume and ROI) | stack."}
    )
    shape: tuple[int, int, int] = field(default=(128, 256, 256), metadata={"help": "Phantom grid D H W."})
    thickness: int = field(default=3, metadata={"help": "Contour thickness in pixels for the PNGs."})
    split_ratios: tuple[float, float, float] = field(
        default=DEFAULT_RATIOS, metadata={"help": "Train / validation / test patient fractions."}
    )
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


def volume_seed(seed: int, index: int) -> int:
    """The phantom seed of volume ``index``: independent streams per (master seed, index)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0])


class PhantomBuilder(DatasetBuilder):
    """Synthetic chest-CT phantoms with per-structure masks and RadGenome-style questions."""

    name = "phantom"
    script = "datasets_scripts/build_phantom.py"
    owned_paths = ("prompts", "volumes")
    # Synthetic data, apache-2.0: the volumes, masks and PNGs go up with the card and the JSONL files.
    hub_allow_patterns = (*DatasetBuilder.hub_allow_patterns, "volumes/*", "prompts/*")

    def __init__(self, config: PhantomBuildConfig):
        self.cfg = config

    def config(self) -> dict[str, Any]:
        values = asdict(self.cfg)
        values.pop("output_dir")
        return values

    def unit_dirs(self, unit: WorkUnit) -> list[str]:
        return [f"prompts/{unit.unit_id}", f"volumes/{unit.unit_id}"]

    def extra_features(self) -> dict[str, Any]:
        import datasets

        return {"anatomy": datasets.Value("string")}

    def plan(self) -> Plan:
        units = []
        for index in range(self.cfg.num_volumes):
            volume_id = f"phantom_{index:05d}"  # one volume per synthetic patient
            split = assign_split(volume_id, self.cfg.seed, self.cfg.split_ratios)
            units.append(WorkUnit(unit_id=volume_id, patient_id=volume_id, split=split, payload=index))
        return Plan(units=units)

    def process(self, unit: WorkUnit, out_dir: Path) -> UnitResult:
        cfg = self.cfg
        roi_config, whole_config = rewrite_configs(cfg.prompt)
        normalizer = RadLexNormalizer()
        phantom = generate_phantom(volume_seed(cfg.seed, unit.payload), cfg.phantom)
        volume_dir = Path("volumes") / unit.unit_id
        phantom.save(out_dir / volume_dir)

        questions = generate_questions(phantom)
        pngs: dict[str, list[str]] = {}
        for question in questions:
            roi = question["roi"]
            if roi is not None and roi not in pngs:
                pngs[roi] = write_prompt_pngs(
                    phantom.volume,
                    phantom.masks[roi],
                    out_dir,
                    unit.unit_id,
                    roi,
                    prompt=cfg.prompt,
                    write_png=cfg.write_png,
                    thickness=cfg.thickness,
                )
        records = []
        for question in questions:
            roi = question["roi"]
            qa = rewrite_qa(
                question["question"],
                question["answer"],
                answer_type=question["answer_type"],
                config=roi_config if roi is not None else whole_config,
                normalizer=normalizer,
            )
            records.append(
                build_record(
                    qa,
                    volume_path=(volume_dir / "volume.nii.gz").as_posix(),
                    mask_path=None if roi is None else (volume_dir / "masks" / f"{roi}.nii.gz").as_posix(),
                    mask_source=None if roi is None else "phantom",
                    roi=roi,
                    question_type=question["question_type"],
                    split=unit.split,
                    patient_id=unit.patient_id,
                    volume_id=unit.unit_id,
                    prompt_pngs=pngs.get(roi, []) if roi is not None else [],
                    roi_empty=roi is not None and not phantom.masks[roi].any(),
                    extra={"anatomy": question["anatomy"]},
                )
            )
        return UnitResult(records=records, counters={"unknown_anatomy_terms": dict(normalizer.unknown_terms)})

    def card(self, summary: BuildSummary) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.prompt != "none":
            pngs = {
                "none": "No PNGs were written (`--write_png none`).",
                "montage": f"Each ROI has a {cfg.thickness}-px contour montage under `prompts/`.",
                "stack": f"Each ROI has a {cfg.thickness}-px contour montage and one PNG per ROI slice under "
                "`prompts/`.",
            }[cfg.write_png]
            variant = (
                f'Boundary prompts in **{cfg.prompt}**: questions are rewritten ("Within the {cfg.prompt}-outlined '
                f'area of the CT volume, ...") and the system prompt describes the outline. {pngs} Whole-volume '
                "questions (location) have no ROI, so no contour and the no-prompt wording."
            )
        else:
            variant = "No prompt: questions keep their wording (RadLex-normalised) and no contour is drawn."
        unknown = summary.counters.get("unknown_anatomy_terms", {})
        notes = [f"Anatomy terms without a RadLex entry (kept as they are): {unknown}."] if unknown else []
        return {
            "pretty_name": "Med3DQwen synthetic chest-CT phantom VQA",
            "summary": (
                f"{cfg.num_volumes} deterministic synthetic chest-CT phantoms (grid {cfg.shape}, seed {cfg.seed}) "
                "with per-structure masks (TotalSegmentator names), lesions (nodules, masses, pleural effusions) and "
                "RadGenome-style questions (presence, abnormality, location, size, region report). It exercises the "
                "whole pipeline offline; it is not evidence about real CT."
            ),
            "prompt_description": variant,
            "source": (
                "Synthetic, generated by `med3dqwen.builders.phantom.generator` from the seed above; no patient data."
            ),
            "license": "apache-2.0",
            "notes": notes,
            "files_description": (
                "Volumes and masks are NIfTI files under `volumes/<volume_id>/` (int16 HU volume, uint8 masks on the "
                "same grid, `findings.json` with the lesions); load one with "
                '`med3dqwen.processing.ct_io.load_volume(folder / sample["volume_path"])`.'
            ),
            "extra_fields": {"anatomy": "RadGenome-style anatomy path of the ROI (`whole scan` without one)"},
            "tags": ["synthetic"],
        }


def build_phantom_dataset(config: PhantomBuildConfig, args: BuildArguments | None = None) -> BuildSummary:
    """Generate phantoms, their masks, rewritten questions and prompt PNGs; write JSONL splits and the card.

    Args:
        config: see :class:`PhantomBuildConfig`.
        args: how to run (processes, shards, resume; default: one process, everything, with a merge).

    Returns:
        A :class:`~med3dqwen.builders.engine.BuildSummary`; ``unknown_anatomy_terms`` is in
        ``summary.counters["unknown_anatomy_terms"]``.
    """
    return run_build(PhantomBuilder(config), config.output_dir, args)
