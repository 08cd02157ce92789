"""build_dataloader on real files through Hugging Face datasets: formats, errors, streaming,
validation splits, fine-tuning fields, the tokenizer and its EOS, the warm cache."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("transformers")

from nemo_lite.components.datasets import (  # noqa: E402
    DataConfig,
    build_dataloader,
    build_tokenizer,
    collate_rows,
    pack_documents,
    resolve_eos_id,
)
from nemo_lite.components.datasets.default_corpus import shipped_tokenizer_file  # noqa: E402
from nemo_lite.components.datasets.text import TextEncoder  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "",
    "Packing puts many short documents into one row; each ends with its EOS token.",
    "A third document, somewhat longer than the others, so that it has to continue in the next "
    "row of the batch when the rows are short, which they are in these tests.",
    "Short.",
    "Literal special token <|endoftext|> inside the text stays text.",
] * 3


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("default")


def config(tmp_path, source, **kw) -> DataConfig:
    kw.setdefault("seq_len", 16)
    kw.setdefault("batch_size", 2)
    kw.setdefault("shuffle", False)
    kw.setdefault("prefetch", 0)
    kw.setdefault("validation_fraction", 0.0)  # the whole source is the train split unless a test says
    return DataConfig(source=source, cache_dir=str(tmp_path / "hf_cache"), **kw)


def expected_batches(tokenizer, texts, *, seq_len=16, batch_size=2, n=None):
    ids = [tokenizer(t, add_special_tokens=False, split_special_tokens=True)["input_ids"] for t in texts]
    rows = list(pack_documents(ids, seq_len=seq_len, eos_id=tokenizer.eos_token_id))
    steps = len(rows) // batch_size if n is None else n
    return [collate_rows(rows[i * batch_size : (i + 1) * batch_size], eos_id=0) for i in range(steps)]


def first_epoch(loader, tokenizer, texts):
    """The loader's batches covering one epoch of `texts` (the loader loops forever)."""
    n = len(expected_batches(tokenizer, texts))
    return list(itertools.islice(loader, n))


def assert_same(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        for k in ("input_ids", "labels", "position_ids"):
            assert torch.equal(x[k], y[k]), k


def write_jsonl(path, texts, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t, "id": 1}) + "\n")
    return str(path)


# -- formats ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "txt"])
def test_each_format_packs_like_the_reference(tmp_path, tokenizer, fmt):
    texts = [t for t in TEXTS if t] if fmt == "txt" else TEXTS  # txt: one document per line
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, texts)
    elif fmt == "json":
        path.write_text(json.dumps([{"text": t} for t in texts]))
    elif fmt in ("parquet", "csv"):
        import pyarrow as pa
        import pyarrow.csv
        import pyarrow.parquet

        table = pa.table({"text": texts})
        (pyarrow.parquet.write_table if fmt == "parquet" else pyarrow.csv.write_csv)(table, str(path))
    else:
        path.write_text("\n".join(texts) + "\n")
    loader = build_dataloader(config(tmp_path, str(path)))
    assert loader.eos_id == 0 and loader.vocab_size == 8192
    assert_same(first_epoch(loader, tokenizer, texts), expected_batches(tokenizer, texts))


def test_glob_directory_and_list(tmp_path, tokenizer):
    (tmp_path / "d").mkdir()
    a = write_jsonl(tmp_path / "d" / "a.jsonl", TEXTS[:3])
    b = write_jsonl(tmp_path / "d" / "b.jsonl", TEXTS[3:])
    expected = expected_batches(tokenizer, TEXTS)
    for source in (str(tmp_path / "d" / "*.jsonl"), str(tmp_path / "d"), [a, b]):
        loader = build_dataloader(config(tmp_path, source))
        assert_same(first_epoch(loader, tokenizer, TEXTS), expected)


def test_text_files_by_paragraph_and_document(tmp_path, tokenizer):
    path = tmp_path / "t.txt"
    path.write_text("one a\none b\n\ntwo\n")
    loader = build_dataloader(config(tmp_path, str(path), text_sample_by="document"))
    assert loader.source.num_documents == 1
    loader = build_dataloader(config(tmp_path, str(path), text_sample_by="paragraph"))
    assert loader.source.num_documents == 2


