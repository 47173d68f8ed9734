"""One vocabulary for structure names across mask sources: VISTA-3D, TotalSegmentator, RadGenome-ChestCT, RadLex.

Canonical key: the **TotalSegmentator-style snake_case name** (``lung_upper_lobe_right``, ``vertebrae_T7``,
``rib_left_4``). It is what the phantom's masks and :data:`~med3dqwen.processing.ct_io.TOTALSEGMENTATOR_V2_LABELS`
already use, it is a valid identifier and file name, and it exists for every structure (RadLex has no preferred name
for many dataset structures, e.g. RadGenome's "abdominal tissue"). Structures that TotalSegmentator lacks get a key in
the same style: unions (``lung_left``, ``lung``, ``ribs``, ``vertebrae``, ``bone``, ``kidney``), RadGenome regions and
leaves (``mediastinum``, ``thoracic_cavity``, ``heart_tissue``), VISTA-3D-only classes (``airway``, ``lung_tumor``).
Each key carries its name in each source and its RadLex preferred name (from :mod:`med3dqwen.anatomy.radlex`).

Lookup accepts any of those names, case-insensitively and treating runs of spaces, ``_`` and ``-`` alike, plus the
colloquial terms of :data:`~med3dqwen.anatomy.radlex.RADLEX_TABLE` ("windpipe" → ``trachea``) and RadGenome ``Anatomy``
paths (their leaf). Names the vocabulary does not know are never guessed: lookups return ``None`` and the name is
counted in :attr:`Vocabulary.unmatched`.

Composite structures: a source that lacks a structure but has all of its parts serves the union of the parts;
:meth:`Vocabulary.components` lists the source names to unite (``lung_left`` in TotalSegmentator → its two lobes).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from .labels import (
    RADGENOME_NO_CONTOUR,
    RADGENOME_REGIONS,
    RADGENOME_SUBSET_LEAVES,
    TOTALSEGMENTATOR_V2_LABELS,
    VISTA3D_LABELS,
)
from .radlex import RADLEX_TABLE, RadLexNormalizer


__all__ = ["SOURCES", "SourceName", "Vocabulary", "VocabularyEntry", "default_vocabulary", "name_key"]

SourceName = Literal["vista3d", "totalsegmentator", "radgenome", "radlex"]
SOURCES: tuple[str, ...] = ("vista3d", "totalsegmentator", "radgenome", "radlex")

# TotalSegmentator classes outside the ``total`` task that chest-CT users meet (task: names).
_TS_OTHER_TASKS = {
    "lung_vessels": ("lung_vessels", "lung_trachea_bronchia"),
    "body": ("body_trunc", "body_extremities"),
    "heartchambers_highres": (
        "heart_myocardium",
        "heart_atrium_left",
        "heart_ventricle_left",
        "heart_atrium_right",
        "heart_ventricle_right",
        "pulmonary_artery",
    ),
    "liver_vessels": ("liver_vessels", "liver_tumor"),
    "pleural_pericard_effusion": ("pleural_effusion", "pericardial_effusion"),
}

# Names whose canonical key the rules below would get wrong (source name → canonical key).
_VISTA_OVERRIDES = {"bladder": "urinary_bladder", "hepatic vessel": "liver_vessels", "hepatic tumor": "liver_tumor"}
_RADGENOME_OVERRIDES = {
    "bronchie": "bronchi",
    "caudate lobe": "liver_caudate_lobe",
    "cervical esophagus": "esophagus_cervical",
    "clavicle": "clavicula",
    "left clavicle": "clavicula_left",
    "right clavicle": "clavicula_right",
    "heart ascending aorta": "ascending_aorta",
    "liver vessel": "liver_vessels",
    "manubrium of sternum": "sternum_manubrium",
    "rib": "ribs",
    "thyroid": "thyroid_gland",  # the region file; the anatomy leaf is "thyroid gland"
    "left thyroid": "thyroid_gland_left",
    "right thyroid": "thyroid_gland_right",
    "trachea and bronchie": "airway",
}
# Preferred source name where several names share one key.
_VISTA_PRIMARY = {"liver_tumor": "hepatic tumor"}  # 130 "liver tumor" is not a supported prompt
_RADGENOME_PRIMARY = {"thyroid_gland": "thyroid gland"}
# Source names for keys that are not named like the source's own classes.
_TS_NAMES = {"airway": "lung_trachea_bronchia"}
# RadLex preferred names the normaliser cannot derive from any of the source names.
_RADLEX_OVERRIDES = {"vertebrae": "vertebral column", "ribs": "rib", "airway": "trachea and bronchi"}

_BONES = ("vertebrae", "ribs", "sacrum", "humerus", "scapula", "clavicula", "femur", "hip")
_BONES += ("costal_cartilages", "skull", "sternum")


def name_key(name: str) -> str:
    """Lookup key of a name: lower case, runs of whitespace, ``_`` and ``-`` turned into one space."""
    return re.sub(r"[\s_-]+", " ", name).strip().lower()


def _rule_key(name: str) -> str:
    """Canonical key of a spaced name ("left lung upper lobe", "vertebrae L5", "left rib 4") by TotalSegmentator's
    naming rules: side last (``..._left``), ribs as ``rib_<side>_<n>``, vertebrae as ``vertebrae_<T7>``."""
    name = " ".join(name.split())
    if m := re.fullmatch(r"(left|right) rib (\d+)", name):
        return f"rib_{m[1]}_{m[2]}"
    if m := re.fullmatch(r"rib (\d+)", name):
        return f"rib_{m[1]}"
    if m := re.fullmatch(r"(?:cervical|thoracic|lumbar) vertebrae \d+ \(([ctl]\d+)\)", name):
        return f"vertebrae_{m[1].upper()}"
    if m := re.fullmatch(r"vertebrae ([CTLS]\d+)", name):
        return f"vertebrae_{m[1]}"
    if m := re.fullmatch(r"(cervical|thoracic|lumbar) vertebrae", name):
        return f"vertebrae_{m[1]}"
    if m := re.fullmatch(r"(left|right) (.+)", name):
        return f"{m[2].replace(' ', '_')}_{m[1]}"
    return name.replace(" ", "_")


@dataclass(frozen=True)
class VocabularyEntry:
    """One structure.

    Args:
        key: canonical key (TotalSegmentator-style snake_case).
        totalsegmentator: TotalSegmentator class name (any task), or ``None``.
        vista3d: VISTA-3D class name, or ``None``.
        radgenome: RadGenome-ChestCT mask name (anatomy leaf or region), or ``None``.
        radlex: RadLex preferred name, or ``None``.
        parts: canonical keys whose union is this structure (empty for atomic structures).
        aliases: further names that mean this structure (secondary source names such as VISTA-3D "liver tumor").
    """

    key: str
    totalsegmentator: str | None = None
    vista3d: str | None = None
    radgenome: str | None = None
    radlex: str | None = None
    parts: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()

    def name_in(self, source: str) -> str | None:
        """This structure's name in ``source`` (one of :data:`SOURCES`), or ``None``."""
        if source not in SOURCES:
            raise ValueError(f"unknown name source {source!r}; expected one of {SOURCES}")
        return getattr(self, source)


