"""Vista3DSource: MONAI's VISTA-3D network and the bundle's pre/post-processing, with random or fake weights.

No released weights are available offline (``monai.bundle.download`` needs the internet), so these tests check the
pipeline, not segmentation quality: the real ``vista3d132`` network (narrow, ``encoder_embed_dim=8``, random weights)
runs end to end; a fake network with VISTA-3D's ``forward`` signature whose logits are a known function of the input
intensity and of the class prompt checks grid alignment and class selection through ``Invertd``.
"""

import json
import warnings

import numpy as np
import pytest
import torch

from med3dqwen.anatomy import VISTA3D_EVERYTHING_LABELS, VISTA3D_LABELS, VISTA3D_SUBCLASS, VISTA3D_SUPPORTED
from med3dqwen.processing.ct_io import CorruptFileError, CTVolume, load_volume
from med3dqwen.segmentation import UnknownStructureError, get_mask_source
from med3dqwen.segmentation.vista3d import VISTA3D_BUNDLE_DEFAULTS, Vista3DSource


monai = pytest.importorskip("monai")
from monai.apps.vista3d.sampler import MERGE_LIST, SPECIAL_INDEX  # noqa: E402
from monai.networks.nets import vista3d132  # noqa: E402


SMALL = {"encoder_embed_dim": 8, "resample_spacing": (4.5, 4.5, 4.5), "patch_size": (32, 32, 32)}
A_MIN, A_MAX = VISTA3D_BUNDLE_DEFAULTS["intensity_range"]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


class IntensityNet(torch.nn.Module):
    """Stands in for VISTA-3D: the logit of every prompted class is ``(x - 0.5) * 20`` for the scaled intensity x,
    so a single prompt segments HU > the middle of the bundle's intensity range; ``positive`` limits the classes."""

    def __init__(self, positive: set[int] | None = None):
        super().__init__()
        self.positive = positive
        self.calls = 0

    def forward(self, input_images, patch_coords=None, class_vector=None, transpose=False, **kwargs):
        self.calls += 1
        logits = (input_images - 0.5) * 20  # (1, 1, X, Y, Z)
        channels = []
        for label in class_vector[:, 0].tolist():
            on = self.positive is None or label in self.positive
            channels.append(logits if on else torch.full_like(logits, -10.0))
        out = torch.cat(channels, dim=0)  # (N, 1, X, Y, Z), VISTA-3D's layout before transpose
        return out.transpose(0, 1) if transpose else out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions gain nothing from intra-op threads, and on a shared CPU spinning threads slow them down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sphere_volume():
    """A (21, 37, 45) volume at (3, 2, 2.5) mm: soft tissue with an off-centre dense sphere (values straddle the
    middle of the intensity range, so thresholding the resampled image gives the sphere back)."""
    spacing = (3.0, 2.0, 2.5)
    d, h, w = np.meshgrid(*(np.arange(n) * s for n, s in zip((21, 37, 45), spacing, strict=True)), indexing="ij")
    hu = np.full(d.shape, -1000.0, np.float32)
    hu[((d - 30) / 28) ** 2 + ((h - 36) / 30) ** 2 + ((w - 56) / 50) ** 2 < 1] = -200.0
    sphere = ((d - 36) / 12) ** 2 + ((h - 28) / 12) ** 2 + ((w - 80) / 14) ** 2 < 1
    hu[sphere] = 300.0
    return CTVolume.from_array(hu, spacing=spacing), sphere


@pytest.fixture(scope="module")
def random_source():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # random weights are asked for, so nothing to warn about
        source = Vista3DSource(**SMALL, random_weights=True)
    assert source.pretrained is False
    return source


# ---------------------------------------------------------------------------------------------------------------
# The class table
# ---------------------------------------------------------------------------------------------------------------


