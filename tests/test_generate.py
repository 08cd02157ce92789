"""Generation with the KV cache against transformers' own ``generate``, on tiny random checkpoints of every
family (Mistral's window shorter than the sequences), float32 CPU: greedy tokens identical for batches of
prompts of different lengths, through every attention backend, whatever mask type the model was built with;
sampling reproducible with a seed and filtered as transformers filters; stops; the cache's memory check."""

from __future__ import annotations

import pytest
import torch
from model_utils import EOS, FAMILY_VARIANTS, family_hf_model, random_ids

from nemo_lite.components.attention import AttentionConfig, list_attention_backends
from nemo_lite.components.models import AutoModelForCausalLM, generate
from nemo_lite.components.models.generate import (
    GenerationConfig,
    GenerationError,
    KVCache,
    cache_lengths,
    generate_ids,
    kv_cache_bytes,
    sample_next,
)

NEW = 12


def _twins(variant: str, tmp_path, attention: AttentionConfig | None = None, seed: int = 1):
    theirs = family_hf_model(variant, seed=seed)
    theirs.save_pretrained(tmp_path / variant)
    return theirs, AutoModelForCausalLM.from_pretrained(tmp_path / variant, attention=attention)


def _prompts(lengths=(3, 11, 7)) -> list[list[int]]:
    prompts = [random_ids(1, n, 128, seed=n)[0].tolist() for n in lengths]
    prompts[1][4] = EOS  # a document boundary inside a prompt: generation must still see the whole prompt
    return prompts


def _reference(theirs, prompt: list[int], new: int = NEW, **kwargs) -> list[int]:
    out = theirs.generate(
        torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=0, **{"eos_token_id": None, **kwargs}
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("variant", list(FAMILY_VARIANTS))
def test_greedy_tokens_equal_transformers_generate_for_a_batch_of_prompts_of_different_lengths(variant, tmp_path):
    theirs, ours = _twins(variant, tmp_path)
    prompts = _prompts()
    out = generate_ids(ours, prompts, GenerationConfig(max_new_tokens=NEW))
    assert out.tokens == [_reference(theirs, p) for p in prompts]
    assert out.stop_reasons == ["length"] * 3


@pytest.mark.parametrize("backend", list_attention_backends())
def test_every_backend_prefills_with_a_causal_view_of_a_block_causal_model(backend, tmp_path):
    """A model built for packed training (block_causal at EOS) must not split the prompt at its EOS."""
    attention = AttentionConfig(backend=backend, attn_mask_type="block_causal")
    theirs, ours = _twins("mistral", tmp_path, attention)
    prompts = _prompts()
    assert generate_ids(ours, prompts, GenerationConfig(max_new_tokens=NEW)).tokens == [
        _reference(theirs, p) for p in prompts
    ]


def test_the_sliding_window_changes_what_is_generated(tmp_path):
    """The mistral parity above is not blind to the window: without it transformers generates otherwise."""
    theirs, ours = _twins("mistral", tmp_path)
    unwindowed = family_hf_model("mistral", seed=1, sliding_window=None)
    prompts = _prompts()
    out = generate_ids(ours, prompts, GenerationConfig(max_new_tokens=NEW)).tokens
    assert out != [_reference(unwindowed, p) for p in prompts]


def test_a_sliding_window_layer_keeps_a_ring_of_window_plus_one_slots(tmp_path):
    """Mistral's window 5 (q - k < 5): 5 slots per layer whatever the length; Qwen2's window layer alone."""
    _, mistral = _twins("mistral", tmp_path)
    _, qwen2 = _twins("qwen2_window", tmp_path)
    assert cache_lengths(mistral.config, 100) == (5, 5) and cache_lengths(mistral.config, 4) == (4, 4)
    assert cache_lengths(qwen2.config, 100) == (100, 6)
    cache = KVCache(qwen2.config, 2, 100, dtype=torch.float32, device="cpu")
    assert [tuple(cache.layer(i)[0].shape) for i in range(2)] == [(2, 2, 100, 16), (2, 2, 6, 16)]
    assert kv_cache_bytes(qwen2.config, 2, 100, torch.float32) == 2 * 2 * 2 * 16 * 106 * 4


def test_generation_stops_at_any_eos_id_and_at_stop_strings(tmp_path):
    theirs, ours = _twins("llama", tmp_path)
    prompts = _prompts()
    free = generate_ids(ours, prompts, GenerationConfig(max_new_tokens=NEW)).tokens
    stops = (free[0][3], free[2][5])  # a list of EOS ids, as Llama-3-Instruct has
    out = generate_ids(ours, prompts, GenerationConfig(max_new_tokens=NEW, eos_token_ids=stops))
    expected = []
    for tokens in free:
        cut = next((i for i, t in enumerate(tokens) if t in stops), None)
        expected.append(tokens if cut is None else tokens[: cut + 1])
    assert out.tokens == expected
    assert out.tokens == [
        _reference(theirs, p, eos_token_id=list(stops))[: len(e)] for p, e in zip(prompts, expected, strict=True)
    ]
    assert out.stop_reasons == ["length" if e == f else "eos" for e, f in zip(expected, free, strict=True)]

    def decode(ids):
        return " ".join(f"<{i}>" for i in ids)

    stop = f"<{free[1][2]}> <{free[1][3]}>"  # spans two tokens
    out = generate_ids(ours, prompts[1:2], GenerationConfig(max_new_tokens=NEW, stop_strings=(stop,)), decode=decode)
    assert out.tokens == [free[1][: free[1].index(free[1][3], 3) + 1]] and out.stop_reasons == ["stop_string"]
    with pytest.raises(GenerationError, match="stop_strings need a decode function"):
        generate_ids(ours, prompts, GenerationConfig(stop_strings=("x",)))


def test_the_tensor_helper_pads_stopped_rows_with_their_stop_token(tmp_path):
    _, ours = _twins("qwen3", tmp_path)
    ids = random_ids(2, 5, 128)
    out = generate(ours, ids, 6)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], ids)
    for t in range(5, 11):  # each token is the argmax of the full forward (no cache) over what came before
        assert torch.equal(out[:, t], ours(out[:, :t])[:, -1].argmax(-1))
    first = out[0, 5].item()
    assert generate(ours, ids[:1], 6, eos_token_id=[first]).shape == (1, 6)


