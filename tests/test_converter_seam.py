"""A converter changes what the trainer saves, resumes, counts and exports through its hooks alone: a toy one
registered here under its own config section (frozen weights, checkpoints of the trainable tensors, a record,
an extra export file) gets all of it without the trainer knowing it, and the trainer names no converter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from recipe_utils import tiny_config

from nemo_lite.training import trainer as trainer_module
from nemo_lite.training.config import ConfigError
from nemo_lite.training.converters import ModelConverter, register_converter, unregister_converter
from nemo_lite.training.trainer import Trainer


@dataclass
class ToySection:
    tag: str = ""  # "" = off


class FreezeEmbeddings(ModelConverter):
    """Freezes the token embeddings: checkpoints hold the rest, recorded under "toy"; the export adds a note."""

    writes_record = True
    saves_only_trainable = True

    def __init__(self, tag: str = "a") -> None:
        self.tag = tag
        self.description = f"toy converter {tag}"

    @classmethod
    def enabled(cls, section: ToySection) -> bool:
        return bool(section.tag)

    @classmethod
    def check_config(cls, cfg) -> None:
        if getattr(cfg, "toy", ToySection()).tag not in ("", "a", "b"):
            raise ConfigError(f"toy.tag={cfg.toy.tag!r} is not valid; choose one of: a, b")

    @classmethod
    def from_config(cls, cfg, *, autocast_dtype, pretrained_dir):
        return cls(cfg.toy.tag)

    def convert(self, model, family) -> None:
        model.embed_tokens.weight.requires_grad_(False)

    def flops_per_token(self, model, flops: int) -> int:
        return flops // 2

    def checkpoint_record(self):
        return {"tag": self.tag}

    @staticmethod
    def check_record(path: Path, saved, current) -> None:
        if saved != current:
            raise ConfigError(f"{path} was saved with {saved} and this run has {current}")

    def export_extra(self, run_dir: Path, hf_dir: Path) -> str:
        (run_dir / "toy.txt").write_text(self.tag)
        return f"wrote {run_dir / 'toy.txt'}"


@pytest.fixture
def toy_converter():
    register_converter("toy")(FreezeEmbeddings)
    yield
    unregister_converter("toy")


def config(run_dir: Path, tag: str = "a"):
    cfg = tiny_config(run_dir, backend="sdpa", steps=6)
    cfg.trainer.save_every, cfg.trainer.val_every, cfg.trainer.sample_tokens = 3, 0, 0
    cfg.trainer.export_hf = True
    cfg.toy = ToySection(tag)  # the converter's own section, beside the schema's
    return cfg


def test_a_registered_converter_plugs_into_checkpoints_resume_flops_and_export(tmp_path, toy_converter):
    with pytest.raises(ConfigError, match="toy.tag='c' is not valid; choose one of: a, b"):
        Trainer(config(tmp_path / "bad", tag="c"))
    trainer = Trainer(config(tmp_path / "run"))
    result = trainer.fit()
    assert result.status == "completed" and (tmp_path / "run/hf/config.json").is_file()
    assert (tmp_path / "run/toy.txt").read_text() == "a"
    assert trainer.flops_per_token == trainer.family.flops_per_token(trainer.model) // 2

    from safetensors import safe_open

    step3 = tmp_path / "run/checkpoints/step_000003"
    with safe_open(str(step3 / "model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    trainable = {name for name, p in trainer.raw_model.named_parameters() if p.requires_grad}
    assert saved == trainable and "embed_tokens.weight" not in saved
    assert torch.load(step3 / "train_state.pt", weights_only=True)["toy"] == {"tag": "a"}

    cfg = config(tmp_path / "resumed")
    cfg.trainer.resume = str(step3)
    assert Trainer(cfg).fit().losses == result.losses[3:]  # bit-equal: the frozen weights came from the seed

    cfg = config(tmp_path / "other", tag="b")
    cfg.trainer.resume = str(step3)
    with pytest.raises(ConfigError, match="was saved with {'tag': 'a'} and this run has {'tag': 'b'}"):
        Trainer(cfg).fit()
    cfg = config(tmp_path / "without", tag="")  # a run without the converter checks its record too
    cfg.trainer.resume = str(step3)
    with pytest.raises(ConfigError, match="was saved with {'tag': 'a'} and this run has None"):
        Trainer(cfg).fit()


def test_the_trainer_names_no_converter():
    source = Path(trainer_module.__file__).read_text().lower()
    assert not any(word in source for word in ("lora", "peft", "float8", "adapter"))