def test_label_table_matches_the_bundle_and_monai():
    assert sorted(VISTA3D_LABELS) == list(range(1, 133)) and len(set(VISTA3D_LABELS.values())) == 132
    assert len(VISTA3D_SUPPORTED) == 127 and len(VISTA3D_EVERYTHING_LABELS) == 117
    assert set(VISTA3D_EVERYTHING_LABELS) <= VISTA3D_SUPPORTED
    # Ids named in MONAI's own VISTA-3D sampler comments: "hepatic tumor and vessel merge into liver",
    # "pancreatic tumor merge into pancreas", "overlap with trachea merge into airway".
    assert VISTA3D_LABELS[1] == "liver" and {VISTA3D_LABELS[i] for i in MERGE_LIST[1]} == {
        "hepatic vessel",
        "hepatic tumor",
    }
    assert VISTA3D_LABELS[4] == "pancreas" and [VISTA3D_LABELS[i] for i in MERGE_LIST[4]] == ["pancreatic tumor"]
    assert VISTA3D_LABELS[132] == "airway" and [VISTA3D_LABELS[i] for i in MERGE_LIST[132]] == ["trachea"]
    special = {VISTA3D_LABELS[i] for i in SPECIAL_INDEX}  # tumours, vessels, airway and bone lesions
    assert special == {
        "lung tumor", "pancreatic tumor", "hepatic vessel", "hepatic tumor", "colon cancer primaries", "trachea",
        "bone lesion",
    }  # fmt: skip
    assert vista3d132(encoder_embed_dim=8).point_head.last_supported == max(VISTA3D_LABELS)
    assert [VISTA3D_LABELS[i] for i in VISTA3D_SUBCLASS[2]] == ["left kidney", "right kidney"]
    assert all(VISTA3D_LABELS[i].endswith("lobe") for i in VISTA3D_SUBCLASS[20])
    assert VISTA3D_LABELS[33] == "vertebrae L5" and VISTA3D_LABELS[56] == "vertebrae C1"
    assert VISTA3D_LABELS[63] == "left rib 1" and VISTA3D_LABELS[86] == "right rib 12"


def test_class_ids_from_any_vocabulary(random_source):
    assert random_source.class_ids("liver") == ([1], ["liver"])
    assert random_source.class_ids("lung_left")[0] == [28, 29]
    assert random_source.class_ids("right lung upper lobe")[0] == [30]
    assert random_source.class_ids("thoracic vertebrae 7 (t7)")[0] == [43]
    assert random_source.class_ids("trachea and bronchie")[0] == [132]
    assert random_source.class_ids("id:3") == ([3], ["spleen"])
    assert random_source.output_ids([20, 1]) == [28, 29, 30, 31, 32, 1]


@pytest.mark.parametrize(
    ("name", "message"),
    [("livr", "did you mean"), ("rectum", "zero-shot"), ("vertebrae L6", "zero-shot"), ("mediastinal tissue", "not a"),
     ("id:999", "no such")],
)  # fmt: skip
def test_unknown_or_unsupported_classes(random_source, name, message):
    with pytest.raises(UnknownStructureError, match=message):
        random_source.class_ids(name)


# ---------------------------------------------------------------------------------------------------------------
# The real network with random weights
# ---------------------------------------------------------------------------------------------------------------


def test_random_weights_run_end_to_end_on_the_input_grid(random_source, sphere_volume):
    volume, _ = sphere_volume
    results = random_source.get_masks(volume, ["liver", "lung_left", "lung"])
    for result in results.values():
        assert result.mask.shape == volume.shape and result.mask.dtype == bool and result.source == "vista3d"
    assert results["lung_left"].components == ("left lung upper lobe", "left lung lower lobe")
    assert results["lung"].resolved_name == "lung"
    # One label map: lung (classes 28-32) contains its left lobes (28, 29) and never overlaps the liver (1).
    assert not (results["lung_left"].mask & ~results["lung"].mask).any()
    assert not (results["liver"].mask & results["lung"].mask).any()
    single = random_source.get_mask(volume, "lung_left").mask  # same prompts (28, 29) → same label map
    assert np.array_equal(single, random_source.get_masks(volume, ["lung_left"])["lung_left"].mask)


