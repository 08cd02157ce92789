"""DPO and SimPO against TRL's own implementations: float32 CPU, a tiny model, the same pairs.

DPO: TRL's ``DPOTrainer`` (its loss path ``_compute_loss``, its tokenization, its reference copy) against the
``dpo`` objective on packed pairs, separate and with a shared prompt: loss, rewards, log-probabilities and
every parameter's gradient within 1e-4. SimPO: TRL's ``CPOTrainer.cpo_loss`` and ``get_batch_logps`` (the
``simpo`` loss type) on the Hugging Face model's logits, against the ``simpo`` objective.
"""

from __future__ import annotations

import types

import pytest
import torch

from nemo_lite.components.attention import AttentionConfig
from nemo_lite.components.datasets import DataConfig, build_encoder, build_tokenizer
from nemo_lite.components.models import LlamaForCausalLM
from nemo_lite.components.models.hf import to_hf_key
from nemo_lite.testing.preference import PAIRS_CHAT, PAIRS_TEXT, one_row_batch, perturbed_copy, tiny_chat_checkpoint
from nemo_lite.training.objectives import DPO, ObjectiveSection, SimPO

trl = pytest.importorskip("trl")
TOL = dict(atol=1e-4, rtol=1e-4)
PAIRS = {"chat": PAIRS_CHAT, "text": PAIRS_TEXT}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(reference, policy): a tiny random chat model and the same with noise added."""
    root = tmp_path_factory.mktemp("parity")
    reference = tiny_chat_checkpoint(root / "reference")
    return reference, perturbed_copy(reference, root / "policy")


def ours(checkpoints, objective_cls, section, records, *, shared: bool):
    """The objective's loss, metrics and gradients (Hugging Face names) on the pairs packed in one row."""
    reference, policy = checkpoints
    mask_type = "shared_prompt" if shared else "block_causal"
    model = LlamaForCausalLM.from_pretrained(
        reference, attention=AttentionConfig(backend="sdpa", attn_mask_type=mask_type)
    )
    objective = objective_cls(section, model)  # a reference copy holds the starting weights
    model.load_state_dict(LlamaForCausalLM.from_pretrained(policy).state_dict())
    encoder = build_encoder(
        DataConfig(kind="preference", tokenizer=str(policy), shared_prompt=shared, seq_len=512),
        build_tokenizer(str(policy)),
        description="the parity pairs",
    )
    batch = one_row_batch(encoder, records, 512)
    mask = model.build_attention_mask(batch["input_ids"], encoder.eos_id, batch["position_ids"])
    count = objective.count(batch)
    assert count == len(records)
    loss = objective.loss(None, model, batch, mask) / count
    loss.backward()
    metrics = {k: float(v) / count for k, v in objective.metric_sums().items()}
    grads = {to_hf_key(n): p.grad for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), metrics, grads


def assert_same(mine, theirs):
    loss, metrics, grads = mine
    their_loss, their_metrics, their_grads = theirs
    assert loss == pytest.approx(their_loss, abs=1e-4)
    for key, value in their_metrics.items():
        assert metrics[key] == pytest.approx(value, abs=1e-4, rel=1e-5), key
    assert grads.keys() == their_grads.keys()
    for name, grad in their_grads.items():
        torch.testing.assert_close(grads[name], grad, **TOL, msg=name)


def trl_dpo(checkpoints, records, beta, tmp_path):
    import datasets
    import transformers
    from trl import DPOConfig, DPOTrainer

    reference, policy = checkpoints
    load = lambda path: transformers.AutoModelForCausalLM.from_pretrained(  # noqa: E731
        str(path), attn_implementation="eager", dtype=torch.float32
    )
    model = load(policy)
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=len(records), beta=beta,
        use_cpu=True, bf16=False, max_length=None, loss_type=["sigmoid"],
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model,
        ref_model=load(reference),
        args=args,
        train_dataset=datasets.Dataset.from_list(records),
        processing_class=transformers.AutoTokenizer.from_pretrained(str(policy)),
    )
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(records))])
    model.train()
    loss = trainer._compute_loss(model, inputs, False)
    loss.backward()
    names = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected")  # fmt: skip
    metrics = {k: trainer._metrics["train"][k][-1] for k in names}
    return float(loss), metrics, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["chat", "text"])
@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared_prompt"])
def test_dpo_matches_trls_dpo_trainer(checkpoints, tmp_path, kind, shared):
    section = ObjectiveSection(name="dpo", beta=0.3, reference="copy")
    theirs = trl_dpo(checkpoints, PAIRS[kind], section.beta, tmp_path)
    assert 0 < theirs[1]["rewards/accuracies"] < 1 or theirs[1]["rewards/margins"] != 0  # policy != reference
    assert_same(ours(checkpoints, DPO, section, PAIRS[kind], shared=shared), theirs)