# -- errors -----------------------------------------------------------------------------------
def test_missing_file_and_glob(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        build_dataloader(config(tmp_path, str(tmp_path / "nope.jsonl")))
    with pytest.raises(FileNotFoundError, match=r"glob .*\*\.parquet.* matched no file"):
        build_dataloader(config(tmp_path, str(tmp_path / "*.parquet")))
    with pytest.raises(FileNotFoundError, match="has no data files"):
        build_dataloader(config(tmp_path, str(tmp_path)))


def test_missing_field_lists_the_fields(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ["x"], field="content")
    with pytest.raises(ValueError, match=r"field 'text' is not in .*fields are \['content', 'id'\]"):
        build_dataloader(config(tmp_path, path))
    with pytest.raises(ValueError, match="'id' .* not text"):
        build_dataloader(config(tmp_path, path, text_field="id"))
    assert build_dataloader(config(tmp_path, path, text_field="content")).source.num_documents == 1


@pytest.mark.parametrize("streaming", [False, True], ids=["in_memory", "streaming"])
def test_one_record_that_is_not_text_is_refused_not_trained_quoted(tmp_path, streaming):
    """One number among texts makes datasets type the column as JSON and hand every text back quoted."""
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["hello world", 3, "more text"]))
    with pytest.raises(ValueError) as err:
        next(iter(build_dataloader(config(tmp_path, str(path), streaming=streaming))))
    message = str(err.value)
    assert (
        "\n" not in message
        and message.startswith("field 'text' of ")
        and message.endswith(
            "holds text in some records and other values (numbers, lists, objects) in others; every record's field "
            "must be a string"
        )
    )


