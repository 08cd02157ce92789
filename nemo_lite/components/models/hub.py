"""Where a checkpoint is: a local Hugging Face directory, or a hub id resolved through the Hugging Face cache.

    resolve_pretrained("~/ckpt/smollm2-135m")        # a directory with config.json: returned as it is
    resolve_pretrained("HuggingFaceTB/SmolLM2-135M")  # the cached snapshot of the main branch
    resolve_pretrained("HuggingFaceTB/SmolLM2-135M@main")  # a branch, a tag or a commit hash after "@"

A hub id goes through ``huggingface_hub.snapshot_download`` with the standard cache (``HF_HUB_CACHE``,
``HF_HOME``) and its switches (``HF_HUB_OFFLINE=1``: the cache only, no network). Only what loading
needs is fetched: config.json, generation_config.json (the stop ids the export keeps), the safetensors
weights (the single file, or the index and the shards it names) and the tokenizer files; never a pickle
``.bin``, never a second copy of the weights in another format (``consolidated.safetensors``, ``original/``).
Every failure is one :class:`PretrainedNotFoundError` line naming the id, the revision and what to do.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from nemo_lite.errors import NemoLiteError

CONFIG_NAME = "config.json"
# transformers' generate reads its stop ids (eos_token_id, one or a list) and sampling settings here.
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Shards as transformers names them; an index naming other files gets those fetched by name.
SHARD_PATTERN = "model-*-of-*.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    TOKENIZER_CONFIG,
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    CHAT_TEMPLATE_FILE,
)

# "org/name" or "name", then optionally "@revision" (a branch, a tag or a commit hash).
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?:@(?P<revision>[\w./-]+))?")


class PretrainedNotFoundError(NemoLiteError, ValueError):
    """``model.pretrained_path`` names no checkpoint that can be read; the message says what to do."""


def smollm2_dir() -> Path:
    """Where scripts/convert_smollm2.py writes SmolLM2-135M by default: ``$NEMO_LITE_CACHE/smollm2-135m``
    (``~/.cache/nemo_lite/smollm2-135m``); the one missing checkpoint a script of this project creates."""
    return Path(os.environ.get("NEMO_LITE_CACHE") or Path.home() / ".cache" / "nemo_lite").expanduser() / "smollm2-135m"


def split_hub_id(path_or_id: str) -> tuple[str, str | None] | None:
    """``("org/name", revision or None)`` if ``path_or_id`` has the form of a hub id, else None."""
    if path_or_id.startswith(("/", ".", "~")) or "\\" in path_or_id:
        return None
    match = _HUB_ID.fullmatch(path_or_id)
    if match is None or "--" in match["repo"] or ".." in match["repo"]:
        return None
    check_revision(match["revision"])
    return match["repo"], match["revision"]


def check_revision(revision: str | None) -> None:
    """A revision is a branch, a tag or a commit: names that never climb out of the cache (``..``) or start at
    the root, since the cache keeps revisions as paths."""
    if revision is not None and (revision.startswith("/") or ".." in revision.split("/") or not revision.strip("/")):
        raise PretrainedNotFoundError(
            f"revision {revision!r} is not a branch, a tag or a commit hash (it would name a path outside the "
            "Hugging Face cache): give one such as main, v1.0 or refs/pr/1"
        )


def resolve_pretrained(path_or_id: str | Path, *, revision: str | None = None) -> Path:
    """The local Hugging Face directory (config.json + safetensors) that ``path_or_id`` names.

    A directory with config.json is returned as it is. Anything else of the form ``org/name`` or
    ``org/name@revision`` (``revision=`` may give the revision instead) is a hub id: its snapshot in
    the Hugging Face cache, downloaded first if it is not there and the hub can be reached.
    """
    text = str(path_or_id)
    path = Path(text).expanduser()
    if (path / CONFIG_NAME).is_file():
        if revision is not None:
            raise PretrainedNotFoundError(
                f"{text!r} is a local directory: revision={revision!r} applies to hub ids only"
            )
        return path
    hub_id = None if path.exists() else split_hub_id(text)
    if hub_id is None:
        create = (
            " Create it with: python scripts/convert_smollm2.py"
            if path.absolute() == smollm2_dir().absolute()
            else " Give a directory with config.json and safetensors weights, or a hub id"
        )
        raise PretrainedNotFoundError(
            f"model.pretrained_path={text!r} holds no Hugging Face checkpoint (no config.json) and is not a "
            f"hub id (org/name or org/name@revision).{create}"
        )
    repo_id, id_revision = hub_id
    check_revision(revision)
    if revision is not None and id_revision is not None and revision != id_revision:
        raise PretrainedNotFoundError(f"{text!r} names revision {id_revision!r} but revision={revision!r} was given")
    return download_snapshot(repo_id, revision or id_revision)


def download_snapshot(repo_id: str, revision: str | None) -> Path:
    """The snapshot directory of ``repo_id`` at ``revision`` (default: main) holding what loading needs."""
    shown = f"{repo_id}@{revision}" if revision else repo_id
    patterns = [CONFIG_NAME, GENERATION_CONFIG, SINGLE_FILE, INDEX_FILE, SHARD_PATTERN, *TOKENIZER_FILES]
    snapshot = fetch_snapshot(repo_id, revision, patterns)
    if not (snapshot / CONFIG_NAME).is_file():
        raise PretrainedNotFoundError(f"{shown} has no config.json: it is not a transformers checkpoint")
    if (snapshot / INDEX_FILE).is_file():
        shards = sorted(set(json.loads((snapshot / INDEX_FILE).read_text())["weight_map"].values()))
        if any(not (snapshot / shard).is_file() for shard in shards):
            snapshot = fetch_snapshot(repo_id, revision, shards)  # an index naming shards off transformers' names
        missing = [shard for shard in shards if not (snapshot / shard).is_file()]
    else:
        missing = [] if (snapshot / SINGLE_FILE).is_file() else [SINGLE_FILE]
    if missing:
        raise PretrainedNotFoundError(
            f"{shown}: {snapshot} lacks {', '.join(missing)} (only safetensors are read; a repository with only "
            "pytorch_model.bin is not loaded). Download it once online, or convert it to safetensors"
        )
    return snapshot


def fetch_snapshot(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """The snapshot directory of ``repo_id`` at ``revision`` (default: main) with the files matching ``patterns``
    (from the cache, fetched first where the hub can be reached); every failure one
    :class:`PretrainedNotFoundError` line."""
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as err:
        raise PretrainedNotFoundError(
            f"{repo_id!r} looks like a hub id, which needs huggingface_hub (pip install huggingface_hub): {err}"
        ) from None

    shown = f"{repo_id}@{revision}" if revision else repo_id
    rev = revision or "main"
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RevisionNotFoundError:
        raise PretrainedNotFoundError(
            f"revision {rev!r} of {repo_id} does not exist on the hub: give an existing branch, tag or "
            f"commit after '@' (e.g. {repo_id}@main)"
        ) from None
    except GatedRepoError:
        raise PretrainedNotFoundError(
            f"{repo_id} is gated: accept its terms on huggingface.co and log in (hf auth login), "
            "or give a local directory"
        ) from None
    except RepositoryNotFoundError:
        raise PretrainedNotFoundError(
            f"{repo_id} is not a model on the hub (or is private: log in with hf auth login); "
            "check the id, or give a local directory"
        ) from None
    except LocalEntryNotFoundError:
        raise PretrainedNotFoundError(_not_cached_message(repo_id, revision, shown, constants)) from None
    except HFValidationError as err:
        raise PretrainedNotFoundError(f"{shown!r} is not a valid hub id: {err}") from None
    except (HfHubHTTPError, OSError) as err:
        raise PretrainedNotFoundError(
            f"could not fetch {shown} from the hub ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "retry, or set HF_HUB_OFFLINE=1 to use the cache only"
        ) from None


def _not_cached_message(repo_id: str, revision: str | None, shown: str, constants) -> str:
    """Why a hub id could not be found locally: the repository, or only this revision, is not cached."""
    cache = Path(constants.HF_HUB_CACHE)
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    offline = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
    if not repo_dir.is_dir():
        command = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
        return (
            f"{shown} is not in the Hugging Face cache ({cache}) and {offline}: download it once with network "
            f"({command}), point HF_HUB_CACHE at a cache that has it, or give a local directory"
        )
    revision = revision or "main"
    known = sorted(
        {p.name for p in (repo_dir / "refs").glob("*") if p.is_file()}
        | {p.name for p in (repo_dir / "snapshots").glob("*") if p.is_dir()}
    )
    return (
        f"revision {revision!r} of {repo_id} is not in the Hugging Face cache ({cache}) and {offline}; cached "
        f"revisions: {', '.join(known) or 'none'}. Give one of them after '@' ({repo_id}@main), or download it"
    )
