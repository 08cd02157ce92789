"""End to end on CPU: the recipes' trainer with every backend, exact resume, exports, bad command lines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from recipe_utils import tiny_config

from nemo_lite.components.attention import list_attention_backends
from nemo_lite.testing.hooks import after_each_step
from nemo_lite.training.metrics import read_metrics
from nemo_lite.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    """20 steps with every backend from the same seed and data."""
    out = {}
    for backend in list_attention_backends():
        run_dir = tmp_path_factory.mktemp(f"run_{backend}")
        out[backend] = Trainer(tiny_config(run_dir, backend)).fit()
    return out


def test_every_backend_gives_the_same_loss_curve(curves):
    reference = curves["eager"].losses
    assert len(reference) == 20
    for backend, result in curves.items():
        diffs = [abs(a - b) for a, b in zip(result.losses, reference, strict=True)]
        assert max(diffs[:3]) <= 1e-4, (backend, diffs[:3])
        assert max(diffs) <= 1e-3, (backend, diffs)


def test_loss_falls(curves):
    losses = curves["flex"].losses
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5


def test_run_directory_has_config_metrics_and_a_loadable_export(curves):
    result = curves["sdpa"]
    run_dir = result.run_dir
    assert (run_dir / "config.yaml").read_text().count("backend: sdpa") == 1
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 21))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mask_ms", "step_ms", "mfu", "peak_rss_gib"):
        assert key in records[-1]
    assert "val_loss" in records[9] and "val_ppl" in records[19]
    assert result.sample and isinstance(result.sample, str)

    import transformers

    from nemo_lite.components.models import LlamaForCausalLM

    hf = transformers.AutoModelForCausalLM.from_pretrained(result.hf_dir)
    ours = LlamaForCausalLM.from_pretrained(result.hf_dir)
    ids = torch.randint(0, ours.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    assert (result.hf_dir / "tokenizer.json").is_file() or (result.hf_dir / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "ctrl-c"])
def test_interrupt_and_resume_is_exact(tmp_path, signum):
    straight = Trainer(tiny_config(tmp_path / "straight", "sdpa", steps=12)).fit()

    interrupted_cfg = tiny_config(tmp_path / "interrupted", "sdpa", steps=12)
    trainer = Trainer(interrupted_cfg)

    def signal_at_6(tr, metrics):
        if tr.step == 6:
            os.kill(os.getpid(), signum)  # a real signal: the handler asks for a save and a stop

    after_each_step(trainer, signal_at_6)
    first = trainer.fit()
    assert first.status == "interrupted" and first.steps == 6 and first.signal == signum
    assert first.last_checkpoint.name == "step_000006"

    interrupted_cfg.trainer.resume = "true"
    resumed_trainer = Trainer(interrupted_cfg)
    second = resumed_trainer.fit()
    assert second.status == "completed"
    assert first.losses + second.losses == straight.losses  # exact, not approximate

    final_straight = Trainer(tiny_config(tmp_path / "straight", "sdpa", steps=12))
    final_straight.cfg.trainer.resume = str(tmp_path / "straight")
    final_straight.setup()
    for (name, a), b in zip(
        final_straight.raw_model.state_dict().items(), resumed_trainer.raw_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def run_recipe(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    env.pop("NEMO_LITE_DEBUG", None)
    return subprocess.run(
        [sys.executable, str(REPO / "recipes" / "pretrain.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


@pytest.mark.parametrize(
    "args,expected",
    [
        (["trainer.max_step=5"], "unknown config key 'trainer.max_step'"),
        (["attention=flash9"], "attention=flash9 is not one of the attention configs; choose one of: eager, flex,"),
        (["trainer.max_steps=many"], "trainer.max_steps='many' is not valid: Value 'many' of type 'str' could not"),
        (["trainer.compile=maybe"], "trainer.compile='maybe' is not valid: Value 'maybe' is not a valid bool"),
        (["data.seq_len=[1,2"], "cannot parse the command line:"),
        (["trainer.resume=/nonexistent/run"], "trainer.resume='/nonexistent/run': no checkpoint there"),
        (["model.preset=gpt5"], "model.preset='gpt5' is not valid; choose one of:"),
        (["attention.backend=flash9"], "attention='flash9' is not valid; choose one of: eager, flex, sdpa"),
    ],
)
def test_bad_command_lines_stop_with_one_clear_message(args, expected, tmp_path):
    proc = run_recipe(*args, f"run_dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr  # one line
    assert expected in proc.stderr, proc.stderr
    assert "parameters, attention=" not in proc.stderr  # found before the data and the model are built
    assert not any(tmp_path.iterdir())  # stopped before any work: nothing written, not even a lock


def test_missing_finetune_checkpoint_says_how_to_create_it(tmp_path):
    """The default finetune recipe before scripts/convert_smollm2.py ran: its model.pretrained_path is where that
    script writes SmolLM2-135M ($NEMO_LITE_CACHE/smollm2-135m)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "finetune.py"), f"run_dir={tmp_path}/run"],
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard
        cwd=REPO,
        env={**os.environ, "NEMO_LITE_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode != 0
    assert "Create it with: python scripts/convert_smollm2.py" in proc.stderr and "Traceback" not in proc.stderr


def test_the_exit_code_tells_interrupted_from_finished_and_a_finished_run_is_not_redone(tmp_path):
    """SIGTERM -> 143 with a checkpoint saved; the resume finishes -> 0; resuming the finished run says so,
    exits 0 and repeats nothing (no validation, export or sample)."""
    args = [
        "model=tiny",
        "attention=sdpa",
        "data.seq_len=64",
        "trainer.max_steps=400",
        "trainer.val_every=0",
        "trainer.save_every=0",
        "trainer.progress_bar=false",
        "trainer.sample_tokens=2",
        f"run_dir={tmp_path}",
    ]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "recipes" / "pretrain.py"), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):  # 400 steps: it is still going
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)  # a hang guard, not a speed limit
    assert proc.returncode == 128 + signal.SIGTERM == 143, err[-2000:]
    assert "interrupted at step" in err
    stopped_at = len(metrics.read_text().splitlines())

    finished = run_recipe(*args[:3], "trainer.max_steps=" + str(stopped_at + 2), *args[4:], "trainer.resume=true")
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "exported a Hugging Face checkpoint" in finished.stderr

    again = run_recipe(*args[:3], "trainer.max_steps=" + str(stopped_at + 2), *args[4:], "trainer.resume=true")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "the run is finished, nothing to do" in again.stderr
    assert "exported" not in again.stderr and "validation loss" not in again.stderr and "sample" not in again.stderr


def test_hydra_flags_with_values_are_not_taken_for_overrides(tmp_path):
    proc = run_recipe("--cfg", "job", "attention=sdpa", f"run_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "recipe: pretrain" in proc.stdout and "backend: sdpa" in proc.stdout


def test_a_model_shape_that_does_not_add_up_is_refused_before_the_data_are_built(tmp_path):
    proc = run_recipe("model.overrides.hidden_size=100", f"run_dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: model.preset=small with model.overrides: hidden_size=100 is not divisible by num_attention_heads=8: "
        "set head_dim explicitly\n"
    )
