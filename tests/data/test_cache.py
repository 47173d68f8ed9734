"""The model-grid cache: equal to the online path within its quantisation, one entry per volume, resumable builds,
recorded errors, stale files and other settings refused, and its command line."""

import json
import pickle
import shutil

import datasets
import numpy as np
import pytest

from med3dqwen.builders.engine import BuildArguments
from med3dqwen.builders.phantom.dataset import PhantomBuildConfig, build_phantom_dataset
from med3dqwen.data import cache as cache_module
from med3dqwen.data.cache import (
    CachedSampleError,
    CacheMismatchError,
    ModelGridCache,
    build_model_grid_cache,
    media_key,
)
from med3dqwen.data.schema import resolve_media
from med3dqwen.processing.image_processing_med3d_qwen import Med3DQwenImageProcessor
from med3dqwen.scripts.build_cache import CacheArguments
from med3dqwen.scripts.build_cache import main as cache_main


SMALL = (32, 64, 64)


class Killed(Exception):
    """Stands for the build process being killed."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "phantom"
    build_phantom_dataset(
        PhantomBuildConfig(output_dir=str(out), num_volumes=3, seed=4, shape=SMALL), BuildArguments(progress=False)
    )
    return out


@pytest.fixture(scope="module")
def records(folder):
    return list(datasets.load_dataset(str(folder), split="train"))


@pytest.fixture(scope="module")
def processor():
    return Med3DQwenImageProcessor(volume_size=(24, 40, 48))  # odd ratios: real resampling on every axis


def _pairs(records):
    return {(r["volume_path"], r["mask_path"]) for r in records}


def test_entries_equal_the_online_model_grid_and_are_shared(folder, records, processor, tmp_path):
    cache = build_model_grid_cache(records, processor, tmp_path / "c", dataset_root=folder, num_proc=2, chunk_size=2)
    volumes = {r["volume_path"] for r in records}
    masks = {(r["volume_path"], r["mask_path"]) for r in records if r["mask_path"] is not None}
    assert len(records) > len(volumes)  # many questions per volume ...
    assert cache.info["num_volumes"] == len(volumes) and cache.info["num_masks"] == len(masks)  # ... one entry each
    assert cache.num_errors == 0
    for volume_path, mask_path in sorted(_pairs(records), key=str):
        image, roi = processor.model_grid(str(folder / volume_path), None if mask_path is None else folder / mask_path)
        cached = cache.volume(volume_path, str(folder / volume_path))
        assert cached.dtype == np.float32 and cached.shape == (24, 40, 48)
        assert np.abs(cached - image).max() <= 0.5 / 65535 + 1e-7  # the uint16 quantisation, nothing else
        if mask_path is not None:
            assert np.array_equal(cache.mask(volume_path, mask_path), roi)
    # a fresh reader (another process pickles it as its folder) reads the same
    again = pickle.loads(pickle.dumps(ModelGridCache(tmp_path / "c")))
    key = sorted(volumes)[0]
    assert np.array_equal(again.volume(key), cache.volume(key))


def test_resolved_and_relative_records_share_the_keys(folder, records):
    loaded = datasets.load_dataset(str(folder), split="train").select_columns(["volume_path", "mask_path"])
    resolved = resolve_media(loaded, folder)
    row, relative = resolved[0], records[0]
    assert media_key(row["volume_path"], folder) == media_key(relative["volume_path"], folder)
    assert media_key(row["mask_path"], folder) == media_key(relative["mask_path"], folder) == relative["mask_path"]
    assert media_key(None, folder) is None
    with pytest.raises(CacheMismatchError, match="names no file"):
        media_key(np.zeros((2, 2, 2)), folder)


def test_a_killed_build_resumes_from_its_finished_chunks(folder, records, processor, tmp_path, monkeypatch):
    encode, calls = cache_module._encode, []

    def dies_on_the_second_chunk(batch, image_processor, root, parent):
        calls.append(batch["volume_key"][0])
        if len(calls) == 2:
            raise Killed  # the build is killed inside chunk 2
        return encode(batch, image_processor, root, parent)

    monkeypatch.setattr(cache_module, "_encode", dies_on_the_second_chunk)
    with pytest.raises(Killed):
        build_model_grid_cache(records, processor, tmp_path / "c", dataset_root=folder, chunk_size=1)
    assert sorted(p.name for p in (tmp_path / "c" / "chunks").iterdir() if not p.name.startswith(".")) == ["00000"]
    with pytest.raises(CacheMismatchError, match="did not finish; run the same build again"):
        ModelGridCache(tmp_path / "c")
    calls.clear()
    cache = build_model_grid_cache(records, processor, tmp_path / "c", dataset_root=folder, chunk_size=1)
    first = sorted({r["volume_path"] for r in records})[0]
    assert first not in calls and len(calls) == cache.info["num_volumes"] - 1  # chunk 0 was not built again
    monkeypatch.undo()
    complete = build_model_grid_cache(records, processor, tmp_path / "full", dataset_root=folder, chunk_size=1)
    for key in {r["volume_path"] for r in records}:
        assert np.array_equal(cache.volume(key), complete.volume(key))


def test_other_settings_or_rows_are_refused(folder, records, processor, tmp_path):
    build_model_grid_cache(records, processor, tmp_path / "c", dataset_root=folder)
    with pytest.raises(CacheMismatchError, match=r"other \['volume_size'\].*\[24, 40, 48\] vs \[16, 16, 16\]"):
        build_model_grid_cache(records, Med3DQwenImageProcessor(volume_size=(16, 16, 16)), tmp_path / "c", folder)
    with pytest.raises(CacheMismatchError, match="num_volumes"):
        build_model_grid_cache(records[:1], processor, tmp_path / "c", dataset_root=folder)
    cache = ModelGridCache(tmp_path / "c")
    with pytest.raises(CacheMismatchError, match=r"holds volumes for .*'window': 'chest'.*wants .*'lung'"):
        cache.check_settings(Med3DQwenImageProcessor(volume_size=(24, 40, 48), window="lung"))
    cache.check_settings(Med3DQwenImageProcessor(volume_size=(24, 40, 48), prompt_color="blue", contour_thickness=1))
    with pytest.raises(CacheMismatchError, match="'volumes/elsewhere.nii.gz' is not in the model-grid cache"):
        cache.volume("volumes/elsewhere.nii.gz")
    with pytest.raises(CacheMismatchError, match="not a model-grid cache"):
        ModelGridCache(tmp_path)


def test_bad_files_are_recorded_and_a_changed_file_is_refused(folder, records, processor, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns(".work"))
    volume_path = sorted({r["volume_path"] for r in records})[0]
    (copy / volume_path).write_bytes(b"not a nifti file")
    other = next(r for r in records if r["volume_path"] != volume_path and r["mask_path"] is not None)
    (copy / other["mask_path"]).unlink()
    cache = build_model_grid_cache(records, processor, tmp_path / "c", dataset_root=copy)
    assert cache.num_errors >= 2
    with pytest.raises(CachedSampleError, match=rf"{volume_path}: cannot read NIfTI"):
        cache.volume(volume_path)
    with pytest.raises(CachedSampleError, match="file not found"):
        cache.mask(other["volume_path"], other["mask_path"])
    assert cache.volume(other["volume_path"]).shape == (24, 40, 48)  # the volume itself is fine
    source = copy / other["volume_path"]
    source.write_bytes(source.read_bytes() + b"\0")  # changed after the build
    with pytest.raises(CacheMismatchError, match="changed since the model-grid cache"):
        cache.volume(other["volume_path"], str(source))


def test_the_command_line_builds_and_reports_bad_entries(folder, records, tmp_path, capsys):
    args = CacheArguments(
        dataset_name=str(folder), output_dir=str(tmp_path / "c"), volume_size=[24, 40, 48], chunk_size=2
    )
    assert cache_main(args) == 0
    info = json.loads((tmp_path / "c" / "cache_info.json").read_text())
    all_rows = datasets.load_dataset(str(folder))
    volumes = {r["volume_path"] for split in all_rows.values() for r in split}
    assert info["complete"] and info["num_volumes"] == len(volumes) and info["volume_size"] == [24, 40, 48]
    assert "volumes" in capsys.readouterr().out
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns(".work"))
    broken = sorted(volumes)[0]
    (copy / broken).write_bytes(b"")
    args = CacheArguments(dataset_name=str(copy), output_dir=str(tmp_path / "b"), volume_size=[24, 40, 48])
    assert cache_main(args) == 1
    assert broken in capsys.readouterr().err
    args.allow_bad_samples = True
    assert cache_main(args) == 0  # resumed: already complete
