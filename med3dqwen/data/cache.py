"""The model-grid cache: every volume of a dataset windowed and resized once, so training reads it in milliseconds.

Reading a CT-RATE-size ``.nii.gz`` (240×512×512 int16) and bringing it to the model grid (128×256×256) costs a few
hundred milliseconds of one core, most of it decompression; a GPU step of a 1.5B model consumes about 8 samples a
second. The cache does the volume-dependent work once, with ``datasets``:

- per volume: the windowed, resized volume (what the image processor's :meth:`model_grid` returns, read with its
  records' ``intensity`` and HU rescale, which the entry keeps) as ``uint16`` (``round(v * 65535)``: at most
  0.5/65535 ≈ 7.6e-6 from the float32 value after ``/ 65535``);
- per (volume, mask): the resized ROI mask, bit-packed (``np.packbits``: 1 MB at 128×256×256);
- per entry that cannot be made (missing, corrupt or mismatched file): the error message, so the training collator
  reports (or skips) the row exactly as it would online.

The contour is *not* cached: the collator draws it online (a few ms), so the prompt's colour, width, mode and encoding
stay free. Entries are keyed by the media paths relative to the dataset folder, so the many question rows that share
a volume share one entry, and a dataset folder that moved still finds its entries.

Layout of a cache folder (``cache_info.json`` + Arrow files that ``datasets`` memory-maps)::

    cache_info.json              settings (volume size, window), dataset folder, plan of chunks, complete flag
    chunks/00000/data*.arrow     entries of chunk 0 (one ``Dataset.map`` output, one file per worker process)
    chunks/00001/...

Building is resumable: the work is cut into chunks of ``chunk_size`` volumes, each built by ``Dataset.map`` (with
``num_proc`` processes) into a temporary folder that is renamed into place when complete; a killed build keeps its
finished chunks and the next run continues from there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_output
from .schema import IMAGE_SUFFIXES, volume_settings


__all__ = [
    "CACHE_FORMAT",
    "CacheMismatchError",
    "CachedSampleError",
    "ModelGridCache",
    "build_model_grid_cache",
    "cache_settings",
    "media_key",
]

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2
"""Version of the cache layout; a cache of another version is refused (rebuild it). 2: volumes are made with each
record's ``intensity`` and HU ``rescale`` (format 1 ignored them) and carry them."""
INFO_FILE = "cache_info.json"
_QUANT = 65535  # uint16 levels of [0, 1]
_KEY_SEP = "\n"  # between the volume key and the mask key of a mask entry (never in a path we write)


class CacheMismatchError(ValueError):
    """The cache does not fit what reads it: other settings, another dataset, an unfinished build, a row not in it."""


class CachedSampleError(ValueError):
    """The cache build could not make this entry (its file is missing, corrupt or mismatched); the message is the
    error the build got, naming the file."""


def cache_settings(image_processor) -> dict[str, Any]:
    """The image-processor settings a cached entry depends on (volume size and HU window); the prompt settings are
    applied online and are not among them."""
    window = image_processor.window
    return {
        "volume_size": [int(s) for s in image_processor.volume_size],
        "window": window if isinstance(window, str) else [float(v) for v in window],
    }


def media_key(value: Any, root: str | os.PathLike | None) -> str | None:
    """The cache key of a record's ``volume_path`` / ``mask_path`` value: its path relative to ``root`` (POSIX).

    Args:
        value: a path (relative to ``root`` or absolute), a nibabel image read from a file (a resolved ``Nifti``
            column), a ``{"path": ...}`` dict (an undecoded ``Nifti`` column), or None.
        root: the dataset folder. Paths outside it (or without it) are keyed by their absolute path.

    Returns:
        The key, or None for a None value (a whole-volume question without a mask).

    Raises:
        CacheMismatchError: a value that names no file (an in-memory image or array).
    """
    if value is None:
        return None
    if isinstance(value, Mapping):
        value = value.get("path")
    elif hasattr(value, "get_filename"):
        value = value.get_filename()
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise CacheMismatchError(f"a {type(value).__name__} names no file, so it has no model-grid cache entry")
    path = Path(os.path.normpath(value))
    if not path.is_absolute():
        return path.as_posix()
    if root is not None:
        base = Path(os.path.normpath(os.path.abspath(root)))
        try:
            return path.relative_to(base).as_posix()
        except ValueError:
            resolved = Path(os.path.realpath(path))
            try:
                return resolved.relative_to(Path(os.path.realpath(base))).as_posix()
            except ValueError:
                pass
    return path.as_posix()


