"""The pad token's embedding row: as in transformers (``nn.Embedding(padding_idx=pad_token_id)``), a checkpoint's
pad row gets no gradient from the input lookup (its tied output projection still gets its own);
``model.pad_embedding_gradient`` chooses. The fast step's lookup rows keep the same rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_utils import save_default_tokenizer
from recipe_utils import tiny_config

from nemo_lite.training.config import ConfigError
from nemo_lite.training.fast.lookup_gradient import LookupGradient, lookup
from nemo_lite.training.fast.swaps import RowsEmbedding
from nemo_lite.training.trainer import Trainer

PAD = 5


def write_checkpoint(path: Path, *, tied: bool, pad: int | None = PAD) -> Path:
    import transformers

    eos = save_default_tokenizer(path)
    config = transformers.LlamaConfig(
        vocab_size=8192,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # transformers zeroes the pad row at init; a trained checkpoint's is not zero
        model.model.embed_tokens.weight.normal_(0, 0.02)
    model.save_pretrained(path)
    return path


def finetune_config(run_dir: Path, checkpoint: Path):
    cfg = tiny_config(run_dir, "sdpa", steps=2)
    cfg.model.pretrained_path, cfg.data.tokenizer = str(checkpoint), "model"
    cfg.trainer.device = "cpu"  # compared in float32 with transformers on the CPU
    return cfg


def ids_with_pads() -> torch.Tensor:
    ids = torch.randint(10, 8000, (2, 24), generator=torch.Generator().manual_seed(1))
    ids[:, ::3] = PAD  # as <|im_end|> closes every chat turn; no EOS, so one causal document per row
    return ids


def embedding_gradient_of(model, ids: torch.Tensor) -> torch.Tensor:
    """The embedding matrix's gradient of the mean next-token loss on ``ids`` through nemo_lite's model."""
    model.zero_grad()
    logits = model.forward_hidden(ids) @ model.output_weight.T
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    return next(p for n, p in model.named_parameters() if n.endswith("embed_tokens.weight")).grad


def transformers_embedding_gradient(checkpoint: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(checkpoint, attn_implementation="eager")
    logits = model(ids).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    return model.model.embed_tokens.weight.grad


@pytest.mark.parametrize("tied", [False, True])
def test_a_checkpoints_pad_row_gets_the_gradient_transformers_gives(tmp_path, tied):
    checkpoint = write_checkpoint(tmp_path / "ckpt", tied=tied)
    trainer = Trainer(finetune_config(tmp_path / "run", checkpoint))
    trainer.setup()
    ids = ids_with_pads()
    ours = embedding_gradient_of(trainer.raw_model, ids)
    theirs = transformers_embedding_gradient(checkpoint, ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    if not tied:
        assert (theirs[PAD] == 0).all() and (ours[PAD] == 0).all()
    else:  # the output projection's gradient still reaches the shared row
        assert ours[PAD].abs().sum() > 0
    trainer.release_run_dir()


def test_pad_embedding_gradient_true_trains_the_pad_row_from_its_lookups_too(tmp_path):
    import transformers

    checkpoint = write_checkpoint(tmp_path / "ckpt", tied=False)
    cfg = finetune_config(tmp_path / "run", checkpoint)
    cfg.model.pad_embedding_gradient = True
    trainer = Trainer(cfg)
    trainer.setup()
    ids = ids_with_pads()
    ours = embedding_gradient_of(trainer.raw_model, ids)
    theirs = transformers.LlamaForCausalLM.from_pretrained(checkpoint, attn_implementation="eager")
    theirs.model.embed_tokens.padding_idx = None  # a plain embedding: every looked-up row gets its gradient
    logits = theirs(ids).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    torch.testing.assert_close(ours, theirs.model.embed_tokens.weight.grad, rtol=1e-4, atol=1e-6)
    assert ours[PAD].abs().sum() > 0
    trainer.release_run_dir()


def test_pad_embedding_gradient_false_needs_a_pad_token_id(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt", tied=False, pad=None)
    cfg = finetune_config(tmp_path / "run", checkpoint)
    cfg.model.pad_embedding_gradient = False
    with pytest.raises(ConfigError, match="model.pad_embedding_gradient=false needs a pad_token_id") as info:
        Trainer(cfg).setup()
    assert "\n" not in str(info.value)


def test_the_fast_steps_lookup_rows_skip_the_pad_row_as_nn_embedding_does():
    gen = torch.Generator().manual_seed(0)
    reference = torch.nn.Embedding(37, 8, padding_idx=PAD)
    ids = torch.randint(0, 12, (3, 40), generator=gen)
    ids[:, ::4] = PAD
    upstream = torch.randn(3, 40, 8, generator=gen)
    (reference(ids) * upstream).sum().backward()
    rows = RowsEmbedding(reference)
    assert rows.padding_idx == PAD
    out = rows(ids)
    assert torch.equal(out, F.embedding(ids, reference.weight))
    (out * upstream).sum().backward()
    assert torch.equal(rows.lookups.dense(), reference.weight.grad)
    assert (rows.lookups.dense()[PAD] == 0).all()
    sink = LookupGradient(reference.weight, padding_idx=PAD)
    (lookup(reference.weight, ids, sink) * upstream).sum().backward()
    assert torch.equal(sink.dense(), reference.weight.grad)


def test_a_pad_token_id_outside_the_vocabulary_holds_back_no_row_unless_asked(tmp_path):
    import json

    checkpoint = write_checkpoint(tmp_path / "ckpt", tied=False, pad=None)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "pad_token_id": 9000}))  # vocabulary 8192
    trainer = Trainer(finetune_config(tmp_path / "run", checkpoint))
    trainer.setup()
    assert all(m.padding_idx is None for m in trainer.raw_model.modules() if isinstance(m, torch.nn.Embedding))
    trainer.release_run_dir()
    cfg = finetune_config(tmp_path / "run2", checkpoint)
    cfg.model.pad_embedding_gradient = False
    with pytest.raises(ConfigError, match=r"pad_token_id=9000 is outside the model's vocabulary \[0, 8192\)"):
        Trainer(cfg).setup()