def test_dpo_label_smoothing_is_the_conservative_loss(checkpoints):
    plain = ours(checkpoints, DPO, ObjectiveSection(name="dpo", beta=0.3, reference="copy"), PAIRS_CHAT, shared=False)
    eps = 0.2
    smoothed = ours(
        checkpoints, DPO, ObjectiveSection(name="dpo", beta=0.3, reference="copy", label_smoothing=eps), PAIRS_CHAT,
        shared=False,
    )  # fmt: skip
    # per pair: -(1-e) log s(z) - e log s(-z) = -log s(z) + e z, since log s(z) - log s(-z) = z; z = the margin
    assert smoothed[0] == pytest.approx(plain[0] + eps * plain[1]["rewards/margins"], abs=1e-5)


def trl_simpo(checkpoints, records, section):
    """TRL's CPOTrainer SimPO loss (cpo_alpha=0) on the Hugging Face model, TRL's tokenization of the pairs."""
    import transformers
    from trl.experimental.cpo import CPOTrainer

    from tests.test_data_preference import trl_pair

    _, policy = checkpoints
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(policy))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(policy), attn_implementation="eager", dtype=torch.float32
    )
    sequences = []
    for side in (1, 2):  # all chosen, then all rejected: TRL's concatenated batch
        for record in records:
            pair = trl_pair(tokenizer, record)
            sequences.append((pair[0], pair[side]))
    width = max(len(p) + len(a) for p, a in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, (prompt, answer) in enumerate(sequences):
        ids[i, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[i, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
    model.train()
    logps = CPOTrainer.get_batch_logps(model(ids).logits, labels, average_log_prob=True)
    chosen, rejected = logps.chunk(2)
    this = types.SimpleNamespace(
        alpha=0.0, loss_type="simpo", beta=section.beta, simpo_gamma=section.simpo_gamma,
        label_smoothing=section.label_smoothing, accelerator=types.SimpleNamespace(device=torch.device("cpu")),
    )  # fmt: skip
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(this, chosen, rejected)
    loss = losses.mean()
    loss.backward()
    metrics = {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "logps/chosen": chosen.mean().item(),
        "logps/rejected": rejected.mean().item(),
    }
    return float(loss), metrics, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared_prompt"])
def test_simpo_matches_trls_cpo_simpo(checkpoints, shared):
    section = ObjectiveSection(name="simpo", beta=2.0, simpo_gamma=0.5, label_smoothing=0.1)
    theirs = trl_simpo(checkpoints, PAIRS_CHAT, section)
    assert_same(ours(checkpoints, SimPO, section, PAIRS_CHAT, shared=shared), theirs)


def test_the_lora_reference_is_the_base_model_with_its_adapters_off(checkpoints):
    """objective.reference=adapters_off: the reference log-probabilities of a model whose LoRA adapters are
    trained (non-zero) are the base checkpoint's, and the adapters are on again (and trainable) afterwards."""
    pytest.importorskip("peft")
    from nemo_lite.components.models import family_of_checkpoint
    from nemo_lite.training.converters import lora
    from nemo_lite.training.converters.lora import PeftSection
    from nemo_lite.training.objectives import answer_logps

    reference, _ = checkpoints
    attention = AttentionConfig(backend="sdpa", attn_mask_type="shared_prompt")
    base = LlamaForCausalLM.from_pretrained(reference, attention=attention)
    model = LlamaForCausalLM.from_pretrained(reference, attention=attention)
    lora.LoraConverter(PeftSection(method="lora", r=4, target_modules=["all-linear"])).convert(
        model, family_of_checkpoint(reference)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    objective = DPO(ObjectiveSection(name="dpo", beta=0.3), model)
    assert objective.reference == "adapters_off" and objective.reference_model is None
    encoder = build_encoder(
        DataConfig(kind="preference", tokenizer=str(reference), shared_prompt=True, seq_len=512),
        build_tokenizer(str(reference)),
        description="the parity pairs",
    )
    batch = one_row_batch(encoder, PAIRS_CHAT, 512)
    mask = model.build_attention_mask(batch["input_ids"], encoder.eos_id, batch["position_ids"])
    with torch.no_grad():
        want = answer_logps(base, batch, mask)[:2]
        adapted = answer_logps(model, batch, mask)[:2]
    got = objective.reference_logps(model, batch, mask)
    for g, w, a in zip(got, want, adapted, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(a, w, atol=1e-3)  # the adapters do change the answers' log-probabilities
    after = answer_logps(model, batch, mask)[:2]
    torch.testing.assert_close(after[0], adapted[0])
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)