def _build_entries() -> dict[str, VocabularyEntry]:
    """All entries, keyed by canonical key (built once; see :func:`_tables`)."""
    ts: dict[str, str] = {name: name for name in TOTALSEGMENTATOR_V2_LABELS.values()}
    for names in _TS_OTHER_TASKS.values():
        ts.update({name: name for name in names})
    for key, name in _TS_NAMES.items():  # a TotalSegmentator class filed under another key
        ts.pop(name, None)
        ts[key] = name

    vista: dict[str, list[str]] = {}
    for _, name in sorted(VISTA3D_LABELS.items()):
        vista.setdefault(_VISTA_OVERRIDES.get(name) or _rule_key(name), []).append(name)
    radgenome: dict[str, list[str]] = {}
    for name in sorted(set(RADGENOME_SUBSET_LEAVES) | set(RADGENOME_REGIONS)):
        if name in RADGENOME_NO_CONTOUR:
            continue
        radgenome.setdefault(_RADGENOME_OVERRIDES.get(name) or _rule_key(name), []).append(name)

    parts: dict[str, tuple[str, ...]] = {
        "lung_left": ("lung_upper_lobe_left", "lung_lower_lobe_left"),
        "lung_right": ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"),
        "lung": ("lung_left", "lung_right"),
        "lung_upper_lobe": ("lung_upper_lobe_left", "lung_upper_lobe_right"),
        "lung_lower_lobe": ("lung_lower_lobe_left", "lung_lower_lobe_right"),
        "rib_left": tuple(f"rib_left_{i}" for i in range(1, 13)),
        "rib_right": tuple(f"rib_right_{i}" for i in range(1, 13)),
        "ribs": ("rib_left", "rib_right"),
        "vertebrae_cervical": tuple(f"vertebrae_C{i}" for i in range(1, 8)),
        "vertebrae_thoracic": tuple(f"vertebrae_T{i}" for i in range(1, 13)),
        "vertebrae_lumbar": tuple(f"vertebrae_L{i}" for i in range(1, 6)),
        "vertebrae": ("vertebrae_cervical", "vertebrae_thoracic", "vertebrae_lumbar", "vertebrae_S1"),
        "bone": _BONES,
        "body": ("body_trunc", "body_extremities"),
        **{f"rib_{i}": (f"rib_left_{i}", f"rib_right_{i}") for i in range(1, 13)},
    }
    keys = set(ts) | set(vista) | set(radgenome) | set(parts)
    # Paired structures: X = X_left + X_right wherever both sides are known, X has no parts yet and no source uses
    # the name X for another structure (RadGenome's "rib" means all ribs, not a rib_left + rib_right pair).
    named = {name_key(n): key for table in (vista, radgenome) for key, ns in table.items() for n in ns}
    for key in sorted(keys):
        stem = key[: -len("_left")]
        if key.endswith("_left") and f"{stem}_right" in keys and named.get(name_key(stem), stem) == stem:
            parts.setdefault(stem, (key, f"{stem}_right"))
    keys |= set(parts)
    missing_parts = {p for ps in parts.values() for p in ps} - keys
    if missing_parts:
        raise ValueError(f"vocabulary parts without an entry: {sorted(missing_parts)}")

    normalizer = RadLexNormalizer()

    def radlex_of(key: str, candidates: Iterable[str | None]) -> str | None:
        if key in _RADLEX_OVERRIDES:
            return _RADLEX_OVERRIDES[key]
        for term in candidates:
            if term:
                unknown_before = sum(normalizer.unknown_terms.values())
                preferred = normalizer.normalize_term(term)
                if sum(normalizer.unknown_terms.values()) == unknown_before:
                    # A replaced term comes back as the preferred name; a preferred name comes back as written.
                    return preferred.lower() if preferred != term else name_key(term)
        return None

    entries = {}
    for key in sorted(keys):
        vista_names = vista.get(key, [])
        radgenome_names = radgenome.get(key, [])
        vista_name = _VISTA_PRIMARY.get(key) or (vista_names[0] if vista_names else None)
        radgenome_name = _RADGENOME_PRIMARY.get(key) or (radgenome_names[0] if radgenome_names else None)
        aliases = tuple(n for n in (*vista_names, *radgenome_names) if n not in (vista_name, radgenome_name))
        entries[key] = VocabularyEntry(
            key=key,
            totalsegmentator=ts.get(key),
            vista3d=vista_name,
            radgenome=radgenome_name,
            radlex=radlex_of(key, (radgenome_name, ts.get(key), vista_name, key.replace("_", " "))),
            parts=parts.get(key, ()),
            aliases=aliases,
        )
    return entries


