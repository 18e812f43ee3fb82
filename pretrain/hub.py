"""Where published backbones live: a local folder, any fsspec URL (``s3://``), or ``hf://<repo>``.

Only file transfer is here (no model code), so both the model classes (``from_pretrained`` on a
URL) and :mod:`pretrain.publish` use it. S3 endpoint and credentials come from the standard AWS
environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), which botocore honours.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tempfile
from pathlib import Path

import fsspec

HF_PREFIX = "hf://"
DEFAULT_CACHE = Path.home() / ".cache" / "mskfm" / "backbones"


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def refuse_existing(url: str) -> None:
    raise FileExistsError(f"a published backbone already exists at {url}; "
                          "publish under a new name/version or pass overwrite=True (--overwrite)")


def put_folder(staged: Path, url: str, overwrite: bool, storage_options: dict | None = None) -> None:
    """Copy the files of ``staged`` to ``url``; an existing non-empty destination needs ``overwrite``."""
    if url.startswith(HF_PREFIX):
        _push_hf(staged, url[len(HF_PREFIX):], overwrite)
    elif is_local(url):
        _put_local(staged, Path(url.removeprefix("file://")), overwrite)
    else:
        _put_fsspec(staged, url, overwrite, storage_options or {})


def _put_local(staged: Path, dest: Path, overwrite: bool) -> None:
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        refuse_existing(str(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    shutil.copytree(staged, tmp, dirs_exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)  # readers never see a half-written version


def _put_fsspec(staged: Path, url: str, overwrite: bool, storage_options: dict) -> None:
    fs, root = fsspec.core.url_to_fs(url, **storage_options)
    if fs.exists(root) and fs.find(root):
        if not overwrite:
            refuse_existing(url)
        fs.rm(root, recursive=True)
    for path in sorted(p for p in staged.rglob("*") if p.is_file()):
        fs.put_file(str(path), posixpath.join(root, path.relative_to(staged).as_posix()))


def _push_hf(staged: Path, repo_id: str, overwrite: bool) -> None:
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise RuntimeError(f"publishing to hf://{repo_id} needs a Hugging Face token: set HF_TOKEN "
                           "(or publish to a local folder or an s3:// URL)")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    if api.file_exists(repo_id, "config.json") and not overwrite:
        refuse_existing(HF_PREFIX + repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=str(staged), commit_message="mskfm: publish backbone")


def fetch_folder(url: str, cache_dir: str | Path | None = None, storage_options: dict | None = None) -> Path:
    """A local folder holding the published files at ``url`` (downloaded for remote URLs)."""
    if url.startswith(HF_PREFIX):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(url[len(HF_PREFIX):], token=os.environ.get("HF_TOKEN"), cache_dir=cache_dir))
    if is_local(url):
        local = Path(url.removeprefix("file://"))
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"no published backbone at {local} (config.json missing)")
        return local
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.exists(posixpath.join(root, "config.json")):
        raise FileNotFoundError(f"no published backbone at {url} (config.json missing)")
    local = Path(cache_dir or DEFAULT_CACHE) / hashlib.sha256(url.encode()).hexdigest()[:16]
    if local.exists():
        shutil.rmtree(local)  # re-fetch: a version may have been republished with overwrite
    for remote in fs.find(root):
        target = local / posixpath.relpath(remote, root)
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(target))
    return local
