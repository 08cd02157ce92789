"""One training loop for pretraining and fine-tuning; the difference is config.

    trainer = Trainer(cfg)          # cfg: a RecipeConfig (or its OmegaConf form)
    result = trainer.fit()          # train, validate, checkpoint, export, sample

Each step: take ``grad_accum`` CPU batches, move each to the device (non-blocking), build the step's
attention mask on the device with the configured backend, forward, loss (summed, divided by the
step's label count so accumulation is exact), backward; then clip, check for non-finite values, step
the optimizer and the schedule, and write the metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from nemo_lite.components.attention.flex_attention import FlexAttention, tuned_kernel_options
from nemo_lite.components.models import LlamaForCausalLM, get_preset
from nemo_lite.components.models.config import config_fields
from nemo_lite.training import checkpoint as ckpt
from nemo_lite.training import distributed
from nemo_lite.training.config import ConfigError, RecipeConfig, validate, validate_for_device
from nemo_lite.training.distributed import DistInfo
from nemo_lite.training.loss import IGNORE_INDEX, cross_entropy_sum
from nemo_lite.training.metrics import MetricsWriter, attention_flops, matmul_params, peak_flops
from nemo_lite.training.optim import (
    attach_lookup_gradient,
    attach_weight_copies,
    build_optimizer,
    build_scheduler,
    clipped_step,
    local_shard,
    steps_on_device,
)


class NonFiniteLossError(RuntimeError):
    pass


@dataclasses.dataclass
class FitResult:
    steps: int
    losses: list[float]
    run_dir: Path
    status: str  # "completed" | "interrupted"
    last_checkpoint: Path | None = None
    hf_dir: Path | None = None
    sample: str | None = None


def as_recipe_config(cfg: Any) -> RecipeConfig:
    """Accept a RecipeConfig or an OmegaConf config composed on its schema."""
    if isinstance(cfg, RecipeConfig):
        return cfg
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RecipeConfig), cfg))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r} but CUDA is not available here; use trainer.device=cpu or auto")
    return device


def apply_activation_checkpointing(model: LlamaForCausalLM) -> None:
    """Recompute each decoder block in backward. Wraps ``forward`` in place so parameter names stay."""
    for block in model.layers:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


class Trainer:
    def __init__(self, cfg: Any, *, dist_info: DistInfo | None = None, train_loader: Any = None) -> None:
        """``train_loader`` replaces the configured data (benchmarks, tests): an iterable of batches
        with ``eos_id``, ``vocab_size``, ``tokenizer``, ``state_dict()`` and ``load_state_dict()``."""
        self.cfg = as_recipe_config(cfg)
        self._given_loader = train_loader
        validate(self.cfg)
        self.dist = dist_info or DistInfo()
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.is_main = self.rank == 0
        run_dir = str(Path(self.cfg.run_dir).expanduser())
        self.run_dir = Path(distributed.broadcast_str(run_dir) if self.dist.enabled else run_dir)
        self.device = resolve_device(self.cfg.trainer.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        validate_for_device(self.cfg, self.device.type)
        self.hooks: dict[str, Any] = {}  # test hooks: "after_step", "checkpoint"
        self._stop_signal: int | None = None
        self._stop_requested = False

    # ---- set-up ------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.trainer.seed)
        resume_from = ckpt.resolve_resume(cfg.trainer.resume, self.run_dir)  # errors before any work
        if cfg.model.pretrained_path is not None:
            path = Path(cfg.model.pretrained_path).expanduser()
            if not (path / "config.json").is_file():
                raise ConfigError(
                    f"model.pretrained_path={str(path)!r} holds no Hugging Face checkpoint (no config.json). "
                    "For SmolLM2-135M create it with: python scripts/convert_smollm2.py"
                )
        self._build_data()
        self._build_model()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.trainer.max_steps)
        self._device_step = steps_on_device(self.optimizer)
        self.step = 0
        self.nonfinite_total = 0
        if resume_from is not None:
            self._load(resume_from)
        self.loss_kernel = self._loss_kernel()
        self.weight_copies = self._weight_copies()
        if self.weight_copies:  # after a resume: the copies start from the loaded weights
            n = attach_weight_copies(self.raw_model, self.optimizer)
            self._log(f"bf16 weight copies for {n} weight matrices (optim.weight_copies)")
        self.lookup_gradient = self._lookup_gradient()
        if self.lookup_gradient == "rows":
            attach_lookup_gradient(self.raw_model, self.optimizer)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._save_config()

    def _loss_kernel(self) -> str:
        """The head loss's kernel: trainer.loss_kernel, with auto resolved (triton on one GPU, unchunked)."""
        setting = self.cfg.trainer.loss_kernel
        if setting == "triton" and self.device.type != "cuda":
            raise ConfigError(
                f"trainer.loss_kernel=triton runs on a GPU; this run is on {self.device.type}: "
                "use trainer.loss_kernel=auto or torch"
            )
        if setting == "triton" and importlib.util.find_spec("triton") is None:
            raise ConfigError("trainer.loss_kernel=triton needs the triton package (CUDA builds of torch ship it)")
        if setting != "auto":
            return setting
        usable = self.device.type == "cuda" and not self.dist.enabled and self.cfg.trainer.loss_chunk_size == 0
        return "triton" if usable and importlib.util.find_spec("triton") is not None else "torch"

    def _weight_copies(self) -> bool:
        """Whether the blocks multiply by bf16 weight copies that the triton AdamW kernel writes."""
        setting = self.cfg.optim.weight_copies
        needs = {
            "bf16 autocast on a GPU (trainer.autocast_dtype=bfloat16)": self.device.type == "cuda"
            and self.cfg.trainer.autocast_dtype == "bfloat16",
            "the triton AdamW kernel (optim.kernel=triton or auto)": self.optimizer.kernel == "triton",
            "one process (under torchrun FSDP2 casts the gathered weights)": not self.dist.enabled,
        }
        missing = [what for what, ok in needs.items() if not ok]
        if setting == "true" and missing:
            raise ConfigError(f"optim.weight_copies=true needs {' and '.join(missing)}; use optim.weight_copies=auto")
        return setting != "false" and not missing

    def _lookup_gradient(self) -> str:
        """How the token embedding's float32 gradient is kept: as rows (read by the triton kernel, with the
        weight copies, so the tied output projection's gradient goes to its copy) or dense."""
        setting = self.cfg.optim.lookup_gradient
        if setting == "rows" and not self.weight_copies:
            raise ConfigError("optim.lookup_gradient=rows needs the weight copies (optim.weight_copies); use auto")
        return "rows" if setting != "dense" and self.weight_copies else "dense"

    def _data_config(self):
        from nemo_lite.components.datasets import DataConfig

        values = dataclasses.asdict(self.cfg.data)
        if values["tokenizer"] == "model":
            if self.cfg.model.pretrained_path is None:
                raise ConfigError("data.tokenizer=model needs model.pretrained_path (a directory with a tokenizer)")
            values["tokenizer"] = str(Path(self.cfg.model.pretrained_path).expanduser())
        for key in ("source", "validation_source"):  # "a.jsonl,b.jsonl" -> a list of files
            if values[key] is not None and "," in values[key]:
                values[key] = [part.strip() for part in values[key].split(",") if part.strip()]
        return DataConfig(**values, pin_memory=self.device.type == "cuda")

    def _build_data(self) -> None:
        from nemo_lite.components.datasets import build_dataloader

        self.val_batches: list[dict[str, torch.Tensor]] = []
        if self._given_loader is not None:
            self.train_loader = self._given_loader
            self.eos_id, self.tokenizer = self.train_loader.eos_id, self.train_loader.tokenizer
            self._train_iter = iter(self.train_loader)
            return
        data_cfg = self._data_config()
        self.train_loader = build_dataloader(data_cfg, split="train", rank=self.rank, world_size=self.world_size)
        self.eos_id = self.train_loader.eos_id
        self.tokenizer = self.train_loader.tokenizer
        self._train_iter = iter(self.train_loader)
        if self.cfg.trainer.val_batches > 0 and self.cfg.data.validation_fraction > 0:
            try:
                val_loader = build_dataloader(data_cfg, split="validation", rank=self.rank, world_size=self.world_size)
                val_iter = iter(val_loader)
                for _ in range(self.cfg.trainer.val_batches):
                    self.val_batches.append(next(val_iter))
            except StopIteration:
                pass
            except ValueError as err:  # a held-out split too small for one batch: train without it, say so
                self.val_batches = []
                self._log(f"validation disabled: {err}")

    def _build_model(self) -> None:
        cfg, att = self.cfg, self.cfg.attention
        kwargs = dict(attention=att.backend, attn_mask_type=att.attn_mask_type, fixed_block_size=att.fixed_block_size)
        if cfg.model.pretrained_path is not None:
            model = LlamaForCausalLM.from_pretrained(cfg.model.pretrained_path, device=self.device, **kwargs)
            if model.config.vocab_size < self.train_loader.vocab_size:
                raise ConfigError(
                    f"the tokenizer has {self.train_loader.vocab_size} ids but the checkpoint's vocabulary has "
                    f"{model.config.vocab_size}: use the checkpoint's tokenizer (data.tokenizer=model)"
                )
        else:
            overrides = dict(cfg.model.overrides)
            unknown = sorted(set(overrides) - set(config_fields()))
            if unknown:
                raise ConfigError(
                    f"model.overrides has unknown field(s) {unknown}; valid fields: {', '.join(config_fields())}"
                )
            if cfg.model.vocab_from_tokenizer and "vocab_size" not in overrides:
                overrides["vocab_size"] = 64 * math.ceil(self.train_loader.vocab_size / 64)
            overrides.setdefault("eos_token_id", self.eos_id)
            model = LlamaForCausalLM(get_preset(cfg.model.preset, **overrides), **kwargs)
            model.to(self.device)
            model.init_weights(seed=cfg.trainer.seed)
        if not 0 <= self.eos_id < model.config.vocab_size:
            raise ConfigError(f"eos_id={self.eos_id} is outside the model's vocabulary [0, {model.config.vocab_size})")
        self.raw_model = model
        if att.backend == "flex":  # class-wide, like the compiled kernel: set for this run's card and head_dim
            tuned = att.flex_kernel_options == "auto"
            FlexAttention.kernel_options = tuned_kernel_options(self.device, model.config.head_dim) if tuned else None
        if cfg.trainer.activation_checkpointing:
            apply_activation_checkpointing(model)
        if cfg.trainer.compile:
            for block in model.layers:
                block.compile()
            model.norm.compile()  # the final norm: eager, it was ~15 small float32 kernels a step
        if self.dist.enabled:
            bf16 = self.device.type == "cuda" and cfg.trainer.autocast_dtype == "bfloat16"
            distributed.shard_model(model, bf16=bf16, reshard_after_forward=cfg.trainer.reshard_after_forward)
        self.model = model
        self.n_params = sum(p.numel() for p in model.parameters())
        self.flops_per_token = 6 * matmul_params(model)
        self.peak_flops = peak_flops(self.device)

    def _save_config(self) -> None:
        from omegaconf import OmegaConf

        text = OmegaConf.to_yaml(OmegaConf.structured(self.cfg))
        tmp = self.run_dir / ".config.yaml.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.run_dir / "config.yaml")

    # ---- checkpoints -------------------------------------------------------------------------
    def _train_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.train_loader.state_dict(),
            "rng": ckpt.rng_state(),
            "nonfinite_total": self.nonfinite_total,
        }

    def save(self) -> Path:
        if self.dist.enabled:
            state = self._train_state()
            del state["optimizer"]  # sharded through DCP with the model
            path = distributed.save_sharded(
                self.run_dir / "checkpoints",
                self.step,
                self.model,
                self.optimizer,
                state,
                self.dist,
                self.cfg.trainer.keep_last,
            )
            self.last_checkpoint = path
            return path
        path = ckpt.save_checkpoint(
            self.run_dir / "checkpoints",
            self.step,
            self.raw_model,
            self._train_state(),
            keep_last=self.cfg.trainer.keep_last,
            hooks=self.hooks.get("checkpoint"),
        )
        self.last_checkpoint = path
        return path

    def _load(self, path: Path) -> None:
        if self.dist.enabled:
            state = distributed.load_sharded(path, self.model, self.optimizer, self.dist)
        else:
            if ckpt.is_sharded(path):
                raise ValueError(f"{path} was saved by a torchrun run; resume it under torchrun with as many ranks")
            state = ckpt.load_checkpoint(path, self.raw_model, device=self.device)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_loader.load_state_dict(state["data"])
        self._train_iter = iter(self.train_loader)
        ckpt.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        if getattr(self, "weight_copies", False):
            self.optimizer.refresh_weight_copies()
        self._log(f"resumed from {path} at step {self.step}")

    # ---- the step ----------------------------------------------------------------------------
    def _autocast(self):
        if self.device.type == "cuda" and self.cfg.trainer.autocast_dtype == "bfloat16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _loss_sum(self, batch: dict[str, torch.Tensor], mask, grad_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The batch's summed token loss; ``grad_scale``: the gradient it will receive (the triton loss
        kernel writes the logits' gradient in forward)."""
        with self._autocast():
            hidden = self.model.forward_hidden(
                batch["input_ids"], position_ids=batch.get("position_ids"), attention_mask=mask
            )
            return cross_entropy_sum(
                hidden,
                self.raw_model.output_projection_weight(self.device.type),
                batch["labels"],
                chunk_tokens=self.cfg.trainer.loss_chunk_size,
                compiled=self.cfg.trainer.compile,
                kernel=self.loss_kernel,
                grad_scale=grad_scale,
            )

    def _values_to_host(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """``values`` copied into a reused pinned host buffer without blocking, and the event that says
        the copy is done (None on CPU, where the copy is done on return)."""
        if values.device.type != "cuda":
            return values.clone(), None
        buffer = getattr(self, "_host_values", None)
        if buffer is None or buffer.shape != values.shape:
            buffer = self._host_values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        buffer.copy_(values, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return buffer, ready

    def _build_mask(self, input_ids: torch.Tensor):
        return self.raw_model.build_attention_mask(input_ids, self.eos_id)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """One optimizer step over ``micro_batches``. Returns the step's metrics (host values)."""
        t0 = time.perf_counter()
        n_labels = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)  # CPU tensors: no sync
        loss_scale = 1.0 / max(n_labels, 1)
        if self.dist.enabled:  # gradients are averaged over ranks: scale so the result is the global mean
            # The global label count stays on the device: no host sync before backward.
            global_labels = torch.full((), float(n_labels), device=self.device, dtype=torch.float64)
            torch.distributed.all_reduce(global_labels)
            loss_scale = (self.world_size / global_labels.clamp(min=1.0)).float()
        grad_scale = None  # what each micro-batch's loss sum receives in backward, for the triton loss kernel
        if self.loss_kernel == "triton":
            grad_scale = (
                loss_scale
                if torch.is_tensor(loss_scale)
                else torch.full((), loss_scale, dtype=torch.float32, device=self.device)
            )
        on_cuda = self.device.type == "cuda"
        loss_sum = torch.zeros((), device=self.device)
        attn_flops = torch.zeros((), device=self.device, dtype=torch.float64)
        mask_seconds, mask_events = 0.0, []
        cfg = self.raw_model.config
        for batch in micro_batches:
            batch = self._to_device(batch)
            if on_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            else:
                tm = time.perf_counter()
            mask = self._build_mask(batch["input_ids"])
            if on_cuda:
                end.record()
                mask_events.append((start, end))
            else:
                mask_seconds += time.perf_counter() - tm
            attn_flops += attention_flops(
                mask, layers=cfg.num_hidden_layers, q_heads=cfg.num_attention_heads, head_dim=cfg.head_dim
            )
            loss = self._loss_sum(batch, mask, grad_scale)
            (loss * loss_scale).backward()
            loss_sum += loss.detach()
        clip = self.cfg.trainer.clip_grad_norm
        # Under FSDP2 each rank holds a disjoint shard of every gradient: the squared norms of the local
        # shards add up to the global one, which rides on the all-reduce of the step's totals.
        triton = self.optimizer.kernel == "triton"
        params = list(self.model.parameters())
        if triton:  # one launch per list of the update, over its block tables
            if self._device_step:  # the update's host work now, in one place; the norm reads its tables
                self.optimizer.prepare_step()
            local_norm = self.optimizer.grad_norm()
        else:
            local_norm = torch.nn.utils.get_total_norm([local_shard(p.grad) for p in params if p.grad is not None])
        stop = torch.full((), float(self._stop_signal is not None), device=self.device)  # a fill, not a copy
        if self.dist.enabled:  # global loss, FLOPs and gradient norm; a signal on any rank stops every rank
            totals = torch.stack([loss_sum, attn_flops.float(), stop, local_norm.float().square()])
            torch.distributed.all_reduce(totals)
            totals, grad_norm = totals[:3], totals[3].sqrt()
        else:
            totals, grad_norm = torch.stack([loss_sum, attn_flops.float(), stop]), local_norm
        host = [totals.double(), grad_norm.double().view(1)] + ([global_labels.view(1)] if self.dist.enabled else [])
        if self._device_step:
            # The update is queued before the host reads anything: a non-finite step is skipped inside the
            # fused kernel (found_inf), and the step's values reach the host on an event recorded before
            # the update, so the host waits only for them and goes on to the next batch, its mask and
            # its forward while the GPU runs the update.
            found_inf = (~(torch.isfinite(totals[0]) & torch.isfinite(grad_norm))).float()
            values, ready = self._values_to_host(torch.cat(host))
            clipped_step(self.optimizer, grad_norm, clip, found_inf=found_inf)
            if ready is not None:
                ready.synchronize()
            loss_total, attn_value, stop_any, grad_value, *labels = values.tolist()
        else:
            loss_total, attn_value, stop_any, grad_value, *labels = torch.cat(host).tolist()  # the one host sync
        loss_value = loss_total / max(labels[0] if labels else n_labels, 1)
        self._stop_requested = stop_any > 0
        finite = math.isfinite(loss_value) and math.isfinite(grad_value)
        if finite:
            if not self._device_step:
                if clip > 0:  # clip_grad_norm_'s factor, on the local tensors (shards under FSDP2)
                    grads = [g for p in params for g in (self.optimizer.gradients(p) if triton else [p.grad])]
                    local_grads = [local_shard(g) for g in grads if g is not None]
                    torch._foreach_mul_(local_grads, torch.clamp(clip / (grad_norm + 1e-6), max=1.0))
                self.optimizer.step()
            self._consecutive_nonfinite = 0
        else:
            self.nonfinite_total += 1
            self._consecutive_nonfinite += 1
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        if on_cuda:
            mask_seconds = sum(s.elapsed_time(e) for s, e in mask_events) / 1000.0
        step_seconds = time.perf_counter() - t0
        tokens = sum(b["input_ids"].numel() for b in micro_batches) * self.world_size
        flops = self.flops_per_token * tokens + attn_value
        metrics = {
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_value,
            "tokens_per_s": tokens / step_seconds,
            "step_ms": 1000 * step_seconds,
            "mask_ms": 1000 * mask_seconds,
            "mfu": flops / step_seconds / (self.peak_flops * self.world_size) if self.peak_flops else None,
            "skipped_nonfinite": not finite,
            "nonfinite_total": self.nonfinite_total,
        }
        if on_cuda:
            metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            metrics["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        if not self.val_batches:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for batch in self.val_batches:
            batch = self._to_device(batch)
            total += float(self._loss_sum(batch, self._build_mask(batch["input_ids"])))
            count += int((batch["labels"] != IGNORE_INDEX).sum())
        self.model.train()
        if self.dist.enabled:
            total, count = distributed.all_reduce_sum([total, count], self.device)
        val_loss = total / max(count, 1)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    # ---- the loop ----------------------------------------------------------------------------
    def _next_micro_batches(self) -> list[dict[str, torch.Tensor]]:
        out = []
        for _ in range(self.cfg.trainer.grad_accum):
            try:
                out.append(next(self._train_iter))
            except StopIteration:
                break
        return out

    def _log(self, message: str) -> None:
        if self.is_main:
            print(f"[nemo_lite] {message}", file=sys.stderr, flush=True)

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum
        self._log(f"received {signal.Signals(signum).name}: saving a checkpoint after this step, then exiting")

    @contextlib.contextmanager
    def _signal_handlers(self):
        if threading_main():
            previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
        else:
            yield

    def fit(self) -> FitResult:
        if not hasattr(self, "model"):
            self.setup()
        cfg = self.cfg.trainer
        self.last_checkpoint = None
        self._consecutive_nonfinite = 0
        writer = MetricsWriter(self.run_dir, self.cfg.logger, dataclasses.asdict(self.cfg), enabled=self.is_main)
        losses: list[float] = []
        status = "completed"
        self._log(
            f"{self.n_params / 1e6:.2f}M parameters, attention={self.cfg.attention.backend} "
            f"({self.cfg.attention.attn_mask_type}), device={self.device}, run_dir={self.run_dir}"
        )
        bar = None
        if self.is_main and cfg.progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True, file=sys.stderr)
        self.model.train()
        profiler = None
        if cfg.profile_steps > 0 and self.is_main:
            from nemo_lite.training.profiling import StepProfiler

            profiler = StepProfiler(self.run_dir / "profile", cfg.profile_start, cfg.profile_steps, self.device.type)
        try:
            with self._signal_handlers():
                while self.step < cfg.max_steps:
                    micro_batches = self._next_micro_batches()
                    if not micro_batches:
                        self._log("the training data ran out")
                        break
                    metrics = self.train_step(micro_batches)
                    if profiler is not None:
                        profiler.step()
                    self.step += 1
                    losses.append(metrics["loss"])
                    if metrics["skipped_nonfinite"]:
                        self._log(
                            f"step {self.step}: non-finite loss ({metrics['loss']}) or grad norm "
                            f"({metrics['grad_norm']}); update skipped ({self._consecutive_nonfinite} in a row)"
                        )
                        if self._consecutive_nonfinite >= cfg.max_consecutive_nonfinite:
                            raise NonFiniteLossError(
                                f"{self._consecutive_nonfinite} non-finite steps in a row (limit "
                                f"trainer.max_consecutive_nonfinite={cfg.max_consecutive_nonfinite}); "
                                f"stopping. The last good checkpoint is {self.last_checkpoint or 'none'}"
                            )
                    if cfg.val_every and self.step % cfg.val_every == 0:
                        metrics.update(self.evaluate() or {})
                    if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                        writer.write({"step": self.step, **metrics})
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                    if "after_step" in self.hooks:
                        self.hooks["after_step"](self, metrics)
                    # One process stops at once; under torchrun the flag is agreed on in the next step's
                    # reduction, so every rank stops after the same step.
                    if self._stop_requested or (not self.dist.enabled and self._stop_signal is not None):
                        status = "interrupted"
                        break
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                        self.save()
                if status == "interrupted" or self.step > 0:
                    self.save()
        finally:
            if profiler is not None:
                profiler.close()
            if bar is not None:
                bar.close()
            writer.close()
        result = FitResult(self.step, losses, self.run_dir, status, self.last_checkpoint)
        if status == "completed" and self.step >= cfg.max_steps:
            final = self.evaluate()
            if final:
                self._log(f"validation loss {final['val_loss']:.4f}, perplexity {final['val_ppl']:.2f}")
            if cfg.export_hf or cfg.sample_tokens > 0:
                plain = self._plain_model()  # a collective under torchrun
                if self.is_main and cfg.export_hf:
                    result.hf_dir = self.export(plain)
                if self.is_main and cfg.sample_tokens > 0:
                    result.sample = self.sample(cfg.sample_prompt, cfg.sample_tokens, plain)
        return result

    def _plain_model(self) -> LlamaForCausalLM:
        """The trained model as one unsharded module (the model itself when not distributed)."""
        if not self.dist.enabled:
            return self.raw_model
        full = distributed.full_state_dict(self.model)
        att = self.cfg.attention
        plain = LlamaForCausalLM(
            self.raw_model.config,
            attention=att.backend,
            attn_mask_type=att.attn_mask_type,
            fixed_block_size=att.fixed_block_size,
        )
        plain.tokenizer_dir = self.raw_model.tokenizer_dir
        if self.is_main:
            plain.load_state_dict(full)
        return plain.to(self.device)

    def export(self, model: LlamaForCausalLM | None = None) -> Path:
        """The final model as a Hugging Face directory (``<run_dir>/hf``), tokenizer included."""
        model = model or self.raw_model
        tokenizer_dir = model.tokenizer_dir
        if tokenizer_dir is None and hasattr(self.tokenizer, "save_pretrained"):
            tokenizer_dir = self.run_dir / "tokenizer"
            self.tokenizer.save_pretrained(str(tokenizer_dir))
        model.config.eos_token_id = self.eos_id
        path = model.save_pretrained(self.run_dir / "hf", tokenizer_dir=tokenizer_dir)
        self._log(f"exported a Hugging Face checkpoint to {path}")
        return path

    def sample(self, prompt: str, max_new_tokens: int, model: LlamaForCausalLM | None = None) -> str:
        from nemo_lite.components.models import generate

        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] or [self.eos_id]
        input_ids = torch.tensor([ids], device=self.device)
        with self._autocast():
            out = generate(model or self.raw_model, input_ids, max_new_tokens, eos_token_id=self.eos_id)
        text = self.tokenizer.decode(out[0].tolist())
        self._log(f"sample (greedy, {max_new_tokens} tokens): {text!r}")
        return text


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