def _file(key: str, root: Path | None) -> str:
    """The file a key names (relative keys against ``root``)."""
    path = Path(key)
    if path.is_absolute():
        return str(path)
    if root is None:
        raise CacheMismatchError(f"{key!r} is relative; pass the dataset folder (dataset_root) to build the cache")
    return str(root / path)


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return int(st.st_size), int(st.st_mtime_ns)


# ---------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------


def _settings_text(settings: Mapping[str, Any], volume_key: str) -> str:
    """A record's :func:`~med3dqwen.data.schema.volume_settings` for volume ``volume_key``, as the text stored with
    its cached volume. An unstated intensity is what the image processor takes from the file (figures are
    ``"unit"``, the rest HU), so records that state it and records that do not agree."""
    intensity, rescale = settings["intensity"], settings["rescale"]
    if intensity is None:
        intensity = "unit" if Path(volume_key).suffix.lower() in IMAGE_SUFFIXES else "hu"
    return json.dumps(
        {"intensity": intensity, "rescale": None if rescale is None else [float(v) for v in rescale]}, sort_keys=True
    )


def _plan(records: Iterable[Mapping[str, Any]], root: Path | None) -> list[dict[str, Any]]:
    """One item per distinct volume (sorted by key) with its distinct masks and its intensity settings.

    Raises:
        ValueError: records of one volume that disagree on its intensity or rescale (or state invalid ones).
    """
    volumes: dict[str, set[str]] = {}
    settings: dict[str, str] = {}
    for record in records:
        volume = media_key(record.get("volume_path"), root)
        if volume is None:
            continue  # a record without a volume is the collator's error to report, not the cache's
        masks = volumes.setdefault(volume, set())
        try:
            text = _settings_text(volume_settings(record), volume)
        except ValueError as err:
            raise ValueError(f"volume {volume!r}: {err}") from err
        if settings.setdefault(volume, text) != text:
            raise ValueError(
                f"volume {volume!r}: its records disagree on how to read it ({settings[volume]} vs {text}); one "
                "cached volume serves every record of the file"
            )
        mask = media_key(record.get("mask_path"), root)
        if mask is not None:
            masks.add(mask)
    return [
        {"volume_key": key, "mask_keys": sorted(volumes[key]), "settings": settings[key]} for key in sorted(volumes)
    ]


def _media_columns(dataset):
    """Only the media and intensity columns of a ``datasets.Dataset``, not decoded (``Nifti`` columns give their
    paths)."""
    import datasets

    wanted = ("volume_path", "mask_path", "intensity", "rescale_slope", "rescale_intercept")
    columns = [c for c in wanted if c in dataset.column_names]
    dataset = dataset.select_columns(columns)
    for column in columns:
        feature = dataset.features[column]
        if isinstance(feature, datasets.Nifti) and feature.decode:
            dataset = dataset.cast_column(column, datasets.Nifti(decode=False))
    return dataset


def _features():
    import datasets

    return datasets.Features(
        {
            "kind": datasets.Value("string"),  # volume | mask | error
            "key": datasets.Value("string"),
            "data": datasets.Value("large_binary"),
            "shape": datasets.List(datasets.Value("int32")),
            "message": datasets.Value("string"),
            "settings": datasets.Value("string"),  # a volume's intensity and rescale (JSON), "" for the others
            "source_size": datasets.Value("int64"),
            "source_mtime_ns": datasets.Value("int64"),
        }
    )


