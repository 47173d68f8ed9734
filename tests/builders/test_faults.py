"""Data faults the dataset builds must report instead of loading them wrong or crashing raw (issue #7): CSVs that
are not UTF-8 or leave a quote open, ``--overwrite`` of a folder that is not a build, a user's README, temporaries
left by a kill, what ``--push_to_hub`` uploads, and local paths in ``skipped.jsonl``."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import QUIET, file_tree, read_lines, write_csv
from PIL import Image

from med3dqwen.builders.ctrate import CTRateBuilder
from med3dqwen.builders.engine import BuildArguments, BuildError, link_folder, skip_entry
from med3dqwen.builders.m3d_vqa import M3DVQABuildConfig, M3DVQABuilder, build_m3d_vqa_dataset
from med3dqwen.builders.phantom.dataset import PhantomBuildConfig, PhantomBuilder, build_phantom_dataset
from med3dqwen.builders.pmc_vqa import PMCVQABuildConfig, PMCVQABuilder, build_pmc_vqa_dataset
from med3dqwen.builders.radgenome import RadGenomeBuilder
from med3dqwen.builders.upstream import UpstreamCSV
from med3dqwen.io import save_nifti


COLUMNS = ["Volumename", "Anatomy", "Sentence"]


def read_csv(path):
    """``(rows, skipped)`` of an upstream CSV with :data:`COLUMNS`."""
    skipped: list[dict] = []
    with UpstreamCSV(path, COLUMNS) as table:
        rows = [(source, values["Sentence"]) for _, source, values in table.rows(COLUMNS, skipped)]
    return rows, skipped


# ---------------------------------------------------------------------------------------------------------------
# Upstream CSVs
# ---------------------------------------------------------------------------------------------------------------


def test_a_row_that_is_not_utf8_is_skipped_and_the_rest_read(tmp_path):
    path = tmp_path / "train_region_report.csv"
    body = "Volumename,Anatomy,Sentence\nv1,lung,Clear.\nv2,heart,Caf\xe9 ok.\nv3,liver,Normal.\n"
    path.write_bytes(body.encode("latin-1"))  # one row saved as Latin-1: byte 0xe9 is not UTF-8
    rows, skipped = read_csv(path)
    assert rows == [("train_region_report.csv:1", "Clear."), ("train_region_report.csv:3", "Normal.")]
    assert skipped == [
        {
            "reason": "malformed_row",
            "unit_id": None,
            "source": "train_region_report.csv:2",
            "rows": 1,
            "detail": "not UTF-8: bytes 0xe9 on line 3",
        }
    ]


def test_a_header_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "table.csv"
    path.write_bytes(b"Volumename,Anat\xf6my,Sentence\nv1,lung,Clear.\n")
    with pytest.raises(BuildError, match=r"table\.csv: the header is not UTF-8 \(bytes 0xf6\)"):
        read_csv(path)


def test_an_unclosed_quote_is_reported_with_the_rows_it_swallows(tmp_path):
    path = tmp_path / "table.csv"
    # Row 2 opens a quote in its last field and never closes it: a plain csv read returns ONE row whose Sentence
    # holds the three lines after it, with the header's field count, so it would load silently wrong.
    lines = ["Volumename,Anatomy,Sentence", "v1,lung,Clear.", 'v2,heart,"Enlarged.', "v3,liver,Normal.", ""]
    lines += ["v4,spleen,Normal.", "v5,aorta,Normal."]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows, skipped = read_csv(path)
    assert rows == [("table.csv:1", "Clear.")]
    assert [(e["reason"], e["source"], e["rows"]) for e in skipped] == [("malformed_row", "table.csv:2", 4)]
    assert "quote opened in the row on line 3 is never closed: lines 3-7" in skipped[0]["detail"]


def test_quoted_fields_over_several_lines_are_still_read(tmp_path):
    path = tmp_path / "table.csv"
    write_csv(path, COLUMNS, [["v1", "lung", "Line one.\nLine two."], ["v2", "heart", 'A "quoted" word.']])
    rows, skipped = read_csv(path)
    assert rows == [("table.csv:1", "Line one.\nLine two."), ("table.csv:2", 'A "quoted" word.')] and not skipped
    # Without a final newline, and with a quoted last field.
    path.write_text('Volumename,Anatomy,Sentence\nv1,lung,"Clear, normal."', encoding="utf-8")
    assert read_csv(path) == ([("table.csv:1", "Clear, normal.")], [])


def test_an_unclosed_quote_in_the_header_names_the_file(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text('Volumename,"Anatomy,Sentence\nv1,lung,Clear.\n', encoding="utf-8")
    with pytest.raises(BuildError, match=r"table\.csv: the header has a quote that is never closed"):
        read_csv(path)


# ---------------------------------------------------------------------------------------------------------------
# Fixture builds: a miniature M3D-VQA download (two images, one with a TotalSegmentator liver mask) and PMC-VQA v2
# ---------------------------------------------------------------------------------------------------------------

M3D_HEADER = ["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D"]
M3D_HEADER += ["Answer", "Answer Choice"]
IMG1 = "M3D_Cap_npy/ct_case/000001/Axial.npy"
IMG2 = "M3D_Cap_npy/ct_case/000002/Axial.npy"
PLANE = "Which plane is the image viewed in?"
M3D_ROWS = {
    "M3D_VQA_train.csv": [
        [IMG1, "Report.", "4", "What abnormality is seen in the liver?", "Cyst", "Mass", "Abscess", "NA", "Mass", "B"],
        [IMG1, "Report.", "1", PLANE, "Axial", "Sagittal", "Coronal", "Oblique", "Axial", "A"],
    ],
    "M3D_VQA_val.csv": [[IMG2, "Report.", "1", PLANE, "Axial", "Sagittal", "Coronal", "Oblique", "Axial", "A"]],
    "M3D_VQA_test.csv": [],
}
M3D_MASKED = {"prompt": "red", "mask_source": "totalsegmentator_files", "write_png": "montage", "thickness": 1}


def make_m3d_root(root: Path) -> Path:
    for name, rows in M3D_ROWS.items():
        write_csv(root / name, M3D_HEADER, rows)
    rng = np.random.default_rng(0)
    for rel in (IMG1, IMG2):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(root / rel, rng.random((1, 8, 32, 32), dtype=np.float32))
    liver = np.zeros((8, 32, 32), np.uint8)
    liver[2:6, 8:20, 10:24] = 1
    save_nifti(root / "ts_masks" / IMG1[: -len(".npy")] / "liver.nii.gz", liver)
    return root


def m3d_config(root: Path, out: Path, **kwargs) -> M3DVQABuildConfig:
    return M3DVQABuildConfig(data_root=str(root), output_dir=str(out), **kwargs)


@pytest.fixture(scope="module")
def m3d_root(tmp_path_factory) -> Path:
    return make_m3d_root(tmp_path_factory.mktemp("m3d_root"))


def test_a_build_skips_a_row_that_is_not_utf8_and_strict_names_file_and_line(tmp_path):
    root = make_m3d_root(tmp_path / "root")
    path = root / "M3D_VQA_train.csv"
    latin = "Which plane is the image viewed in\xbf".encode("cp1252")  # an inverted question mark: byte 0xbf
    path.write_bytes(path.read_bytes().replace(PLANE.encode(), latin))
    summary = build_m3d_vqa_dataset(m3d_config(root, tmp_path / "out"), QUIET)
    assert summary.skipped == {"malformed_row": 1} and summary.questions["train"] == 2  # the other row, both modes
    [entry] = read_lines(tmp_path / "out" / "skipped.jsonl")
    assert (entry["source"], entry["detail"]) == ("M3D_VQA_train.csv:2", "not UTF-8: bytes 0xbf on line 3")
    strict = BuildArguments(progress=False, strict=True)
    with pytest.raises(BuildError, match=r"--strict: malformed_row \(M3D_VQA_train\.csv:2\): not UTF-8.* line 3"):
        build_m3d_vqa_dataset(m3d_config(root, tmp_path / "strict"), strict)


# ---------------------------------------------------------------------------------------------------------------
# The output folder: --overwrite and a user's README.md
# ---------------------------------------------------------------------------------------------------------------


def test_overwrite_refuses_a_folder_that_no_build_wrote(m3d_root, tmp_path):
    out = tmp_path / "thesis"
    (out / "data").mkdir(parents=True)
    (out / "data" / "results.csv").write_text("mine\n")
    (out / "README.md").write_text("# My thesis\n")
    before = file_tree(out)
    overwrite = BuildArguments(progress=False, overwrite=True)
    with pytest.raises(BuildError, match=r"--overwrite would delete data, README\.md in .*thesis, but no build wrote"):
        build_m3d_vqa_dataset(m3d_config(m3d_root, out), overwrite)
    assert file_tree(out) == before and not (out / ".work").exists()
    # A folder holding nothing a build writes is fine to build into, and its other files stay.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep\n")
    build_m3d_vqa_dataset(m3d_config(m3d_root, other), overwrite)
    assert (other / "notes.txt").read_text() == "keep\n" and (other / "data" / "train.jsonl").is_file()
    # Our own build is overwritten as before.
    (other / "data" / "stale.jsonl").write_text("{}\n")
    build_m3d_vqa_dataset(m3d_config(m3d_root, other), overwrite)
    assert not (other / "data" / "stale.jsonl").exists() and (other / "notes.txt").is_file()


def test_a_users_readme_is_never_replaced(m3d_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("# My notes\n")
    with pytest.raises(BuildError, match=r"already holds README\.md, which no build wrote.*move it away"):
        build_m3d_vqa_dataset(m3d_config(m3d_root, out), QUIET)
    assert (out / "README.md").read_text() == "# My notes\n" and sorted(p.name for p in out.iterdir()) == ["README.md"]
    # The card of our own build is rewritten by a re-run (resume, merge) as before.
    (out / "README.md").unlink()
    build_m3d_vqa_dataset(m3d_config(m3d_root, out), QUIET)
    card = (out / "README.md").read_bytes()
    build_m3d_vqa_dataset(m3d_config(m3d_root, out), QUIET)
    assert (out / "README.md").read_bytes() == card


# ---------------------------------------------------------------------------------------------------------------
# Temporaries of a killed build
# ---------------------------------------------------------------------------------------------------------------


def test_resume_removes_every_temporary_a_killed_build_leaves(m3d_root, tmp_path):
    out = tmp_path / "out"
    config = {"mask_dir": str(m3d_root / "ts_masks"), **M3D_MASKED}
    build_m3d_vqa_dataset(m3d_config(m3d_root, out, **config), QUIET)
    ref = file_tree(out)
    shutil.rmtree(out / "data")  # killed before the merge wrote data/
    # Killed while writing .work/config.json (atomic_output's temporary), while replacing the source/images link
    # (link_folder's temporary symlink, of another process id), and during a merge.
    (out / ".work" / ".config.json.ab12cd_9.tmp.json").write_text("{")
    (out / "source" / ".images.4242.tmp").symlink_to(m3d_root, target_is_directory=True)
    (out / ".README.md.zz99yy88.tmp.md").write_text("---")
    (out / ".skipped.jsonl.k3j4h5g6.tmp.jsonl").write_text("{")
    build_m3d_vqa_dataset(m3d_config(m3d_root, out, **config), QUIET)
    assert file_tree(out) == ref
    assert sorted(p.name for p in (out / "source").iterdir()) == ["images"]
    assert sorted(p.name for p in (out / ".work").iterdir()) == ["config.json", "units"]


# ---------------------------------------------------------------------------------------------------------------
# --push_to_hub: exactly what datasets_scripts/README.md says
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    """``huggingface_hub.HfApi`` replaced by a recorder of the ``upload_folder`` arguments (no network)."""
    import huggingface_hub

    uploads: list[dict] = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            pass

        def upload_folder(self, **kwargs):
            uploads.append(kwargs)
            return "https://hub/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return uploads


def uploaded_files(upload: dict) -> list[str]:
    """The files ``HfApi.upload_folder`` would upload with these arguments: the folder listed as it lists it, then
    filtered by ``huggingface_hub``'s own ``filter_repo_objects`` with the exact patterns the push passed."""
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(upload["folder_path"])
    files = [p.relative_to(folder).as_posix() for p in sorted(folder.glob("**/*")) if p.is_file()]
    allow, ignore = upload.get("allow_patterns"), upload.get("ignore_patterns")
    return list(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore))


