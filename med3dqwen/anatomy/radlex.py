"""RadLex normalisation of chest and upper-abdomen anatomy terms (paper §3.3).

The rewriting pipeline replaces colloquial or dataset-specific anatomy names with RadLex preferred names, so that
"windpipe", RadGenome's "trachea and bronchie" and TotalSegmentator's ``lung_upper_lobe_right`` reach the model as
"trachea", "trachea and bronchi" and "upper lobe of right lung".

Matching is case-insensitive and treats runs of whitespace, underscores and hyphens as one space, so
``"Kidney_Left"``, ``"kidney left"`` and ``"kidney-left"`` are the same term. The keys of :data:`RADLEX_TABLE` are
written as they appear in their source (free text, RadGenome mask names, TotalSegmentator label names); the values
are lower-case RadLex preferred names. Terms that are neither in the table nor preferred names pass through
unchanged and are counted, so a dataset builder can report what the table is missing.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping


__all__ = ["RADLEX_PREFERRED", "RADLEX_TABLE", "RadLexNormalizer"]

_ORDINALS = (
    "first",
    "second",
    "third",
    "fourth",
    "fifth",
    "sixth",
    "seventh",
    "eighth",
    "ninth",
    "tenth",
    "eleventh",
    "twelfth",
)

# Hand-curated entries: colloquial English, British spellings, RadGenome-ChestCT mask names and TotalSegmentator
# labels whose name differs from the preferred one by more than case and underscores.
_CURATED = {
    # Airways and lungs
    "windpipe": "trachea",
    "voice box": "larynx",
    "bronchie": "bronchi",  # RadGenome's spelling, e.g. the region mask "trachea and bronchie"
    "bronchia": "bronchi",
    "trachea and bronchie": "trachea and bronchi",
    "mainstem bronchus": "main bronchus",
    "left mainstem bronchus": "left main bronchus",
    "right mainstem bronchus": "right main bronchus",
    "right lung upper lobe": "upper lobe of right lung",
    "right lung middle lobe": "middle lobe of right lung",
    "right lung lower lobe": "lower lobe of right lung",
    "left lung upper lobe": "upper lobe of left lung",
    "left lung lower lobe": "lower lobe of left lung",
    "right upper lobe": "upper lobe of right lung",
    "right middle lobe": "middle lobe of right lung",
    "right lower lobe": "lower lobe of right lung",
    "left upper lobe": "upper lobe of left lung",
    "left lower lobe": "lower lobe of left lung",
    "lung_upper_lobe_right": "upper lobe of right lung",
    "lung_middle_lobe_right": "middle lobe of right lung",
    "lung_lower_lobe_right": "lower lobe of right lung",
    "lung_upper_lobe_left": "upper lobe of left lung",
    "lung_lower_lobe_left": "lower lobe of left lung",
    "lingular lobe": "lingula",
    "pleural space": "pleural cavity",
    "chest cavity": "thoracic cavity",
    # Heart
    "heart sac": "pericardium",
    "pericardial sac": "pericardium",
    "heart muscle": "myocardium",
    "heart_myocardium": "myocardium",
    "heart_atrium_left": "left atrium",
    "heart_atrium_right": "right atrium",
    "heart_ventricle_left": "left ventricle",
    "heart_ventricle_right": "right ventricle",
    "atrial_appendage_left": "left atrial appendage",
    "bicuspid valve": "mitral valve",
    # Great vessels
    "main pulmonary artery": "pulmonary trunk",
    "innominate artery": "brachiocephalic trunk",
    "innominate vein": "brachiocephalic vein",
    "left innominate vein": "left brachiocephalic vein",
    "right innominate vein": "right brachiocephalic vein",
    "brachiocephalic_vein_left": "left brachiocephalic vein",
    "brachiocephalic_vein_right": "right brachiocephalic vein",
    "subclavian_artery_left": "left subclavian artery",
    "subclavian_artery_right": "right subclavian artery",
    "common_carotid_artery_left": "left common carotid artery",
    "common_carotid_artery_right": "right common carotid artery",
    # Mediastinum, oesophagus, glands, lymphatics
    "gullet": "esophagus",
    "food pipe": "esophagus",
    "foodpipe": "esophagus",
    "oesophagus": "esophagus",
    "thymus gland": "thymus",
    "lymph gland": "lymph node",
    "lymph glands": "lymph nodes",
    "armpit": "axilla",
    # Bones of the thorax
    "collarbone": "clavicle",
    "collar bone": "clavicle",
    "clavicula_left": "left clavicle",
    "clavicula_right": "right clavicle",
    "breastbone": "sternum",
    "breast bone": "sternum",
    "shoulder blade": "scapula",
    "scapula_left": "left scapula",
    "scapula_right": "right scapula",
    "humerus_left": "left humerus",
    "humerus_right": "right humerus",
    "rib cage": "thoracic cage",
    "ribcage": "thoracic cage",
    "costal_cartilages": "costal cartilage",
    "backbone": "vertebral column",
    "back bone": "vertebral column",
    "spine": "vertebral column",
    "spinal column": "vertebral column",
    # Upper abdomen
    "gall bladder": "gallbladder",
    "kidney_left": "left kidney",
    "kidney_right": "right kidney",
    "adrenal_gland_left": "left adrenal gland",
    "adrenal_gland_right": "right adrenal gland",
    "suprarenal gland": "adrenal gland",
    "bowel": "intestine",
    "small bowel": "small intestine",
    "large bowel": "large intestine",
}


def _numbered_bones() -> dict[str, str]:
    """Ribs 1-12 and vertebrae T1-T12, L1-L5 under their RadGenome (SAT) and TotalSegmentator names."""
    table = {}
    for side in ("left", "right"):
        for number, ordinal in enumerate(_ORDINALS, start=1):
            table[f"{side} rib {number}"] = f"{side} {ordinal} rib"
            table[f"rib_{side}_{number}"] = f"{side} {ordinal} rib"
    for region, letter, count in (("thoracic", "t", 12), ("lumbar", "l", 5)):
        for number, ordinal in enumerate(_ORDINALS[:count], start=1):
            table[f"{region} vertebrae {number} ({letter}{number})"] = f"{ordinal} {region} vertebra"
            table[f"vertebrae_{letter.upper()}{number}"] = f"{ordinal} {region} vertebra"
    return table


RADLEX_TABLE: dict[str, str] = {**_CURATED, **_numbered_bones()}
"""Colloquial or dataset-specific term (as written in its source) → RadLex preferred name (lower case)."""

RADLEX_PREFERRED: frozenset[str] = frozenset(RADLEX_TABLE.values()) | {
    "abdomen",
    "abdominal aorta",
    "adrenal gland",
    "aorta",
    "aortic valve",
    "ascending aorta",
    "azygos vein",
    "bone",
    "brachiocephalic trunk",
    "breast",
    "bronchus",
    "chest wall",
    "clavicle",
    "colon",
    "coronary artery",
    "descending aorta",
    "diaphragm",
    "duodenum",
    "esophagus",
    "gallbladder",
    "heart",
    "ileum",
    "inferior vena cava",
    "jejunum",
    "kidney",
    "left lung",
    "left main bronchus",
    "left rib",
    "liver",
    "lung",
    "lymph node",
    "lymph nodes",
    "mediastinum",
    "pancreas",
    "pleura",
    "portal vein",
    "pulmonary artery",
    "pulmonary valve",
    "pulmonary vein",
    "rib",
    "right lung",
    "right main bronchus",
    "right rib",
    "scapula",
    "spinal canal",
    "spinal cord",
    "spleen",
    "splenic vein",
    "sternum",
    "stomach",
    "superior vena cava",
    "thoracic aorta",
    "thoracic vertebra",
    "lumbar vertebra",
    "thorax",
    "thymus",
    "thyroid gland",
    "trachea",
    "tricuspid valve",
    "urinary bladder",
    "vertebra",
}
"""RadLex preferred names the normaliser recognises: the values of :data:`RADLEX_TABLE` plus common ones."""


def _canonical(term: str) -> str:
    """Lookup key of a term: lower case, with runs of whitespace, underscores and hyphens turned into one space."""
    return re.sub(r"[\s_-]+", " ", term).strip().lower()


def _canonical_table(table: Mapping[str, str]) -> dict[str, str]:
    """``table`` with its keys replaced by lookup keys; raises ``ValueError`` on an empty key or a conflict."""
    canonical: dict[str, str] = {}
    for term, preferred in table.items():
        key = _canonical(term)
        if not key:
            raise ValueError(f"empty RadLex table key {term!r}")
        if canonical.setdefault(key, preferred) != preferred:
            raise ValueError(f"RadLex table key {term!r} maps to both {canonical[key]!r} and {preferred!r}")
    return canonical


class RadLexNormalizer:
    """Map anatomy terms, free text and RadGenome anatomy paths to RadLex preferred names, with counts.

    Args:
        extra_terms: additional ``term → preferred name`` entries, added to (and overriding) :data:`RADLEX_TABLE`;
            their values become known preferred names.

    Attributes:
        unknown_terms: how often each unknown term (by its lookup key, i.e. lower case with single spaces) was
            seen by :meth:`normalize_term`.

    Raises:
        ValueError: if ``extra_terms`` has an empty key or two keys that differ only in case or separators but map to
            different preferred names.
    """

    def __init__(self, extra_terms: Mapping[str, str] | None = None) -> None:
        self._table = _canonical_table(RADLEX_TABLE)
        self._table.update(_canonical_table(extra_terms or {}))
        self._preferred = {_canonical(name) for name in RADLEX_PREFERRED | set(self._table.values())}
        self.unknown_terms: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()

        # One alternation over table keys and preferred names, longest first, so that the longest phrase wins at each
        # position and a preferred name containing a table key (none today) is kept whole.
        phrases = sorted(set(self._table) | self._preferred, key=lambda key: (-len(key), key))
        alternation = "|".join(r"[\s_-]+".join(map(re.escape, phrase.split(" "))) for phrase in phrases)
        self._pattern = re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.IGNORECASE)

    def normalize_term(self, term: str) -> str:
        """Normalise one anatomy term (a whole mask or label name, not free text).

        Args:
            term: e.g. ``"Windpipe"``, ``"kidney_left"``, ``"thoracic vertebrae 7 (t7)"``.

        Returns:
            The lower-case preferred name if the term is in the table; otherwise ``term`` unchanged (a preferred
            name is counted as known, anything else as unknown and in :attr:`unknown_terms`).
        """
        key = _canonical(term)
        if key in self._table:
            self._counts["replaced"] += 1
            return self._table[key]
        if key in self._preferred:
            self._counts["known"] += 1
        else:
            self._counts["unknown"] += 1
            self.unknown_terms[key] += 1
        return term

    def normalize_text(self, text: str) -> str:
        """Replace every table term occurring in free text by its preferred name, in one pass.

        Terms match as whole words (``"spine"`` but not ``"spineless"``), case-insensitively, the longest term first
        (``"small bowel"`` before ``"bowel"``); a replacement is never replaced again. A replacement starts with a
        capital letter when the replaced text did; all other text, preferred names included, is kept as written.
        Unknown words cannot be told apart from ordinary words here, so they are not counted.

        Args:
            text: a question, answer or report sentence.

        Returns:
            The text with its colloquial anatomy terms normalised.
        """
        return self._pattern.sub(self._replace_match, text)

    def _replace_match(self, match: re.Match[str]) -> str:
        original = match.group(0)
        preferred = self._table.get(_canonical(original))
        if preferred is None:
            self._counts["known"] += 1
            return original
        self._counts["replaced"] += 1
        if original[0].isupper():
            return preferred[0].upper() + preferred[1:]
        return preferred

    def stats(self) -> dict[str, int]:
        """Counts since construction.

        Returns:
            ``{"replaced": ..., "known": ..., "unknown": ...}``: terms replaced by a preferred name, preferred names
            met (left as they were), and unknown terms (see :attr:`unknown_terms` for which).
        """
        return {name: self._counts[name] for name in ("replaced", "known", "unknown")}
