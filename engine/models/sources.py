"""Where a hub id's files come from: RunPod's model cache, a local folder, or a download into HF_HOME.

RunPod's "cached models" endpoint setting downloads a Hugging Face model onto the host before
the worker starts, in huggingface_hub's cache layout under ``/runpod-volume/huggingface-cache/hub``:
``models--ORG--NAME/snapshots/HASH/`` holds the files (symlinks into ``blobs/``) and
``refs/main`` names the snapshot of the main branch. Reading it needs no network call, so it is
tried first; the hub's own client is only imported for a download.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from engine.common.errors import ModelError

log = logging.getLogger(__name__)

HUB_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.safetensors"]
"""A diffusers folder's files: the index at the top, each component's config, tokenizer and weights below it
(a repository's single-file checkpoints at the top level are not read)."""
HUB_IGNORED = ["*.fp16.*", "*non_ema*", "safety_checker/*"]
"""Weight variants and the safety checker, which the worker never loads (a few GB for SD 1.5)."""
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


class ModelSource(str, Enum):
    """Where the model's folder was found, as ``init_ms.model_source`` reports it."""

    BUILTIN = "builtin"
    MODEL_CACHE = "model_cache"
    FOLDER = "folder"
    HUB = "hub"


@dataclass(frozen=True)
class ModelLocation:
    folder: Path
    source: ModelSource


def is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith(("/", ".", "~")) and all(name.split("/"))


def cache_repo_folder(model_cache: Path, hub_id: str) -> Path:
    """huggingface_hub's folder for a model repository: ``models--ORG--NAME``."""
    return model_cache / ("models--" + hub_id.replace("/", "--"))


def cached_snapshot(model_cache: Path, hub_id: str, revision: str | None) -> Path | None:
    """The cached snapshot of ``hub_id`` (``revision`` a ref such as ``main``, or a commit hash), or None.

    Without a revision: the snapshot ``refs/main`` names, else the only one, else the newest."""
    repo = cache_repo_folder(model_cache, hub_id)
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    if revision is not None:
        return _snapshot_for_revision(repo, revision)
    main = _snapshot_for_revision(repo, "main")
    if main is not None:
        return main
    found = [path for path in snapshots.iterdir() if path.is_dir()]
    if not found:
        return None
    if len(found) > 1:
        log.info("%s has %d cached snapshots and no refs/main: taking the newest", hub_id, len(found))
    return max(found, key=lambda path: path.stat().st_mtime)


def _snapshot_for_revision(repo: Path, revision: str) -> Path | None:
    if "/" not in revision and revision not in {"", ".", ".."}:
        snapshot = repo / "snapshots" / revision
        if COMMIT_HASH.fullmatch(revision) and snapshot.is_dir():
            return snapshot
    ref = repo / "refs" / revision
    if ref.is_file() and ref.resolve().is_relative_to(repo.resolve() / "refs"):
        commit = ref.read_text().strip()
        snapshot = repo / "snapshots" / commit
        if COMMIT_HASH.fullmatch(commit) and snapshot.is_dir():
            return snapshot
    return None


def locate_hub_model(name: str, model_cache: Path, revision: str | None) -> ModelLocation:
    """A hub id from RunPod's model cache, then a local folder of that name, then the hub (into HF_HOME)."""
    snapshot = cached_snapshot(model_cache, name, revision)
    if snapshot is not None:
        if (snapshot / "model_index.json").is_file():
            log.info("MODEL=%s found in the model cache: %s", name, snapshot)
            return ModelLocation(snapshot, ModelSource.MODEL_CACHE)
        log.warning("the cached snapshot %s has no model_index.json; looking elsewhere", snapshot)
    local = Path(name)
    if local.exists():
        return ModelLocation(local_folder(local), ModelSource.FOLDER)
    return ModelLocation(download(name, model_cache, revision), ModelSource.HUB)


def local_folder(path: Path) -> Path:
    if not (path / "model_index.json").is_file():
        raise ModelError(f"{path} is not a diffusers model folder: model_index.json is missing")
    return path.resolve()


def download(name: str, model_cache: Path, revision: str | None) -> Path:
    """The hub's snapshot in HF_HOME's cache, downloaded when missing (offline: the cached one, or an error)."""
    from huggingface_hub import constants, snapshot_download

    at = f" at revision {revision!r}" if revision else ""
    log.info("MODEL=%s%s is not in the model cache %s: fetching it from the Hugging Face hub", name, at, model_cache)
    try:
        return Path(
            snapshot_download(name, revision=revision, allow_patterns=HUB_PATTERNS, ignore_patterns=HUB_IGNORED)
        )
    except Exception as error:  # offline, unknown repo, gated: the hub's errors are many and untyped
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        detail = str(error).splitlines()[0] if str(error) else "no detail"
        raise ModelError(
            f"MODEL={name}{at}: not in the model cache ({cache_repo_folder(model_cache, name)}, MODEL_CACHE_DIR) "
            f"and cannot be downloaded from the Hugging Face hub{offline} ({type(error).__name__}: {detail}); "
            "enable the endpoint's cached model, or download it once and set MODEL to its local folder"
        ) from error
