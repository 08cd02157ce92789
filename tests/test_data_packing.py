"""Packing invariants: every token once and in order, EOS after each document, positions restart
exactly at document starts, labels are the inputs shifted by one."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nemo_lite.components.datasets import IGNORE_INDEX, DocumentPacker, collate_rows, pack_documents

EOS = 0

documents_st = st.lists(st.lists(st.integers(1, 50), max_size=40), max_size=25)


def stream_of(docs: list[list[int]]) -> list[int]:
    """The packed stream the rules define: each non-empty document followed by EOS."""
    return [t for d in docs if d for t in [*d, EOS]]


def doc_ids_reference(stream: list[int]) -> list[int]:
    """The mask rules (docs/attention.md): a document ends at (and includes) each EOS."""
    out, doc = [], 0
    for t in stream:
        out.append(doc)
        doc += t == EOS
    return out


@settings(max_examples=200, deadline=None)
@given(docs=documents_st, seq_len=st.integers(1, 17))
def test_every_token_once_in_order(docs, seq_len):
    stats: dict[str, int] = {}
    rows = list(pack_documents(docs, seq_len=seq_len, eos_id=EOS, stats=stats))
    stream = stream_of(docs)
    inputs = [t for r in rows for t in r.tokens[:-1]]
    labels = [t for r in rows for t in r.tokens[1:]]
    # input_ids tile the stream with no gap and no repeat; labels are the same tiling shifted by one.
    assert inputs == stream[: len(rows) * seq_len]
    assert labels == stream[1 : len(rows) * seq_len + 1]
    assert len(rows) == max(0, (len(stream) - 1) // seq_len)
    assert all(len(r.tokens) == len(r.positions) == seq_len + 1 for r in rows)
    for a, b in zip(rows, rows[1:], strict=False):  # the last token of a row is the first of the next
        assert a.tokens[-1] == b.tokens[0] and a.positions[-1] == b.positions[0]
    assert stats["documents"] == sum(1 for d in docs if d)
    assert stats["empty_documents"] == sum(1 for d in docs if not d)
    assert stats["tokens"] == len(stream)


@settings(max_examples=200, deadline=None)
@given(docs=documents_st, seq_len=st.integers(1, 17))
def test_positions_restart_exactly_at_document_starts(docs, seq_len):
    rows = list(pack_documents(docs, seq_len=seq_len, eos_id=EOS))
    stream = stream_of(docs)
    positions = [p for r in rows for p in r.positions[:-1]]
    doc_of = doc_ids_reference(stream)
    for i, p in enumerate(positions):
        first = i == 0 or doc_of[i] != doc_of[i - 1]
        assert (p == 0) == first, (i, p)
        if not first:  # also across row boundaries: a continued document keeps counting
            assert p == positions[i - 1] + 1


@settings(max_examples=100, deadline=None)
@given(docs=documents_st, seq_len=st.integers(1, 12), mask_cross=st.booleans(), use_pos=st.booleans())
def test_collate_shift_and_masks(docs, seq_len, mask_cross, use_pos):
    rows = list(pack_documents(docs, seq_len=seq_len, eos_id=EOS))
    if not rows:
        return
    batch = collate_rows(rows, eos_id=EOS, position_ids=use_pos, mask_cross_document_labels=mask_cross)
    x, y, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    assert x.shape == y.shape == pos.shape == (len(rows), seq_len)
    assert all(t.dtype == torch.int64 and t.is_contiguous() for t in batch.values())
    full = torch.tensor([r.tokens for r in rows])
    assert torch.equal(x, full[:, :-1])
    expected = full[:, 1:].clone()
    if mask_cross:  # only the labels *from* an EOS (the next document's first token) go
        expected[x == EOS] = IGNORE_INDEX
    assert torch.equal(y, expected)
    # the EOS itself stays a target: the model learns to end documents
    assert bool((y == EOS).any()) == bool((full[:, 1:] == EOS).any())
    if use_pos:
        assert torch.equal(pos, torch.tensor([r.positions[:-1] for r in rows]))
    else:
        assert torch.equal(pos, torch.arange(seq_len).expand(len(rows), -1))


def test_long_document_spans_several_rows():
    doc = list(range(1, 31))  # 30 tokens + EOS over rows of 8
    rows = list(pack_documents([doc, [7, 7]], seq_len=8, eos_id=EOS))
    assert len(rows) == 4  # 30 + 1 + 2 + 1 = 34 tokens -> (34 - 1) // 8
    positions = [p for r in rows for p in r.positions[:-1]]
    assert positions[:31] == list(range(31))  # continues across 3 row boundaries
    assert positions[31] == 0 and rows[3].tokens[-2:] == [7, 7]


def test_empty_documents_are_skipped_and_counted():
    stats: dict[str, int] = {}
    rows = list(pack_documents([[], [5, 6], [], [], [7]], seq_len=2, eos_id=EOS, stats=stats))
    assert [r.tokens for r in rows] == [[5, 6, EOS], [EOS, 7, EOS]]
    assert stats == {"documents": 2, "empty_documents": 3, "tokens": 5}


def test_eos_inside_a_document_starts_a_new_one():
    # docs/attention.md: documents end at every EOS; positions must agree with the attention mask.
    rows = list(pack_documents([[3, EOS, 4, 5]], seq_len=4, eos_id=EOS))
    assert rows[0].tokens == [3, EOS, 4, 5, EOS]
    assert rows[0].positions == [0, 1, 0, 1, 2]


def test_prompt_tokens_get_no_loss():
    docs = [([11, 12, 13, 21, 22], 3), ([14, 23], 1)]  # (ids, prompt_len)
    rows = list(pack_documents(docs, seq_len=8, eos_id=EOS, track_prompts=True))
    assert len(rows) == 1
    batch = collate_rows(rows, eos_id=EOS)
    # stream: 11 12 13 21 22 EOS 14 23 EOS; the targets 12, 13 and 14 are prompt tokens
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, EOS, 14, 23]]
    assert batch["labels"].tolist() == [[-100, -100, 21, 22, EOS, -100, 23, EOS]]


def test_packer_state_round_trip_mid_document():
    rng = random.Random(0)
    docs = [[rng.randrange(1, 100) for _ in range(rng.randrange(0, 30))] for _ in range(50)]
    reference = list(pack_documents(docs, seq_len=7, eos_id=EOS))
    packer = DocumentPacker(seq_len=7, eos_id=EOS)
    got = []
    for i, d in enumerate(docs):
        packer.push(d)
        while packer.rows_ready:
            got.append(packer.pop_row())
        if i % 5 == 0:  # save and restore the leftover buffer in a fresh packer
            state = packer.state_dict()
            packer = DocumentPacker(seq_len=7, eos_id=EOS)
            packer.load_state_dict(state)
    assert got == reference


def test_packer_rejects_bad_input():
    packer = DocumentPacker(seq_len=4, eos_id=EOS)
    with pytest.raises(ValueError, match="track_prompts"):
        packer.push([1, 2], prompt_len=1)
    with pytest.raises(IndexError, match="no full row"):
        packer.pop_row()
    with pytest.raises(ValueError, match="outside"):
        DocumentPacker(seq_len=4, eos_id=EOS, track_prompts=True).push([1, 2], prompt_len=3)
