"""Pretrain a Llama-style model from scratch (configs/pretrain.yaml).

python recipes/pretrain.py                                   # the default: small model, CPU, offline
python recipes/pretrain.py attention=sdpa trainer.max_steps=50
"""

from nemo_lite.training.launch import main

if __name__ == "__main__":
    main("pretrain")
