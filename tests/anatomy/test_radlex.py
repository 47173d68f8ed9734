import pytest

from med3dqwen.anatomy.radlex import RADLEX_PREFERRED, RADLEX_TABLE, RadLexNormalizer


TERM_CASES = [
    ("windpipe", "trachea"),
    ("Gullet", "esophagus"),
    ("food pipe", "esophagus"),
    ("collarbone", "clavicle"),
    ("breastbone", "sternum"),
    ("backbone", "vertebral column"),
    ("spine", "vertebral column"),
    ("heart sac", "pericardium"),
    ("gall bladder", "gallbladder"),
    ("voice box", "larynx"),
    ("lymph glands", "lymph nodes"),
    ("rib cage", "thoracic cage"),
    ("bronchie", "bronchi"),
    ("trachea and bronchie", "trachea and bronchi"),
    ("right lung upper lobe", "upper lobe of right lung"),
    ("left lung lower lobe", "lower lobe of left lung"),
    ("right lung middle lobe", "middle lobe of right lung"),
    ("lung_upper_lobe_right", "upper lobe of right lung"),
    ("kidney_left", "left kidney"),
    ("Kidney_Left", "left kidney"),
    ("  kidney   left ", "left kidney"),
    ("heart_atrium_right", "right atrium"),
    ("vertebrae_T7", "seventh thoracic vertebra"),
    ("thoracic vertebrae 7 (t7)", "seventh thoracic vertebra"),
    ("vertebrae_L1", "first lumbar vertebra"),
    ("left rib 4", "left fourth rib"),
    ("rib_right_12", "right twelfth rib"),
]


@pytest.mark.parametrize(("term", "expected"), TERM_CASES)
def test_normalize_term(term, expected):
    normalizer = RadLexNormalizer()
    assert normalizer.normalize_term(term) == expected
    assert normalizer.stats() == {"replaced": 1, "known": 0, "unknown": 0}


@pytest.mark.parametrize("term", ["heart", "aorta", "liver", "left lung", "Right Lung", "pleura", "mediastinum"])
def test_preferred_term_is_unchanged_and_known(term):
    normalizer = RadLexNormalizer()
    assert normalizer.normalize_term(term) == term
    assert normalizer.stats() == {"replaced": 0, "known": 1, "unknown": 0}
    assert not normalizer.unknown_terms


def test_unknown_terms_pass_through_and_are_counted():
    normalizer = RadLexNormalizer()
    assert normalizer.normalize_term("Heart Tissue") == "Heart Tissue"
    assert normalizer.normalize_term("heart_tissue") == "heart_tissue"
    assert normalizer.normalize_term("whole scan") == "whole scan"
    assert normalizer.unknown_terms == {"heart tissue": 2, "whole scan": 1}
    assert normalizer.stats() == {"replaced": 0, "known": 0, "unknown": 3}


def test_table_is_consistent():
    keys = [" ".join(key.replace("_", " ").lower().split()) for key in RADLEX_TABLE]
    assert len(keys) == len(set(keys)), "two table keys differ only in case or separators"
    assert set(RADLEX_TABLE.values()) <= RADLEX_PREFERRED
    assert not set(keys) & RADLEX_PREFERRED, "a preferred name is also a table key"
    assert all(value == value.lower() for value in RADLEX_TABLE.values())


def test_every_table_entry_normalises_in_text():
    normalizer = RadLexNormalizer()
    for term, preferred in RADLEX_TABLE.items():
        assert normalizer.normalize_text(f"the {term} is normal") == f"the {preferred} is normal"


def test_preferred_names_are_left_alone_in_text():
    normalizer = RadLexNormalizer()
    for name in sorted(RADLEX_PREFERRED):
        assert normalizer.normalize_text(f"({name})") == f"({name})"
    assert normalizer.stats()["replaced"] == 0


TEXT_CASES = [
    ("The windpipe is patent.", "The trachea is patent."),
    ("Windpipe and gullet are normal.", "Trachea and esophagus are normal."),
    ("WINDPIPE", "Trachea"),
    # Whole words only.
    ("A spineless spine-related finding.", "A spineless vertebral column-related finding."),
    ("windpipes", "windpipes"),
    # Longest match first.
    ("Thickened small bowel and bowel loops.", "Thickened small intestine and intestine loops."),
    ("Nodule in the right lung upper lobe.", "Nodule in the upper lobe of right lung."),
    ("trachea and bronchie", "trachea and bronchi"),
    ("The right lung is clear.", "The right lung is clear."),
    # Separators inside a term are tolerated; text outside terms (and its case) is kept.
    ("Stones in the Gall-Bladder, see kidney_left.", "Stones in the Gallbladder, see left kidney."),
    ("Fracture of vertebrae T7 and left rib 4.", "Fracture of seventh thoracic vertebra and left fourth rib."),
    # One pass: a replacement is not replaced again.
    ("heart sac and heart muscle", "pericardium and myocardium"),
    ("No anatomy here, CT is fine.", "No anatomy here, CT is fine."),
]


@pytest.mark.parametrize(("text", "expected"), TEXT_CASES)
def test_normalize_text(text, expected):
    assert RadLexNormalizer().normalize_text(text) == expected


def test_normalize_text_counts():
    normalizer = RadLexNormalizer()
    normalizer.normalize_text("The windpipe, the heart and the gullet.")
    assert normalizer.stats() == {"replaced": 2, "known": 1, "unknown": 0}


def test_extra_terms():
    normalizer = RadLexNormalizer(extra_terms={"ticker": "heart", "Spine": "spinal cord"})
    assert normalizer.normalize_text("The ticker and the spine.") == "The heart and the spinal cord."
    with pytest.raises(ValueError, match="maps to both"):
        RadLexNormalizer(extra_terms={"food pipe": "esophagus", "food_pipe": "trachea"})
    with pytest.raises(ValueError, match="empty"):
        RadLexNormalizer(extra_terms={" _ ": "heart"})
