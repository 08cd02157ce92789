"""Hub ids (org/name, org/name@revision) resolved through a Hugging Face cache laid out as huggingface_hub
lays it out, with HF_HUB_OFFLINE=1: no network, one-line errors, only safetensors, only what loading needs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
from model_utils import family_hf_model, random_ids, save_default_tokenizer

from nemo_lite.components.attention import AttentionConfig
from nemo_lite.components.models import AutoModelForCausalLM, PretrainedNotFoundError, resolve_pretrained
from nemo_lite.components.models.hub import split_hub_id
from nemo_lite.testing.hub import COMMIT, cache_repo

hf_hub = pytest.importorskip("huggingface_hub")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE=<tmp>; huggingface_hub read both at import, so its constants follow."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    """A tiny Qwen2 checkpoint in two safetensors shards, with a tokenizer."""
    path = tmp_path_factory.mktemp("tiny-qwen2")
    eos = save_default_tokenizer(path)
    model = family_hf_model("qwen2", seed=5, vocab_size=8192, bos_token_id=eos, eos_token_id=eos)
    model.save_pretrained(path, max_shard_size="900KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def test_a_hub_id_resolves_from_the_cache_offline(offline_cache, tiny_qwen2):
    snapshot = cache_repo(offline_cache, "tiny-org/tiny-qwen2", tiny_qwen2, refs=("main", "v1.0"))
    for name in (
        "tiny-org/tiny-qwen2",
        "tiny-org/tiny-qwen2@main",
        "tiny-org/tiny-qwen2@v1.0",
        f"tiny-org/tiny-qwen2@{COMMIT}",
    ):
        assert resolve_pretrained(name) == snapshot, name
    assert resolve_pretrained("tiny-org/tiny-qwen2", revision="v1.0") == snapshot
    from_hub = AutoModelForCausalLM.from_pretrained("tiny-org/tiny-qwen2", attention=AttentionConfig(backend="sdpa"))
    from_dir = AutoModelForCausalLM.from_pretrained(tiny_qwen2, attention=AttentionConfig(backend="sdpa"))
    assert from_hub.tokenizer_dir == snapshot  # the checkpoint's own tokenizer goes with it
    ids = random_ids(1, 16, 8192)
    with torch.no_grad():
        assert torch.equal(from_hub(ids), from_dir(ids))


def test_a_missing_revision_names_it_and_the_cached_ones(offline_cache, tiny_qwen2):
    cache_repo(offline_cache, "tiny-org/tiny-qwen2", tiny_qwen2, refs=("main", "v1.0"))
    with pytest.raises(PretrainedNotFoundError) as err:
        resolve_pretrained("tiny-org/tiny-qwen2@v9")
    message = str(err.value)
    assert "\n" not in message
    assert "revision 'v9' of tiny-org/tiny-qwen2 is not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE=1" in message and f"cached revisions: {COMMIT}, main, v1.0" in message


def test_an_uncached_hub_id_says_what_to_do(offline_cache):
    with pytest.raises(PretrainedNotFoundError) as err:
        AutoModelForCausalLM.from_pretrained("other-org/not-cached")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("other-org/not-cached is not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in message and "hf download other-org/not-cached" in message


def test_a_pickle_only_snapshot_is_refused_unread(offline_cache, tiny_qwen2, tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    shutil.copy(tiny_qwen2 / "config.json", files)
    (files / "pytorch_model.bin").write_bytes(b"never unpickled")
    cache_repo(offline_cache, "tiny-org/pickled", files)
    with pytest.raises(PretrainedNotFoundError, match=r"lacks model\.safetensors \(only safetensors are read"):
        resolve_pretrained("tiny-org/pickled")


def test_only_what_loading_needs_is_fetched(tiny_qwen2, monkeypatch):
    """The patterns handed to snapshot_download: config, generation config, safetensors weights, tokenizer; no
    pickles, no second copy of the weights in another layout."""
    calls = []

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, allow_patterns))
        return str(tiny_qwen2)

    monkeypatch.setattr(hf_hub, "snapshot_download", snapshot_download)
    assert resolve_pretrained("Qwen/Qwen2.5-0.5B@abc123") == tiny_qwen2
    ((repo_id, revision, patterns),) = calls
    assert (repo_id, revision) == ("Qwen/Qwen2.5-0.5B", "abc123")
    wanted = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-00001-of-00004.safetensors"]
    wanted += ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
    wanted += ["generation_config.json"]  # its stop ids travel into the export
    unwanted = ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "consolidated.safetensors"]
    unwanted += [
        "original/consolidated.00.pth",
        "model.ckpt",
        "flax_model.msgpack",
        "README.md",
    ]
    assert all(any(fnmatch(name, p) for p in patterns) for name in wanted)
    assert not any(fnmatch(name, p) for name in unwanted for p in patterns)


def test_paths_and_hub_ids_are_told_apart(tmp_path):
    assert split_hub_id("Qwen/Qwen2.5-0.5B") == ("Qwen/Qwen2.5-0.5B", None)
    assert split_hub_id("Qwen/Qwen3-0.6B@refs/pr/3") == ("Qwen/Qwen3-0.6B", "refs/pr/3")
    for not_an_id in ("./ckpt", "/abs/dir", "~/ckpt", "a/b/c", "a--b/c", "a/b@"):
        assert split_hub_id(not_an_id) is None, not_an_id
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedNotFoundError, match="holds no Hugging Face checkpoint .* is not a hub id"):
        resolve_pretrained(tmp_path / "empty")
    with pytest.raises(PretrainedNotFoundError, match="revision='v1' applies to hub ids only"):
        resolve_pretrained(_local_checkpoint(tmp_path), revision="v1")


def _local_checkpoint(tmp_path: Path) -> Path:
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "config.json").write_text("{}")
    return tmp_path / "local"


def _finetune(*args: str, cache: Path, run_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HYDRA_FULL_ERROR": "0"}
    env.pop("NEMO_LITE_DEBUG", None)
    overrides = [f"run_dir={run_dir}", "trainer.max_steps=2", "trainer.sample_tokens=0", "trainer.val_every=0"]
    overrides += ["data.seq_len=32", "data.validation_fraction=0", "attention=flex", "trainer.progress_bar=false"]
    return subprocess.run(
        [sys.executable, str(REPO / "recipes" / "finetune.py"), *overrides, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )


def test_the_finetune_recipe_takes_a_hub_id_offline(tmp_path):
    """python recipes/finetune.py model.pretrained_path=org/name with HF_HUB_OFFLINE=1: the cached weights
    and tokenizer, a Mistral export transformers loads; a revision that is not cached is one error line."""
    transformers = pytest.importorskip("transformers")
    files = tmp_path / "files"
    eos = save_default_tokenizer(files)
    family_hf_model("mistral", seed=6, vocab_size=8192, bos_token_id=eos, eos_token_id=eos).save_pretrained(files)
    cache_repo(tmp_path / "hub", "tiny-org/tiny-mistral", files)

    done = _finetune("model.pretrained_path=tiny-org/tiny-mistral", cache=tmp_path / "hub", run_dir=tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf")
    assert type(exported).__name__ == "MistralForCausalLM" and exported.config.sliding_window == 5
    assert (tmp_path / "run" / "hf" / "tokenizer.json").is_file()

    failed = _finetune(
        "model.pretrained_path=tiny-org/tiny-mistral@v9", cache=tmp_path / "hub", run_dir=tmp_path / "bad"
    )
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    (line,) = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert "revision 'v9' of tiny-org/tiny-mistral is not in the Hugging Face cache" in line


@pytest.mark.parametrize("revision", ["../../outside", "main/../../../outside", "/etc"])
def test_a_revision_that_would_leave_the_cache_is_refused(offline_cache, tiny_qwen2, revision):
    cache_repo(offline_cache, "tiny-org/tiny-qwen2", tiny_qwen2)
    shutil.copytree(tiny_qwen2, offline_cache / "outside")  # what the revision would reach as a "snapshot"
    for ask in (
        lambda: resolve_pretrained(f"tiny-org/tiny-qwen2@{revision}"),
        lambda: resolve_pretrained("tiny-org/tiny-qwen2", revision=revision),
    ):
        with pytest.raises(PretrainedNotFoundError, match=r"^revision .* is not a branch, a tag or a commit hash"):
            ask()
