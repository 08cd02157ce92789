"""The recipes' typed schema: every YAML key, its type and default, in one place.

Hydra composes ``configs/`` on top of :class:`RecipeConfig`, so an unknown key or a value of the wrong
type stops the run while the command line is parsed. Values that depend on what is installed (the
attention backend names, the model presets) are checked by :func:`validate` before any work starts.
Only OmegaConf-compatible types appear here (no unions beyond Optional).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from nemo_lite.components.attention.config import AttentionConfig
from nemo_lite.components.datasets.config import DataConfig
from nemo_lite.errors import ConfigError
from nemo_lite.training.activation_checkpointing import ac_mode
from nemo_lite.training.converters.float8 import Float8Section
from nemo_lite.training.converters.lora import PeftSection
from nemo_lite.training.objectives import ObjectiveSection, check_objective
from nemo_lite.training.optimizers import OptimSection, check_optim


@dataclass
class ModelSection:
    # A preset name from nemo_lite.components.models (exact match), used when training from scratch.
    preset: str = "tiny"
    # A Hugging Face directory to fine-tune from (config.json + safetensors). Overrides `preset`.
    pretrained_path: str | None = None
    # Field overrides of the preset's config (e.g. {num_hidden_layers: 2}); unknown fields are an error.
    overrides: dict[str, Any] = field(default_factory=dict)
    # From scratch: set vocab_size to the tokenizer's (rounded up to a multiple of 64) unless overridden.
    vocab_from_tokenizer: bool = True
    # Whether the pad token's embedding row (config.json's pad_token_id) gets a gradient from the input lookup.
    # null: as transformers for a checkpoint (model.pretrained_path: its nn.Embedding(padding_idx=pad_token_id)
    # gives that row none; a tied output projection's gradient still reaches it), every row for a preset;
    # true: every row; false: none for the pad row (needs a pad_token_id).
    pad_embedding_gradient: bool | None = None


@dataclass
class TrainerSection:
    max_steps: int = 200
    grad_accum: int = 1
    clip_grad_norm: float = 1.0
    seed: int = 0
    # "auto" = cuda when available, else cpu.
    device: str = "auto"
    # Autocast dtype on GPU ("bfloat16" | "float32"); master weights stay float32. CPU runs float32.
    autocast_dtype: str = "bfloat16"
    # The step's implementation (STEP_IMPLS): "plain" (the optimizer and torch's cross-entropy, the reference),
    # "fast" (fused kernels and module swaps, nemo_lite.training.fast; refused where it cannot run) or "auto"
    # (fast where it can run). Which parts run is printed in one line before training.
    step_impl: str = "auto"
    # torch.compile each decoder block.
    compile: bool = False
    # Recompute the decoder blocks' activations in backward: none | full (each block whole) | selective (all but
    # attention's and every other matmul's outputs, as torchtitan's per-op policy). true/false mean full/none.
    activation_checkpointing: str = "none"
    # Several GPUs (FSDP2): free each block's gathered parameters after its forward and gather them again
    # for backward (less memory), or keep them until backward (one all-gather fewer per block).
    reshard_after_forward: bool = True
    # HSDP: the number of replicas of the sharded model (normally the number of nodes); each shard group
    # is world_size / dp_replicate consecutive ranks (one node's GPUs). 1 = FSDP over every rank.
    dp_replicate: int = 1
    # FSDP2 prefetch: each block starts the all-gathers of the next N blocks when its forward starts (and of
    # the previous N in backward). 0 = FSDP2's own order (each block's all-gather when the host reaches it).
    fsdp_prefetch: int = 0
    # Profile this many steps (0 = off) after skipping profile_start steps; rank 0 writes a trace and a
    # summary under run_dir/profile (docs/benchmarks.md). Profiled steps run slower.
    profile_steps: int = 0
    profile_start: int = 5
    # Tokens per chunk of the output projection + cross-entropy, recomputed in backward so only one
    # chunk's logits exist at a time (0 = all tokens at once).
    loss_chunk_size: int = 0
    log_every: int = 1
    val_every: int = 50
    # Validation tokens: the first val_tokens of the held-out split (all of it when smaller), in whole rows,
    # the same for every batch size and number of ranks (0 = no validation).
    val_tokens: int = 8192
    # Checkpoints: every N steps (0 = only at the end), keep the last K, under <run_dir>/checkpoints.
    save_every: int = 100
    keep_last: int = 2
    # false | true (the latest checkpoint in run_dir) | a checkpoint directory or run directory (a path).
    resume: Any = False
    # A fresh run (resume=false) in a run_dir that holds an earlier run's checkpoints is refused; true moves
    # that run's checkpoints, metrics.jsonl and config.yaml into <run_dir>/replaced-<time> first.
    overwrite: bool = False
    # Stop after this many consecutive non-finite losses/gradients (their updates are skipped).
    max_consecutive_nonfinite: int = 5
    # Export the final model as a Hugging Face directory (<run_dir>/hf).
    export_hf: bool = True
    # The export's weights: "auto" (the dtype of model.pretrained_path's weights; float32 from scratch),
    # "float32", "bfloat16" or "float16".
    export_dtype: str = "auto"
    # The end-of-run sample: its prompt (None = the data kind's own: "The" for text, a question for chat,
    # where it is the user turn rendered through the chat template) and its greedy new tokens (0 = none).
    sample_prompt: str | None = None
    sample_tokens: int = 32
    # lm-eval tasks scored every val_every steps and at the end (docs/evaluation.md; needs the eval extra and
    # one process), logged as eval/<task>/<metric>; eval_limit documents per task (None = all).
    eval_tasks: list[str] = field(default_factory=list)
    eval_limit: int | None = None
    progress_bar: bool = True


@dataclass
class LoggerSection:
    # "jsonl" (always written) or "wandb" (jsonl plus Weights & Biases).
    name: str = "jsonl"
    project: str = "nemo_lite"
    # wandb's own modes: online | offline | disabled.
    mode: str = "offline"
    run_name: str | None = None


@dataclass
class RecipeConfig:
    recipe: str = "pretrain"
    run_dir: str = "runs/${recipe}"
    model: ModelSection = field(default_factory=ModelSection)
    # The recipes' default: flex attention, packed documents kept apart (a plain model's is sdpa, causal).
    attention: AttentionConfig = field(
        default_factory=lambda: AttentionConfig(backend="flex", attn_mask_type="block_causal")
    )
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    peft: PeftSection = field(default_factory=PeftSection)
    float8: Float8Section = field(default_factory=Float8Section)
    logger: LoggerSection = field(default_factory=LoggerSection)


def register_schema() -> None:
    """Make the schema available to Hydra's defaults lists as `recipe_schema`."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="recipe_schema", node=RecipeConfig)