PUSH = BuildArguments(progress=False, push_to_hub=True, hub_repo_id="me/data")


def test_push_of_a_licence_restricted_build_uploads_only_the_card_and_jsonl(m3d_root, tmp_path, fake_hub):
    out = tmp_path / "out"
    (out / ".work").mkdir(parents=True)  # a temporary of a killed configuration write never goes up either
    (out / ".work" / ".config.json.abcd1234.tmp.json").write_text("{")
    build_m3d_vqa_dataset(m3d_config(m3d_root, out, mask_dir=str(m3d_root / "ts_masks"), **M3D_MASKED), PUSH)
    [upload] = fake_hub
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    # The build holds the mask it used and the prompt PNG drawn on the image: renderings of M3D's images.
    assert any(f.startswith("masks/") for f in on_disk) and any(f.startswith("prompts/") for f in on_disk)
    assert uploaded_files(upload) == [
        *["README.md", "data/train.jsonl", "data/validation.jsonl", "filtered.jsonl", "skipped.jsonl"]
    ]


EVERY_KIND = [
    *["README.md", "data/train.jsonl", "data/test.jsonl", "skipped.jsonl", "filtered.jsonl", ".work/config.json"],
    *[".work/units/p1.json", "source/images/M3D_Cap_npy/a.npy", "source/train/train_1/x.nii.gz"],
    *["prompts/p1/lung_montage.png", "masks/p1/liver.nii.gz", "volumes/p1/volume.nii.gz"],
]
CARD_AND_JSONL = ["README.md", "data/test.jsonl", "data/train.jsonl", "filtered.jsonl", "skipped.jsonl"]


