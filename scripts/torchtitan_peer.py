"""torchtitan as a peer of the training benchmark: its llama3 model and its own training step, on the
benchmark's batches (imported by ``bench_train.py``; written against torchtitan 0.2.x).

What runs is torchtitan's: ``Transformer`` of ``TransformerModelArgs`` with the preset's shape, flex attention
with block-causal masks that its ``get_attention_masks`` builds from the EOS tokens, ``parallelize_llama`` on
one device (``torch.compile`` per block and of the loss, no activation checkpointing), bf16 autocast
(``maybe_enable_amp``), ``build_optimizers`` (fused AdamW) and ``build_lr_schedulers``, and
``Trainer.train_step`` itself: loss sum / valid tokens, backward, ``clip_grad_norm_``, optimizer and
scheduler steps. The trainer object is assembled here (its ``__init__`` would also build a tokenizer, its text
pipeline and a checkpointer); batches reach ``train_step`` through its data-loader interface,
``({"input": tokens, "positions": position_ids}, labels)``, and the positions restart RoPE per document as
nemo_lite's do.

What differs from nemo_lite's run besides the code: 0.2.x's output projection is its own matrix (compare with
``flex-compile-untied``); torchtitan's init (the loss curves differ, the work does not); weight decay on every
parameter, norms included; its warm-up formula; the loss from fp32 logits (compiled ``F.cross_entropy``) where
nemo_lite's fast step has a fused kernel; torch's fused AdamW where nemo_lite has its Triton AdamW; flex compiled
with max-autotune where nemo_lite uses its tuned tiles. Both read the loss on the host every step.

torchtitan imports its text pipeline (Hugging Face ``datasets``) and its TensorBoard logger at import time,
although neither runs here; where those packages are missing (datasets, which brings pyarrow and pandas, is not
on the GPU machine), the two torchtitan modules that need them are registered as modules whose every name raises
when used. The rest of what the model and step import beyond torch: tyro, docstring_parser and torchdata.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

# torchtitan modules that only its text pipeline and metric loggers use, and the package each one imports
UNUSED_MODULES = {"torchtitan.hf_datasets.text_datasets": "datasets", "torchtitan.components.metrics": "tensorboard"}


def _absent_module(name: str, package: str) -> types.ModuleType:
    module = types.ModuleType(name)

    def attribute(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)

        class Absent:
            def __init__(self, *args, **kwargs):
                raise RuntimeError(f"{name}.{attr} needs {package}, which is not installed; pip install {package}")

        Absent.__name__ = Absent.__qualname__ = attr
        return Absent

    module.__getattr__ = attribute
    return module


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a finder that refuses it; a module set to None in sys.modules
        return False


def import_torchtitan() -> types.ModuleType:
    """``torchtitan.train``, importable without the packages only its text pipeline and loggers need."""
    for name, package in UNUSED_MODULES.items():
        if not _installed(package) and name not in sys.modules:
            sys.modules[name] = _absent_module(name, package)
    import torchtitan.train

    return torchtitan.train


def version() -> str:
    import importlib.metadata

    return importlib.metadata.version("torchtitan")


def model_args(preset: str, *, seq_len: int, eos_id: int, attention: str = "flex"):
    """torchtitan's ``TransformerModelArgs`` of nemo_lite's llama ``preset``: the same widths, heads, vocabulary,
    norm eps and RoPE (theta and Llama 3 scaling); ``attention="flex"``: block-causal masks from the EOS tokens,
    ``"sdpa"``: causal only (flex has no backward on a CPU). torchtitan 0.2.x always has a separate output
    projection (untied)."""
    from torchtitan.models.llama3.model.args import RoPEScalingArgs, TransformerModelArgs

    from nemo_lite.components.models import get_preset

    if attention not in ("flex", "sdpa"):
        raise ValueError(f"attention={attention!r}; choose flex or sdpa")
    c = get_preset(preset)
    if c.rope_scaling is not None and c.rope_scaling.rope_type != "llama3":
        raise ValueError(f"torchtitan's llama3 has Llama 3 RoPE scaling; {preset} has {c.rope_scaling.rope_type}")
    if c.hidden_size // c.num_attention_heads != c.head_dim:
        raise ValueError(f"torchtitan's llama3 has head_dim = dim // n_heads; {preset} has head_dim {c.head_dim}")
    rope = c.rope_scaling
    if rope is None:  # torchtitan always scales; a factor of 1 leaves every frequency as it is
        scaling = RoPEScalingArgs(scaling_factor=1.0)
    else:
        scaling = RoPEScalingArgs(
            scaling_factor=rope.factor,
            low_freq_factor=rope.low_freq_factor,
            high_freq_factor=rope.high_freq_factor,
            original_max_position_embeddings=rope.original_max_position_embeddings,
        )
    # torchtitan sizes the MLP as multiple_of-rounded ffn_dim_multiplier * int(8 * dim / 3); half a unit
    # above the exact ratio lands int() on intermediate_size whatever the float rounding.
    base = int(2 * 4 * c.hidden_size / 3)
    return TransformerModelArgs(
        dim=c.hidden_size,
        n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads,
        vocab_size=c.vocab_size,
        multiple_of=1,
        ffn_dim_multiplier=(c.intermediate_size + 0.5) / base,
        norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        rope_scaling_args=scaling,
        max_seq_len=seq_len,
        attn_type=attention,
        attn_mask_type="block_causal" if attention == "flex" else "causal",
        eos_id=eos_id,
    )


def flops_nemo_definition(args, n_params: int, tokens: int, pairs: int) -> float:
    """nemo_lite's FLOPs of one step (``nemo_lite.training.metrics``): 6 x the parameters that multiply each
    token (all but the input embedding) x tokens, plus 12 x head_dim x heads x layers per (query, key) pair
    the document mask allows."""
    head_dim = args.dim // args.n_heads
    matmul_params = n_params - args.vocab_size * args.dim
    return 6 * matmul_params * tokens + 12 * head_dim * args.n_heads * args.n_layers * pairs


def flops_torchtitan_definition(args, n_params: int, tokens: int, seq_len: int) -> float:
    """torchtitan's FLOPs of one step (``get_dense_model_nparams_and_flops``): attention counted over the full
    seq_len x seq_len square, whatever the mask."""
    head_dim = args.dim // args.n_heads
    per_token = 6 * (n_params - args.vocab_size * args.dim) + 6 * args.n_layers * args.n_heads * 2 * head_dim * seq_len
    return per_token * tokens


class _Tokenizer:
    """What ``get_attention_masks`` reads of a tokenizer: the id that ends a document."""

    def __init__(self, eos_id: int) -> None:
        self.eos_id = eos_id


@dataclass
class _Records:
    """The trainer's metrics processor: asked to log every step, it keeps the loss."""

    losses: list[float] = field(default_factory=list)

    def should_log(self, step: int) -> bool:
        return True

    def log(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None) -> None:
        self.losses.append(float(global_avg_loss))


