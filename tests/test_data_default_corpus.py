"""The default corpus and tokenizer: built offline, deterministic, atomic, round-trips text."""

from __future__ import annotations

import itertools
import json
import sys

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from nemo_lite.components.datasets import DataConfig, build_dataloader, build_tokenizer  # noqa: E402
from nemo_lite.components.datasets import default_corpus as dc  # noqa: E402

SENTENCE = "The default corpus is the Python reference documentation, read without a network."


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("nemo_lite_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEMO_LITE_CACHE", str(path))
        yield path, dc.default_corpus_file()


def test_corpus_is_built_once_atomically(corpus_cache, monkeypatch, capsys):
    cache, corpus = corpus_cache
    monkeypatch.setenv("NEMO_LITE_CACHE", str(cache))
    assert corpus.is_file() and corpus.is_relative_to(cache)
    assert [p.name for p in corpus.parent.iterdir()] == [corpus.name]  # no temporary file left
    docs = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
    assert len(docs) > 300
    assert docs[0]["source"].startswith("pydoc_data.topics:")
    assert any(d["source"].startswith("docstrings:json") for d in docs)
    assert sum(len(d["text"]) for d in docs) > 1_000_000
    assert all(d["text"].strip() for d in docs)
    assert dc.default_corpus_file() == corpus  # second call: found, not rebuilt
    assert "building" not in capsys.readouterr().err


def test_corpus_is_deterministic(corpus_cache):
    _, corpus = corpus_cache
    lines = corpus.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == list(dc.iter_default_documents())


def test_shipped_tokenizer_round_trips_a_sentence():
    tok = build_tokenizer("default")
    assert len(tok) == dc.DEFAULT_VOCAB_SIZE and tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    ids = tok(SENTENCE, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == SENTENCE
    assert len(ids) < len(SENTENCE) / 3  # a real BPE, not bytes


def test_tokenizer_is_trained_into_the_cache_when_not_shipped(corpus_cache, monkeypatch, tmp_path):
    cache, _ = corpus_cache
    monkeypatch.setenv("NEMO_LITE_CACHE", str(cache))
    shipped = dc.shipped_tokenizer_file()
    monkeypatch.setattr(dc, "shipped_tokenizer_file", lambda: tmp_path / "missing.json")
    path = dc.default_tokenizer_file()
    assert path.is_relative_to(cache) and path.is_file()
    tok = build_tokenizer("default")
    assert tok.decode(tok(SENTENCE)["input_ids"]) == SENTENCE and tok.eos_token_id == 0
    if sys.version.split()[0] == "3.11.7":  # the Python the shipped tokenizer was trained on: same bytes
        assert path.read_bytes() == shipped.read_bytes()


def test_default_pipeline_end_to_end(corpus_cache, monkeypatch, tmp_path):
    cache, _ = corpus_cache
    monkeypatch.setenv("NEMO_LITE_CACHE", str(cache))
    cfg = DataConfig(seq_len=128, batch_size=2, cache_dir=str(tmp_path / "hf"), validation_fraction=0.02)
    loader = build_dataloader(cfg)
    batches = list(itertools.islice(loader, 3))
    assert batches[0]["input_ids"].shape == (2, 128)
    assert loader.stats["documents"] >= 1 and loader.stats["tokens"] > 3 * 2 * 128
    text = loader.tokenizer.decode(batches[0]["input_ids"][0])
    assert sum(c.isalpha() for c in text) > 0.5 * len(text)  # English, not noise
    val = build_dataloader(cfg, split="validation")
    n_docs = len(dc.default_corpus_file().read_text().splitlines())
    assert val.source.num_documents + loader.source.num_documents == n_docs