@pytest.mark.parametrize(
    ("builder", "expected"),
    [
        (RadGenomeBuilder, CARD_AND_JSONL),
        (CTRateBuilder, CARD_AND_JSONL),
        (M3DVQABuilder, CARD_AND_JSONL),
        (PMCVQABuilder, CARD_AND_JSONL),
        (PhantomBuilder, [*CARD_AND_JSONL, "prompts/p1/lung_montage.png", "volumes/p1/volume.nii.gz"]),
    ],
)
def test_hub_rule_of_each_builder(builder, expected):
    """The rule each builder declares, over every kind of file a build of any builder can hold: never ``source/``
    (links to the upstream data) nor renderings of licence-restricted data; the phantom's synthetic files go up."""
    from huggingface_hub.utils import filter_repo_objects

    kept = filter_repo_objects(EVERY_KIND, allow_patterns=list(builder.hub_allow_patterns), ignore_patterns=".work/*")
    assert sorted(kept) == sorted(expected)


def test_push_of_the_phantom_uploads_its_synthetic_volumes(tmp_path, fake_hub):
    out = tmp_path / "phantom"
    build_phantom_dataset(PhantomBuildConfig(output_dir=str(out), num_volumes=2, shape=(32, 64, 64)), PUSH)
    [upload] = fake_hub
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert uploaded_files(upload) == [f for f in on_disk if not f.startswith(".work/")]
    assert any(f.startswith("volumes/") for f in on_disk) and any(f.startswith("prompts/") for f in on_disk)


