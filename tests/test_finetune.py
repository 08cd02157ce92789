"""Fine-tuning SmolLM2-135M on CPU through the recipes' trainer: it starts from the checkpoint's own
loss, improves on held-out text, and exports a directory transformers loads with the same logits."""

from __future__ import annotations

import pytest
import torch

from nemo_lite.components.attention import AttentionConfig
from nemo_lite.components.models import LlamaForCausalLM
from nemo_lite.training.config import RecipeConfig
from nemo_lite.training.trainer import Trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, smollm2_dir):
    cfg = RecipeConfig(recipe="finetune")
    cfg.run_dir = str(tmp_path_factory.mktemp("finetune"))
    cfg.model.pretrained_path = str(smollm2_dir)
    cfg.attention.backend = "sdpa"
    cfg.data.tokenizer = "model"
    cfg.data.seq_len, cfg.data.batch_size = 128, 2
    cfg.data.mask_cross_document_labels = True
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay = 1e-4, 2, 0.0
    t = cfg.trainer
    t.max_steps, t.val_every, t.val_tokens, t.save_every = 20, 0, 2 * 2 * 128, 0
    t.sample_tokens, t.progress_bar = 8, False
    trainer = Trainer(cfg)
    trainer.setup()
    before = trainer.evaluate()
    captured = {}
    real_step = trainer.train_step

    def capture_first(batches):
        if "batch" not in captured:
            captured["batch"] = {k: v.clone() for k, v in batches[0].items()}
        return real_step(batches)

    trainer.train_step = capture_first
    result = trainer.fit()
    after = trainer.evaluate()
    return cfg, result, before, after, captured["batch"]


def test_first_loss_is_the_checkpoints_own(finetuned):
    import transformers

    cfg, result, _, _, batch = finetuned
    reference = transformers.AutoModelForCausalLM.from_pretrained(cfg.model.pretrained_path).eval()
    with torch.no_grad():  # transformers on the same batch, one document per row-segment via position_ids
        logits = reference(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    assert abs(result.losses[0] - float(loss)) <= 0.1
    assert 1.0 < result.losses[0] < 4.0  # a trained model on English, not random (~10.8)


def test_fine_tuning_lowers_held_out_loss(finetuned):
    _, result, before, after, _ = finetuned
    assert result.status == "completed" and len(result.losses) == 20
    assert after["val_loss"] < before["val_loss"]


def test_export_loads_in_transformers_with_the_same_logits(finetuned):
    import transformers

    _, result, _, _, _ = finetuned
    hf = transformers.AutoModelForCausalLM.from_pretrained(result.hf_dir).eval()
    ours = LlamaForCausalLM.from_pretrained(result.hf_dir, attention=AttentionConfig(backend="sdpa")).eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 48))
    with torch.no_grad():
        diff = (ours(ids) - hf(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-4
    tokenizer = transformers.AutoTokenizer.from_pretrained(result.hf_dir)
    assert tokenizer.eos_token_id == ours.config.eos_token_id
