"""load_local_dataset: every folder (and every rebuild of one) reads its own rows, never another's cache."""

import json
import os

import datasets

from med3dqwen.data.loading import load_local_dataset, local_cache_dir


CARD = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train.jsonl\n---\n"


def write_folder(folder, values, mtime=None):
    """A built-dataset-like folder: a card with relative data_files (as our builders write) and one JSONL split."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(CARD)
    data = folder / "data" / "train.jsonl"
    data.write_text("".join(json.dumps({"x": value}) + "\n" for value in values))
    if mtime is not None:
        os.utime(data, ns=(mtime, mtime))
    return folder


def test_same_name_folders_and_rebuilds_load_their_own_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    first = write_folder(tmp_path / "a" / "phantom", [1, 1, 1])
    second = write_folder(tmp_path / "b" / "phantom", [2, 2, 2, 2, 2])
    assert load_local_dataset(first)["train"]["x"] == [1, 1, 1]
    assert load_local_dataset(second)["train"]["x"] == [2, 2, 2, 2, 2]  # plain load_dataset gives [1, 1, 1] here
    before = local_cache_dir(first)
    write_folder(first, [3, 3, 3, 3], mtime=10**18)  # rebuilt in place with other settings
    assert local_cache_dir(first) != before
    assert load_local_dataset(first)["train"]["x"] == [3, 3, 3, 3]
    assert local_cache_dir(first) == local_cache_dir(first)  # unchanged: its cache is reused
