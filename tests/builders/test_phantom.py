import json
import re

import nibabel as nib
import numpy as np
import pytest

from med3dqwen.anatomy.labels import TOTALSEGMENTATOR_V2_LABELS
from med3dqwen.builders.phantom import (
    ANATOMY_NAMES,
    ANATOMY_PATHS,
    DEFAULT_FOV_MM,
    LESION_KINDS,
    Phantom,
    PhantomConfig,
    generate_phantom,
    generate_questions,
)
from med3dqwen.processing.ct_io import load_mask, load_volume, standard_affine


SMALL = (32, 64, 64)
MEDIUM = (64, 128, 128)
NO_LESIONS = {"lesion_probability": 0.0, "effusion_probability": 0.0}
LOBES = {
    "lung_right": ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"),
    "lung_left": ("lung_upper_lobe_left", "lung_lower_lobe_left"),
}
# Structures that do not overlap one another (unions such as lung_left and per-level masks left out).
DISJOINT = (
    *LOBES["lung_right"],
    *LOBES["lung_left"],
    "heart",
    "aorta",
    "trachea",
    "esophagus",
    "liver",
    "spleen",
    "stomach",
    "vertebrae",
    "ribs",
    "sternum",
)
# Mask keys that are unions of TotalSegmentator classes rather than classes themselves.
UNIONS = {"body", "lung_left", "lung_right", "vertebrae", "ribs"}


def small(**kwargs) -> PhantomConfig:
    return PhantomConfig(shape=SMALL, **kwargs)


def centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)  # (d, h, w)


def finding_kind(question: str) -> str:
    return next(
        kind
        for kind, noun in (("effusion", "pleural effusion"), ("mass", "mass"), ("nodule", "nodule"))
        if noun in question
    )


@pytest.fixture(scope="module")
def clean() -> Phantom:
    """A lesion-free phantom at a resolution where small structures are well sampled."""
    return generate_phantom(11, PhantomConfig(shape=MEDIUM, **NO_LESIONS))


@pytest.fixture(scope="module")
def full_size() -> Phantom:
    return generate_phantom(5)


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


def test_default_grid_spans_a_chest_ct():
    config = PhantomConfig()
    assert config.shape == (128, 256, 256)
    assert config.resolved_spacing == (2.5, 1.5, 1.5)
    assert small().resolved_spacing == (10.0, 6.0, 6.0)
    assert PhantomConfig(shape=SMALL, spacing=(5, 3, 3)).resolved_spacing == (5.0, 3.0, 3.0)
    assert tuple(n * s for n, s in zip(SMALL, small().resolved_spacing, strict=True)) == DEFAULT_FOV_MM


def test_config_accepts_lists():
    config = PhantomConfig(shape=[32, 64, 64], spacing=[10, 6, 6], nodule_size_mm=[5, 20], lesion_kinds=["nodule"])
    assert config.shape == SMALL and config.spacing == (10.0, 6.0, 6.0)
    assert config.nodule_size_mm == (5.0, 20.0) and config.lesion_kinds == ("nodule",)


