"""RadGenome-style raw questions about a phantom and their answer text."""

from __future__ import annotations

import numpy as np

from .config import Finding, Phantom
from .structures import _EFFUSION_HOSTS, _LOBES, _PARENT, _SOLID_HOSTS, ANATOMY_NAMES, ANATOMY_PATHS


PRESENCE_TEMPLATES = (
    "Is there a {finding} in the {region}?",
    "Can a {finding} be identified in the {region}?",
    "Is a {finding} present in the {region}?",
    "Does the {region} contain a {finding}?",
)
ABNORMALITY_TEMPLATES = (
    "What abnormalities are seen in the {region}?",
    "What are the abnormalities in the {region}?",
    "What abnormal findings are present in the {region}?",
)
LOCATION_TEMPLATES = (
    "Where is the {finding} located?",
    "Where is the {finding} located in the image?",
    "In which region is the {finding} found?",
)
SIZE_TEMPLATES = (
    "What is the approximate size of the {finding} in the {region}?",
    "How large is the {finding} in the {region}?",
)
REGION_REPORT_TEMPLATES = (
    "Describe the {region}.",
    "Please describe the findings in the {region}.",
    "What does the {region} look like on this scan?",
)
_FINDING_NOUNS = {"nodule": "nodule", "mass": "mass", "effusion": "pleural effusion"}
# Structures asked about in presence questions, by finding kind (effusions are asked about at lung level).
_PRESENCE_ROIS = {
    "nodule": (*_SOLID_HOSTS, *_EFFUSION_HOSTS),
    "mass": (*_SOLID_HOSTS, *_EFFUSION_HOSTS),
    "effusion": _EFFUSION_HOSTS,
}
_REPORT_ROIS = (*_LOBES, *_EFFUSION_HOSTS, "liver", "heart")


def generate_questions(phantom: Phantom, seed: int | None = None) -> list[dict]:
    """RadGenome-style raw questions about a phantom.

    Per volume: presence (closed, "Yes."/"No."; as many absent findings asked about as present ones, at least
    one), abnormality and region report (open; every structure holding a finding plus as many normal ones),
    location (open, whole volume, one per finding) and size (open, one per finding).

    Args:
        phantom: the phantom asked about.
        seed: seed of the template and structure choices (default: the phantom's seed).

    Returns:
        One dict per question with ``question``, ``answer``, ``question_type`` (presence | abnormality | location |
        size | region_report), ``answer_type`` (closed | open), ``roi`` (mask key the question is about, None for
        whole-volume questions) and ``anatomy`` (RadGenome anatomy path of ``roi``, ``"whole scan"`` if None).
    """
    rng = np.random.default_rng([phantom.seed if seed is None else int(seed), 0x51])
    kinds = phantom.config.lesion_kinds
    questions: list[dict] = []

    def ask(question_type: str, templates: tuple[str, ...], answer: str, roi: str | None, **slots: str):
        text = templates[int(rng.integers(len(templates)))].format(**slots)
        questions.append(
            {
                "question": text,
                "answer": answer,
                "question_type": question_type,
                "answer_type": "closed" if question_type == "presence" else "open",
                "roi": roi,
                "anatomy": ANATOMY_PATHS[roi] if roi is not None else "whole scan",
            }
        )

    # Presence: one "Yes." per finding (asked at its host or, for a lobe, at the whole lung), then as many "No.".
    def present(roi: str, kind: str) -> bool:
        return any(f.kind == kind for f in phantom.findings_in(roi))

    positives: list[tuple[str, str]] = []
    for f in phantom.findings:
        roi = f.structure
        if f.structure in _PARENT and rng.random() < 0.5:
            roi = _PARENT[f.structure]
        if (roi, f.kind) not in positives:
            positives.append((roi, f.kind))
    negatives = [(roi, kind) for kind in kinds for roi in _PRESENCE_ROIS[kind] if not present(roi, kind)]
    n_negative = min(len(negatives), max(len(positives), 1))
    negatives = [negatives[i] for i in sorted(rng.choice(len(negatives), n_negative, replace=False))]
    for roi, kind in sorted(positives + negatives, key=lambda p: (_structure_order(p[0]), p[1])):
        answer = "Yes." if present(roi, kind) else "No."
        ask("presence", PRESENCE_TEMPLATES, answer, roi, finding=_FINDING_NOUNS[kind], region=ANATOMY_NAMES[roi])

    # Abnormality and region report: structures with findings plus as many normal ones.
    for question_type, candidates in (
        ("abnormality", (*_SOLID_HOSTS, *_EFFUSION_HOSTS)),
        ("region_report", _REPORT_ROIS),
    ):
        hosts = sorted({f.structure for f in phantom.findings}, key=_structure_order)
        normal = [roi for roi in candidates if not phantom.findings_in(roi)]
        n_normal = min(len(normal), max(len(hosts), 1))
        picked = [normal[i] for i in sorted(rng.choice(len(normal), n_normal, replace=False))]
        for roi in sorted(hosts + picked, key=_structure_order):
            if question_type == "abnormality":
                ask(
                    question_type,
                    ABNORMALITY_TEMPLATES,
                    _abnormality_answer(phantom, roi),
                    roi,
                    region=ANATOMY_NAMES[roi],
                )
            else:
                ask(
                    question_type,
                    REGION_REPORT_TEMPLATES,
                    _region_report(phantom, roi),
                    roi,
                    region=ANATOMY_NAMES[roi],
                )

    # Location (whole volume: a contour around the answer would give it away), one per finding; a finding is
    # named by its kind, plus its size or side when the kind occurs twice. Findings that still share a name
    # (two 5 mm nodules) are asked about together.
    locations: dict[str, list[Finding]] = {}
    for f in phantom.findings:
        described = _FINDING_NOUNS[f.kind]
        if sum(g.kind == f.kind for g in phantom.findings) > 1:
            qualifier = _side(f.structure) if f.kind == "effusion" else f"{_fmt_mm(f.size_mm)} mm"
            described = f"{qualifier} {described}"
        locations.setdefault(described, []).append(f)
    for described, group in locations.items():
        answer = _location_answer(group[0])
        if len(group) > 1:
            answer = "In the " + " and the ".join(ANATOMY_NAMES[f.structure] for f in group) + "."
        ask("location", LOCATION_TEMPLATES, answer, None, finding=described)
    for f in phantom.findings:
        ask(
            "size",
            SIZE_TEMPLATES,
            f"{_fmt_mm(f.size_mm)} mm",
            f.structure,
            finding=_FINDING_NOUNS[f.kind],
            region=ANATOMY_NAMES[f.structure],
        )
    return questions