class _NoCheckpoint:
    def maybe_wait_for_staging(self) -> None:
        pass


def titan_batches(batches: Iterable[dict[str, torch.Tensor]]) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """nemo_lite's packed batches in the form torchtitan's data loaders yield: ``(input_dict, labels)``;
    ``input_dict`` keys other than ``"input"`` reach the model's forward as keyword arguments."""
    for batch in batches:
        yield {"input": batch["input_ids"], "positions": batch["position_ids"]}, batch["labels"]


def build_trainer(
    preset: str,
    *,
    steps: int,
    seq_len: int,
    rows: int,
    eos_id: int,
    lr: float,
    warmup_steps: int,
    min_lr_ratio: float,
    weight_decay: float,
    clip: float,
    compile: bool = True,
    device: str = "cuda",
    attention: str = "flex",
):
    """torchtitan's ``Trainer`` with what ``train_step`` uses, on one device; ``torch.distributed`` must be
    initialized (world size 1), as torchtitan's trainer always has it."""
    train = import_torchtitan()
    from torchtitan.components.loss import build_cross_entropy_loss
    from torchtitan.components.lr_scheduler import build_lr_schedulers
    from torchtitan.components.optimizer import build_optimizers
    from torchtitan.config import JobConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.models.llama3 import parallelize_llama
    from torchtitan.models.llama3.model.model import Transformer

    job = JobConfig()
    job.training.seq_len, job.training.local_batch_size, job.training.steps = seq_len, rows, steps
    job.training.max_norm, job.training.mixed_precision_param = clip, "bfloat16"
    job.activation_checkpoint.mode = "none"
    job.compile.enable, job.compile.components = compile, ["model", "loss"]
    job.optimizer.lr, job.optimizer.weight_decay, job.optimizer.implementation = lr, weight_decay, "fused"
    job.optimizer.beta1, job.optimizer.beta2, job.optimizer.eps = 0.9, 0.95, 1e-8
    job.lr_scheduler.warmup_steps, job.lr_scheduler.decay_type = warmup_steps, "cosine"
    job.lr_scheduler.min_lr_factor = min_lr_ratio
    if device == "cpu":
        job.optimizer.implementation = "foreach"  # fused AdamW is CUDA-only in torch 2.11

    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    args = model_args(preset, seq_len=seq_len, eos_id=eos_id, attention=attention)
    with torch.device("meta"):
        model = Transformer(args)
    model = parallelize_llama(model, dims, job)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()

    trainer = train.Trainer.__new__(train.Trainer)
    trainer.job_config, trainer.parallel_dims, trainer.model_args = job, dims, args
    trainer.device, trainer.model_parts = torch.device(device), [model]
    trainer.tokenizer = _Tokenizer(eos_id)
    trainer.loss_fn = build_cross_entropy_loss(job)
    trainer.gradient_accumulation_steps = 1
    trainer.optimizers = build_optimizers([model], job.optimizer, dims)
    trainer.lr_schedulers = build_lr_schedulers(trainer.optimizers, job.lr_scheduler, steps)
    trainer.train_context = dist_utils.get_train_context(False)
    trainer.maybe_enable_amp = dist_utils.maybe_enable_amp(dims, "bfloat16", torch.device(device).type)
    trainer.checkpointer, trainer.metrics_processor = _NoCheckpoint(), _Records()
    trainer.step, trainer.ntokens_seen = 0, 0
    return trainer


