"""Anatomy names: the label tables of the mask sources, the RadLex table and the vocabulary that links them.

This subpackage imports nothing else of ``med3dqwen``: every other part looks names up here.
"""

from .labels import (
    RADGENOME_ANATOMY_PATHS,
    RADGENOME_NO_CONTOUR,
    RADGENOME_REGIONS,
    RADGENOME_SUBSET_LEAVES,
    TOTALSEGMENTATOR_V2_LABELS,
    VISTA3D_EVERYTHING_LABELS,
    VISTA3D_LABELS,
    VISTA3D_SUBCLASS,
    VISTA3D_SUPPORTED,
)
from .radlex import RADLEX_PREFERRED, RADLEX_TABLE, RadLexNormalizer
from .vocabulary import Vocabulary, VocabularyEntry, default_vocabulary, name_key


__all__ = [
    "RADGENOME_ANATOMY_PATHS",
    "RADGENOME_NO_CONTOUR",
    "RADGENOME_REGIONS",
    "RADGENOME_SUBSET_LEAVES",
    "RADLEX_PREFERRED",
    "RADLEX_TABLE",
    "TOTALSEGMENTATOR_V2_LABELS",
    "VISTA3D_EVERYTHING_LABELS",
    "VISTA3D_LABELS",
    "VISTA3D_SUBCLASS",
    "VISTA3D_SUPPORTED",
    "RadLexNormalizer",
    "Vocabulary",
    "VocabularyEntry",
    "default_vocabulary",
    "name_key",
]
