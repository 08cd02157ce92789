"""``recipes/evaluate.py``: lm-evaluation-harness tasks on a checkpoint, results JSON into the run_dir.

    python recipes/evaluate.py checkpoint=runs/finetune tasks=[nemo_lite_arithmetic_mc]
    python recipes/evaluate.py checkpoint=HuggingFaceTB/SmolLM2-135M tasks=[hellaswag,arc_easy] limit=200

The model class lm-eval runs is :class:`nemo_lite.lm_eval_model.NemoLiteLM` (docs/evaluation.md). lm-eval is the
``eval`` extra; this module imports it only when a run starts.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nemo_lite.errors import ConfigError


@dataclass
class EvalConfig:
    """python recipes/evaluate.py checkpoint=PATH_OR_HUB_ID tasks=[TASK,...] [key=value ...]"""

    # A run_dir (its hf/ export), a Hugging Face directory or a hub id.
    checkpoint: str = "???"
    # lm-eval task or group names (lm-eval's, nemo_lite's shipped ones, or ones under task_dirs).
    tasks: list[str] = field(default_factory=list)
    # A PEFT LoRA adapter directory merged into the checkpoint before evaluating.
    adapter: str | None = None
    # More directories of task YAML files.
    task_dirs: list[str] = field(default_factory=list)
    # Documents per task at most (None = all); few-shot examples (None = the task's default).
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    # auto = cuda when available, else cpu.
    device: str = "auto"
    # auto = bfloat16 on cuda, float32 on cpu.
    dtype: str = "auto"
    # Where the results JSON goes: None = <run_dir>/eval for a run_dir, else ./eval_results.
    out: str | None = None
    # Write each document's requests and responses too (lm-eval's samples).
    log_samples: bool = False
    seed: int = 0


def run(cfg: EvalConfig) -> Path:
    """Evaluate, print lm-eval's table, and write its results JSON; returns the JSON's path."""
    if not cfg.tasks:
        raise ConfigError("tasks is required: pass tasks=[name,...] (e.g. tasks=[nemo_lite_arithmetic_mc])")
    try:
        from lm_eval.utils import handle_non_serializable, make_table
    except ImportError:
        raise ConfigError("evaluation needs lm-eval: pip install 'nemo_lite[eval]'") from None
    from nemo_lite.lm_eval_model import NemoLiteLM, evaluate

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    lm = NemoLiteLM(cfg.checkpoint, adapter=cfg.adapter, dtype=dtype, device=device, batch_size=cfg.batch_size)
    try:
        results = evaluate(
            lm,
            cfg.tasks,
            task_dirs=cfg.task_dirs,
            limit=cfg.limit,
            num_fewshot=cfg.num_fewshot,
            log_samples=cfg.log_samples,
            random_seed=cfg.seed,
            numpy_random_seed=cfg.seed,
            torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed,
        )
    except KeyError as err:  # lm-eval's word for a task name it does not know
        raise ConfigError(f"tasks={cfg.tasks}: lm-eval does not know {err}; see `lm-eval ls tasks`") from None
    print(make_table(results), file=sys.stderr)
    run_dir = Path(cfg.checkpoint).expanduser()
    out = Path(cfg.out) if cfg.out else run_dir / "eval" if (run_dir / "hf").is_dir() else Path("eval_results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"results_{time.strftime('%Y-%m-%dT%H-%M-%S', time.gmtime())}.json"
    results["config"]["nemo_lite"] = {"checkpoint": cfg.checkpoint, "adapter": cfg.adapter, "dtype": dtype}
    path.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    print(f"[nemo_lite] wrote lm-eval's results to {path}", file=sys.stderr)
    return path


# ---- trainer.eval_tasks -------------------------------------------------------------------------------


def check_training_eval(tasks: list[str], limit: int | None) -> None:
    """Refuse, before a run starts, ``trainer.eval_tasks`` without lm-eval or with a task it does not know."""
    try:
        from lm_eval.tasks import TaskManager

        from nemo_lite.lm_eval_model import SHIPPED_TASKS
    except ImportError:
        raise ConfigError("trainer.eval_tasks needs lm-eval: pip install 'nemo_lite[eval]'") from None
    if limit is not None and limit <= 0:
        raise ConfigError(f"trainer.eval_limit={limit} must be > 0 (documents per task), or null for all")
    manager = TaskManager(include_path=[str(SHIPPED_TASKS)])
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"trainer.eval_tasks: lm-eval does not know {unknown}; see `lm-eval ls tasks`")


def evaluate_in_training(model, tokenizer, tasks: list[str], *, limit: int | None = None) -> dict[str, float]:
    """Score ``tasks`` on the model being trained; ``{"eval/<task>/<metric>": value}`` (no stderr)."""
    from nemo_lite.lm_eval_model import NemoLiteLM, evaluate

    lm = NemoLiteLM(model=model, tokenizer=tokenizer)
    results = evaluate(lm, tasks, limit=limit, bootstrap_iters=0, log_samples=False, verbosity="ERROR")
    scores = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, _ = key.partition(",")
            if isinstance(value, int | float) and not isinstance(value, bool) and not metric.endswith("_stderr"):
                scores[f"eval/{task}/{metric}"] = float(value)
    return scores
