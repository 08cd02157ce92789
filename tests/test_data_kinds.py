"""Record kinds: a new kind is one class registered from outside the package (here, this file), and
the loader gives sampling what it needs (prompt ids, where generation stops) for every kind."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("datasets")
pytest.importorskip("transformers")

from nemo_lite.components.datasets import (  # noqa: E402
    DataConfig,
    Document,
    RecordEncoder,
    UnknownRecordKindError,
    build_dataloader,
    list_record_kinds,
    register_record_kind,
    resolve_eos_id,
    unregister_record_kind,
)
from nemo_lite.errors import IGNORE_INDEX, NemoLiteError  # noqa: E402
from nemo_lite.testing.data import SyntheticPackedLoader  # noqa: E402


class IdPairsEncoder:
    """Pre-tokenized fine-tuning pairs, ``{"prompt": [...], "response": [...]}``: no loss on the prompt."""

    has_prompts, whole_documents = True, False

    def __init__(self, tokenizer: Any, eos_id: int) -> None:
        self.tokenizer, self.eos_id, self.end_id = tokenizer, eos_id, eos_id

    @classmethod
    def from_config(cls, cfg: DataConfig, tokenizer: Any, *, description: str) -> IdPairsEncoder:
        return cls(tokenizer, resolve_eos_id(tokenizer, cfg.eos_id))

    def check_columns(self, columns: Sequence[str], features: Any, description: str) -> None:
        missing = [c for c in ("prompt", "response") if c not in columns]
        if missing:
            raise ValueError(f"fields {missing} are not in {description}; its fields are {list(columns)}")

    def columns(self, table: Any) -> list[list[Any]]:
        return [table.column("prompt").to_pylist(), table.column("response").to_pylist()]

    def documents(self, records: Sequence[tuple[Any, ...]], indices: Sequence[int]) -> list[Document]:
        return [Document(prompt + response, len(prompt)) for prompt, response in records]

    def __call__(self, table: Any, indices: list[int]) -> dict[str, list[Any]]:
        docs = self.documents(list(zip(*self.columns(table), strict=True)), indices)
        return {"input_ids": [d.ids for d in docs], "prompt_len": [d.prompt_len for d in docs]}

    def features(self) -> Any:
        import datasets

        return datasets.Features(
            {"input_ids": datasets.List(datasets.Value("int32")), "prompt_len": datasets.Value("int32")}
        )

    def read(self, table: Any) -> list[Document]:
        ids, prompt_lens = table.column("input_ids").to_pylist(), table.column("prompt_len").to_pylist()
        return [Document(d, p) for d, p in zip(ids, prompt_lens, strict=True)]

    def cache_key(self) -> str:
        return "test-id-pairs-v1"

    def report(self, tokenized: Any, description: str) -> None:
        pass

    def prompt_ids(self, text: str) -> list[int]:
        return [int(t) for t in text.split()] or [self.eos_id]


@pytest.fixture
def id_pairs_kind():
    register_record_kind("test_id_pairs")(IdPairsEncoder)
    yield "test_id_pairs"
    unregister_record_kind("test_id_pairs")


# (prompt, response) id lists: 25 ids + 8 EOS make 33 stream tokens, 4 rows of 8 + 1.
PAIRS = [
    ([5, 6], [7]),
    ([8], [9]),
    ([10, 11, 12], [13, 14]),
    ([15], []),
    ([16, 17], [18, 19]),
    ([20], [21, 22]),
    ([23, 24, 25], [26, 27]),
    ([28], [29]),
]
EOS = 0  # the default tokenizer's
REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def loader_config(source: str, tmp_path, **kw) -> DataConfig:
    kw = {"seq_len": 8, "batch_size": 2, "shuffle": False, "prefetch": 0, "validation_fraction": 0.0} | kw
    return DataConfig(source=source, cache_dir=str(tmp_path / "hf"), num_epochs=1, **kw)


def hand_packed_rows(docs, seq_len):
    """Rows of the stream doc0 EOS doc1 EOS ...: (tokens, positions, trainable) of seq_len + 1 each.
    ``docs`` are (ids, prompt_len); a prompt token is never a loss target, its response and EOS are."""
    stream, trainable = [], []
    for ids, prompt_len in docs:
        stream += [*ids, EOS]
        trainable += [0] * prompt_len + [1] * (len(ids) - prompt_len + 1)
    positions, p = [], 0
    for t in stream:
        positions.append(p)
        p = 0 if t == EOS else p + 1
    spans = [slice(r * seq_len, (r + 1) * seq_len + 1) for r in range((len(stream) - 1) // seq_len)]
    return [(stream[s], positions[s], trainable[s]) for s in spans]


def loader_rows(loader):
    return [
        (batch["input_ids"][b].tolist(), batch["labels"][b].tolist(), batch["position_ids"][b].tolist())
        for batch in loader
        for b in range(len(batch["input_ids"]))
    ]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_kind_registered_outside_the_package_packs_its_documents(tmp_path, id_pairs_kind, streaming):
    source = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "response": r, "note": "x"} for p, r in PAIRS])
    loader = build_dataloader(loader_config(source, tmp_path, kind=id_pairs_kind, streaming=streaming))
    rows = loader_rows(loader)
    want = hand_packed_rows([(p + r, len(p)) for p, r in PAIRS], 8)
    assert len(want) == 4 and len(rows) == 4  # two steps of two rows
    for (ids, labels, pos), (tokens, positions, trainable) in zip(rows, want, strict=True):
        assert ids == tokens[:-1] and pos == positions[:-1]
        assert labels == [t if ok else IGNORE_INDEX for t, ok in zip(tokens[1:], trainable[1:], strict=True)]
    assert rows[0][0] == [5, 6, 7, EOS, 8, 9, EOS, 10]
    assert rows[0][1] == [IGNORE_INDEX, 7, EOS, IGNORE_INDEX, 9, EOS, IGNORE_INDEX, IGNORE_INDEX]
    assert rows[0][2] == [0, 1, 2, 3, 0, 1, 2, 0]
    assert loader.stats["documents"] == len(PAIRS)
    assert loader.record_kind == id_pairs_kind
    assert loader.prompt_ids("5 6") == [5, 6] and loader.end_id == EOS


def test_a_kind_checks_its_own_columns(tmp_path, id_pairs_kind):
    source = write_jsonl(tmp_path / "text.jsonl", [{"prompt": [1], "text": "hello"}])
    with pytest.raises(ValueError, match=r"^fields \['response'\] are not in .*text\.jsonl.*; its fields are"):
        build_dataloader(loader_config(source, tmp_path, kind=id_pairs_kind))


def test_an_unknown_kind_names_the_registered_ones(tmp_path, id_pairs_kind):
    source = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": [1], "response": [2]}])
    with pytest.raises(UnknownRecordKindError) as err:
        build_dataloader(loader_config(source, tmp_path, kind="pairs"))
    assert isinstance(err.value, NemoLiteError) and isinstance(err.value, ValueError)
    assert str(err.value) == (
        "unknown record kind DataConfig.kind='pairs'; registered kinds: "
        "chat, preference, test_id_pairs, text, token_ids"
    )
    with pytest.raises(ValueError, match="is already registered by IdPairsEncoder"):
        register_record_kind("test_id_pairs")(type("Other", (IdPairsEncoder,), {}))


def test_each_kind_reads_the_fields_it_needs(tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match=r"^DataConfig.kind=chat reads conversations from DataConfig.messages_field"):
        build_dataloader(DataConfig(source=path, kind="chat", validation_fraction=0.0))
    with pytest.raises(ValueError, match=r"holds conversations, which kind 'text' does not read; set DataConfig.kind"):
        build_dataloader(DataConfig(source=path, kind="text", messages_field="m", validation_fraction=0.0))


def test_every_built_in_kind_implements_the_protocol():
    members = [n for n, v in vars(RecordEncoder).items() if inspect.isfunction(v) or isinstance(v, classmethod)]
    assert {"from_config", "check_columns", "columns", "documents", "__call__", "read", "prompt_ids"} <= set(members)
    import nemo_lite.components.datasets.kinds as kinds

    for name in list_record_kinds():
        cls = kinds.KINDS.get(name)
        assert cls.kind == name
        missing = [m for m in members if not callable(getattr(cls, m, None))]
        assert not missing, f"record kind {name!r} lacks {missing}"


# -- what sampling reads ----------------------------------------------------------------------
def test_a_text_loader_encodes_prompts_and_stops_at_the_eos(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i} of the test."}) + "\n" for i in range(20)))
    loader = build_dataloader(
        DataConfig(source=str(path), seq_len=16, batch_size=1, validation_fraction=0.0, cache_dir=str(tmp_path / "hf"))
    )
    assert loader.record_kind == "text" and loader.end_id == loader.eos_id == EOS
    ids = loader.prompt_ids("The quick fox")
    assert ids == loader.tokenizer("The quick fox", add_special_tokens=False)["input_ids"]
    assert loader.tokenizer.decode(ids) == "The quick fox"
    assert loader.prompt_ids("") == [EOS]  # an empty prompt starts where a document does


def test_the_synthetic_loader_offers_the_same_sampling_api():
    loader = SyntheticPackedLoader(2, 16, vocab_size=64, eos_id=3)
    assert loader.end_id == 3 and loader.record_kind == "synthetic"
    with pytest.raises(ValueError, match=re.escape("no tokenizer") + ".*set trainer.sample_tokens=0"):
        loader.prompt_ids("Hello")
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (2, 16) and (batch["labels"] != IGNORE_INDEX).all()


# -- the shipped token_ids kind -----------------------------------------------------------------
@pytest.mark.parametrize("streaming", [False, True])
def test_token_ids_records_are_packed_as_they_are(tmp_path, streaming):
    docs = [p + r for p, r in PAIRS]
    source = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": d, "meta": "x"} for d in docs])
    loader = build_dataloader(loader_config(source, tmp_path, kind="token_ids", streaming=streaming))
    rows = loader_rows(loader)
    want = hand_packed_rows([(d, 0) for d in docs], 8)
    assert [(ids, labels, pos) for ids, labels, pos in rows] == [(t[:-1], t[1:], p[:-1]) for t, p, _ in want]
    assert loader.record_kind == "token_ids" and loader.end_id == loader.eos_id == EOS
    assert loader.tokenizer.decode(loader.prompt_ids("The quick fox")) == "The quick fox"


def test_token_ids_outside_the_vocabulary_name_the_record(tmp_path):
    source = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, 2]}, {"input_ids": [3, 10**6]}])
    with pytest.raises(ValueError) as err:
        build_dataloader(loader_config(source, tmp_path, kind="token_ids"))
    assert re.match(
        r"record 1 of '.*ids\.jsonl' \(1 json file\): 'input_ids' holds \[3, 1000000\], not a list of token ids in "
        r"\[0, 8192\) \(the vocabulary of DataConfig.tokenizer\)$",
        str(err.value),
    )
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello"}])
    with pytest.raises(ValueError, match=r"field 'input_ids' is not in .*; its fields are \['text'\]. Records of"):
        build_dataloader(loader_config(text, tmp_path, kind="token_ids"))


def test_the_token_ids_data_group_reads_the_given_files(tmp_path):
    from omegaconf import OmegaConf

    group = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(REPO / "configs/data/token_ids.yaml"))
    with pytest.raises(ValueError, match=r"^field 'input_ids' is not in the default corpus"):
        build_dataloader(dataclasses.replace(OmegaConf.to_object(group), validation_fraction=0.0))
    source = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": list(range(1, 40))}])
    group.merge_with({"source": source, "validation_fraction": 0.0, "cache_dir": str(tmp_path / "hf")})
    loader = build_dataloader(OmegaConf.to_object(group))
    assert loader.record_kind == "token_ids"
    assert next(iter(loader))["input_ids"][0, :40].tolist() == [*range(1, 40), EOS]


def test_training_reads_no_record_kind_setting():
    """Sampling and the export go through the loader (prompt_ids, end_id), so a new kind's settings never
    reach nemo_lite/training."""
    import ast

    kind_settings = {"kind", "text_field", "prompt_field", "response_field", "mask_prompt_labels"}
    kind_settings |= {"messages_field", "chat_template"}
    found = [
        f"{path.relative_to(REPO)}:{node.lineno} .{node.attr}"
        for path in sorted((REPO / "nemo_lite/training").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr in kind_settings
    ]
    assert not found, f"training code reads record-kind settings: {found}"
