"""Vocabulary: VISTA-3D, TotalSegmentator, RadGenome-ChestCT and RadLex names through canonical keys."""

import re

import pytest

from med3dqwen.anatomy import (
    RADGENOME_ANATOMY_PATHS,
    RADGENOME_REGIONS,
    RADGENOME_SUBSET_LEAVES,
    VISTA3D_LABELS,
    Vocabulary,
    default_vocabulary,
)
from med3dqwen.anatomy.labels import TOTALSEGMENTATOR_V2_LABELS
from med3dqwen.anatomy.radlex import RADLEX_PREFERRED, RADLEX_TABLE, RadLexNormalizer
from med3dqwen.anatomy.vocabulary import name_key


# VISTA-3D classes without a TotalSegmentator ``total`` class of the same meaning (checked by hand).
VISTA_ONLY = {
    "kidney",
    "prostate or uterus",
    "rectum",
    "lung",
    "bone",
    "lung tumor",
    "pancreatic tumor",
    "colon cancer primaries",
    "bone lesion",
    "kidney mass",
    "vertebrae L6",
}


@pytest.fixture()
def vocab():
    return Vocabulary()


@pytest.mark.parametrize("name", sorted(TOTALSEGMENTATOR_V2_LABELS.values()))
def test_every_totalsegmentator_name_round_trips(vocab, name):
    assert vocab.canonical(name) == name
    assert vocab.to_source_name(name, "totalsegmentator") == name
    assert vocab.components(name, "totalsegmentator") == [name]


def test_every_vista3d_class_round_trips(vocab):
    for label, name in VISTA3D_LABELS.items():
        key = vocab.canonical(name)
        assert key is not None, name
        back = vocab.to_source_name(key, "vista3d")
        # 130 "liver tumor" is the unsupported twin of 26 "hepatic tumor"; every other class maps to itself.
        assert back == ("hepatic tumor" if name == "liver tumor" else name), (label, name, key, back)
    assert vocab.report()["unmatched"] == []


def test_vista3d_and_totalsegmentator_meet(vocab):
    pairs = {
        "left lung upper lobe": "lung_upper_lobe_left",
        "right lung middle lobe": "lung_middle_lobe_right",
        "vertebrae L5": "vertebrae_L5",
        "vertebrae S1": "vertebrae_S1",
        "left rib 1": "rib_left_1",
        "right rib 12": "rib_right_12",
        "bladder": "urinary_bladder",
        "left clavicula": "clavicula_left",
        "left iliac vena": "iliac_vena_left",
        "left kidney cyst": "kidney_cyst_left",
        "costal cartilages": "costal_cartilages",
        "portal vein and splenic vein": "portal_vein_and_splenic_vein",
        "hepatic vessel": "liver_vessels",  # TotalSegmentator task liver_vessels
        "airway": "lung_trachea_bronchia",  # TotalSegmentator task lung_vessels
    }
    for vista, ts in pairs.items():
        assert vocab.to_source_name(vista, "totalsegmentator") == ts
        assert vocab.to_source_name(ts, "vista3d") == vista
    unmatched = {name for name in VISTA3D_LABELS.values() if vocab.to_source_name(name, "totalsegmentator") is None}
    assert unmatched == VISTA_ONLY


def test_every_radgenome_leaf_and_region_is_known(vocab):
    for name in (*RADGENOME_SUBSET_LEAVES, *RADGENOME_REGIONS):
        if name == "others":  # a head meaning "no mask", handled by the file source's linking rule
            assert vocab.canonical(name) is None
            continue
        key = vocab.canonical(name)
        assert key is not None, name
        assert vocab.to_source_name(key, "radgenome") in (name, "thyroid gland"), name  # region "thyroid"
    assert [name for name, _ in vocab.report()["unmatched"]] == ["others"]


@pytest.mark.parametrize(
    ("radgenome", "key", "vista", "ts"),
    [
        ("right lung upper lobe", "lung_upper_lobe_right", "right lung upper lobe", "lung_upper_lobe_right"),
        ("thoracic vertebrae 7 (t7)", "vertebrae_T7", "vertebrae T7", "vertebrae_T7"),
        ("lumbar vertebrae 1 (l1)", "vertebrae_L1", "vertebrae L1", "vertebrae_L1"),
        ("left rib 4", "rib_left_4", "left rib 4", "rib_left_4"),
        ("trachea and bronchie", "airway", "airway", "lung_trachea_bronchia"),
        ("left clavicle", "clavicula_left", "left clavicula", "clavicula_left"),
        ("urinary bladder", "urinary_bladder", "bladder", "urinary_bladder"),
        ("left lung", "lung_left", None, None),
        ("mediastinum", "mediastinum", None, None),
    ],
)
def test_radgenome_names_across_sources(vocab, radgenome, key, vista, ts):
    assert vocab.canonical(radgenome) == key
    assert vocab.canonical(f"lung/lung/{radgenome}") == key  # an Anatomy path is looked up by its leaf
    assert vocab.to_source_name(radgenome, "vista3d") == vista
    assert vocab.to_source_name(radgenome, "totalsegmentator") == ts
    assert vocab.to_source_name(key, "radgenome") == radgenome


