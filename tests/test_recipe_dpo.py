"""recipes/dpo.py: preference tuning offline on CPU on the default preference set, LoRA and full, resume, export."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_lite.testing.preference import tiny_chat_checkpoint
from nemo_lite.training.config import ConfigError, RecipeConfig
from nemo_lite.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_chat_checkpoint(tmp_path_factory.mktemp("dpo_checkpoint"))


def dpo_config(run_dir: Path, checkpoint: Path, *, objective="dpo", lora=False, steps=4, shared=True) -> RecipeConfig:
    cfg = RecipeConfig()
    cfg.recipe, cfg.run_dir = "dpo", str(run_dir)
    cfg.model.pretrained_path = str(checkpoint)
    cfg.attention.backend = "sdpa"
    cfg.attention.attn_mask_type = "shared_prompt" if shared else "block_causal"
    data = cfg.data
    data.source, data.kind, data.tokenizer, data.shared_prompt = "default_preference", "preference", "model", shared
    data.seq_len, data.batch_size, data.validation_fraction, data.num_proc = 256, 2, 0.05, 1
    cfg.objective.name = objective
    cfg.optim.lr, cfg.optim.warmup_steps = 3e-3, 1
    if lora:
        cfg.peft.method, cfg.peft.target_modules = "lora", ["all-linear"]
    t = cfg.trainer
    t.max_steps, t.val_every, t.val_tokens, t.save_every, t.keep_last = steps, steps, 512, 2, 5
    t.sample_tokens, t.sample_prompt, t.progress_bar = 4, "What is 2 plus 2?", False
    return cfg


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_trains_offline_with_trls_metrics_and_exports(tmp_path, checkpoint, lora):
    trainer = Trainer(dpo_config(tmp_path / "run", checkpoint, lora=lora))
    result = trainer.fit()
    assert result.status == "completed" and result.steps == 4
    assert trainer.objective.reference == ("adapters_off" if lora else "copy")
    # The policy starts as its reference: every pair's logit is 0, the loss log 2.
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert len(set(result.losses)) > 1  # and then it moves
    records = read_metrics(tmp_path / "run")
    assert all(key in record for record in records for key in TRL_METRICS)
    assert records[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert "val_rewards/accuracies" in records[-1] and 0 <= records[-1]["val_rewards/accuracies"] <= 1
    assert (tmp_path / "run/hf/config.json").is_file()
    assert (tmp_path / "run/adapter").is_dir() == lora


def test_a_resumed_dpo_run_repeats_the_uninterrupted_losses(tmp_path, checkpoint):
    full = Trainer(dpo_config(tmp_path / "run", checkpoint)).fit()
    cfg = dpo_config(tmp_path / "resumed", checkpoint)
    cfg.trainer.resume = str(tmp_path / "run/checkpoints/step_000002")
    assert Trainer(cfg).fit().losses == full.losses[2:]  # the reference is the checkpoint's starting weights


def test_simpo_trains_without_a_reference(tmp_path, checkpoint):
    trainer = Trainer(dpo_config(tmp_path / "run", checkpoint, objective="simpo", shared=False, steps=2))
    result = trainer.fit()
    assert result.status == "completed" and not hasattr(trainer.objective, "reference_model")
    assert all(key in read_metrics(tmp_path / "run")[-1] for key in TRL_METRICS)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"objective.name": "dpo", "data.kind": None}, "trains on preference pairs; set data.kind=preference"),
        ({"attention.attn_mask_type": "block_causal"}, "set attention.attn_mask_type=shared_prompt"),
        ({"objective.name": "orpo"}, "registered objectives: dpo, next_token, simpo"),
        ({"objective.reference": "adapters_off"}, "needs LoRA adapters (peft=lora)"),
    ],
)
def test_bad_preference_settings_are_refused_in_one_line(tmp_path, checkpoint, change, words):
    cfg = dpo_config(tmp_path / "run", checkpoint)
    for key, value in change.items():
        section, field = key.split(".")
        setattr(getattr(cfg, section), field, value)
    if cfg.data.kind is None:
        cfg.data.shared_prompt = False
        cfg.data.source, cfg.attention.attn_mask_type = "default_chat", "block_causal"
        cfg.data.messages_field = "messages"
    with pytest.raises(ConfigError) as err:
        Trainer(cfg).fit()
    assert "\n" not in str(err.value) and words in str(err.value)


def test_the_recipe_composes_and_its_help_names_the_objective(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "dpo.py"), "objective=simpo", "--cfg", "job"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for line in ("recipe: dpo", "name: simpo", "attn_mask_type: shared_prompt", "kind: preference"):
        assert line in proc.stdout
