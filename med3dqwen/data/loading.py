"""Loading a built dataset folder with ``datasets.load_dataset`` without reading another folder's cache.

``datasets.load_dataset(folder)`` (datasets 5.2) caches the Arrow files under ``<cache>/<folder name>/default/0.0.0/
<hash>``, and for a folder whose ``README.md`` declares ``configs:`` with relative ``data_files`` (every build of
ours) the hash depends on those patterns only, not on the files: two folders with the same name, or one folder
rebuilt with other settings, load whichever rows were cached first, or fail with ``NonMatchingSplitsSizesError``
(``download_mode="force_redownload"`` does not help: the recorded split sizes come from the same cache). So
:func:`load_local_dataset` gives ``load_dataset`` a cache folder of its own, named after the folder's absolute path
and the size and modification time of its card and data files: a rebuilt or different folder gets a fresh cache,
an unchanged one reuses its own.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any


__all__ = ["load_local_dataset", "local_cache_dir"]

_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt", ".md")


def local_cache_dir(folder: str | os.PathLike) -> Path:
    """The ``datasets`` cache folder :func:`load_local_dataset` uses for ``folder`` (see the module docstring)."""
    import datasets

    folder = Path(folder).expanduser().resolve()
    digest = hashlib.sha256(str(folder).encode())
    files = [path for path in folder.iterdir() if path.is_file() and path.suffix in _DATA_SUFFIXES]
    if (folder / "data").is_dir():
        files += [path for path in (folder / "data").rglob("*") if path.is_file()]
    for path in sorted(files):
        stat = path.stat()
        digest.update(f"\0{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return Path(datasets.config.HF_DATASETS_CACHE) / "med3dqwen_local" / digest.hexdigest()[:16]


def load_local_dataset(folder: str | os.PathLike, **kwargs: Any):
    """``datasets.load_dataset(folder, cache_dir=local_cache_dir(folder), **kwargs)``.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
    """
    import datasets

    if not Path(folder).expanduser().is_dir():
        raise FileNotFoundError(f"dataset folder {folder} does not exist")
    kwargs.setdefault("cache_dir", str(local_cache_dir(folder)))
    return datasets.load_dataset(str(Path(folder).expanduser()), **kwargs)