def test_radlex_names_agree_with_the_normalizer(vocab):
    preferred = {name.lower() for name in RADLEX_PREFERRED}
    normalizer = RadLexNormalizer()
    checked = 0
    for entry in vocab.entries.values():
        if entry.radlex:
            assert entry.radlex in preferred, entry
        if entry.radgenome and name_key(entry.radgenome) in {name_key(k) for k in RADLEX_TABLE}:
            assert normalizer.normalize_term(entry.radgenome) == entry.radlex, entry
            checked += 1
    assert checked > 30
    assert sum(entry.radlex is not None for entry in vocab.entries.values()) > 100
    assert vocab.to_source_name("lung_upper_lobe_right", "radlex") == "upper lobe of right lung"
    assert vocab.canonical("Upper lobe of right lung") == "lung_upper_lobe_right"


@pytest.mark.parametrize(
    ("term", "key"),
    [
        ("Windpipe", "trachea"),
        ("left upper lobe", "lung_upper_lobe_left"),
        ("breastbone", "sternum"),
        ("collarbone", "clavicula"),
        ("spine", "vertebrae"),
        ("gall bladder", "gallbladder"),
        ("Kidney-Left", "kidney_left"),
    ],
)
def test_colloquial_terms_reach_canonical_keys(vocab, term, key):
    assert vocab.canonical(term) == key


def test_components_build_unions_where_a_source_has_parts_only(vocab):
    assert vocab.components("lung_left", "totalsegmentator") == ["lung_upper_lobe_left", "lung_lower_lobe_left"]
    assert vocab.components("left lung", "vista3d") == ["left lung upper lobe", "left lung lower lobe"]
    assert vocab.components("lung_left", "radgenome") == ["left lung"]
    assert vocab.components("lung", "vista3d") == ["lung"]  # VISTA-3D expands class 20 itself
    assert len(vocab.components("lung", "totalsegmentator")) == 5
    vertebrae = vocab.components("vertebrae", "totalsegmentator")
    assert len(vertebrae) == 25 and "vertebrae_T7" in vertebrae and "vertebrae_S1" in vertebrae
    bone = vocab.components("bone", "totalsegmentator")
    assert {"rib_left_1", "sternum", "vertebrae_L5", "costal_cartilages"} <= set(bone) and "liver" not in bone
    assert vocab.components("kidney", "totalsegmentator") == ["kidney_left", "kidney_right"]


def test_unbuildable_and_unknown_names_are_reported_not_guessed(vocab):
    assert vocab.components("breast", "totalsegmentator") == []  # no breast class, no parts
    assert vocab.to_source_name("mediastinal tissue", "vista3d") is None
    assert vocab.canonical("spleenish thing") is None
    assert vocab.to_source_name("livr", "totalsegmentator") is None
    assert vocab.components("livr", "vista3d") == []
    report = vocab.report()
    assert dict(report["unmatched"]) == {"spleenish thing": 1, "livr": 2}
    assert dict(report["missing"]) == {("breast", "totalsegmentator"): 1}
    assert vocab.unmatched["livr"] == 2


def test_extra_aliases(vocab):
    custom = Vocabulary({"my liver mask": "liver"})
    assert custom.canonical("My_Liver Mask") == "liver"
    assert vocab.canonical("my liver mask") is None
    with pytest.raises(ValueError, match="no such canonical key"):
        Vocabulary({"x": "not_a_key"})


def test_source_names_are_validated(vocab):
    with pytest.raises(ValueError, match="unknown name source"):
        vocab.to_source_name("liver", "sat")


def test_names_lists_each_sources_vocabulary(vocab):
    assert set(vocab.names("vista3d")) == set(VISTA3D_LABELS.values())
    assert set(TOTALSEGMENTATOR_V2_LABELS.values()) <= set(vocab.names("totalsegmentator"))
    assert set(vocab.names("radgenome")) == (set(RADGENOME_SUBSET_LEAVES) | set(RADGENOME_REGIONS)) - {"others"}


def test_radgenome_anatomy_paths_agree_with_the_vocabulary():
    # The one table of RadGenome anatomy-tree paths (the phantom takes its paths from it): heads are regions, every
    # level the vocabulary knows names the same structure family, and each leaf the vocabulary knows is its key.
    vocabulary = default_vocabulary()
    unknown = []
    for key, path in RADGENOME_ANATOMY_PATHS.items():
        levels = path.split("/")
        assert levels[0] in RADGENOME_REGIONS, path
        leaf = vocabulary.canonical(levels[-1])
        if leaf is None:
            unknown.append(levels[-1])
        else:
            assert leaf == key, (path, leaf)
    # Only numbered vertebrae that the official 2,000-volume subset never names are outside the vocabulary.
    assert all(re.fullmatch(r"(cervical|lumbar) vertebrae \d \([cl]\d\)", name) for name in unknown), unknown
    assert "thoracic vertebrae 7 (t7)" in RADGENOME_ANATOMY_PATHS["vertebrae_T7"]