def titan_train(trainer, batches: Iterable[dict], steps: int, peak_flops: float | None) -> list[dict]:
    """Run ``steps`` of torchtitan's ``train_step`` on ``batches``; per step: tokens/s, step ms, loss, the
    document-mask pairs, MFU by nemo_lite's definition and by torchtitan's (``None`` without a peak)."""
    model = trainer.model_parts[0]
    args = trainer.model_args
    n_params = sum(p.numel() for p in model.parameters())
    cuda = trainer.device.type == "cuda"
    records = []
    source = titan_batches(batches)
    for _ in range(steps):
        input_dict, labels = next(source)  # made on the host before the clock starts, as nemo_lite's trainer does
        t0 = time.perf_counter()
        trainer.step += 1
        trainer.train_step(iter([(input_dict, labels)]))  # it moves the batch to the device itself
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tokens, seq_len = input_dict["input"].numel(), input_dict["input"].shape[1]
        pairs = int((input_dict["positions"] + 1).sum())  # each query sees its document's prefix
        ours = flops_nemo_definition(args, n_params, tokens, pairs)
        theirs = flops_torchtitan_definition(args, n_params, tokens, seq_len)
        records.append(
            {
                "tokens": tokens,
                "pairs": pairs,
                "tokens_per_s": tokens / dt,
                "step_ms": 1000 * dt,
                "loss": trainer.metrics_processor.losses[-1],
                "mfu": ours / dt / peak_flops if peak_flops else None,
                "mfu_torchtitan_definition": theirs / dt / peak_flops if peak_flops else None,
            }
        )
    return records


def single_process_group(device: str) -> bool:
    """Start a world of one process unless one exists (torchtitan's trainer runs under one); True if
    started here, so the caller ends it."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True
