"""The preference record kind: TRL's tokenization, answers-only labels, whole pairs, one-line refusals."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from nemo_lite.components.datasets import DataConfig, build_dataloader
from nemo_lite.components.datasets.default_preference import generate_pairs
from nemo_lite.errors import IGNORE_INDEX
from nemo_lite.testing.preference import PAIRS_CHAT, PAIRS_TEXT, tiny_chat_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_chat_checkpoint(tmp_path_factory.mktemp("tiny_chat"))


def loader_of(tmp_path, checkpoint, records, *, shared=False, seq_len=128, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = DataConfig(
        source=str(path), kind="preference", tokenizer=str(checkpoint), seq_len=seq_len, batch_size=1,
        validation_fraction=0, shuffle=False, shared_prompt=shared, prefetch=0, cache_dir=str(tmp_path / "cache"),
        **kw,
    )  # fmt: skip
    return build_dataloader(cfg)


def trl_pair(tokenizer, record):
    """TRL's DPOTrainer tokenization of one record (its own functions)."""
    from trl.data_utils import _tokenize, common_prefix_length, is_conversational

    record = dict(record)
    if not is_conversational(record):
        for key in ("chosen", "rejected"):
            record[key] += tokenizer.eos_token
    kw = {"add_generation_prompt": True} if is_conversational(record) else {}
    prompt = _tokenize(tokenizer, record["prompt"], **kw)["input_ids"]
    chosen = _tokenize(tokenizer, record["prompt"] + record["chosen"])["input_ids"]
    rejected = _tokenize(tokenizer, record["prompt"] + record["rejected"])["input_ids"]
    n = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
    return prompt[:n], chosen[n:], rejected[n:]


def answers_of(batch, row=0):
    """{answer id: the label tokens of that answer}, from labels and answer_ids."""
    out: dict[int, list[int]] = {}
    for label, answer in zip(batch["labels"][row].tolist(), batch["answer_ids"][row].tolist(), strict=True):
        assert (answer == 0) == (label == IGNORE_INDEX)
        if answer:
            out.setdefault(answer, []).append(label)
    return out