def _build_index(entries: Mapping[str, VocabularyEntry]) -> tuple[dict[str, str], frozenset[str]]:
    """Lookup key → canonical key. Source names win over RadLex-derived names; a RadLex-derived name that would mean
    two structures is left out (returned as ambiguous). Two structures claiming one source name is a table bug."""
    index: dict[str, str] = {}
    for entry in entries.values():
        for name in (entry.key, entry.totalsegmentator, entry.vista3d, entry.radgenome, *entry.aliases):
            if name is None:
                continue
            previous = index.setdefault(name_key(name), entry.key)
            if previous != entry.key:
                raise ValueError(f"name {name!r} means both {previous!r} and {entry.key!r}")
    by_radlex: dict[str, set[str]] = {}
    for entry in entries.values():
        if entry.radlex:
            by_radlex.setdefault(name_key(entry.radlex), set()).add(entry.key)
    derived: dict[str, set[str]] = {key: set(found) for key, found in by_radlex.items()}
    for term, preferred in RADLEX_TABLE.items():
        derived.setdefault(name_key(term), set()).update(by_radlex.get(name_key(preferred), ()))
    ambiguous = set()
    for key, found in derived.items():
        if key in index or not found:
            continue
        if len(found) == 1:
            index[key] = next(iter(found))
        else:
            ambiguous.add(key)
    return index, frozenset(ambiguous)


@lru_cache(maxsize=1)
def _tables() -> tuple[dict[str, VocabularyEntry], dict[str, str], frozenset[str]]:
    entries = _build_entries()
    index, ambiguous = _build_index(entries)
    return entries, index, ambiguous


