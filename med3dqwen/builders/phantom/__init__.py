"""Synthetic chest-CT phantoms and the phantom VQA dataset (see ``docs/phantom.md``)."""

from .config import DEFAULT_FOV_MM, LESION_KINDS, Finding, Phantom, PhantomConfig
from .generator import generate_phantom
from .questions import (
    ABNORMALITY_TEMPLATES,
    LOCATION_TEMPLATES,
    PRESENCE_TEMPLATES,
    REGION_REPORT_TEMPLATES,
    SIZE_TEMPLATES,
    generate_questions,
)
from .structures import ANATOMY_NAMES, ANATOMY_PATHS


__all__ = [
    "ABNORMALITY_TEMPLATES",
    "ANATOMY_NAMES",
    "ANATOMY_PATHS",
    "DEFAULT_FOV_MM",
    "Finding",
    "LESION_KINDS",
    "LOCATION_TEMPLATES",
    "PRESENCE_TEMPLATES",
    "Phantom",
    "PhantomConfig",
    "REGION_REPORT_TEMPLATES",
    "SIZE_TEMPLATES",
    "generate_phantom",
    "generate_questions",
]