def test_real_ct_grid_and_orientation(random_source, real_ct):
    volume = load_volume(real_ct / "totalseg_example_ct_sm/example_ct_sm.nii.gz")  # RAS file, (S, P, L) array
    coarse = Vista3DSource(network=random_source.network, resample_spacing=(9.0, 9.0, 9.0), patch_size=(32, 32, 32))
    labels = coarse.predict(volume, [1, 3])
    assert labels.shape == volume.shape and set(np.unique(labels)) <= {0, 1, 3}


# ---------------------------------------------------------------------------------------------------------------
# Alignment and class selection with a network of known output
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spacing", "min_dice"), [((4.5, 4.5, 4.5), 0.85), ((2.0, 2.0, 2.0), 0.9)])
def test_masks_come_back_on_the_input_grid(sphere_volume, spacing, min_dice):
    volume, sphere = sphere_volume
    source = Vista3DSource(network=IntensityNet(), resample_spacing=spacing, patch_size=(32, 32, 32))
    mask = source.get_mask(volume, "liver").mask
    assert dice(mask, sphere) > min_dice  # resampled to `spacing` in RAS and back (measured 0.89 / 0.95)
    assert dice(mask, sphere[:, :, ::-1]) < 0.1 and dice(mask, sphere[::-1]) < 0.5  # not flipped


def test_identity_spacing_is_exact(sphere_volume):
    volume, _ = sphere_volume
    source = Vista3DSource(network=IntensityNet(), resample_spacing=volume.spacing, patch_size=(32, 32, 32))
    threshold = A_MIN + 0.5 * (A_MAX - A_MIN)
    assert np.array_equal(source.get_mask(volume, "liver").mask, volume.array > threshold)


def test_channels_map_back_to_the_requested_classes(sphere_volume):
    volume, sphere = sphere_volume
    source = Vista3DSource(
        network=IntensityNet(positive={3}), **{k: SMALL[k] for k in ("resample_spacing", "patch_size")}
    )
    results = source.get_masks(volume, ["liver", "spleen"])  # prompts [1, 3]: only spleen's logits are positive
    assert results["liver"].empty and dice(results["spleen"].mask, sphere) > 0.85
    lobes = Vista3DSource(network=IntensityNet(positive={30}), resample_spacing=(4.5,) * 3, patch_size=(32,) * 3)
    by_side = lobes.get_masks(volume, ["lung_left", "lung_right"])
    assert by_side["lung_left"].empty and not by_side["lung_right"].empty
    assert not lobes.get_mask(volume, "lung").empty  # class 20 expanded to 28-32 by VistaPreTransformd


def test_volume_without_foreground_skips_the_crop():
    volume = CTVolume.from_array(np.full((12, 20, 20), -1000.0, np.float32), spacing=(3.0, 3.0, 3.0))
    source = Vista3DSource(network=IntensityNet(), resample_spacing=(4.5,) * 3, patch_size=(32,) * 3)
    result = source.get_mask(volume, "liver")
    assert result.empty and result.mask.shape == volume.shape


# ---------------------------------------------------------------------------------------------------------------
# Bundles
# ---------------------------------------------------------------------------------------------------------------


def write_bundle(root, state_dict, inference=None, wrap=False):
    (root / "models").mkdir(parents=True)
    torch.save({"model": state_dict} if wrap else state_dict, root / "models" / "model.pt")
    if inference is not None:
        (root / "configs").mkdir()
        (root / "configs" / "inference.json").write_text(json.dumps(inference))
    return root


