"""Uploading a built dataset folder to the Hugging Face Hub."""

from __future__ import annotations

import os
from collections.abc import Sequence


__all__ = [
    "push_dataset_to_hub",
]


def push_dataset_to_hub(
    out_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = True,
    allow: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
    token: str | None = None,
) -> str:
    """Upload a built dataset folder to a Hub dataset repo (created if needed): the files matching ``allow`` (all
    when ``None``) and none of ``ignore`` (``huggingface_hub`` patterns, matched against paths relative to
    ``out_dir``; the builders pass :attr:`~med3dqwen.builders.engine.DatasetBuilder.hub_allow_patterns`).

    Returns:
        The URL of the commit.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        repo_type="dataset",
        folder_path=str(out_dir),
        allow_patterns=None if allow is None else list(allow),
        ignore_patterns=list(ignore),
        commit_message="Upload dataset built with Med3DQwen",
    )
    return str(getattr(info, "commit_url", info))
