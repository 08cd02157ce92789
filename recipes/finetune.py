"""Fine-tune a Hugging Face checkpoint (configs/finetune.yaml; default SmolLM2-135M).

python scripts/convert_smollm2.py          # once: builds ~/.cache/nemo_lite/smollm2-135m offline
python recipes/finetune.py trainer.max_steps=20
"""

from nemo_lite.training.launch import main

if __name__ == "__main__":
    main("finetune")
