"""The README runs as written, and every script answers --help.

Every command of README.md's ```bash blocks runs here, in the quickstart's environment (``sys.executable``:
``.venv/bin/python`` under ``bash scripts/quickstart.sh test``), as written plus overrides that only shorten
it: ``trainer.max_steps=2``, ``trainer.sample_tokens=2``, ``data.seq_len=64`` unless the command sets it, and a
temporary ``run_dir``. What cannot run here
is listed below with the reason; a command the test does not know how to run fails it, so a new README
command cannot go untested.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

SHORTEN = {"trainer.max_steps": "2", "trainer.sample_tokens": "2"}
SHORTEN_UNLESS_SET = {"data.seq_len": "64"}  # a command that sets its length keeps it
# Commands that need GPUs: a needle of the command -> (GPUs, why).
NEEDS_GPUS = {
    "recipes/pretrain.py model=llama-3.2-1b attention=flex trainer.compile=true": (
        1,
        "Llama-3.2-1B at 2 x 4096 tokens with torch.compile is the one-GPU benchmark command",
    ),
    "torchrun --nproc-per-node 8": (8, "FSDP2 over 8 GPUs"),
    "recipes/pretrain.py model=llama-3.2-3b attention=flex trainer.compile=true": (
        1,
        "float8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper)",
    ),
}
NOT_RUN = {"bash scripts/quickstart.sh test": "it runs this test suite"}
# Placeholders in the README -> what stands for them here (a function of the test's temporary directory).
PLACEHOLDERS = {
    "/path/to/llama-hf-dir": lambda tmp: str(_tiny_hf_checkpoint(tmp / "llama-hf-dir")),
    "my/*.jsonl": lambda tmp: _jsonl_documents(tmp / "my") + "/*.jsonl",
}


def readme_commands() -> list[tuple[int, str]]:
    """(line, command) for every command of the README's ```bash blocks, continuation lines joined."""
    commands, in_bash, pending, start = [], False, "", 0
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_bash = line.strip() == "```bash" and not in_bash
            continue
        if not in_bash:
            continue
        code = shlex.join(shlex.split(line.rstrip().removesuffix("\\"), comments=True))
        if not pending:
            start = number
        pending = f"{pending} {code}".strip()
        if not line.rstrip().endswith("\\") and pending:
            commands.append((start, pending))
            pending = ""
    return commands


COMMANDS = readme_commands()


def _tiny_hf_checkpoint(path: Path) -> Path:
    """A Llama checkpoint with a tokenizer, as `model.pretrained_path` expects (tiny, random weights)."""
    from nemo_lite.components.datasets import DataConfig, build_tokenizer
    from nemo_lite.components.models import LlamaForCausalLM, get_preset

    tokenizer = build_tokenizer(DataConfig())
    tokenizer.save_pretrained(str(path.parent / "tokenizer"))
    model = LlamaForCausalLM(get_preset("tiny", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id))
    model.init_weights(0)
    return model.save_pretrained(path, tokenizer_dir=path.parent / "tokenizer")