# ---------------------------------------------------------------------------------------------------------------
# Answer text
# ---------------------------------------------------------------------------------------------------------------


def _structure_order(name: str) -> int:
    return list(ANATOMY_PATHS).index(name)


def _fmt_mm(value: float) -> str:
    return f"{value:.0f}"


def _side(structure: str) -> str:
    return "right" if structure.endswith("right") else "left"


def _effusion_grade(thickness_mm: float) -> str:
    return "small" if thickness_mm < 20 else "moderate" if thickness_mm < 40 else "large"


def _finding_phrase(phantom: Phantom, f: Finding) -> str:
    """'a 12 mm nodule', 'an 8 mm nodule', 'a 35 mm hypodense mass', 'a small right pleural effusion'."""
    if f.kind == "effusion":
        return f"a {_effusion_grade(f.size_mm)} {_side(f.structure)} pleural effusion"
    density = ""
    if f.structure == "liver":
        density = "hypodense " if f.hu < phantom.tissue_hu["liver"] else "hyperdense "
    size = _fmt_mm(f.size_mm)
    article = "an" if size.startswith("8") or size in ("11", "18") else "a"  # "an eight", "an eleven"
    return f"{article} {size} mm {density}{f.kind}"


def _join(phrases: list[str]) -> str:
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return text[0].upper() + text[1:] + "."


def _abnormality_answer(phantom: Phantom, roi: str) -> str:
    findings = phantom.findings_in(roi)
    return _join([_finding_phrase(phantom, f) for f in findings]) if findings else "No abnormality."


def _location_answer(f: Finding) -> str:
    if f.kind == "effusion":
        return f"At the base of the {ANATOMY_NAMES[f.structure]}, posteriorly."
    return f"In the {ANATOMY_NAMES[f.structure]}."


def _region_report(phantom: Phantom, roi: str) -> str:
    """A report-like sentence about ``roi``."""
    findings = phantom.findings_in(roi)
    name = ANATOMY_NAMES[roi]
    sentences = []
    for f in findings:
        if f.kind == "effusion":
            sentences.append(
                f"There is {_finding_phrase(phantom, f)} layering posteriorly, {_fmt_mm(f.size_mm)} mm thick."
            )
        else:
            sentences.append(f"There is {_finding_phrase(phantom, f)} in the {ANATOMY_NAMES[f.structure]}.")
    if sentences:
        return " ".join(sentences)
    if roi == "liver":
        return "The liver is normal in size and attenuation, with no focal lesion."
    if roi == "heart":
        return "The heart is normal in size. There is no pericardial effusion."
    if roi in _EFFUSION_HOSTS:
        return f"The {name} is clear, with no nodule, mass or pleural effusion."
    return f"The {name} is clear, with no nodule or mass."
