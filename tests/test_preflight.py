"""Every config value is checked before Hydra or the data touch anything: a bad value on the command line is
one line and exit 2, and the run directory is neither created nor written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_lite.training import launch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = str(REPO / "configs")


def problem(run_dir: Path | str, *overrides: str, config: str = "pretrain") -> str | None:
    return launch.preflight(CONFIGS, config, [f"run_dir={run_dir}", *overrides])


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=0", "DataConfig.batch_size must be an int >= 1, got 0"),
        ("data.batch_size=-3", "DataConfig.batch_size must be an int >= 1, got -3"),
        ("data.seq_len=0", "DataConfig.seq_len must be an int >= 1, got 0"),
        ("data.validation_fraction=-0.1", "DataConfig.validation_fraction=-0.1; it must be in [0, 1)"),
        ("data.prefetch=-1", "DataConfig.prefetch must be an int >= 0, got -1"),
        ("data.num_epochs=0", "DataConfig.num_epochs must be an int >= 1, got 0"),
        ("trainer.max_steps=0", "trainer.max_steps=0 must be a finite number > 0"),
        ("optim.beta2=1.0", "optim.beta2=1.0 must be in [0.0, 1.0)"),
    ],
)
def test_a_bad_value_is_one_line_before_the_run_dir_exists(tmp_path, override, message):
    run_dir = tmp_path / "run"
    assert problem(run_dir, override) == message
    assert not run_dir.exists()


def test_a_good_command_line_passes(tmp_path):
    assert problem(tmp_path / "run", "trainer.max_steps=3", "attention=sdpa") is None
    assert problem(tmp_path / "ft", config="finetune") is None


def test_a_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    assert problem(tmp_path / "f") == f"run_dir {tmp_path}/f is a file, not a directory: choose another run_dir"
    assert problem(tmp_path / "f" / "run") == (
        f"run_dir {tmp_path}/f/run cannot be created: {tmp_path}/f is a file; choose another run_dir"
    )


def test_a_run_dir_that_links_to_nowhere(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    assert problem(tmp_path / "link") == (
        f"run_dir {tmp_path}/link is a symbolic link to {tmp_path}/gone, which does not exist: "
        "create its target or choose another run_dir"
    )
    assert not (tmp_path / "gone").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_run_dir_under_a_read_only_directory(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    assert problem(tmp_path / "ro" / "run") == (
        f"run_dir {tmp_path}/ro/run is not writable ({tmp_path}/ro is read-only): choose another run_dir"
    )


def test_an_interpolation_the_config_cannot_resolve(tmp_path):
    assert problem(f"{tmp_path}/${{x}}") == f"run_dir='{tmp_path}/${{x}}' is not valid: Interpolation key 'x' not found"
    assert list(tmp_path.iterdir()) == []


def test_the_recipe_exits_2_with_one_line_and_no_run_dir(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NEMO_LITE_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run(
        [sys.executable, "recipes/pretrain.py", f"run_dir={tmp_path}/run", "data.batch_size=0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == ["error: DataConfig.batch_size must be an int >= 1, got 0"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "section, key, value",
    [("data", "seq_len", 10**9), ("data", "batch_size", 10**9), ("trainer", "grad_accum", 10**9)],
)
def test_a_step_that_cannot_fit_is_refused_before_the_data_are_built(tmp_path, monkeypatch, section, key, value):
    from recipe_utils import tiny_config

    from nemo_lite.errors import ConfigError
    from nemo_lite.training.trainer import Trainer

    cfg = tiny_config(tmp_path / "run", steps=1)
    setattr(getattr(cfg, section), key, value)

    def build_data(self):
        raise AssertionError("the data were built for a step that cannot fit")

    monkeypatch.setattr(Trainer, "_build_data", build_data)
    with pytest.raises(ConfigError, match=rf"{section}.{key}={value}.* needs at least .* free: lower data.seq_len"):
        Trainer(cfg).fit()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_step_floor_counts_batches_and_block_inputs():
    from nemo_lite.components.models.families.llama import LlamaConfig
    from nemo_lite.training.run_dir import StepShape

    config = LlamaConfig(
        num_hidden_layers=3, hidden_size=64, vocab_size=100, intermediate_size=128, num_attention_heads=4
    )
    step = StepShape(batch_size=2, seq_len=10, grad_accum=4, activation_bytes=2)
    assert step.batch_bytes() == 4 * 2 * 10 * 3 * 8
    assert step.activation_floor(config) == 2 * 10 * 64 * 3 * 2