def _jsonl_documents(directory: Path) -> str:
    directory.mkdir(parents=True)
    for part in range(2):
        rows = [
            {"text": f"Note {part}.{i}: packed rows of tokens are cut at the end of each document. " * 4}
            for i in range(150)
        ]
        (directory / f"part{part}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(directory)


def _argv(command: str, tmp: Path) -> tuple[list[str], str]:
    """The command as this test runs it, and the script it runs."""
    for placeholder, stand_in in PLACEHOLDERS.items():
        if placeholder in command:
            command = command.replace(placeholder, stand_in(tmp))
    words = shlex.split(command)
    if words[:3] == ["bash", "scripts/quickstart.sh", "pretrain"]:
        quickstart = (REPO / "scripts" / "quickstart.sh").read_text()
        assert 'pretrain) exec "$VENV/bin/python" recipes/pretrain.py "$@"' in quickstart
        words = ["python", "recipes/pretrain.py", *words[3:]]
    if words[0] == "torchrun":
        script_at = next(i for i, word in enumerate(words) if word.endswith(".py"))
        return [sys.executable, "-m", "torch.distributed.run", *words[1:]], words[script_at]
    if words[0] == "python" and re.fullmatch(r"(recipes|scripts)/\w+\.py", words[1]):
        return [sys.executable, *words[1:]], words[1]
    raise AssertionError(f"README command {command!r}: tests/test_readme.py does not know how to run it")


@pytest.mark.slow
@pytest.mark.parametrize("line,command", COMMANDS, ids=[f"README.md:{line}" for line, _ in COMMANDS])
def test_readme_command_runs(line, command, tmp_path, request):
    if command in NOT_RUN:
        pytest.skip(f"README.md:{line} `{command}`: not run here, {NOT_RUN[command]}")
    for needle, (gpus, why) in NEEDS_GPUS.items():
        if needle in command and torch.cuda.device_count() < gpus:
            pytest.skip(f"README.md:{line} needs {gpus} GPU(s) ({why}); this machine has {torch.cuda.device_count()}")
    argv, script = _argv(command, tmp_path)
    uses_smollm2 = script == "scripts/convert_smollm2.py" or (
        script == "recipes/finetune.py" and not any(a.startswith("model.pretrained_path=") for a in argv)
    )
    if uses_smollm2:
        request.getfixturevalue("smollm2_dir")  # skips, saying how to get it, when it cannot be fetched
    run_dir = tmp_path / "run"
    if script.startswith("recipes/"):
        keys = {a.split("=", 1)[0] for a in argv}
        shorten = {**{k: v for k, v in SHORTEN_UNLESS_SET.items() if k not in keys}, **SHORTEN}
        keep = [a for a in argv if a.split("=", 1)[0] not in {*SHORTEN, "run_dir"}]
        argv = [*keep, *(f"{key}={value}" for key, value in shorten.items()), f"run_dir={run_dir}"]
    env = {key: value for key, value in os.environ.items() if key not in ("NEMO_LITE_DEBUG", "PYTHONPATH")}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, f"README.md:{line} `{command}` exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    if script.startswith("recipes/"):
        steps = [json.loads(row)["step"] for row in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2]
        assert (run_dir / "hf" / "config.json").is_file()
        shutil.rmtree(run_dir)  # a fine-tuned SmolLM2 run is 2 GB; pytest would keep it
    else:
        assert proc.stdout.strip(), proc.stderr


def test_the_readme_holds_no_test_count():
    """Counts of tests drift with every commit: the README points at pytest's own last line instead."""
    assert re.findall(r"\b\d+ (?:passed|skipped|failed|tests)\b", README.read_text()) == []


def test_the_readme_commands_are_found():
    commands = [command for _, command in COMMANDS]
    assert "python recipes/pretrain.py attention=sdpa trainer.max_steps=50 run_dir=runs/sdpa" in commands
    assert any(c.startswith("torchrun") and "trainer.reshard_after_forward=false" in c for c in commands)
    assert all(any(needle in c for c in commands) for needle in [*NEEDS_GPUS, *NOT_RUN, *PLACEHOLDERS])


# ---- every script answers --help ------------------------------------------------------------------

SCRIPTS = sorted(p for p in (REPO / "scripts").glob("*.py") if "argparse" in p.read_text())
HELP_TIMEOUT_S = 300  # a hang, not a speed limit


@pytest.fixture(scope="module")
def helps():
    """``--help`` of every argparse script, as many at once as there are cores, without a GPU."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}

    def run(script: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(script), "--help"],
            capture_output=True,
            text=True,
            timeout=HELP_TIMEOUT_S,
            cwd=REPO,
            env=env,
        )

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = dict(zip(SCRIPTS, pool.map(run, SCRIPTS), strict=True))
    return results


def test_every_script_with_a_command_line_is_checked(helps):
    assert REPO / "scripts" / "plot_loss.py" in SCRIPTS
    assert len(SCRIPTS) >= 10
    assert set(helps) == set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_help(script, helps):
    proc = helps[script]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {script.name}"), proc.stdout[:200]
