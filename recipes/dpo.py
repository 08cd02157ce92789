"""Preference-tune a Hugging Face checkpoint with DPO or SimPO (configs/dpo.yaml; default SmolLM2-135M
on the offline default preference set; docs/preference.md).

python scripts/convert_smollm2.py          # once: builds ~/.cache/nemo_lite/smollm2-135m offline
python recipes/dpo.py trainer.max_steps=20
python recipes/dpo.py objective=simpo peft=lora
"""

from nemo_lite.training.launch import main

if __name__ == "__main__":
    main("dpo")