def _choice(name: str, value: Any, choices: list[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value!r} must be a finite number {'>= 0' if allow_zero else '> 0'}")


def _in_range(name: str, value: float, low: float, high: float, *, high_open: bool = False) -> None:
    if not (math.isfinite(value) and low <= value and (value < high if high_open else value <= high)):
        raise ConfigError(f"{name}={value!r} must be in [{low}, {high}{')' if high_open else ']'}")


STEP_IMPLS = ("auto", "fast", "plain")
# trainer.export_dtype: "auto" is the source checkpoint's dtype (nemo_lite.components.models.hf.EXPORT_DTYPES).
EXPORT_DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def check_step_impl(impl: str) -> None:
    """``trainer.step_impl`` is one of :data:`STEP_IMPLS`."""
    _choice("trainer.step_impl", impl, list(STEP_IMPLS))


def validate(cfg: RecipeConfig) -> None:
    """Checks the schema's types cannot express. Raises ConfigError naming the bad value."""
    from nemo_lite.components.attention import AttentionConfigError, list_attention_backends
    from nemo_lite.components.models import list_presets
    from nemo_lite.training.converters import check_converter_sections

    _choice("attention", cfg.attention.backend, list_attention_backends())  # named as the recipe's key
    try:
        cfg.attention.check()
    except AttentionConfigError as err:
        raise ConfigError(str(err)) from None
    if cfg.model.pretrained_path is None:
        _choice("model.preset", cfg.model.preset, list_presets())
    if cfg.trainer.eval_tasks:
        from nemo_lite.evaluation import check_training_eval

        check_training_eval(cfg.trainer.eval_tasks, cfg.trainer.eval_limit)
    _choice("trainer.autocast_dtype", cfg.trainer.autocast_dtype, ["bfloat16", "float32"])
    _choice("trainer.export_dtype", cfg.trainer.export_dtype, list(EXPORT_DTYPE_CHOICES))
    check_step_impl(cfg.trainer.step_impl)
    ac_mode(cfg.trainer.activation_checkpointing)
    check_optim(cfg.optim)
    check_objective(cfg.objective)
    if cfg.data.shared_prompt and cfg.attention.attn_mask_type != "shared_prompt":
        raise ConfigError(
            "data.shared_prompt=true packs both answers after one prompt; set attention.attn_mask_type=shared_prompt "
            f"(it is {cfg.attention.attn_mask_type!r}), or the rejected answer would see the chosen one"
        )
    _choice("logger.name", cfg.logger.name, ["jsonl", "wandb"])
    _choice("logger.mode", cfg.logger.mode, ["online", "offline", "disabled"])
    if cfg.trainer.device not in ("auto", "cpu") and not cfg.trainer.device.startswith("cuda"):
        raise ConfigError(f"trainer.device={cfg.trainer.device!r} is not valid; choose auto, cpu, cuda or cuda:N")
    for name, value in [
        ("trainer.max_steps", cfg.trainer.max_steps),
        ("trainer.grad_accum", cfg.trainer.grad_accum),
        ("data.seq_len", cfg.data.seq_len),
        ("data.batch_size", cfg.data.batch_size),
        ("optim.lr", cfg.optim.lr),
        ("optim.eps", cfg.optim.eps),
        ("trainer.log_every", cfg.trainer.log_every),
        ("trainer.keep_last", cfg.trainer.keep_last),
        ("trainer.max_consecutive_nonfinite", cfg.trainer.max_consecutive_nonfinite),
        ("trainer.dp_replicate", cfg.trainer.dp_replicate),
    ]:
        _positive(name, value)
    for name, value in [
        ("optim.warmup_steps", cfg.optim.warmup_steps),
        ("optim.weight_decay", cfg.optim.weight_decay),
        ("trainer.save_every", cfg.trainer.save_every),
        ("trainer.val_every", cfg.trainer.val_every),
        ("trainer.val_tokens", cfg.trainer.val_tokens),
        ("trainer.profile_steps", cfg.trainer.profile_steps),
        ("trainer.profile_start", cfg.trainer.profile_start),
        ("trainer.clip_grad_norm", cfg.trainer.clip_grad_norm),
        ("trainer.loss_chunk_size", cfg.trainer.loss_chunk_size),
        ("trainer.sample_tokens", cfg.trainer.sample_tokens),
        ("trainer.seed", cfg.trainer.seed),
        ("trainer.fsdp_prefetch", cfg.trainer.fsdp_prefetch),
    ]:
        _positive(name, value, allow_zero=True)
    _in_range("optim.min_lr_ratio", cfg.optim.min_lr_ratio, 0.0, 1.0)
    _in_range("optim.beta1", cfg.optim.beta1, 0.0, 1.0, high_open=True)
    _in_range("optim.beta2", cfg.optim.beta2, 0.0, 1.0, high_open=True)
    _in_range("data.validation_fraction", cfg.data.validation_fraction, 0.0, 1.0, high_open=True)
    check_converter_sections(cfg)


def validate_for_device(cfg: RecipeConfig, device_type: str) -> None:
    """Checks that depend on where the run happens; the attention backend checks its own."""
    from nemo_lite.components.attention import AttentionConfigError

    try:
        cfg.attention.check_run(seq_len=cfg.data.seq_len, device_type=device_type)
    except AttentionConfigError as err:
        raise ConfigError(str(err)) from None