class Vocabulary:
    """Map structure names between VISTA-3D, TotalSegmentator, RadGenome-ChestCT and RadLex through canonical keys.

    Args:
        extra_aliases: additional ``name → canonical key`` entries (e.g. a site's own mask names); they override the
            built-in lookup for those names.

    Attributes:
        unmatched: how often each name (by lookup key) was asked for and not known.
        missing: how often a known structure was asked of a source that neither has it nor all of its parts,
            keyed by ``(canonical key, source)``.

    Raises:
        ValueError: an extra alias names an unknown canonical key.
    """

    def __init__(self, extra_aliases: Mapping[str, str] | None = None) -> None:
        entries, index, ambiguous = _tables()
        self._entries = entries
        self._index = dict(index)
        self.ambiguous = ambiguous
        for name, key in (extra_aliases or {}).items():
            if key not in entries:
                raise ValueError(f"extra alias {name!r} → {key!r}: no such canonical key")
            self._index[name_key(name)] = key
        self.unmatched: Counter[str] = Counter()
        self.missing: Counter[tuple[str, str]] = Counter()

    # -- lookups ---------------------------------------------------------------------------------------------------

    @property
    def entries(self) -> Mapping[str, VocabularyEntry]:
        """Canonical key → entry (read-only view of the shared table)."""
        return self._entries

    def canonical(self, name: str) -> str | None:
        """The canonical key of a name, or ``None`` (then counted in :attr:`unmatched`).

        Args:
            name: any known name, e.g. ``"right lung upper lobe"``, ``"lung_upper_lobe_right"``,
                ``"upper lobe of right lung"``, ``"Windpipe"``, or a RadGenome path
                ``"lung/lung/right lung/right lung upper lobe"`` (its leaf is looked up).
        """
        term = name
        if "/" in term:
            levels = [level.strip() for level in term.split("/") if level.strip()]
            term = levels[-1] if levels else ""
        key = self._index.get(name_key(term))
        if key is None:
            self.unmatched[name_key(term) or name] += 1
        return key

    def entry(self, name: str) -> VocabularyEntry | None:
        """The entry of a name (see :meth:`canonical`), or ``None``."""
        key = self.canonical(name)
        return None if key is None else self._entries[key]

    def to_source_name(self, name: str, source: SourceName) -> str | None:
        """The name ``source`` uses for a structure, or ``None`` if the name is unknown or the source lacks it.

        Args:
            name: any known name (see :meth:`canonical`).
            source: ``"vista3d"``, ``"totalsegmentator"``, ``"radgenome"`` or ``"radlex"``.

        Returns:
            e.g. ``to_source_name("right lung upper lobe", "totalsegmentator") == "lung_upper_lobe_right"``;
            ``None`` for ``to_source_name("lung_left", "totalsegmentator")`` (see :meth:`components`).
        """
        if source not in SOURCES:
            raise ValueError(f"unknown name source {source!r}; expected one of {SOURCES}")
        entry = self.entry(name)
        return None if entry is None else entry.name_in(source)

    def components(self, name: str, source: SourceName) -> list[str]:
        """Source names whose union is the structure: ``[its own name]`` when the source has it, else its parts
        (recursively), else ``[]`` (counted in :attr:`missing`; a partial union is never returned).

        Example: ``components("lung_left", "totalsegmentator") == ["lung_upper_lobe_left", "lung_lower_lobe_left"]``
        (TotalSegmentator has lobes only); ``components("lung_left", "radgenome") == ["left lung"]``.
        """
        key = self.canonical(name)
        if key is None:
            return []
        found = self._components(key, source)
        if not found:
            self.missing[(key, source)] += 1
        return found

    def _components(self, key: str, source: str) -> list[str]:
        entry = self._entries[key]
        own = entry.name_in(source)
        if own is not None:
            return [own]
        if not entry.parts:
            return []
        names: list[str] = []
        for part in entry.parts:
            found = self._components(part, source)
            if not found:
                return []
            names.extend(n for n in found if n not in names)
        return names

    def names(self, source: SourceName) -> list[str]:
        """All names ``source`` has for the structures of this vocabulary (primary names and aliases), sorted."""
        names = {entry.name_in(source) for entry in self._entries.values()} - {None}
        if source in ("vista3d", "radgenome"):
            lookup = VISTA3D_LABELS.values() if source == "vista3d" else RADGENOME_SUBSET_LEAVES + RADGENOME_REGIONS
            names |= {alias for entry in self._entries.values() for alias in entry.aliases if alias in lookup}
        return sorted(names)

    # -- reporting -------------------------------------------------------------------------------------------------

    def report(self) -> dict[str, list]:
        """``{"unmatched": [(name, count), ...], "missing": [((key, source), count), ...]}``, most frequent first."""
        return {"unmatched": self.unmatched.most_common(), "missing": self.missing.most_common()}


_DEFAULT: Vocabulary | None = None


def default_vocabulary() -> Vocabulary:
    """A process-wide :class:`Vocabulary` (its counters collect every source's misses)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Vocabulary()
    return _DEFAULT


# Fail at import, not at the first lookup, if the tables are inconsistent.
_tables()
