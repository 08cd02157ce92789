"""Bad input through the recipes' trainer: each gives one clear message before any training step,
and nothing is written that a later run could mistake for work. docs/reliability.md lists the messages
(`pytest tests/test_bad_inputs.py -s` prints them)."""

from __future__ import annotations

import json
import shutil

import pytest
from recipe_utils import tiny_config

from nemo_lite.components.datasets import default_tokenizer_file
from nemo_lite.training.metrics import read_metrics
from nemo_lite.training.trainer import Trainer

MESSAGES: dict[str, str] = {}


def fails(name: str, cfg, error, match: str) -> str:
    with pytest.raises(error, match=match) as info:
        Trainer(cfg).fit()
    MESSAGES[name] = str(info.value)
    print(f"\n{name}: {info.value}")
    return str(info.value)


def test_data_file_that_does_not_exist(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    cfg.data.source = str(tmp_path / "nowhere.jsonl")
    fails("data file missing", cfg, FileNotFoundError, "does not exist")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    cfg = tiny_config(tmp_path / "run")
    cfg.data.source = str(tmp_path / "empty.jsonl")
    fails("empty dataset", cfg, ValueError, "no documents in")


def test_text_field_missing(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "some text"}) + "\n")
    cfg = tiny_config(tmp_path / "run")
    cfg.data.source, cfg.data.text_field = str(tmp_path / "a.jsonl"), "text"
    fails("text field missing", cfg, ValueError, r"its fields are \['body'\]")


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    good = "a readable line of text about packing documents into rows\n" * 40
    (tmp_path / "a.txt").write_bytes(good.encode() + b"bad \xff\xfe bytes \xc3\x28 here\n" + good.encode())
    cfg = tiny_config(tmp_path / "run", steps=2)
    cfg.data.source, cfg.data.validation_fraction, cfg.trainer.val_every = str(tmp_path / "a.txt"), 0.0, 0
    trainer = Trainer(cfg)
    result = trainer.fit()
    assert result.status == "completed" and result.steps == 2
    assert trainer.train_loader.stats["replaced_chars"] >= 3


