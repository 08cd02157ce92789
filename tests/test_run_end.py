"""The end of a run: the last step is validated once (whatever max_steps is against val_every) and that result is
the run's final validation; a held-out chat split smaller than a training step still validates."""

from __future__ import annotations

import json

from model_utils import save_default_tokenizer
from recipe_utils import tiny_config

from nemo_lite.components.datasets.default_chat import generate_conversations
from nemo_lite.training.metrics import read_metrics
from nemo_lite.training.trainer import Trainer

TEMPLATE = (
    "{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)


def counted(trainer: Trainer) -> list[int]:
    """The steps at which ``trainer`` validates."""
    steps, evaluate = [], trainer.evaluate

    def counting():
        steps.append(trainer.step)
        return evaluate()

    trainer.evaluate = counting
    return steps


def test_the_last_step_is_validated_once_and_is_the_final_validation(tmp_path, capsys):
    for max_steps, validated in [(5, [2, 4, 5]), (4, [2, 4])]:
        cfg = tiny_config(tmp_path / str(max_steps), backend="sdpa", steps=max_steps)
        cfg.trainer.val_every, cfg.trainer.sample_tokens, cfg.trainer.export_hf = 2, 0, False
        trainer = Trainer(cfg)
        steps = counted(trainer)
        assert trainer.fit().status == "completed"
        assert steps == validated
        lines = read_metrics(tmp_path / str(max_steps))
        assert [r["step"] for r in lines if "val_loss" in r] == validated
        final = lines[-1]["val_loss"]
        assert capsys.readouterr().err.count(f"validation loss {final:.4f}") == 1


def test_a_held_out_chat_split_smaller_than_a_step_still_validates(tmp_path, capsys):
    tokenizer = tmp_path / "tokenizer"
    save_default_tokenizer(tokenizer)
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    source = tmp_path / "c.jsonl"
    source.write_text("".join(json.dumps({"messages": c}) + "\n" for c in generate_conversations(40)))
    cfg = tiny_config(tmp_path / "run", backend="sdpa", steps=2)
    cfg.data.source, cfg.data.tokenizer, cfg.data.messages_field = str(source), str(tokenizer), "messages"
    cfg.data.chat_template, cfg.data.seq_len, cfg.data.batch_size = str(tmp_path / "t.jinja"), 128, 4
    cfg.data.validation_fraction = 0.1  # four conversations: fewer rows than the 4 of a step
    cfg.trainer.val_every, cfg.trainer.sample_tokens, cfg.trainer.export_hf = 1, 0, False
    trainer = Trainer(cfg)
    trainer.fit()
    assert "validation disabled" not in capsys.readouterr().err
    assert 1 <= sum(int((b["labels"] != -100).any(dim=1).sum()) for b in trainer.val_batches) < 4
    assert all("val_loss" in r for r in read_metrics(tmp_path / "run"))


def test_a_held_out_split_smaller_than_a_row_is_said(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run", backend="sdpa", steps=1)
    cfg.data.validation_fraction, cfg.data.seq_len = 0.001, 1024
    cfg.trainer.sample_tokens, cfg.trainer.export_hf = 0, False
    Trainer(cfg).fit()
    err = capsys.readouterr().err
    assert "validation disabled: " in err and "hold out more data (data.validation_fraction)" in err


def test_no_held_out_data_is_said(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run", backend="sdpa", steps=1)
    cfg.data.validation_fraction = 0.0
    cfg.trainer.sample_tokens, cfg.trainer.export_hf = 0, False
    Trainer(cfg).fit()
    assert "no validation: data.validation_fraction is 0 and data.validation_source is unset" in capsys.readouterr().err
