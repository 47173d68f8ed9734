"""What a built dataset folder gives the ecosystem: load_dataset from a moved copy, TRL's collator, --format paper,
and a card that names no path of the machine that built it (phantom builder, small volumes)."""

import json
import shutil
from dataclasses import replace

import datasets
import pytest
from helpers import read_records
from PIL import Image
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from med3dqwen.builders.engine import BuildArguments, BuildError, merge_build
from med3dqwen.builders.phantom.dataset import PhantomBuildConfig, PhantomBuilder, build_phantom_dataset
from med3dqwen.data.schema import message_texts, record_features, resolve_media, to_format
from med3dqwen.processing.image_processing_med3d_qwen import Med3DQwenImageProcessor
from med3dqwen.processing.processing_med3d_qwen import Med3DQwenProcessor
from med3dqwen.processing.tokenization_med3d_qwen import load_qwen2_5_tokenizer


SMALL = (32, 64, 64)
VISION_START = 151652


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("records") / "phantom_small"
    config = PhantomBuildConfig(output_dir=str(out), num_volumes=3, seed=2, shape=SMALL)
    build_phantom_dataset(config, BuildArguments(progress=False))
    return out, config


@pytest.fixture(scope="module")
def moved(built, tmp_path_factory):
    """A copy of the built folder somewhere else, loaded from a third folder; the original is out of reach."""
    out, _ = built
    copy = tmp_path_factory.mktemp("elsewhere") / "copied_phantom"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns(".work"))
    hidden = out.with_name(out.name + "_hidden")
    out.rename(hidden)  # any path still pointing at the original folder would now fail
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        ds = resolve_media(datasets.load_dataset(str(copy)), str(copy))
        rows = [row for split in ds.values() for row in split]
    hidden.rename(out)
    return copy, ds, rows


def test_load_dataset_of_a_moved_copy_decodes_volumes_masks_and_pngs(moved):
    copy, ds, rows = moved
    first = next(iter(ds.values()))
    assert first.features["volume_path"] == datasets.Nifti() and first.features["mask_path"] == datasets.Nifti()
    assert first.features["prompt_pngs"] == datasets.List(datasets.Image())
    # the card's declared types, not inferred ones (inference makes the mixed content parts a Json column)
    assert first.features["messages"] == record_features()["messages"]
    outlined = [row for row in rows if row["roi"] is not None]
    whole = [row for row in rows if row["roi"] is None]
    assert outlined and whole
    for row in outlined:
        assert row["volume_path"].shape == row["mask_path"].shape == SMALL[::-1]  # nibabel's (x, y, z)
        assert row["volume_path"].get_filename().startswith(str(copy))
        assert len(row["prompt_pngs"]) == 1 and isinstance(row["prompt_pngs"][0], Image.Image)
    for row in whole:
        assert row["mask_path"] is None and row["prompt_pngs"] == []
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant"]
    assert [part["type"] for part in rows[0]["messages"][1]["content"]] == ["image", "text"]


def test_trl_collator_batches_the_records(moved):
    _, _, rows = moved
    # The plain processor: TRL calls it with images= (one list per sample), which it reads as the volumes.
    processor = Med3DQwenProcessor(
        Med3DQwenImageProcessor(volume_size=(8, 16, 16)), load_qwen2_5_tokenizer(), num_visual_tokens=4
    )
    examples = [{"messages": row["messages"], "images": [row["volume_path"]]} for row in rows[:2]]
    batch = DataCollatorForVisionLanguageModeling(processor)(examples)
    assert batch["pixel_values"].shape == (2, 1, 8, 16, 16)
    assert (batch["input_ids"] == VISION_START).sum(dim=1).tolist() == [1, 1]  # one image block per conversation
    assert batch["labels"].shape == batch["input_ids"].shape
    question = message_texts(rows[0])["user"]
    assert question in processor.tokenizer.decode(batch["input_ids"][0])


def test_format_paper_writes_the_papers_layout(built, tmp_path):
    out, config = built
    paper = tmp_path / "paper"
    shutil.copytree(out, paper)
    config = replace(config, output_dir=str(paper))
    build_phantom_dataset(config, BuildArguments(progress=False, merge_only=True, format="paper"))
    records = read_records(paper)
    assert records == [to_format(r, "paper") for r in read_records(out)]
    for record in records:
        assert [m["role"] for m in record["messages"]] == ["system", "user", "vision", "assistant"]
        assert record["messages"][2]["content"].startswith(f"nifti:{record['volume_path']}; prompt_png:[")
    card = (paper / "README.md").read_text()
    assert "the paper's layout" in card and "`[system, user, vision, assistant]`" in card
    loaded = next(iter(datasets.load_dataset(str(paper)).values()))
    assert loaded.features == record_features({"anatomy": datasets.Value("string")}, "paper")
    assert message_texts(loaded[0]) == message_texts(records[0])


def test_card_names_a_relative_path_or_a_hub_id(built, tmp_path, monkeypatch, capsys):
    out, config = built
    card = (out / "README.md").read_text()
    assert str(out) not in card and str(out.parent) not in card
    assert 'folder = "./phantom_small"' in card and "resolve_media(ds, folder)" in card
    quick_start = card.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(out.parent)  # the quick start runs as written from the folder that holds the dataset
    namespace = {}
    exec(quick_start, namespace)
    assert " -> " in capsys.readouterr().out and namespace["volume"].shape == SMALL[::-1]
    assert "dataset_info:" in card and "- name: prompt_pngs" in card
    hub = tmp_path / "hub"
    shutil.copytree(out, hub)
    merge_build(PhantomBuilder(replace(config, output_dir=str(hub))), hub,
                hub_repo_id="someone/phantom-vqa")  # fmt: skip
    card = (hub / "README.md").read_text()
    assert 'snapshot_download("someone/phantom-vqa", repo_type="dataset")' in card and str(tmp_path) not in card
    with pytest.raises(ValueError, match="Hub dataset id"):
        merge_build(PhantomBuilder(config), hub, hub_repo_id=str(hub))


def test_merge_refuses_units_of_the_old_layout(built, tmp_path):
    out, config = built
    old = tmp_path / "old"
    shutil.copytree(out, old)
    unit = next((old / ".work" / "units").glob("*.json"))
    payload = json.loads(unit.read_text())
    payload["records"] = [to_format(r, "paper") for r in payload["records"]]
    unit.write_text(json.dumps(payload))
    with pytest.raises(BuildError, match="older layout.*--overwrite"):
        merge_build(PhantomBuilder(replace(config, output_dir=str(old))), old)


def test_bad_format_is_refused():
    with pytest.raises(ValueError, match="format must be one of"):
        BuildArguments(format="chatml")