def test_tokenizer_without_eos(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    cfg.data.tokenizer = str(default_tokenizer_file())  # a bare tokenizer.json names no EOS
    fails("tokenizer without EOS", cfg, ValueError, "has no EOS token")


def test_eos_id_outside_the_vocabulary(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    cfg.data.eos_id = 10**6
    fails("eos_id outside the vocabulary", cfg, ValueError, "outside the vocabulary")


@pytest.fixture
def tiny_hf_checkpoint(tmp_path):
    from nemo_lite.components.models import LlamaForCausalLM, get_preset

    model = LlamaForCausalLM(get_preset("tiny", vocab_size=8192, eos_token_id=0))
    model.init_weights(0)
    return model.save_pretrained(tmp_path / "ckpt")


def _finetune_config(tmp_path, path):
    cfg = tiny_config(tmp_path / "run")
    cfg.model.pretrained_path = str(path)
    return cfg


def test_checkpoint_with_a_missing_tensor(tmp_path, tiny_hf_checkpoint):
    from safetensors.torch import load_file, save_file

    file = tiny_hf_checkpoint / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    fails(
        "checkpoint: missing tensor",
        _finetune_config(tmp_path, tiny_hf_checkpoint),
        ValueError,
        "model.layers.1.mlp.up_proj.weight",
    )


def test_checkpoint_with_an_extra_and_a_misshaped_tensor(tmp_path, tiny_hf_checkpoint):
    import torch
    from safetensors.torch import load_file, save_file

    file = tiny_hf_checkpoint / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    tensors["model.extra.weight"] = torch.zeros(2)
    save_file(tensors, file, metadata={"format": "pt"})
    message = fails(
        "checkpoint: extra and mis-shaped tensors",
        _finetune_config(tmp_path, tiny_hf_checkpoint),
        ValueError,
        "model.extra.weight",
    )
    assert "q_proj" in message


def test_checkpoint_of_another_architecture(tmp_path, tiny_hf_checkpoint):
    config = json.loads((tiny_hf_checkpoint / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tiny_hf_checkpoint / "config.json").write_text(json.dumps(config))
    fails("checkpoint of another architecture", _finetune_config(tmp_path, tiny_hf_checkpoint), ValueError, "gpt2")


def test_finetune_directory_without_a_checkpoint(tmp_path):
    err = fails(
        "no checkpoint in model.pretrained_path",
        _finetune_config(tmp_path, tmp_path / "none"),
        ValueError,
        "holds no Hugging Face checkpoint .* Give a directory with config.json and safetensors weights, or a hub id",
    )
    assert "convert_smollm2" not in str(err)  # that script creates one checkpoint only (tests/test_recipes.py)


def test_unknown_model_override_lists_the_fields(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    cfg.model.overrides = {"num_layers": 2}
    fails("unknown model field", cfg, ValueError, "unknown field.*num_layers.*num_hidden_layers")


def test_validation_split_smaller_than_one_batch_still_validates(tmp_path, capsys):
    """The default corpus on another Python has a smaller held-out split: a large batch must still train, and
    validate on the rows there are."""
    docs = [{"text": f"document {i} about packing rows of tokens for training. " * 8} for i in range(60)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = tiny_config(tmp_path / "run", steps=2)
    cfg.data.source, cfg.data.validation_fraction, cfg.data.batch_size = str(tmp_path / "a.jsonl"), 0.02, 8
    trainer = Trainer(cfg)
    result = trainer.fit()
    assert result.status == "completed" and result.steps == 2
    assert 1 <= sum(int((b["labels"] != -100).any(dim=1).sum()) for b in trainer.val_batches) < 8
    assert "validation disabled" not in capsys.readouterr().err
    assert "val_loss" in read_metrics(tmp_path / "run")[-1]


# ---- damaged Hugging Face files: one CheckpointError naming the file ----------------------------------------


def _load(path):
    from nemo_lite.components.models import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("truncated", r"model.safetensors is not a readable safetensors file \(.*\): fetch or convert"),
        ("lying header", r"model.safetensors is not a readable safetensors file"),
        ("pickle", r"model.safetensors is not a readable safetensors file"),
    ],
)
def test_a_damaged_safetensors_file_is_named(tiny_hf_checkpoint, damage, match):
    import pickle
    import struct

    from nemo_lite.components.models import CheckpointError

    file = tiny_hf_checkpoint / "model.safetensors"
    data = file.read_bytes()
    if damage == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif damage == "lying header":  # a header that claims more bytes than the file holds
        (n,) = struct.unpack("<Q", data[:8])
        file.write_bytes(struct.pack("<Q", n + 10**6) + data[8:])
    else:
        file.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(CheckpointError, match=match):
        _load(tiny_hf_checkpoint)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[1, 2, 3]", r"config.json holds a JSON list, not an object"),
        ('{"model_type": "llama",', r"config.json is not valid JSON \(Expecting .* at line 1, column \d+\)"),
    ],
)
def test_a_config_json_that_is_not_an_object_is_named(tiny_hf_checkpoint, text, match):
    from nemo_lite.components.models import CheckpointError

    (tiny_hf_checkpoint / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=match):
        _load(tiny_hf_checkpoint)


def test_a_string_where_config_json_needs_a_number_names_the_file_and_key(tiny_hf_checkpoint):
    from nemo_lite.components.models import CheckpointError

    config = json.loads((tiny_hf_checkpoint / "config.json").read_text())
    config["rms_norm_eps"] = "1e-5"
    (tiny_hf_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"ckpt/config.json: rms_norm_eps='1e-5' must be a number$"):
        _load(tiny_hf_checkpoint)


def test_a_tied_checkpoint_with_a_distinct_lm_head_is_refused(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from nemo_lite.components.models import CheckpointError, LlamaForCausalLM, get_preset

    model = LlamaForCausalLM(get_preset("tiny", vocab_size=512, tie_word_embeddings=True))
    model.init_weights(0)
    path = model.save_pretrained(tmp_path / "tied")
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    _load(path)  # the embedding's copy: skipped, as transformers does
    tensors["lm_head.weight"] = torch.randn_like(tensors["lm_head.weight"])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="tie_word_embeddings=true but lm_head.weight differs"):
        _load(path)


# ---- the launcher: one line for a user error, a traceback for a bug ------------------------------------------


def test_the_launcher_keeps_the_traceback_of_a_bug(monkeypatch):
    from nemo_lite.training import launch
    from nemo_lite.training.trainer import Trainer

    def buggy_fit(self):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(Trainer, "__init__", lambda self, cfg, dist_info=None: None)
    monkeypatch.setattr(Trainer, "fit", buggy_fit)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        launch.run_recipe(object())


def test_the_launcher_gives_one_line_for_each_known_error_family(tmp_path, capsys, monkeypatch):
    import errno

    from safetensors import SafetensorError

    from nemo_lite.training import launch
    from nemo_lite.training.trainer import Trainer

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "metrics.jsonl"))
    read_only = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "run"))
    damaged = SafetensorError("Error while deserializing header: MetadataIncompleteBuffer")
    expected = {
        full: f"error: the disk is full: writing {tmp_path}/run/metrics.jsonl failed; free some space or choose",
        read_only: f"error: cannot access {tmp_path}/run (Permission denied): check its permissions",
        damaged: "error: a safetensors file cannot be read (Error while deserializing header: Metadata",
    }
    monkeypatch.setattr(Trainer, "__init__", lambda self, cfg, dist_info=None: None)
    for err, line in expected.items():

        def fit(self, err=err):
            raise err

        monkeypatch.setattr(Trainer, "fit", fit)
        assert launch.run_recipe(object()) == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(line), lines