@pytest.mark.parametrize("wrap", [False, True])
def test_bundle_weights_and_settings_are_loaded(tmp_path, wrap):
    torch.manual_seed(1)
    reference = vista3d132(encoder_embed_dim=8)
    inference = {
        "resample_spacing": [4.5, 4.5, 4.5],
        "patch_size": [32, 32, 32],
        "inferer": {"overlap": 0.25},
        "preprocessing_transforms": [
            {"_target_": "CropForegroundd", "margin": 4},
            {"_target_": "ScaleIntensityRanged", "a_min": -1000, "a_max": 1000},
        ],
        "subclass": {"2": [14, 5], "21": "$list(range(33, 57))"},  # expressions are not evaluated
    }
    bundle = write_bundle(tmp_path / "vista3d", reference.state_dict(), inference, wrap=wrap)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no random-weights warning
        source = Vista3DSource(bundle, encoder_embed_dim=8)
    assert source.pretrained is True
    for key, value in reference.state_dict().items():
        assert torch.equal(source.network.state_dict()[key], value), key
    assert source.settings["patch_size"] == (32, 32, 32) and source.settings["overlap"] == 0.25
    assert source.settings["crop_margin"] == 4 and source.settings["intensity_range"] == (-1000.0, 1000.0)
    assert source.subclass[21] == VISTA3D_SUBCLASS[21]
    assert Vista3DSource(bundle, encoder_embed_dim=8, patch_size=(64, 64, 64)).settings["patch_size"] == (64, 64, 64)


def test_random_weights_must_be_asked_for(tmp_path):
    needed = r"bundle_dir=.*models/model\.pt.*monai\.bundle\.download.*random_weights=True"
    with pytest.raises(ValueError, match=needed):
        Vista3DSource(**SMALL)
    with pytest.raises(ValueError, match="bundle_dir=.*random_weights"):
        get_mask_source("vista3d", **SMALL)
    bundle = write_bundle(tmp_path / "b", vista3d132(encoder_embed_dim=8).state_dict())
    with pytest.raises(ValueError, match="random_weights=True contradicts bundle_dir"):
        Vista3DSource(bundle, **SMALL, random_weights=True)
    with pytest.raises(ValueError, match="random_weights=True contradicts network"):
        Vista3DSource(network=IntensityNet(), random_weights=True)


def test_missing_bundle_folder_is_named(tmp_path):
    with pytest.raises(CorruptFileError, match=str(tmp_path / "nowhere")):
        Vista3DSource(tmp_path / "nowhere", encoder_embed_dim=8)


def test_bundle_without_weights_names_the_expected_file(tmp_path):
    (tmp_path / "vista3d" / "configs").mkdir(parents=True)
    with pytest.raises(CorruptFileError, match=r"models/model\.pt.*monai\.bundle\.download"):
        Vista3DSource(tmp_path / "vista3d", encoder_embed_dim=8)


def test_damaged_or_foreign_weights_are_rejected(tmp_path):
    bundle = tmp_path / "damaged"
    (bundle / "models").mkdir(parents=True)
    (bundle / "models" / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptFileError, match="cannot read VISTA-3D weights"):
        Vista3DSource(bundle, encoder_embed_dim=8)
    other = write_bundle(tmp_path / "other", vista3d132(encoder_embed_dim=16).state_dict())
    with pytest.raises(CorruptFileError, match="do not fit"):
        Vista3DSource(other, encoder_embed_dim=8)


def test_factory_builds_vista3d(tmp_path):
    bundle = write_bundle(tmp_path / "b", vista3d132(encoder_embed_dim=8).state_dict())
    source = get_mask_source("vista3d", bundle_dir=bundle, encoder_embed_dim=8)
    assert isinstance(source, Vista3DSource) and source.source_name == "vista3d"


@pytest.mark.slow
def test_released_size_network_with_random_weights(sphere_volume):
    volume, _ = sphere_volume
    torch.manual_seed(0)
    source = Vista3DSource(resample_spacing=(1.5, 1.5, 1.5), patch_size=(64, 64, 64), random_weights=True)
    assert sum(p.numel() for p in source.network.parameters()) > 200e6  # the 218M-parameter vista3d132
    result = source.get_mask(volume, "spleen")
    assert result.mask.shape == volume.shape
