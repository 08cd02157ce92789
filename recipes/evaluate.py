"""Evaluate a checkpoint on lm-evaluation-harness tasks (docs/evaluation.md; needs the `eval` extra).

python recipes/evaluate.py checkpoint=runs/finetune tasks=[nemo_lite_arithmetic_mc]
python recipes/evaluate.py checkpoint=HuggingFaceTB/SmolLM2-135M tasks=[hellaswag] limit=200
"""

from nemo_lite.cli import run_cli
from nemo_lite.evaluation import EvalConfig, run

if __name__ == "__main__":
    run_cli(EvalConfig, run)
