"""lm-evaluation-harness over nemo_lite models against lm-eval's own Hugging Face class (``HFLM``) on the same tiny
checkpoint, offline, on the tasks nemo_lite ships (nemo_lite/assets/eval_tasks: multiple choice, rolling
perplexity, generation): every per-sample log-likelihood within 1e-4, accuracies and generations equal."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from model_utils import family_hf_model, save_default_tokenizer

pytest.importorskip("lm_eval")

from nemo_lite.lm_eval_model import NemoLiteLM, evaluate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = ["nemo_lite_arithmetic_mc", "nemo_lite_arithmetic_ppl", "nemo_lite_arithmetic_gen"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    eos = save_default_tokenizer(path)
    # max_position_embeddings 24 < the longest text: the rolling windows and the left truncation are exercised
    model = family_hf_model("llama", seed=5, vocab_size=8192, bos_token_id=eos, eos_token_id=eos)
    model.config.max_position_embeddings = 24
    model.save_pretrained(path)
    return path


def _samples(results, task):
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def test_the_shipped_tasks_score_as_lm_evals_own_hugging_face_class(checkpoint):
    import transformers
    from lm_eval.models.huggingface import HFLM

    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    theirs = HFLM(pretrained=theirs_model, tokenizer=tokenizer, batch_size=4, device="cpu")
    ours = NemoLiteLM(str(checkpoint), batch_size=3)
    assert ours.max_length == theirs.max_length == 24
    kw = dict(log_samples=True, bootstrap_iters=0)
    ref, got = evaluate(theirs, TASKS, **kw), evaluate(ours, TASKS, **kw)

    for task in TASKS:
        theirs_s, ours_s = _samples(ref, task), _samples(got, task)
        assert len(ours_s) == len(theirs_s) == 24
        for a, b in zip(theirs_s, ours_s, strict=True):
            if task.endswith("_gen"):
                assert b["resps"] == a["resps"]  # the generated text itself
                continue
            for ra, rb in zip(a["resps"], b["resps"], strict=True):
                score_a, score_b = (ra[0][0], rb[0][0]) if task.endswith("_mc") else (ra[0], rb[0])
                assert abs(score_a - score_b) <= 1e-4
                if task.endswith("_mc"):
                    assert ra[0][1] == rb[0][1]  # is_greedy
    for task, metric in [("nemo_lite_arithmetic_mc", "acc,none"), ("nemo_lite_arithmetic_gen", "exact_match,none")]:
        assert got["results"][task][metric] == ref["results"][task][metric]
    ppl = "word_perplexity,none"
    assert math.isclose(
        got["results"]["nemo_lite_arithmetic_ppl"][ppl], ref["results"]["nemo_lite_arithmetic_ppl"][ppl], rel_tol=1e-4
    )


def test_the_evaluate_recipe_writes_lm_evals_results_json_into_the_run_dir(checkpoint, tmp_path):
    import shutil
    import subprocess

    run_dir = tmp_path / "run"
    shutil.copytree(checkpoint, run_dir / "hf")
    command = [sys.executable, str(REPO / "recipes" / "evaluate.py"), f"checkpoint={run_dir}"]
    done = subprocess.run(
        [*command, "tasks=[nemo_lite_arithmetic_mc]", "limit=6", "batch_size=4"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (written,) = (run_dir / "eval").glob("results_*.json")
    results = json.loads(written.read_text())
    assert results["n-samples"]["nemo_lite_arithmetic_mc"]["effective"] == 6
    lm = NemoLiteLM(str(run_dir), batch_size=4)
    direct = evaluate(lm, ["nemo_lite_arithmetic_mc"], limit=6, bootstrap_iters=0)
    assert (
        results["results"]["nemo_lite_arithmetic_mc"]["acc,none"]
        == direct["results"]["nemo_lite_arithmetic_mc"]["acc,none"]
    )

    bad = subprocess.run([*command, "task=[x]"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "error: unknown key 'task'; keys: checkpoint, tasks"
    )
    missing = subprocess.run([*command], capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 2 and "error: tasks is required: pass tasks=[name,...]" in missing.stderr


def test_eval_tasks_during_training_are_logged_and_equal_lm_eval_on_the_export(tmp_path):
    from recipe_utils import tiny_config

    from nemo_lite.training.metrics import read_metrics
    from nemo_lite.training.trainer import Trainer

    cfg = tiny_config(tmp_path / "run", backend="sdpa", steps=3)
    cfg.trainer.val_every, cfg.trainer.sample_tokens = 2, 0
    cfg.trainer.eval_tasks, cfg.trainer.eval_limit = ["nemo_lite_arithmetic_mc"], 5
    result = Trainer(cfg).fit()
    records = read_metrics(result.run_dir)
    assert "eval/nemo_lite_arithmetic_mc/acc" in records[1] and "eval/nemo_lite_arithmetic_mc/acc" not in records[0]
    # the end of the run scores the final model: what lm-eval gives on its export
    export = evaluate(NemoLiteLM(str(result.run_dir)), ["nemo_lite_arithmetic_mc"], limit=5, bootstrap_iters=0)
    assert (
        result.eval_metrics["eval/nemo_lite_arithmetic_mc/acc"]
        == export["results"]["nemo_lite_arithmetic_mc"]["acc,none"]
    )


def test_bad_eval_tasks_are_refused_before_the_run(tmp_path):
    from recipe_utils import tiny_config

    from nemo_lite.errors import ConfigError
    from nemo_lite.training.trainer import Trainer

    cfg = tiny_config(tmp_path / "run", backend="sdpa", steps=3)
    cfg.trainer.eval_tasks = ["no_such_task"]
    with pytest.raises(ConfigError, match=r"trainer.eval_tasks: lm-eval does not know \['no_such_task'\]"):
        Trainer(cfg)
