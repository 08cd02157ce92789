"""Generate text from a checkpoint (docs/generation.md): printed (streamed for one prompt) and written as jsonl.

python recipes/generate.py checkpoint=runs/finetune prompt="What is 12 times 3?"
python recipes/generate.py checkpoint=HuggingFaceTB/SmolLM2-135M prompts_file=prompts.txt temperature=0.7 top_p=0.9
"""

from nemo_lite.cli import run_cli
from nemo_lite.inference import GenerateConfig, run_generate

if __name__ == "__main__":
    run_cli(GenerateConfig, run_generate)
