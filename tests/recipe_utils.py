"""Small recipe configs shared by the end-to-end tests."""

from __future__ import annotations

from pathlib import Path

from nemo_lite.training.config import RecipeConfig


def tiny_config(run_dir: Path, backend: str = "flex", steps: int = 20) -> RecipeConfig:
    cfg = RecipeConfig()
    cfg.run_dir = str(run_dir)
    cfg.model.preset = "tiny"
    cfg.attention.backend = backend
    cfg.data.seq_len, cfg.data.batch_size = 64, 4
    cfg.optim.lr, cfg.optim.warmup_steps = 3e-3, 3
    t = cfg.trainer
    t.max_steps, t.val_every, t.val_tokens, t.save_every = steps, 10, 512, 0
    t.sample_tokens, t.progress_bar = 8, False
    return cfg
