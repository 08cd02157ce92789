"""The shared_prompt mask rule: each answer of a pair packed after one prompt attends as its own sequence."""

from __future__ import annotations

import pytest
import torch

from nemo_lite.components.attention import AttentionConfig
from nemo_lite.components.attention.base import AttentionConfigError
from nemo_lite.components.attention.masks import AttentionMask, allowed_pairs, branches_of, dense_mask, document_ids
from nemo_lite.components.datasets import DataConfig, build_encoder, build_tokenizer
from nemo_lite.components.models import LlamaForCausalLM
from nemo_lite.testing.preference import PAIRS_CHAT, PAIRS_TEXT, one_row_batch, tiny_chat_checkpoint
from nemo_lite.training.objectives import answer_logps

EOS = 0


def reference_mask(ids: list[int], positions: list[int]) -> torch.Tensor:
    """The rule written out per (query, key), with each answer's tokens found by hand: a token sees the
    earlier tokens of its own sequence ``prompt answer``."""
    n = len(ids)
    doc, seq, d, s = [], [], 0, 0  # document, and sequence within it: 0 = prompt + first answer, 1 = second
    for t in range(n):
        if t and ids[t - 1] == EOS:
            d, s = d + 1, 0
        elif t and positions[t] != positions[t - 1] + 1:
            s += 1
        doc.append(d)
        seq.append(s)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(q + 1):
            if doc[k] != doc[q]:
                continue
            fork = min(positions[t] for t in range(n) if doc[t] == doc[q] and seq[t] == seq[q])
            allowed[q, k] = seq[k] == seq[q] or (seq[k] == 0 and positions[k] < fork)
    return allowed


def test_the_rule_is_the_handwritten_one_and_counts_its_pairs():
    # prompt (4) chosen (3) | copy + rejected (1 + 2) EOS | a plain document | prompt (2) chosen (1) | copy + rej (1+3)
    ids = [5, 6, 7, 8, 11, 12, 13, 8, 21, 22, EOS, 30, 31, EOS, 40, 41, 42, 41, 51, 52, 53]
    positions = [0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 0, 1, 2, 0, 1, 2, 1, 2, 3, 4]
    ids_BS, pos_BS = torch.tensor([ids]), torch.tensor([positions])
    doc_ids = document_ids(ids_BS, EOS)
    branches = branches_of(doc_ids, pos_BS)
    got = dense_mask(len(ids), doc_ids_BS=doc_ids, branches=branches)[0, 0]
    want = reference_mask(ids, positions)
    assert torch.equal(got, want)
    mask = AttentionMask("sdpa", "shared_prompt", None, len(ids), 1, torch.device("cpu"), doc_ids, branches=branches)
    assert int(allowed_pairs(mask)) == int(want.sum())


@pytest.mark.parametrize("window", [0, 2, 5])
def test_every_backend_builds_the_rule_with_windows_on_positions(window):
    """flex's mask_mod and the dense mask of sdpa/eager agree with the hand-written rule, a sliding window
    counting position ids (so each answer's window is its own sequence's)."""
    from torch.nn.attention.flex_attention import create_mask

    from nemo_lite.components.attention import build_attention_backend

    ids = [5, 6, 7, 8, 11, 12, 13, 8, 21, 22, EOS, 40, 41, 42, 41, 51, 52, 53]
    positions = [0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 0, 1, 2, 1, 2, 3, 4]
    want = reference_mask(ids, positions)
    if window:
        pos = torch.tensor(positions)
        want = want & (pos[:, None] - pos[None, :] <= window)
    ids_BS, pos_BS = torch.tensor([ids]), torch.tensor([positions])
    for name in ("flex", "sdpa", "eager"):
        backend = build_attention_backend(name, attn_mask_type="shared_prompt")
        mask = backend.build_mask(ids_BS, EOS, sliding_windows=(window,), position_ids_BS=pos_BS)
        built = mask.masks[mask.key(window)]
        if name == "flex":
            built = create_mask(built.mask_mod, 1, 1, len(ids), len(ids), device="cpu")
        assert torch.equal(built[0, 0], want), name


def test_without_forks_it_is_block_causal():
    ids = torch.tensor([[5, 6, EOS, 7, 8, 9, EOS, 4]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]])
    doc_ids = document_ids(ids, EOS)
    shared = dense_mask(8, doc_ids_BS=doc_ids, branches=branches_of(doc_ids, positions))
    assert torch.equal(shared, dense_mask(8, doc_ids_BS=doc_ids))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_chat_checkpoint(tmp_path_factory.mktemp("shared_prompt"), layers=2)


def pairs_batch(checkpoint, records, shared):
    cfg = DataConfig(kind="preference", tokenizer=str(checkpoint), shared_prompt=shared, seq_len=512)
    encoder = build_encoder(cfg, build_tokenizer(str(checkpoint)), description="the test pairs")
    return one_row_batch(encoder, records, 512), encoder.eos_id


@pytest.mark.parametrize("backend", ["flex", "sdpa", "eager"])
@pytest.mark.parametrize("kind", ["chat", "text"])
def test_shared_prompt_log_probabilities_equal_the_separate_sequences(checkpoint, backend, kind):
    records = PAIRS_CHAT if kind == "chat" else PAIRS_TEXT
    separate_batch, eos = pairs_batch(checkpoint, records, shared=False)
    shared_batch, _ = pairs_batch(checkpoint, records, shared=True)
    assert shared_batch["input_ids"].ne(eos).sum() < separate_batch["input_ids"].ne(eos).sum()  # the prompt once
    results = {}
    for mask_type, batch in (("block_causal", separate_batch), ("shared_prompt", shared_batch)):
        model = LlamaForCausalLM.from_pretrained(
            checkpoint, attention=AttentionConfig(backend=backend, attn_mask_type=mask_type)
        )
        with torch.no_grad():
            mask = model.build_attention_mask(batch["input_ids"], eos, batch["position_ids"])
            results[mask_type] = answer_logps(model, batch, mask)
        if mask_type == "shared_prompt":  # the rule matters: block_causal lets the rejected answer see the chosen
            with torch.no_grad():
                plain = LlamaForCausalLM.from_pretrained(
                    checkpoint, attention=AttentionConfig(backend=backend, attn_mask_type="block_causal")
                )
                leaky = answer_logps(plain, batch, plain.build_attention_mask(batch["input_ids"], eos))
            assert not torch.allclose(leaky[1], results["block_causal"][1], atol=1e-3)
    for separate, shared in zip(results["block_causal"], results["shared_prompt"], strict=True):
        torch.testing.assert_close(shared, separate, atol=1e-5, rtol=1e-5)


def test_varlen_refuses_the_rule_in_one_line():
    with pytest.raises(AttentionConfigError) as err:
        AttentionConfig(backend="varlen", attn_mask_type="shared_prompt").check()
    assert "\n" not in str(err.value) and "use flex, sdpa or eager" in str(err.value)