@pytest.mark.parametrize("records", [PAIRS_TEXT, PAIRS_CHAT], ids=["text", "chat"])
@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared_prompt"])
def test_pairs_are_whole_with_labels_on_trls_answer_tokens(tmp_path, checkpoint, records, shared):
    loader = loader_of(tmp_path, checkpoint, records, shared=shared, seq_len=96)
    batches = list(itertools.islice(loader, 6))
    expected = [trl_pair(loader.tokenizer, r) for r in records]
    seen = []
    for batch in batches:
        answers = answers_of(batch)
        for k in range(len(answers) // 2):
            seen.append((answers[2 * k + 1], answers[2 * k + 2]))
        ids, positions = batch["input_ids"][0].tolist(), batch["position_ids"][0].tolist()
        for prompt, chosen, rejected in expected:
            layout = (
                prompt + chosen + prompt[-1:] + rejected
                if shared
                else prompt + chosen + [loader.eos_id] + prompt + rejected
            )
            starts = [i for i in range(len(ids)) if ids[i : i + len(layout)] == layout]
            for s in starts:  # whole in the row, positions as two separate sequences would have them
                want = (
                    [*range(len(prompt) + len(chosen)), *range(len(prompt) - 1, len(prompt) + len(rejected))]
                    if shared
                    else [*range(len(prompt) + len(chosen) + 1), *range(len(prompt) + len(rejected))]
                )
                assert positions[s : s + len(layout)] == want
    assert seen[: len(records)] == [(c, r) for _, c, r in expected]


@pytest.mark.parametrize(
    ("record", "field", "words"),
    [
        ({"prompt": "Hi", "chosen": 3, "rejected": "no"}, "chosen", "holds int"),
        ({"prompt": [{"role": "user", "content": "Hi"}], "chosen": "yes", "rejected": "no"}, "chosen", "all be"),
        ({"prompt": "", "chosen": "yes", "rejected": "no"}, "prompt", "non-empty prompt"),
        ({"prompt": "Hi <|endoftext|>", "chosen": "yes", "rejected": "no"}, "prompt", "delimiter"),
    ],
)
def test_a_bad_record_is_refused_in_one_line_naming_record_and_field(tmp_path, checkpoint, record, field, words):
    from nemo_lite.components.datasets import build_encoder, build_tokenizer

    cfg = DataConfig(kind="preference", tokenizer=str(checkpoint))
    encoder = build_encoder(cfg, build_tokenizer(str(checkpoint)), description="the test pairs")
    records = [tuple(r[f] for f in encoder.fields) for r in (PAIRS_TEXT[0], record)]
    with pytest.raises(ValueError) as err:
        encoder.documents(records, [0, 1])
    message = str(err.value)
    assert "\n" not in message and "record 1 " in message and f"field {field!r}" in message and words in message


def test_one_record_of_another_shape_leaves_every_pair_as_written(tmp_path, checkpoint):
    """Content parts in one answer make datasets type the column as JSON: every pair still trains on its own
    tokens (no JSON quotes), the parts joined; a number as content is refused naming the record and field."""
    parts = dict(PAIRS_CHAT[1], chosen=[{"role": "assistant", "content": [{"type": "text", "text": "Lima."}]}])
    odd = [PAIRS_CHAT[0], parts, *PAIRS_CHAT[2:]]
    got = list(loader_of(tmp_path / "odd", checkpoint, odd, num_epochs=1))
    want = list(loader_of(tmp_path / "plain", checkpoint, PAIRS_CHAT, num_epochs=1))
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    bad = [PAIRS_CHAT[0], dict(PAIRS_CHAT[1], rejected=[{"role": "assistant", "content": 6}]), *PAIRS_CHAT[2:]]
    with pytest.raises(ValueError) as err:
        list(loader_of(tmp_path / "bad", checkpoint, bad, num_epochs=1))
    assert str(err.value).startswith("record 1 of ") and (
        "field 'rejected': message 0, field 'content' holds int (6); content must be a string" in str(err.value)
    )


def test_a_pair_longer_than_a_row_is_skipped_with_a_warning(tmp_path, checkpoint):
    long = {"prompt": "word " * 200, "chosen": " yes", "rejected": " no"}
    with pytest.warns(UserWarning, match="1 preference pairs are longer than seq_len - 1"):
        loader = loader_of(tmp_path, checkpoint, [long, *PAIRS_TEXT], seq_len=64)
    answers = [a for b in itertools.islice(loader, 4) for a in answers_of(b).values()]
    assert all(len(a) < 20 for a in answers) and len(answers) >= 2 * len(PAIRS_TEXT)


def test_the_default_preference_set_is_deterministic_and_prefers_the_right_answer():
    first, again = generate_pairs(200), generate_pairs(200)
    assert first == again
    assert all(r["chosen"] != r["rejected"] for r in first)
    questions = {r["prompt"][-1]["content"].split()[2] for r in first}  # "is", "minutes", ... varied kinds
    assert len(questions) > 3
    add = next(r for r in first if " plus " in r["prompt"][-1]["content"])
    a, _, b = add["prompt"][-1]["content"].removeprefix("What is ").rstrip("?").split()
    assert add["chosen"][0]["content"].endswith(f" is {int(a) + int(b)}.")


@pytest.mark.parametrize("records", [PAIRS_TEXT, PAIRS_CHAT], ids=["text", "chat"])
def test_an_implicit_prompt_is_the_answers_common_start(tmp_path, checkpoint, records):
    """TRL's implicit-prompt format (no prompt column, the prompt inside both answers) packs as the explicit one."""
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in records]
    explicit_rows = next(iter(loader_of(tmp_path / "explicit", checkpoint, records)))
    implicit_rows = next(iter(loader_of(tmp_path / "implicit", checkpoint, implicit)))
    for key in ("input_ids", "labels", "answer_ids", "position_ids"):
        assert torch.equal(implicit_rows[key], explicit_rows[key]), key