# ---------------------------------------------------------------------------------------------------------------
# No local paths in skipped.jsonl
# ---------------------------------------------------------------------------------------------------------------

PMC_HEADER = ["index", "Figure_path", "Caption", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer"]
PMC_CT = "Axial CT of the chest."


def make_pmc_root(root: Path) -> Path:
    """PMC-VQA v2 in miniature: a good figure, a missing one and one that does not decode."""
    rows = [
        [str(i), f"PMC10{i}_F1.jpg", PMC_CT, "What is shown?", "A:Cyst", "B:Mass", "C:Abscess", "D:None", "A"]
        for i in range(3)
    ]
    write_csv(root / "train_2.csv", PMC_HEADER, rows)
    write_csv(root / "test_2.csv", PMC_HEADER, [])
    (root / "images_2").mkdir(parents=True)
    Image.fromarray(np.full((20, 24), 128, np.uint8)).save(root / "images_2" / "PMC100_F1.jpg")
    (root / "images_2" / "PMC102_F1.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # PIL's error quotes the full path
    return root


def test_skipped_entries_name_no_local_paths(tmp_path):
    root = make_pmc_root(tmp_path / "pmc")
    out = tmp_path / "out"
    summary = build_pmc_vqa_dataset(PMCVQABuildConfig(data_root=str(root), output_dir=str(out)), QUIET)
    assert summary.skipped == {"missing_volume": 1, "unreadable_volume": 1}
    text = (out / "skipped.jsonl").read_text()
    assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text
    details = {entry["unit_id"]: entry["detail"] for entry in read_lines(out / "skipped.jsonl")}
    assert details["PMC101_F1"] == "PMC101_F1.jpg not found in source/images"
    assert "cannot identify image file 'source/images/PMC102_F1.jpg'" in details["PMC102_F1"]


def test_local_paths_are_replaced_only_as_whole_components(tmp_path):
    from med3dqwen.builders import engine

    upstream = tmp_path / "images"
    upstream.mkdir()
    out = tmp_path / "out"
    link_folder(out, "source/images", upstream)
    local = engine._local_paths(out)
    entry = skip_entry("unreadable_volume", f"{upstream}/a.jpg; {upstream}_2/b.jpg; in {upstream}; {out}/prompts/x")
    assert engine._without_local_paths(entry, local)["detail"] == (
        f"source/images/a.jpg; {upstream}_2/b.jpg; in source/images; prompts/x"
    )


def test_a_no_chest_list_that_is_not_utf8_names_its_bad_line(tmp_path):
    from med3dqwen.builders.ctrate import read_name_list

    path = tmp_path / "no_chest_train.txt"
    path.write_bytes(b"train_1_a_1.nii.gz\ntrain_2_b\ntrain_3\xe9_a_1.nii.gz\n")
    names, bad = read_name_list(path)
    assert names == {"train_1_a_1", "train_2_b"} and bad == ["train_3\\xe9_a_1.nii.gz"]