def _encode(batch: dict[str, list], image_processor, root: str | None, parent: int | None = None) -> dict[str, list]:
    """``Dataset.map`` function (batched, one volume per batch): the entries of one volume and its masks."""
    from ..processing.ct_io import load_volume

    if parent is not None and os.getpid() != parent:
        import torch

        # One thread per map process (num_proc processes share the cores). It also keeps torch out of OpenMP in a
        # process forked from one that already ran OpenMP threads, where the first parallel region never returns
        # (seen as a hung build after other torch work in the same Python process).
        torch.set_num_threads(1)

    out: dict[str, list] = {name: [] for name in _features()}

    def add(kind: str, key: str, data: bytes, shape, message: str, source: str | None, settings: str = "") -> None:
        size, mtime = _stat(source) if source else (-1, -1)
        values = (kind, key, data, list(shape), message, settings, size, mtime)
        for name, value in zip(out, values, strict=True):
            out[name].append(value)

    base = None if root is None else Path(root)
    for volume_key, mask_keys, text in zip(batch["volume_key"], batch["mask_keys"], batch["settings"], strict=True):
        volume_file = _file(volume_key, base)
        settings = json.loads(text)
        try:
            volume = load_volume(volume_file, stored_integers=True)
            image, _ = image_processor.model_grid(volume, intensity=settings["intensity"], rescale=settings["rescale"])
        except (OSError, ValueError, RuntimeError, TypeError) as err:
            add("error", volume_key, b"", [], str(err), volume_file)
            for mask_key in mask_keys:  # a mask without its volume cannot be checked against it
                add("error", volume_key + _KEY_SEP + mask_key, b"", [], str(err), None)
            continue
        quantised = np.rint(image * np.float32(_QUANT)).astype(np.uint16)  # (D, H, W)
        add("volume", volume_key, quantised.tobytes(), quantised.shape, "", volume_file, text)
        for mask_key in mask_keys:
            mask_file = _file(mask_key, base)
            key = volume_key + _KEY_SEP + mask_key
            try:
                roi = image_processor.model_grid_mask(mask_file, volume)
            except (OSError, ValueError, RuntimeError, TypeError) as err:
                add("error", key, b"", [], str(err), mask_file)
                continue
            add("mask", key, np.packbits(roi.reshape(-1)).tobytes(), roi.shape, "", mask_file)
    return out