def test_the_recipe_refuses_a_fresh_run_over_checkpoints_in_one_line(tmp_path):
    """Through the command line: exit 2, one error line, no traceback, the earlier checkpoint untouched."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch

    from nemo_lite.training.checkpoint import save_checkpoint

    earlier = save_checkpoint(tmp_path / "checkpoints", 7, torch.nn.Linear(2, 2), {"step": 7}, keep_last=2)
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "NEMO_LITE_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(repo), *filter(None, [os.environ.get("PYTHONPATH")])])  # this checkout
    proc = subprocess.run(
        [sys.executable, "recipes/pretrain.py", f"run_dir={tmp_path}", "trainer.max_steps=1"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert errors == [
        f"error: run_dir {tmp_path} already holds checkpoints of an earlier run: pass trainer.resume=true to "
        "continue it, choose another run_dir, or pass trainer.overwrite=true to move them aside (into "
        f"{tmp_path}/replaced-<time>) and start fresh"
    ]
    assert "Traceback" not in proc.stderr
    assert (earlier / "meta.json").is_file()


@pytest.mark.parametrize(
    "shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../outside.safetensors"]
)
def test_an_index_that_names_a_file_outside_the_checkpoint_is_refused(tiny_hf_checkpoint, shard):
    """Each shard an index names lies beside it: the file outside is never opened, even when it is there."""
    import shutil

    from safetensors import safe_open

    from nemo_lite.components.models import CheckpointError

    shutil.copy(tiny_hf_checkpoint / "model.safetensors", tiny_hf_checkpoint.parent / "outside.safetensors")
    with safe_open(tiny_hf_checkpoint / "model.safetensors", "pt") as f:
        weight_map = {name: shard for name in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    (tiny_hf_checkpoint / "model.safetensors").unlink()
    (tiny_hf_checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=rf"names shard files outside its directory: {shard};"):
        _load(tiny_hf_checkpoint)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda text: text[: len(text) // 2], r"ckpt/config.json is not valid JSON"),
        (lambda text: text.replace('"num_hidden_layers": 2', '"num_hidden_layers": "two"'), "num_hidden_layers='two'"),
    ],
)
def test_a_bad_config_json_is_named_before_the_tokenizer_reads_it(tmp_path, tiny_hf_checkpoint, edit, match):
    """The tokenizer loader reads config.json too; its error blamed the tokenizer for the checkpoint's file."""
    from nemo_lite.components.datasets import default_tokenizer_file
    from nemo_lite.components.models import CheckpointError

    shutil.copy(default_tokenizer_file(), tiny_hf_checkpoint / "tokenizer.json")
    config = tiny_hf_checkpoint / "config.json"
    config.write_text(edit(config.read_text()))
    cfg = _finetune_config(tmp_path, tiny_hf_checkpoint)
    cfg.data.tokenizer = "model"
    message = fails("bad config.json", cfg, CheckpointError, match)
    assert "tokenizer" not in message
