"""Deterministic, group-level dataset splits (docs/design.md "Records and splits").

A sample's split depends only on its group id (patient for RadGenome / CT-RATE / the phantom, article for
PMC-VQA) and a seed, hashed with SHA-256: all samples of one patient land in one split, the assignment is stable
when the dataset grows, and it is identical across processes and machines (Python's ``hash`` is not).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


__all__ = ["DEFAULT_RATIOS", "SPLIT_NAMES", "assign_split"]

SPLIT_NAMES = ("train", "validation", "test")
DEFAULT_RATIOS = (0.7, 0.1, 0.2)  # the paper's 70/10/20 patient-level split


def _unit_interval(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(
    group_id: str, seed: int = 0, ratios: Sequence[float] = DEFAULT_RATIOS, names: Sequence[str] = SPLIT_NAMES
) -> str:
    """The split of a group (patient, article), from a hash of ``(seed, group_id)``.

    Args:
        group_id: the unit that must not cross splits, e.g. ``"train_362"`` or a PMCID.
        seed: split seed; another seed gives an independent assignment.
        ratios: expected fraction of groups per split; must be non-negative and sum to 1.
        names: split names, one per ratio.

    Returns:
        One of ``names``.

    Raises:
        ValueError: empty id, or ratios that do not match ``names`` or do not sum to 1.
    """
    if not group_id:
        raise ValueError("group_id must be a non-empty string")
    if len(ratios) != len(names) or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise ValueError(f"ratios {tuple(ratios)} must be non-negative, sum to 1 and match the splits {tuple(names)}")
    u = _unit_interval(str(group_id), seed)
    cumulative = 0.0
    for name, ratio in zip(names, ratios, strict=True):
        cumulative += ratio
        if u < cumulative:
            return name
    return names[-1]  # u is within rounding of 1.0