def test_empty_sources(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no documents in .*empty.jsonl"):
        build_dataloader(config(tmp_path, str(empty)))
    blank = write_jsonl(tmp_path / "blank.jsonl", ["", ""])
    loader = build_dataloader(config(tmp_path, blank))
    with pytest.raises(ValueError, match="no documents in .*blank.jsonl.*: all 2 documents are empty"):
        next(iter(loader))


def test_unknown_extension_and_mixed_formats(tmp_path):
    (tmp_path / "a.xyz").write_text("hi")
    with pytest.raises(ValueError, match="data_format"):
        build_dataloader(config(tmp_path, str(tmp_path / "a.xyz")))
    a = write_jsonl(tmp_path / "a.jsonl", ["x"])
    (tmp_path / "b.txt").write_text("y\n")
    with pytest.raises(ValueError, match="mix formats"):
        build_dataloader(config(tmp_path, [a, str(tmp_path / "b.txt")]))


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_undecodable_bytes_are_replaced_and_counted(tmp_path, fmt):
    path = tmp_path / f"bad.{fmt}"
    good = "fine text " * 10
    if fmt == "txt":
        path.write_bytes(f"{good}\nbroken \xff\xfe bytes {good}\n".encode("latin-1"))
    else:
        path.write_bytes(b'{"text": "' + good.encode() + b'"}\n{"text": "broken \xff bytes"}\n')
    with pytest.warns(UserWarning, match="U\\+FFFD"):
        loader = build_dataloader(config(tmp_path, str(path), seq_len=8, batch_size=1))
    for _ in itertools.islice(loader, 20):
        pass
    assert loader.stats["replaced_chars"] >= 1


def test_hub_name_path_gives_a_clear_error_offline(tmp_path):
    code = (
        "from nemo_lite.components.datasets import DataConfig, build_dataloader\n"
        f"cfg = DataConfig(source='someorg/some-dataset', cache_dir={str(tmp_path)!r})\n"
        "try:\n"
        "    build_dataloader(cfg)\n"
        "except ValueError as e:\n"
        "    assert 'loaded as a Hugging Face hub dataset' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=600)  # a hang guard


# -- the tokenizer and EOS --------------------------------------------------------------------
def test_tokenizer_without_eos_is_an_error(tmp_path):
    bare = str(shipped_tokenizer_file())  # a bare tokenizer.json names no EOS
    path = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    with pytest.raises(ValueError, match=r"has no EOS token .*eos_id.*'<\|endoftext\|>': 0"):
        build_dataloader(config(tmp_path, path, tokenizer=bare))
    assert build_dataloader(config(tmp_path, path, tokenizer=bare, eos_id=0)).eos_id == 0


def test_eos_id_must_be_in_the_vocabulary(tokenizer):
    assert resolve_eos_id(tokenizer, None) == 0
    assert resolve_eos_id(tokenizer, 5) == 5
    with pytest.raises(ValueError, match="outside the vocabulary .*8192"):
        resolve_eos_id(tokenizer, 8192)


def test_missing_tokenizer_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_tokenizer(str(tmp_path / "tok.json"))


def test_tokenizer_directory(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = build_tokenizer(str(tmp_path / "tok"))
    assert loaded.eos_token_id == 0 and loaded("a b")["input_ids"] == tokenizer("a b")["input_ids"]


# -- streaming, splits, fine-tuning, resume ---------------------------------------------------
def test_streaming_gives_the_same_rows(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    for split, fraction in (("train", 0.0), ("train", 0.25), ("validation", 0.25)):
        kw = dict(validation_fraction=fraction, seq_len=8, batch_size=1)
        in_memory = build_dataloader(config(tmp_path, path, **kw), split=split)
        streamed = build_dataloader(config(tmp_path, path, streaming=True, **kw), split=split)
        assert_same(list(itertools.islice(streamed, 30)), list(itertools.islice(in_memory, 30)))


def test_validation_fraction_partitions_the_documents(tmp_path):
    texts = [f"document number {i}" for i in range(40)]
    path = write_jsonl(tmp_path / "a.jsonl", texts)
    cfg = config(tmp_path, path, validation_fraction=0.1)
    train = build_dataloader(cfg).source
    val = build_dataloader(cfg, split="validation").source
    train_docs = [tuple(d.ids) for d in train.documents(0, 0)]
    val_docs = [tuple(d.ids) for d in val.documents(0, 0)]
    assert len(val_docs) == 4 and len(train_docs) == 36
    everything = build_dataloader(config(tmp_path, path)).source.documents(0, 0)
    assert sorted(train_docs + val_docs) == sorted(tuple(d.ids) for d in everything)
    with pytest.raises(ValueError, match="no validation data"):
        build_dataloader(config(tmp_path, path), split="validation")


def test_validation_source_reads_once_in_order(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", TEXTS)
    val = write_jsonl(tmp_path / "val.jsonl", TEXTS)
    loader = build_dataloader(config(tmp_path, train, validation_source=val, shuffle=True), split="validation")
    assert_same(list(loader), expected_batches(tokenizer, TEXTS))  # no shuffle, one pass, then stops


def test_prompt_response_fields(tmp_path, tokenizer):
    path = tmp_path / "sft.jsonl"
    rows = [{"q": "What is two plus two?", "a": " Four."}, {"q": "Name a colour.", "a": " Blue."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(tmp_path, str(path), prompt_field="q", response_field="a", seq_len=40, batch_size=1)
    (batch,) = list(itertools.islice(build_dataloader(cfg), 1))
    enc = [(tokenizer(r["q"])["input_ids"], tokenizer(r["a"])["input_ids"]) for r in rows]
    stream = [t for q, a in enc for t in [*q, *a, 0]]
    trainable = [m for q, a in enc for m in [0] * len(q) + [1] * (len(a) + 1)]
    labels = [t if m else -100 for t, m in zip(stream[1:41], trainable[1:41], strict=False)]
    assert batch["input_ids"][0].tolist()[: len(stream)] == stream[:40]
    assert batch["labels"][0].tolist()[: len(labels)] == labels[:40]


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_with_shuffle(tmp_path, streaming):
    texts = [f"document {i} " + "word " * (i % 7) for i in range(50)]
    path = write_jsonl(tmp_path / "a.jsonl", texts)
    cfg = config(tmp_path, path, shuffle=True, streaming=streaming, shuffle_buffer=8, seq_len=8, prefetch=2)
    reference = list(itertools.islice(build_dataloader(cfg), 40))
    loader = build_dataloader(cfg)
    list(itertools.islice(loader, 25))  # past the first epoch (~300 tokens / 16 per batch)
    assert loader.epoch >= 1
    resumed = build_dataloader(cfg)
    resumed.load_state_dict(loader.state_dict())
    assert_same(list(itertools.islice(resumed, 15)), reference[25:])


def test_warm_run_does_not_tokenize(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    first = list(itertools.islice(build_dataloader(config(tmp_path, path)), 3))

    def fail(self, table):
        raise AssertionError("tokenized again on a warm run")

    monkeypatch.setattr(TextEncoder, "__call__", fail)
    assert_same(list(itertools.islice(build_dataloader(config(tmp_path, path)), 3)), first)