def _digest(items: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()


def build_model_grid_cache(
    records,
    image_processor,
    cache_dir: str | os.PathLike,
    dataset_root: str | os.PathLike | None = None,
    num_proc: int | None = None,
    chunk_size: int = 32,
) -> ModelGridCache:
    """Build (or resume building) the model-grid cache of ``records`` in ``cache_dir``.

    Args:
        records: the dataset rows (a ``datasets.Dataset`` — only its ``volume_path`` / ``mask_path`` columns are read,
            undecoded — or any iterable of records), as the builders write them (``docs/dataset_format.md``).
        image_processor: the ``Med3DQwenImageProcessor`` of the model (its volume size and window are what is cached).
        cache_dir: the cache folder (created). A folder holding part of a build with the same settings and rows is
            resumed; one built for other settings or rows is refused.
        dataset_root: the dataset folder that relative media paths are relative to; absolute paths (resolved
            datasets) are keyed relative to it too.
        num_proc: processes of ``Dataset.map`` (None: one).
        chunk_size: volumes per chunk, the unit a killed build loses at most.

    Returns:
        The :class:`ModelGridCache` (entries that could not be made hold their error; ``num_errors`` counts them).

    Raises:
        CacheMismatchError: ``cache_dir`` holds a cache of other settings, rows or format.
    """
    import datasets

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    root = None if dataset_root is None else Path(os.path.abspath(dataset_root))
    if isinstance(records, datasets.Dataset):
        records = _media_columns(records)
    items = _plan(records, root)
    cache_dir = Path(cache_dir)
    info = {
        "format": CACHE_FORMAT,
        **cache_settings(image_processor),
        "dataset_root": None if root is None else str(root),
        "num_volumes": len(items),
        "num_masks": sum(len(item["mask_keys"]) for item in items),
        "chunk_size": int(chunk_size),
        "plan_sha256": _digest(items),
        "complete": False,
    }
    info_path = cache_dir / INFO_FILE
    if info_path.is_file():
        old = json.loads(info_path.read_text())
        differs = sorted(k for k in info if k != "complete" and old.get(k) != info[k])
        if differs:
            raise CacheMismatchError(
                f"{cache_dir} holds a model-grid cache built with other {differs} "
                f"({', '.join(f'{k}: {old.get(k)!r} vs {info[k]!r}' for k in differs if k != 'plan_sha256')}); "
                "use another folder or delete this one"
            )
    else:
        with atomic_output(info_path) as tmp:
            tmp.write_text(json.dumps(info, indent=2))
    chunks = cache_dir / "chunks"
    chunks.mkdir(parents=True, exist_ok=True)
    features = _features()
    num_chunks = (len(items) + chunk_size - 1) // chunk_size
    for index in range(num_chunks):
        final = chunks / f"{index:05d}"
        if final.is_dir():
            continue  # built by an earlier run
        part = items[index * chunk_size : (index + 1) * chunk_size]
        tmp = chunks / f".{index:05d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # a chunk a killed run left half-written
        tmp.mkdir()
        logger.info("model-grid cache %s: chunk %d of %d (%d volumes)", cache_dir, index + 1, num_chunks, len(part))
        datasets.Dataset.from_list(part).map(
            _encode,
            batched=True,
            batch_size=1,
            num_proc=min(num_proc, len(part)) if num_proc and num_proc > 1 else None,
            remove_columns=["volume_key", "mask_keys", "settings"],
            features=features,
            fn_kwargs={
                "image_processor": image_processor,
                "root": None if root is None else str(root),
                "parent": os.getpid(),
            },
            cache_file_name=str(tmp / "data.arrow"),
            writer_batch_size=4,  # rows of 16 MB (128×256×256 uint16): a few at a time in memory
            load_from_cache_file=False,
            desc=f"model-grid cache chunk {index + 1}/{num_chunks}",
        )
        os.replace(tmp, final)
    info["complete"] = True
    with atomic_output(info_path) as tmp:
        tmp.write_text(json.dumps(info, indent=2))
    return ModelGridCache(cache_dir)


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


class ModelGridCache:
    """Read access to a built model-grid cache (see the module docstring).

    Opened lazily in each process that reads it (the Arrow files are memory-mapped), so it pickles as its folder
    and works in DataLoader workers under ``fork`` and ``spawn``.

    Args:
        cache_dir: the folder :func:`build_model_grid_cache` wrote.

    Raises:
        CacheMismatchError: not a complete cache of this format.
    """

    def __init__(self, cache_dir: str | os.PathLike):
        self.cache_dir = Path(cache_dir)
        info_path = self.cache_dir / INFO_FILE
        if not info_path.is_file():
            raise CacheMismatchError(f"{self.cache_dir} is not a model-grid cache (no {INFO_FILE}); build it first")
        self.info = json.loads(info_path.read_text())
        if self.info.get("format") != CACHE_FORMAT:
            raise CacheMismatchError(
                f"{self.cache_dir} is a model-grid cache of format {self.info.get('format')}, this version reads "
                f"{CACHE_FORMAT}; rebuild it"
            )
        if not self.info.get("complete"):
            raise CacheMismatchError(
                f"the model-grid cache build in {self.cache_dir} did not finish; run the same build again to resume it"
            )
        self._table = None
        self._index: dict[str, int] | None = None

    def __getstate__(self) -> dict:
        return {"cache_dir": self.cache_dir, "info": self.info, "_table": None, "_index": None}

    def __repr__(self) -> str:
        return f"ModelGridCache({str(self.cache_dir)!r}, volumes={self.info['num_volumes']})"

    @property
    def dataset_root(self) -> str | None:
        """The dataset folder the keys are relative to (absolute; as given to the build)."""
        return self.info.get("dataset_root")

    @property
    def settings(self) -> dict[str, Any]:
        return {"volume_size": self.info["volume_size"], "window": self.info["window"]}

    def check_settings(self, image_processor) -> None:
        """Raise :class:`CacheMismatchError` unless the cache was built with ``image_processor``'s volume size and
        window (its prompt settings may differ: the contour is drawn online)."""
        wanted = cache_settings(image_processor)
        if wanted != self.settings:
            raise CacheMismatchError(
                f"the model-grid cache {self.cache_dir} holds volumes for {self.settings}, the processor wants "
                f"{wanted}; rebuild the cache with this processor"
            )

    def _open(self) -> None:
        import datasets

        files = sorted(self.cache_dir.glob("chunks/[0-9]*/*.arrow"))
        if not files:
            self._table = None
            self._index = {}
            return
        dataset = datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])
        self._table = dataset.data.table  # memory-mapped pyarrow Table
        self._index = {key: row for row, key in enumerate(self._table.column("key").to_pylist())}

    def _row(self, key: str, what: str, source: str | None) -> int:
        if self._index is None:
            self._open()
        row = self._index.get(key)
        if row is None:
            raise CacheMismatchError(
                f"{what} is not in the model-grid cache {self.cache_dir}; it was built for other rows: rebuild it "
                "for this dataset"
            )
        kind = self._table.column("kind")[row].as_py()
        if kind == "error":
            raise CachedSampleError(self._table.column("message")[row].as_py())
        if source is not None:
            size, mtime = _stat(source)
            recorded = (
                self._table.column("source_size")[row].as_py(),
                self._table.column("source_mtime_ns")[row].as_py(),
            )
            if size >= 0 and (size, mtime) != recorded:
                raise CacheMismatchError(
                    f"{source} changed since the model-grid cache {self.cache_dir} was built (size and modification "
                    "time differ); rebuild the cache"
                )
        return row

    def _buffer(self, row: int) -> tuple[Any, tuple[int, ...]]:
        """The bytes of entry ``row`` as a zero-copy view of the memory-mapped file, and its shape.

        Sliced from the column's offsets and data buffers: indexing the column (``column[row].as_buffer()``) builds a
        scalar that copies the value (about 30 ms for a 16 MB volume, measured).
        """
        column = self._table.column("data")
        index = row
        for chunk in column.chunks:
            if index < len(chunk):
                break
            index -= len(chunk)
        _, offsets, data = chunk.buffers()  # validity, int64 offsets, values
        start, end = np.frombuffer(offsets, dtype=np.int64)[chunk.offset + index : chunk.offset + index + 2]
        return data.slice(int(start), int(end - start)), tuple(self._table.column("shape")[row].as_py())

    def volume(
        self,
        key: str,
        source: str | None = None,
        out: np.ndarray | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> np.ndarray:
        """The cached volume of ``key`` as (D, H, W) float32 in [0, 1] (within 7.7e-6 of the image processor's).

        Args:
            key: the volume's :func:`media_key`.
            source: the volume file, when at hand: refused if it changed (size, modification time) since the build.
            out: a float32 (D, H, W) array to write it to (e.g. a row of a batch in shared memory); None: a new one.
            settings: the reading record's :func:`~med3dqwen.data.schema.volume_settings`: refused unless the volume
                was cached with the same intensity and rescale.

        Raises:
            CacheMismatchError: no such entry, the file changed, or other intensity settings. CachedSampleError: the
                build could not read it.
        """
        row = self._row(key, f"volume {key!r}", source)
        if settings is not None:
            stored, wanted = self._table.column("settings")[row].as_py(), _settings_text(settings, key)
            if stored != wanted:
                raise CacheMismatchError(
                    f"volume {key!r} is cached as {stored} but its record asks for {wanted}; rebuild the cache from "
                    "these records"
                )
        data, shape = self._buffer(row)
        quantised = np.frombuffer(data, dtype=np.uint16).reshape(shape)
        if out is not None and out.shape != quantised.shape:
            raise ValueError(f"out has shape {out.shape}, the cached volume {key!r} has shape {quantised.shape}")
        return np.multiply(quantised, np.float32(1.0 / _QUANT), out=out, dtype=np.float32)

    def mask(self, volume_key: str, mask_key: str, source: str | None = None) -> np.ndarray:
        """The cached ROI mask of ``mask_key`` on the grid of volume ``volume_key``, (D, H, W) bool.

        Raises:
            CacheMismatchError: no such entry, or the file changed. CachedSampleError: the build could not make it.
        """
        row = self._row(volume_key + _KEY_SEP + mask_key, f"mask {mask_key!r} of volume {volume_key!r}", source)
        data, shape = self._buffer(row)
        count = int(np.prod(shape))
        return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count).view(bool).reshape(shape)

    @property
    def num_errors(self) -> int:
        """Entries the build could not make (each holds its error message)."""
        if self._index is None:
            self._open()
        if self._table is None:
            return 0
        return sum(1 for kind in self._table.column("kind").to_pylist() if kind == "error")

    def errors(self) -> list[tuple[str, str]]:
        """``(key, message)`` of every entry the build could not make."""
        if self._index is None:
            self._open()
        if self._table is None:
            return []
        kinds = self._table.column("kind").to_pylist()
        keys = self._table.column("key").to_pylist()
        messages = self._table.column("message").to_pylist()
        return [
            (k.replace(_KEY_SEP, " + "), m)
            for kind, k, m in zip(kinds, keys, messages, strict=True)
            if kind == "error"
        ]