def test_sampling_is_reproducible_with_a_seed_and_differs_between_seeds(tmp_path):
    _, ours = _twins("qwen2", tmp_path)
    prompts = _prompts()

    def run(seed, **kw):
        return generate_ids(ours, prompts, GenerationConfig(max_new_tokens=NEW, temperature=1.5, seed=seed, **kw))

    assert run(0).tokens == run(0).tokens
    assert run(0).tokens != run(1).tokens
    assert run(3, top_k=5, top_p=0.8).tokens == run(3, top_k=5, top_p=0.8).tokens
    greedy = generate_ids(ours, prompts, GenerationConfig(max_new_tokens=NEW)).tokens
    assert run(7, top_k=1).tokens == greedy  # one candidate left: sampling is greedy


@pytest.mark.parametrize("top_k, top_p", [(0, 0.7), (7, 1.0), (5, 0.5), (0, 0.05)])
def test_top_k_and_top_p_keep_the_tokens_transformers_keeps(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    reference = logits.clone()
    if top_k:
        reference = TopKLogitsWarper(top_k)(None, reference)
    if top_p < 1:
        reference = TopPLogitsWarper(top_p)(None, reference)
    kept = torch.isfinite(reference)
    config = GenerationConfig(temperature=1.0, top_k=top_k, top_p=top_p)
    generator = torch.Generator().manual_seed(0)
    drawn = torch.stack([sample_next(logits, config, generator) for _ in range(400)], dim=1)
    assert kept.gather(1, drawn).all()  # never a token transformers drops
    for row in range(4):  # and, over 400 draws, most of those it keeps (all when few)
        if kept[row].sum() <= 3:
            assert set(drawn[row].tolist()) == set(kept[row].nonzero()[:, 0].tolist())


def test_the_cache_checks_its_memory_before_it_is_allocated(tmp_path):
    _, ours = _twins("llama", tmp_path)
    with pytest.raises(GenerationError, match=r"KV cache for 4096 prompts x 10000000 tokens needs .* GiB and cpu has"):
        KVCache(ours.config, 4096, 10_000_000, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens=0 must be >= 1"),
        (dict(temperature=-1), "temperature=-1 must be >= 0"),
        (dict(top_p=0), r"top_p=0 must be in \(0, 1\]"),
        (dict(top_k=-2), "top_k=-2 must be >= 0"),
    ],
)
def test_bad_settings_are_refused_in_one_line(kwargs, message):
    with pytest.raises(GenerationError, match=message):
        GenerationConfig(**kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["llama", "mistral"])
def test_the_compiled_step_replayed_as_a_cuda_graph_generates_what_the_plain_step_does(variant, tmp_path):
    theirs, ours = _twins(variant, tmp_path)
    ours = ours.cuda()
    prompts = _prompts()
    plain = generate_ids(ours, prompts, GenerationConfig(max_new_tokens=NEW)).tokens
    fast = generate_ids(ours, prompts, GenerationConfig(max_new_tokens=NEW, compile=True, cuda_graphs=True)).tokens
    assert fast == plain == [_reference(theirs, p) for p in prompts]


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_mixture_of_experts_models_generate_what_transformers_does(family, backend, tmp_path):
    """MoE layers return their routing statistics beside the output; gpt-oss adds per-head sinks and
    sliding-window layers (window 4, shorter than the prompts), so the ring and the sink column are crossed."""
    from test_gpt_oss import hf_gpt_oss
    from test_moe import hf_qwen3_moe

    theirs = {"qwen3_moe": hf_qwen3_moe, "gpt_oss": hf_gpt_oss}[family](seed=1)
    theirs.save_pretrained(tmp_path / family)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / family, attention=AttentionConfig(backend=backend))
    prompts = [random_ids(1, n, 97, seed=n)[0].tolist() for n in (3, 11, 7)]
    out = generate_ids(ours, prompts, GenerationConfig(max_new_tokens=NEW))
    assert out.tokens == [_reference(theirs, p) for p in prompts]