@pytest.mark.parametrize(
    "field, value",
    [
        ("shape", (8, 64, 64)),
        ("shape", (32, 64)),
        ("shape", (32.5, 64, 64)),
        ("spacing", (0.0, 1.0, 1.0)),
        ("spacing", (1.0, 1.0)),
        ("spacing", (1.0, float("nan"), 1.0)),
        ("noise_sigma", -1.0),
        ("position_jitter_mm", 100.0),
        ("size_jitter", 0.5),
        ("lesion_probability", 1.5),
        ("effusion_probability", -0.1),
        ("mass_fraction", 2.0),
        ("lesion_kinds", ("tumour",)),
        ("lesion_kinds", ("nodule", "nodule")),
        ("nodule_size_mm", (4.0, 40.0)),
        ("nodule_size_mm", (20.0, 10.0)),
        ("mass_size_mm", (20.0, 50.0)),
        ("effusion_size_mm", (30.0, 10.0)),
        ("lung_lesion_hu", (100.0, -100.0)),
        ("liver_lesion_contrast_hu", (0.0,)),
        ("effusion_hu", "warm"),
        ("ribs", "yes"),
        ("bone_levels", 1),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PhantomConfig(**{field: value})


@pytest.mark.parametrize("seed", [-1, 1.5, "3", True])
def test_seed_must_be_a_non_negative_integer(seed):
    with pytest.raises(ValueError, match="seed"):
        generate_phantom(seed, small())


# ---------------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_phantoms():
    a, b = generate_phantom(7, small()), generate_phantom(7, small())
    assert a.volume.dtype == np.float32 and a.volume.shape == SMALL
    assert a.volume.tobytes() == b.volume.tobytes()
    assert list(a.masks) == list(b.masks)
    assert all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert a.findings == b.findings
    assert all(np.array_equal(x, y) for x, y in zip(a.lesion_masks, b.lesion_masks, strict=True))
    assert a.tissue_hu == b.tissue_hu


def test_different_seeds_differ():
    a, b = generate_phantom(1, small()), generate_phantom(2, small())
    assert not np.array_equal(a.volume, b.volume)
    assert not np.array_equal(a.masks["heart"], b.masks["heart"])
    assert a.tissue_hu != b.tissue_hu


def test_masks_do_not_depend_on_lesions():
    with_lesions = generate_phantom(3, small(lesion_probability=1.0, effusion_probability=1.0))
    without = generate_phantom(3, small(**NO_LESIONS))
    assert with_lesions.findings and not without.findings and not without.lesion_masks
    assert list(with_lesions.masks) == list(without.masks)
    for name in without.masks:
        assert np.array_equal(with_lesions.masks[name], without.masks[name]), name
    # The noise and the anatomy are drawn from their own streams: only lesion voxels differ.
    lesions = np.logical_or.reduce(with_lesions.lesion_masks)
    assert np.array_equal(with_lesions.volume[~lesions], without.volume[~lesions])
    assert not np.array_equal(with_lesions.volume[lesions], without.volume[lesions])


# ---------------------------------------------------------------------------------------------------------------
# Geometry and masks
# ---------------------------------------------------------------------------------------------------------------


def test_mask_names_and_anatomy_paths(clean):
    for name, mask in clean.masks.items():
        assert mask.dtype == bool and mask.shape == MEDIUM
        assert mask.any(), f"{name} is empty"
        assert name in ANATOMY_PATHS and name in ANATOMY_NAMES
        assert name in UNIONS or name in TOTALSEGMENTATOR_V2_LABELS.values(), name
    assert ANATOMY_PATHS["lung_upper_lobe_right"] == "lung/lung/right lung/right lung upper lobe"
    assert ANATOMY_NAMES["lung_upper_lobe_right"] == "right lung upper lobe"
    assert ANATOMY_NAMES["liver"] == "liver"
    assert {"body", "heart", "aorta", "trachea", "esophagus", "liver", "vertebrae", "ribs"} <= set(clean.masks)


@pytest.mark.parametrize("seed", range(4))
def test_lobes_partition_their_lung(seed):
    phantom = generate_phantom(seed, small())
    masks = phantom.masks
    assert not (masks["lung_left"] & masks["lung_right"]).any()
    for lung, lobes in LOBES.items():
        union = np.zeros(SMALL, dtype=bool)
        for lobe in lobes:
            assert masks[lobe].any(), lobe
            assert not (union & masks[lobe]).any(), f"{lobe} overlaps another lobe"
            union |= masks[lobe]
        assert np.array_equal(union, masks[lung])


def test_structures_are_disjoint_and_inside_the_body(clean):
    masks = clean.masks
    for name, mask in masks.items():
        assert not (mask & ~masks["body"]).any(), f"{name} leaves the body"
    for i, a in enumerate(DISJOINT):
        for b in DISJOINT[i + 1 :]:
            assert not (masks[a] & masks[b]).any(), f"{a} overlaps {b}"


def test_anatomical_sides(clean):
    d_mid, h_mid, w_mid = (np.array(MEDIUM) - 1) / 2
    c = {name: centroid(mask) for name, mask in clean.masks.items()}
    assert c["lung_right"][2] < w_mid < c["lung_left"][2]  # column 0 is the patient's right
    assert c["liver"][2] < w_mid and c["spleen"][2] > w_mid and c["stomach"][2] > w_mid
    assert c["liver"][0] < c["lung_right"][0] and c["liver"][0] < c["heart"][0]  # the liver is inferior
    assert c["heart"][2] > w_mid and c["heart"][1] < c["vertebrae"][1]  # anterior-left
    assert c["vertebrae"][1] > h_mid and c["vertebrae"][1] > c["aorta"][1] > c["heart"][1]
    assert c["trachea"][0] > c["heart"][0]
    assert c["lung_upper_lobe_right"][0] > c["lung_middle_lobe_right"][0]
    assert c["lung_upper_lobe_left"][0] > c["lung_lower_lobe_left"][0]
    assert c["lung_lower_lobe_right"][1] > c["lung_middle_lobe_right"][1]  # lower lobe is posterior
    assert c["sternum"][1] < h_mid


def test_affine_maps_to_ras_world(clean):
    spacing = (5.0, 3.0, 3.0)
    assert clean.spacing == spacing
    assert np.allclose(clean.affine[:3, :3], standard_affine(spacing)[:3, :3])
    centre = np.append((np.array(MEDIUM) - 1) / 2, 1.0)
    assert np.allclose(clean.affine @ centre, [0, 0, 0, 1])  # the volume centre is the world origin

    def world(name):
        return (clean.affine @ np.append(centroid(clean.masks[name]), 1.0))[:3]

    # RAS+ world: +x towards the patient's right, +y anterior, +z superior.
    assert nib.aff2axcodes(clean.affine[:, [2, 1, 0, 3]]) == ("L", "P", "S")  # NIfTI (i, j, k) = (W, H, D)
    assert world("lung_right")[0] > 0 > world("lung_left")[0]
    assert world("heart")[1] > world("vertebrae")[1]
    assert world("trachea")[2] > world("liver")[2]


# ---------------------------------------------------------------------------------------------------------------
# Intensities
# ---------------------------------------------------------------------------------------------------------------

# structure → (low, high) bounds of its mean HU.
MEAN_HU = {
    "lung_left": (-900, -800),
    "lung_right": (-900, -800),
    **{lobe: (-900, -790) for lobe in (*LOBES["lung_right"], *LOBES["lung_left"])},
    "heart": (30, 65),
    "aorta": (35, 65),
    "liver": (45, 65),
    "spleen": (35, 55),
    "esophagus": (25, 55),
    "trachea": (-1000, -300),  # air lumen inside a thin soft-tissue wall
    "vertebrae": (300, 700),
    "ribs": (250, 800),
}


def test_mean_hu_inside_masks(clean):
    for name, (low, high) in MEAN_HU.items():
        mean = float(clean.volume[clean.masks[name]].mean())
        assert low <= mean <= high, f"{name}: mean {mean:.1f} HU not in [{low}, {high}]"
    air = clean.volume[~clean.masks["body"]]
    assert -1010 <= air.mean() <= -985 and air.min() >= -1024
    assert np.percentile(clean.volume[clean.masks["vertebrae"]], 90) >= 700  # cortical bone
    body = clean.volume[clean.masks["body"]]
    assert ((body > -130) & (body < -70)).mean() > 0.05  # subcutaneous and intra-abdominal fat


def test_noise_level_follows_config():
    for sigma in (0.0, 20.0, 40.0):
        phantom = generate_phantom(2, small(noise_sigma=sigma, **NO_LESIONS))
        liver = phantom.volume[phantom.masks["liver"]]
        assert abs(liver.std() - sigma) <= 0.1 * sigma + 1e-6
        assert abs(liver.mean() - phantom.tissue_hu["liver"]) <= 3 + sigma / 5


def test_noise_free_phantom_is_piecewise_constant():
    phantom = generate_phantom(4, small(noise_sigma=0.0, **NO_LESIONS))
    hu = phantom.tissue_hu
    assert np.all(phantom.volume[phantom.masks["liver"]] == np.float32(hu["liver"]))
    assert np.all(phantom.volume[phantom.masks["aorta"]] == np.float32(hu["blood"]))
    assert np.all(phantom.volume[~phantom.masks["body"]] == -1000)
    lung = phantom.volume[phantom.masks["lung_left"] | phantom.masks["lung_right"]]
    parenchyma = lung[lung < -500]  # leave out the intrapulmonary vessels
    assert -900 <= hu["lung"] <= -800 and parenchyma.min() >= hu["lung"] - 60 and parenchyma.max() <= hu["lung"] + 60
    assert parenchyma.std() > 5  # the dependent gradient and the smooth texture


# ---------------------------------------------------------------------------------------------------------------
# Lesions
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_lesions_lie_in_their_host(seed):
    config = PhantomConfig(shape=MEDIUM, noise_sigma=0.0, lesion_probability=0.7, effusion_probability=0.5)
    phantom = generate_phantom(seed, config)
    assert len(phantom.findings) == len(phantom.lesion_masks)
    seen = np.zeros(MEDIUM, dtype=bool)
    for finding, mask in zip(phantom.findings, phantom.lesion_masks, strict=True):
        assert finding.kind in LESION_KINDS
        assert mask.dtype == bool and mask.sum() == finding.n_voxels > 0
        assert not (mask & ~phantom.masks[finding.structure]).any(), f"{finding} leaves its host"
        assert mask[finding.center_voxel]
        assert not (mask & seen).any(), "lesions overlap"
        seen |= mask
        assert np.all(phantom.volume[mask] == np.float32(finding.hu))
        if finding.structure == "liver":
            assert finding.hu < phantom.tissue_hu["liver"]  # default contrast is hypodense
        elif finding.kind == "effusion":
            assert config.effusion_hu[0] <= finding.hu <= config.effusion_hu[1]
        else:
            assert config.lung_lesion_hu[0] <= finding.hu <= config.lung_lesion_hu[1]
    labels = phantom.lesion_labels()
    assert labels.dtype == np.uint8 and np.array_equal(labels > 0, seen)


def test_lesion_size_matches_voxel_count(full_size):
    # One test at the default grid: (2.5, 1.5, 1.5) mm voxels resolve nodules of 10 mm and more.
    assert full_size.volume.shape == (128, 256, 256) and full_size.spacing == (2.5, 1.5, 1.5)
    voxel_mm3 = float(np.prod(full_size.spacing))
    checked = 0
    for seed in (5, 6, 7, 8):
        phantom = full_size if seed == 5 else generate_phantom(seed)
        for finding in phantom.findings:
            if finding.kind == "effusion" or finding.size_mm < 10:
                continue
            equivalent = (6 * finding.n_voxels * voxel_mm3 / np.pi) ** (1 / 3)
            assert 0.8 * finding.size_mm <= equivalent <= 1.12 * finding.size_mm, finding
            checked += 1
    assert checked >= 3


def test_size_ranges_and_kinds_follow_config():
    config = small(lesion_probability=1.0, effusion_probability=0.0, lesion_kinds=("nodule",), nodule_size_mm=(20, 30))
    for seed in range(3):
        phantom = generate_phantom(seed, config)
        assert {f.kind for f in phantom.findings} == {"nodule"}
        # Every lobe and the liver hold one (a nodule only shrinks when its host is too small).
        assert len(phantom.findings) == 6
        assert all(20 <= f.size_mm <= 30 for f in phantom.findings)
    masses = generate_phantom(0, small(lesion_probability=1.0, lesion_kinds=("mass",))).findings
    assert masses and all(f.kind == "mass" and f.size_mm >= 30 for f in masses)
    assert not generate_phantom(0, small(lesion_kinds=())).findings


def test_effusion_is_a_dependent_layer_at_the_lung_base():
    config = PhantomConfig(shape=MEDIUM, noise_sigma=0.0, effusion_probability=1.0, lesion_probability=0.0)
    phantom = generate_phantom(9, config)
    assert [f.structure for f in phantom.findings] == ["lung_right", "lung_left"]
    for finding, mask in zip(phantom.findings, phantom.lesion_masks, strict=True):
        assert finding.kind == "effusion"
        lung = phantom.masks[finding.structure]
        fluid, whole = centroid(mask), centroid(lung)
        assert fluid[1] > whole[1] and fluid[0] < whole[0]  # posterior and inferior
        assert mask.sum() < 0.5 * lung.sum()
        # The fluid shows inside the lower lobe's outline, so questions about that lobe mention it.
        lower = f"lung_lower_lobe_{finding.structure.split('_')[1]}"
        assert (mask & phantom.masks[lower]).any() and finding in phantom.findings_in(lower)
    for q in generate_questions(phantom):
        if q["question_type"] in ("abnormality", "region_report") and q["roi"] != "heart":
            reached = any(finding in phantom.findings_in(q["roi"]) for finding in phantom.findings)
            assert bool(re.search(r"(small|moderate|large) \w+ pleural effusion", q["answer"])) == reached, q


# ---------------------------------------------------------------------------------------------------------------
# Optional bone masks
# ---------------------------------------------------------------------------------------------------------------


def test_bone_levels_split_vertebrae_and_ribs():
    phantom = generate_phantom(0, PhantomConfig(shape=MEDIUM, bone_levels=True, **NO_LESIONS))
    masks = phantom.masks
    for prefix, union in (("vertebrae_", "vertebrae"), ("rib_", "ribs")):
        parts = [name for name in masks if name.startswith(prefix)]
        assert parts
        total = np.zeros(MEDIUM, dtype=int)
        for name in parts:
            assert name in TOTALSEGMENTATOR_V2_LABELS.values() and name in ANATOMY_PATHS
            total += masks[name]
        assert total.max() == 1 and np.array_equal(total > 0, masks[union])
    assert {f"vertebrae_T{i}" for i in range(1, 12)} <= set(masks)
    w_mid = (MEDIUM[2] - 1) / 2
    assert centroid(masks["rib_left_6"])[2] > w_mid > centroid(masks["rib_right_6"])[2]
    # Rib 1 is higher than rib 6, vertebra T1 than T6.
    assert centroid(masks["rib_left_1"])[0] > centroid(masks["rib_left_6"])[0]
    assert centroid(masks["vertebrae_T1"])[0] > centroid(masks["vertebrae_T6"])[0]


def test_ribs_can_be_left_out():
    phantom = generate_phantom(0, small(ribs=False))
    assert "ribs" not in phantom.masks and "sternum" not in phantom.masks
    assert not any(name.startswith("rib_") for name in phantom.masks)


# ---------------------------------------------------------------------------------------------------------------
# Questions
# ---------------------------------------------------------------------------------------------------------------

QUESTION_TYPES = {"presence", "abnormality", "location", "size", "region_report"}


def check_question_fields(phantom: Phantom, questions: list[dict]) -> None:
    for q in questions:
        assert set(q) == {"question", "answer", "question_type", "answer_type", "roi", "anatomy"}
        assert q["question_type"] in QUESTION_TYPES
        assert q["answer_type"] == ("closed" if q["question_type"] == "presence" else "open")
        assert q["question"].endswith(("?", ".")) and q["answer"]
        if q["roi"] is None:
            assert q["anatomy"] == "whole scan"
        else:
            assert q["roi"] in phantom.masks and q["anatomy"] == ANATOMY_PATHS[q["roi"]]
            assert ANATOMY_NAMES[q["roi"]] in q["question"]


@pytest.mark.parametrize("seed", range(8))
def test_question_answers_agree_with_findings(seed):
    phantom = generate_phantom(seed, small())
    questions = generate_questions(phantom)
    check_question_fields(phantom, questions)
    by_type = {t: [q for q in questions if q["question_type"] == t] for t in QUESTION_TYPES}
    for q in by_type["presence"]:
        present = any(f.kind == finding_kind(q["question"]) for f in phantom.findings_in(q["roi"]))
        assert q["answer"] == ("Yes." if present else "No.")
    n_yes = sum(q["answer"] == "Yes." for q in by_type["presence"])
    n_no = len(by_type["presence"]) - n_yes
    assert n_no == max(n_yes, 1) or n_no < n_yes  # as many absent as present, unless none are left to ask
    for q in by_type["abnormality"]:
        assert (q["answer"] == "No abnormality.") == (not phantom.findings_in(q["roi"]))
    assert len(by_type["size"]) == len(phantom.findings)
    for finding, q in zip(phantom.findings, by_type["size"], strict=True):
        assert q["roi"] == finding.structure and q["answer"] == f"{finding.size_mm:.0f} mm"
    assert len(by_type["location"]) == len({q["question"] for q in by_type["location"]}) <= len(phantom.findings)
    for finding in phantom.findings:  # every finding is located by one question
        assert any(ANATOMY_NAMES[finding.structure] in q["answer"] for q in by_type["location"])
    assert all(q["roi"] is None for q in by_type["location"])
    reported = {q["roi"] for q in by_type["region_report"]}
    assert {f.structure for f in phantom.findings} <= reported


def test_presence_questions_are_balanced():
    answers = []
    for seed in range(40):
        phantom = generate_phantom(seed, small())
        answers += [q["answer"] for q in generate_questions(phantom) if q["question_type"] == "presence"]
    assert set(answers) == {"Yes.", "No."}
    assert 0.4 <= answers.count("Yes.") / len(answers) <= 0.6


def test_questions_are_deterministic():
    phantom = generate_phantom(12, small())
    assert generate_questions(phantom) == generate_questions(phantom) == generate_questions(phantom, seed=12)
    texts = {tuple(q["question"] for q in generate_questions(phantom, seed=s)) for s in range(5)}
    assert len(texts) > 1  # the seed picks templates and the structures asked about


def test_questions_without_findings():
    phantom = generate_phantom(0, small(**NO_LESIONS))
    questions = generate_questions(phantom)
    check_question_fields(phantom, questions)
    assert {q["question_type"] for q in questions} == {"presence", "abnormality", "region_report"}
    assert [q["answer"] for q in questions if q["question_type"] == "presence"] == ["No."]
    assert all(q["answer"] == "No abnormality." for q in questions if q["question_type"] == "abnormality")
    assert generate_questions(generate_phantom(0, small(lesion_kinds=())))  # nothing to ask about: no crash


def test_question_wording():
    phantom = generate_phantom(3, small())
    text = " ".join(q["question"] + " " + q["answer"] for q in generate_questions(phantom))
    assert not re.search(r"\ba (8|11|18)\b", text)  # "an 8 mm", "an 11 mm"
    for q in generate_questions(phantom):
        if q["question_type"] == "size":
            assert re.fullmatch(r"\d+ mm", q["answer"])


# ---------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------


def test_save_writes_nifti_and_findings(tmp_path):
    phantom = generate_phantom(3, small(lesion_probability=0.8))
    paths = phantom.save(tmp_path / "p")
    assert paths["volume"] == tmp_path / "p" / "volume.nii.gz"
    assert set(paths) == {"volume", "lesions", "findings", *(f"masks/{name}" for name in phantom.masks)}
    assert not list((tmp_path / "p").rglob("*.tmp*"))  # atomic writes leave no temporaries

    image = nib.load(paths["volume"])
    assert image.get_data_dtype() == np.int16
    assert np.allclose(image.affine, phantom.affine[:, [2, 1, 0, 3]])  # NIfTI axes are (W, H, D)
    data = np.asarray(image.dataobj).transpose(2, 1, 0)
    assert np.array_equal(data, np.rint(phantom.volume).astype(np.int16))
    for name, mask in phantom.masks.items():
        saved = nib.load(paths[f"masks/{name}"])
        assert saved.get_data_dtype() == np.uint8
        assert np.array_equal(np.asarray(saved.dataobj).transpose(2, 1, 0), mask)
    labels = np.asarray(nib.load(paths["lesions"]).dataobj).transpose(2, 1, 0)
    assert np.array_equal(labels, phantom.lesion_labels())

    record = json.loads(paths["findings"].read_text())
    assert record["seed"] == 3 and record["shape"] == list(SMALL) and record["spacing"] == [10.0, 6.0, 6.0]
    assert len(record["findings"]) == len(phantom.findings)
    for i, (saved, finding) in enumerate(zip(record["findings"], phantom.findings, strict=True)):
        assert saved["label"] == i + 1 and saved["kind"] == finding.kind and saved["n_voxels"] == finding.n_voxels
        assert saved["anatomy"] == ANATOMY_PATHS[finding.structure]
        assert int((labels == i + 1).sum()) == finding.n_voxels


def test_saved_volume_round_trips_through_ct_io(tmp_path):
    phantom = generate_phantom(8, small())
    paths = phantom.save(tmp_path)
    loaded = load_volume(paths["volume"])
    assert loaded.shape == SMALL and loaded.spacing == phantom.spacing
    assert np.allclose(loaded.affine, phantom.affine)
    assert np.array_equal(loaded.array, np.rint(phantom.volume).astype(np.int16).astype(np.float32))
    heart = load_mask(paths["masks/heart"], like=loaded)
    assert np.array_equal(heart, phantom.masks["heart"])
