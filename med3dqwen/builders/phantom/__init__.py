"""Synthetic chest-CT phantoms and the phantom VQA dataset (see ``docs/phantom.md``)."""

from .generator import (
    ABNORMALITY_TEMPLATES,
    ANATOMY_NAMES,
    ANATOMY_PATHS,
    DEFAULT_FOV_MM,
    LESION_KINDS,
    LOCATION_TEMPLATES,
    PRESENCE_TEMPLATES,
    REGION_REPORT_TEMPLATES,
    SIZE_TEMPLATES,
    Finding,
    Phantom,
    PhantomConfig,
    generate_phantom,
    generate_questions,
)


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
