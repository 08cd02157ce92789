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
import json
import math
import os
import resource
import signal
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

from nemo_lite.components.models import family_of_checkpoint, family_of_preset, resolve_pretrained
from nemo_lite.components.models.decoder import set_embedding_padding
from nemo_lite.errors import NemoLiteError
from nemo_lite.training import checkpoint as ckpt
from nemo_lite.training import distributed
from nemo_lite.training import run_dir as rundir
from nemo_lite.training.activation_checkpointing import ac_mode, checkpoint_blocks
from nemo_lite.training.config import ConfigError, RecipeConfig, validate, validate_for_device
from nemo_lite.training.converters import build_converters, check_resume, converter_records, training_bytes
from nemo_lite.training.distributed import DistInfo
from nemo_lite.training.loss import IGNORE_INDEX
from nemo_lite.training.metrics import DeviceTimer, MetricsWriter, peak_flops
from nemo_lite.training.schedule import build_scheduler
from nemo_lite.training.step import TrainStep
from nemo_lite.training.step_choice import build_step


class NonFiniteLossError(NemoLiteError, RuntimeError):
    pass


class NonFiniteWeightsError(NonFiniteLossError):
    """An update left NaN or Inf in the weights; they are never saved."""


@dataclasses.dataclass
class FitResult:
    steps: int
    losses: list[float]
    run_dir: Path
    status: str  # "completed" | "interrupted" | "finished before" (resumed at max_steps: nothing to do)
    last_checkpoint: Path | None = None
    signal: int | None = None  # what interrupted the run (a signal on another rank counts as SIGTERM)
    stopped_in: str = "training"  # where the signal stopped it: "training" or "export"
    hf_dir: Path | None = None
    sample: str | None = None
    eval_metrics: dict[str, float] | None = None  # trainer.eval_tasks' last scores


@dataclasses.dataclass
class StepValues:
    """What one step brings to the host, in its one host sync: device scalars, then their host floats."""

    loss_sum: Any  # the summed token losses of the step (every rank's under torchrun)
    grad_norm: Any  # the gradient norm before clipping
    attention_flops: Any  # the attention FLOPs the step's masks allow (each layer within its window)
    stop: Any  # > 0: a signal asked this run (on some rank) to stop after the step
    bad_weights: Any  # > 0: the previous update left NaN or Inf in the weights
    labels: Any  # the labels the loss was taken over (every rank's under torchrun)

    def as_tensor(self) -> torch.Tensor:
        """One float64 vector in field order; it starts with the loss sum and the gradient norm, as the step
        strategies' ``apply`` reads it."""
        return torch.stack([getattr(self, f.name).double().reshape(()) for f in dataclasses.fields(self)])

    @classmethod
    def on_host(cls, values: list[float]) -> StepValues:
        return cls(*values)


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


def rank_batches(
    rows: list[dict[str, torch.Tensor]], *, rank: int, world_size: int, batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """``rank``'s share of ``rows`` (every world_size-th), stacked into batches of ``batch_size``; rows whose
    labels are all ignored fill the last batches, so every rank runs as many batches, of the training shape."""
    if not rows:
        return []
    n_batches = math.ceil(math.ceil(len(rows) / world_size) / batch_size)
    mine = rows[rank::world_size]
    blank = {"labels": IGNORE_INDEX, "answer_ids": 0}  # no label, no preference pair
    filler = {k: (torch.full_like(v, blank[k]) if k in blank else v) for k, v in rows[0].items()}
    mine += [filler] * (n_batches * batch_size - len(mine))
    return [
        {k: torch.stack([row[k] for row in mine[i : i + batch_size]]) for k in filler}
        for i in range(0, len(mine), batch_size)
    ]


def apply_activation_checkpointing(blocks, mode: str = "full") -> None:
    """Recompute each block in backward, whole (``full``) or all but what the selective policy keeps
    (``selective``; :mod:`nemo_lite.training.activation_checkpointing`). Wraps ``forward`` in place so
    parameter names stay."""
    checkpoint_blocks(blocks, mode)


class Trainer:
    def __init__(self, cfg: Any, *, dist_info: DistInfo | None = None, train_loader: Any = None) -> None:
        """``train_loader`` replaces the configured data (benchmarks, tests): an iterable of batches
        with ``eos_id``, ``vocab_size``, ``tokenizer``, ``state_dict()`` and ``load_state_dict()``, and for
        sampling and the export ``prompt_ids(text)``, ``end_id`` and ``record_kind`` (as ``PackedDataLoader``)."""
        self.cfg = as_recipe_config(cfg)
        self._given_loader = train_loader
        validate(self.cfg)
        self.dist = dist_info or DistInfo()
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        distributed.check_dp_replicate(self.cfg.trainer.dp_replicate, self.world_size)
        if self.cfg.trainer.eval_tasks and self.world_size > 1:
            raise ConfigError("trainer.eval_tasks runs in one process; under torchrun evaluate the export instead")
        self.eval_metrics: dict[str, float] | None = None
        self.mesh = None  # the data-parallel DeviceMesh under torchrun
        self.is_main = self.rank == 0
        run_dir = str(Path(self.cfg.run_dir).expanduser())
        self.run_dir = Path(distributed.broadcast_str(run_dir) if self.dist.enabled else run_dir)
        self.device = resolve_device(self.cfg.trainer.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        validate_for_device(self.cfg, self.device.type)
        self._lock: rundir.RunLock | None = None
        self._stop_signal: int | None = None
        self._stop_requested = False

    # ---- set-up: the phases in the order they run -------------------------------------------------
    def setup(self) -> None:
        """Build everything the loop needs; a failure gives up the run directory."""
        try:
            torch.manual_seed(self.cfg.trainer.seed)
            resume_from = self._resolve_sources()
            self._checked_on_main_rank(self._check_model_fits, lambda: self._claim_run_dir(fresh=resume_from is None))
            self._build_data()
            self._build_model()
            self._apply_converters()
            self._build_objective()
            self._parallelize()
            self._count_flops()
            self._build_step()
            self._restore(resume_from)
            if resume_from is None and self.is_main:  # after every refusal: a refused run leaves run_dir as it was
                self._move_earlier_outputs()
            self._announce()
        except BaseException:
            self.release_run_dir()
            raise

    def _resolve_sources(self) -> Path | None:
        """Where the run starts: the checkpoint it resumes (None: a fresh run), the pretrained checkpoint's
        local directory, or the preset's family and ``model.overrides`` (checked here, so a bad field or shape
        stops the run before the data are built)."""
        cfg = self.cfg
        resume_from = ckpt.resolve_resume(cfg.trainer.resume, self.run_dir)
        self.pretrained_dir: Path | None = None
        if cfg.model.pretrained_path is not None:
            try:
                self.pretrained_dir = resolve_pretrained(cfg.model.pretrained_path)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            return resume_from
        self.family = family_of_preset(cfg.model.preset)
        self._overrides = dict(cfg.model.overrides)
        unknown = sorted(set(self._overrides) - set(self.family.config_fields()))
        if unknown:
            valid = ", ".join(self.family.config_fields())
            raise ConfigError(f"model.overrides has unknown field(s) {unknown}; valid fields: {valid}")
        try:
            self._preset_config = self.family.preset(cfg.model.preset, **self._overrides)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model.preset={cfg.model.preset} with model.overrides: {err}") from None
        return resume_from

    def _checked_on_main_rank(self, *checks) -> None:
        """Run ``checks`` on rank 0 only (they look at the file system); under torchrun a refusal there is
        raised on every rank."""
        problem = ""
        if self.is_main:
            try:
                for check in checks:
                    check()
            except NemoLiteError as err:
                if not self.dist.enabled:
                    raise
                problem = f"{type(err).__name__}\0{err}"
        if self.dist.enabled:
            problem = distributed.broadcast_str(problem)
        if problem:
            kind, message = problem.split("\0", 1)
            raise {"ConfigError": ConfigError, "RunDirError": rundir.RunDirError}.get(kind, NemoLiteError)(message)

    def _check_model_fits(self) -> None:
        """The model's parameters, as far as they are known before the data, fit the device."""
        config = self._model_config_estimate()
        self._params_estimate = 0 if config is None else rundir.estimate_parameters(config)
        if config is None:
            return
        what = f"model.pretrained_path={self.cfg.model.pretrained_path}"
        if self.pretrained_dir is None:
            what = f"model.preset={self.cfg.model.preset} with model.overrides"
        data, trainer = self.cfg.data, self.cfg.trainer
        step = rundir.StepShape(
            data.batch_size, data.seq_len, trainer.grad_accum, 2 if trainer.autocast_dtype == "bfloat16" else 4
        )
        rundir.check_model_fits(
            config,
            what=what,
            device_type=self.device.type,
            device_index=self.device.index,
            world_size=self.world_size,
            step=step,
            training_bytes=training_bytes(self.cfg, config, autocast_dtype=self._autocast_dtype()),
        )

    def _claim_run_dir(self, *, fresh: bool) -> None:
        """The run directory is writable with room for the checkpoints; this run locks it, and a fresh run makes
        sure no earlier run's checkpoints are there (or, with trainer.overwrite, moves them aside)."""
        # A resume's saves prune its own checkpoints as they go: the space those hold counts as free.
        self._held_bytes = 0 if fresh else rundir.held_checkpoint_bytes(self.run_dir / "checkpoints")
        need = rundir.FREE_SPACE_FACTOR * rundir.checkpoint_bytes(self._params_estimate)
        rundir.check_writable(self.run_dir, need, held_bytes=self._held_bytes)
        self._lock = rundir.RunLock(self.run_dir)
        if fresh:
            if ckpt.resumes_latest(self.cfg.trainer.resume):  # nothing to resume: an export here is not reused
                rundir.refuse_empty_resume(self.run_dir)
            has_checkpoints = bool(ckpt.list_checkpoints(self.run_dir / "checkpoints"))
            rundir.refuse_fresh_run(
                self.run_dir,
                overwrite=self.cfg.trainer.overwrite,
                has_checkpoints=has_checkpoints,
                reads=self.pretrained_dir,
            )

    def _move_earlier_outputs(self) -> None:
        aside = rundir.move_earlier_outputs(self.run_dir)
        if aside is not None:
            self._log(f"an earlier run's files in {self.run_dir} were moved to {aside}")

    def _model_config_estimate(self):
        """The model's config as far as it is known before the data. A checkpoint's config.json is read here, so
        a bad one is reported as itself before the tokenizer (which reads it too) can blame the tokenizer."""
        if self.pretrained_dir is None:
            return self._preset_config
        from nemo_lite.components.models.family import family_of_model_type
        from nemo_lite.components.models.hf import CONFIG_NAME, read_config, read_json_object

        config_file = self.pretrained_dir / CONFIG_NAME
        family_of_model_type(read_json_object(config_file).get("model_type"), str(config_file))  # as the loader says
        return read_config(self.pretrained_dir)

    def release_run_dir(self) -> None:
        """Give up the run directory's lock (the end of fit() does; so does the process's end)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _data_config(self):
        from nemo_lite.components.datasets import resolve_data_config

        try:
            return resolve_data_config(
                self.cfg.data, pretrained_path=self.pretrained_dir, pin_memory=self.device.type == "cuda"
            )
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _build_data(self) -> None:
        from nemo_lite.components.datasets import build_dataloader

        self.val_batches: list[dict[str, torch.Tensor]] = []
        if self._given_loader is not None:
            self.train_loader = self._given_loader
            self.eos_id, self.tokenizer = self.train_loader.eos_id, self.train_loader.tokenizer
            self._train_iter = iter(self.train_loader)
            return
        data_cfg = self._data_config()
        with data_errors():
            self.train_loader = build_dataloader(data_cfg, split="train", rank=self.rank, world_size=self.world_size)
        self.eos_id = self.train_loader.eos_id
        self.tokenizer = self.train_loader.tokenizer
        self._train_iter = iter(self.train_loader)
        held_out = self.cfg.data.validation_fraction > 0 or self.cfg.data.validation_source is not None
        if self.cfg.trainer.val_tokens > 0 and held_out:
            try:
                self.val_batches = self._validation_batches(data_cfg)
            except ValueError as err:  # a held-out split too small for one row: train without it, say so
                self._log(f"validation disabled: {err}; hold out more data (data.validation_fraction)")
        elif self.cfg.trainer.val_tokens > 0 and self.cfg.trainer.val_every > 0:
            self._log(
                "no validation: data.validation_fraction is 0 and data.validation_source is unset (hold out part "
                "of the data with data.validation_fraction, e.g. 0.05)"
            )

    def _validation_batches(self, data_cfg) -> list[dict[str, torch.Tensor]]:
        """This rank's validation batches: the first ``trainer.val_tokens`` tokens of the held-out split (all of
        it when smaller), in whole rows, the same rows whatever the batch size and the number of ranks. Each
        rank takes every world_size-th row; rows of ignored labels fill the last batches, so that every batch
        has the training shape and every rank runs as many."""
        from nemo_lite.components.datasets import build_dataloader

        want = math.ceil(self.cfg.trainer.val_tokens / data_cfg.seq_len)
        rows: list[dict[str, torch.Tensor]] = []
        # Read one row at a time: a held-out split smaller than a training step still validates.
        one_row = dataclasses.replace(data_cfg, batch_size=1)
        for batch in build_dataloader(one_row, split="validation", rank=0, world_size=1):
            rows += [{k: v[i] for k, v in batch.items()} for i in range(len(batch["input_ids"]))]
            if len(rows) >= want:
                break
        return rank_batches(rows[:want], rank=self.rank, world_size=self.world_size, batch_size=data_cfg.batch_size)

    def _build_model(self) -> None:
        """The plain model on the device: model.pretrained_path loaded (where the converters, built here, ask:
        they move it to the device), or the preset built and initialized."""
        cfg, vocab = self.cfg, self.train_loader.vocab_size
        self.converters = build_converters(
            self.cfg, autocast_dtype=self._autocast_dtype(), pretrained_dir=self.pretrained_dir
        )
        if self.pretrained_dir is not None:
            self.family = family_of_checkpoint(self.pretrained_dir)
            load_on = self.device
            for converter in self.converters:
                load_on = converter.load_device(load_on)
            model = self.family.load_pretrained(self.pretrained_dir, attention=cfg.attention, device=load_on)
            if model.config.vocab_size < vocab:
                raise ConfigError(
                    f"the tokenizer has {vocab} ids but the checkpoint's vocabulary has {model.config.vocab_size}: "
                    "use the checkpoint's tokenizer (data.tokenizer=model)"
                )
        else:
            overrides = dict(self._overrides)
            if cfg.model.vocab_from_tokenizer and "vocab_size" not in overrides:
                overrides["vocab_size"] = 64 * math.ceil(vocab / 64)
            overrides.setdefault("eos_token_id", self.eos_id)
            config = self.family.preset(cfg.model.preset, **overrides)
            if config.vocab_size < vocab:
                raise ConfigError(
                    f"the tokenizer has {vocab} ids but the model's vocabulary has {config.vocab_size}: set model."
                    f"overrides.vocab_size to at least {vocab}, or leave it out with model.vocab_from_tokenizer=true"
                )
            model = self.family.build(config, attention=cfg.attention)
            model.to(self.device)
            model.init_weights(seed=cfg.trainer.seed)
        if not 0 <= self.eos_id < model.config.vocab_size:
            raise ConfigError(f"eos_id={self.eos_id} is outside the model's vocabulary [0, {model.config.vocab_size})")
        set_embedding_padding(model, self._pad_without_gradient(model.config))
        self.raw_model = self.model = model
        self.n_params = sum(p.numel() for p in model.parameters())
        if self.is_main and not self.dist.enabled:  # the free space again, now that the vocabulary is known
            need = rundir.FREE_SPACE_FACTOR * rundir.checkpoint_bytes(self.n_params)
            rundir.check_free_space(self.run_dir, need, held_bytes=self._held_bytes)

    def _pad_without_gradient(self, config) -> int | None:
        """The token whose embedding row gets no gradient from the lookup (model.pad_embedding_gradient)."""
        trains = self.cfg.model.pad_embedding_gradient
        pad = getattr(config, "pad_token_id", None)
        if trains is False and pad is None:
            raise ConfigError(
                "model.pad_embedding_gradient=false needs a pad_token_id in the model's config and it names none: "
                "set it in config.json (or model.overrides.pad_token_id), or leave model.pad_embedding_gradient unset"
            )
        if trains or (trains is None and self.pretrained_dir is None) or pad is None:
            return None
        if 0 <= pad < config.vocab_size:
            return pad
        if trains is None:  # a config.json whose pad id names no row: there is no row to hold back
            return None
        raise ConfigError(
            f"model.pad_embedding_gradient=false: pad_token_id={pad} is outside the model's vocabulary "
            f"[0, {config.vocab_size}), so no row is the pad token's; leave model.pad_embedding_gradient unset"
        )

    def _apply_converters(self) -> None:
        """The configured converters change the plain model in place (before checkpointing, compile, FSDP2)."""
        for converter in self.converters:
            converter.convert(self.raw_model, self.family)
            self._log(converter.description)
        self.only_trainable = any(c.saves_only_trainable for c in self.converters)

    def _build_objective(self) -> None:
        """What the loss is (``objective.name``): built on the plain model, before sharding, so that a reference
        copy holds the starting weights."""
        from nemo_lite.training.objectives import build_objective

        pairs = bool(getattr(self.train_loader, "pairs", False))
        self.objective = build_objective(self.cfg.objective, self.raw_model, pairs=pairs)

    def _parallelize(self) -> None:
        """Activation checkpointing, torch.compile and FSDP2 (under torchrun), each unit chosen by the family."""
        cfg, family, model = self.cfg.trainer, self.family, self.raw_model
        if ac_mode(cfg.activation_checkpointing) != "none":
            apply_activation_checkpointing(family.blocks(model), ac_mode(cfg.activation_checkpointing))
        if cfg.compile:
            for module in [unit for m in (model, *self.objective.frozen_models) for unit in family.compile_units(m)]:
                module.compile()
        if self.dist.enabled:
            self.mesh = distributed.build_mesh(self.dist, cfg.dp_replicate, self.device.type)
            distributed.shard_model(
                family,
                model,
                bf16=self._autocast_dtype() == torch.bfloat16,
                reshard_after_forward=cfg.reshard_after_forward,
                mesh=self.mesh,
                prefetch=cfg.fsdp_prefetch,
            )

    def _count_flops(self) -> None:
        """What MFU divides by: the model's FLOPs per token (as the converters change them) and the device's peak."""
        self.flops_per_token = self.family.flops_per_token(self.model)
        for converter in self.converters:
            self.flops_per_token = converter.flops_per_token(self.model, self.flops_per_token)
        self.peak_flops = peak_flops(self.device)

    def _build_step(self) -> None:
        """The step strategy (``trainer.step_impl``), its optimizer and the learning-rate schedule."""
        cfg = self.cfg
        self.step_impl: TrainStep = build_step(
            self.model,
            cfg.optim,
            impl=cfg.trainer.step_impl,
            blocks=self.family.blocks(self.model),
            device=self.device,
            distributed=self.dist.enabled,
            autocast_bf16=self._autocast_dtype() == torch.bfloat16,
            compile=cfg.trainer.compile,
            loss_chunk_size=cfg.trainer.loss_chunk_size,
        )
        self.optimizer = self.step_impl.optimizer
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.trainer.max_steps)

    def _restore(self, resume_from: Path | None) -> None:
        """Step 0, or the state of the checkpoint ``resume_from`` (a damaged one falls back to the one before it)."""
        self.step = 0
        self.nonfinite_total = 0
        self.resumed_from = self._resume(resume_from) if resume_from is not None else None

    def _announce(self) -> None:
        """What will run, in one line each, and the resolved config in run_dir/config.yaml."""
        self._log(self.step_impl.description)
        self._log(self.raw_model.attention_backend.describe(self.device.type))  # what the model runs
        if self.is_main:
            self._save_config()

    def _save_config(self) -> None:
        from omegaconf import OmegaConf

        text = OmegaConf.to_yaml(OmegaConf.structured(self.cfg))
        if self.resumed_from is not None:  # the settings the steps so far ran with are kept
            kept = rundir.keep_earlier_config(self.run_dir, text, self.step)
            if kept is not None:
                self._log(kept)
        tmp = self.run_dir / ".config.yaml.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.run_dir / "config.yaml")

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        if not hasattr(self, "model"):
            self.setup()
        try:
            return self._fit()
        finally:
            self.release_run_dir()

    def _fit(self) -> FitResult:
        cfg = self.cfg.trainer
        self.last_checkpoint = None
        self._consecutive_nonfinite = 0
        self._validation: tuple[int | None, dict[str, float] | None] = (None, None)  # (step, its validation)
        if self.resumed_from is not None and self.step >= cfg.max_steps:
            result = FitResult(self.step, [], self.run_dir, "finished before", self.resumed_from)
            finished = (
                f"{self.resumed_from} is at step {self.step} and trainer.max_steps={cfg.max_steps}: the run is finished"
            )
            if not self._export_missing():
                self._log(f"{finished}, nothing to do (raise trainer.max_steps to train on)")
                return result
            self._log(f"{finished} but its export is missing or incomplete: exporting it now")
            plain = self._plain_model()  # a collective under torchrun
            if self.is_main:
                self._export_or_interrupted(plain, result)
            return result
        self._log(
            f"{self.n_params / 1e6:.2f}M parameters, attention={self.cfg.attention.backend} "
            f"({self.cfg.attention.attn_mask_type}), device={self.device}, run_dir={self.run_dir}"
        )
        losses: list[float] = []
        status = "completed"
        self.model.train()
        with self._progress() as progress, self._signal_handlers():
            while self.step < cfg.max_steps:
                micro_batches = self._next_micro_batches()
                if not micro_batches:
                    self._log("the training data ran out")
                    break
                metrics = self.train_step(micro_batches)
                self.step += 1
                losses.append(metrics["loss"])
                self._after_step(metrics, progress)
                # One process stops at once; under torchrun the flag is agreed on in the next step's
                # reduction, so every rank stops after the same step.
                if self._stop_requested or (not self.dist.enabled and self._stop_signal is not None):
                    status = "interrupted"
                    break
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self.save()
            if status == "interrupted" or self.step > 0:
                self.save()
        stopped_by = (self._stop_signal or signal.SIGTERM) if status == "interrupted" else None
        result = FitResult(self.step, losses, self.run_dir, status, self.last_checkpoint, signal=stopped_by)
        if status == "completed" and self.step >= cfg.max_steps:
            self._finish(result)
        return result

    def _next_micro_batches(self) -> list[dict[str, torch.Tensor]]:
        out = []
        for _ in range(self.cfg.trainer.grad_accum):
            try:
                with data_errors():
                    out.append(next(self._train_iter))
            except StopIteration:
                break
        return out

    def _after_step(self, metrics: dict[str, Any], progress) -> None:
        """What follows each step: the non-finite count (too many in a row stop the run), validation every
        trainer.val_every steps, the metrics line and the progress bar."""
        cfg = self.cfg.trainer
        if progress.profiler is not None:
            progress.profiler.step()
        if metrics["skipped_nonfinite"]:
            self._log(
                f"step {self.step}: non-finite loss ({metrics['loss']}) or grad norm "
                f"({metrics['grad_norm']}); update skipped ({self._consecutive_nonfinite} in a row)"
            )
            if self._consecutive_nonfinite >= cfg.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"{self._consecutive_nonfinite} non-finite steps in a row (limit "
                    f"trainer.max_consecutive_nonfinite={cfg.max_consecutive_nonfinite}); "
                    f"stopping. The last good checkpoint is {self._last_good() or 'none'}"
                )
        if (cfg.val_every and self.step % cfg.val_every == 0) or self.step == cfg.max_steps:
            self._validation = (self.step, self.evaluate())  # the last step's is the end of the run's
            metrics.update(self._validation[1] or {})
            metrics.update(self.evaluate_tasks())
        if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
            progress.writer.write({"step": self.step, **metrics})
        if progress.bar is not None:
            progress.bar.update(1)
            progress.bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")

    @contextlib.contextmanager
    def _progress(self):
        """The loop's outputs: metrics.jsonl (and wandb), the progress bar and the profiler, closed at the end."""
        cfg = self.cfg.trainer
        progress = types.SimpleNamespace(bar=None, profiler=None)
        progress.writer = MetricsWriter(
            self.run_dir, self.cfg.logger, dataclasses.asdict(self.cfg), enabled=self.is_main, resumed_step=self.step
        )
        try:
            if self.is_main and cfg.progress_bar:
                from tqdm.auto import tqdm

                progress.bar = tqdm(
                    total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True, file=sys.stderr
                )
            if cfg.profile_steps > 0 and self.is_main:
                from nemo_lite.training.profiling import StepProfiler

                progress.profiler = StepProfiler(
                    self.run_dir / "profile", cfg.profile_start, cfg.profile_steps, self.device.type
                )
            yield progress
        finally:
            if progress.profiler is not None:
                progress.profiler.close()
            if progress.bar is not None:
                progress.bar.close()
            progress.writer.close()

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

    # ---- one step ---------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """One optimizer step over ``micro_batches``: forward and backward here, the clip and the update by
        the step strategy (``trainer.step_impl``). Returns the step's metrics (host values)."""
        t0, strategy, mask_timer = time.perf_counter(), self.step_impl, DeviceTimer(self.device)
        n_labels = sum(self.objective.count(b) for b in micro_batches)  # the loss's units; CPU tensors: no sync
        loss_scale = 1.0 / max(n_labels, 1)  # the summed token losses, scaled to the step's mean
        if self.dist.enabled:  # gradients are averaged over ranks: scale so the result is the global mean
            global_labels = torch.full((), float(n_labels), device=self.device, dtype=torch.float64)
            torch.distributed.all_reduce(global_labels)  # stays on the device: no host sync before backward
            loss_scale = (self.world_size / global_labels.clamp(min=1.0)).float()
        loss_sum = torch.zeros((), device=self.device)
        attention_flops = torch.zeros((), device=self.device, dtype=torch.float64)  # of the step's masks
        extras: dict[str, torch.Tensor] = {}  # the model's own metrics (auxiliary losses), micro-batch means
        for batch in micro_batches:
            batch = self._to_device(batch)
            with mask_timer:
                mask = self._build_mask(batch)
            attention_flops += self.family.attention_flops(self.raw_model.config, mask)
            with self._autocast():
                loss = self.objective.loss(strategy, self.model, batch, mask, loss_scale)
            (loss * loss_scale + self._auxiliary_loss(extras, len(micro_batches))).backward()
            loss_sum += loss.detach()
        values = StepValues(
            loss_sum=loss_sum,
            grad_norm=strategy.grad_norm(),  # this rank's (its shards' under FSDP2) until reduced
            attention_flops=attention_flops.float(),
            stop=torch.full((), float(self._stop_signal is not None), device=self.device),  # a fill, not a copy
            # The previous update's weight check rides with this step's values: no host sync of its own.
            bad_weights=strategy.nonfinite_weights(),
            labels=global_labels
            if self.dist.enabled
            else torch.full((), n_labels, device=self.device, dtype=torch.float64),
        )
        if self.dist.enabled:  # global loss, norm and attention FLOPs; a signal on any rank stops every rank
            values = self._all_reduce(values)
        report = torch.cat([values.as_tensor(), self._reduced_extras(extras)])  # the extras ride the one sync
        host_values = strategy.apply(report, values.grad_norm, self.cfg.trainer.clip_grad_norm)
        host = values.on_host(host_values[: len(dataclasses.fields(values))])
        if host.bad_weights > 0:
            raise self._nonfinite_weights_error()
        self._stop_requested = host.stop > 0
        loss_value = host.loss_sum / max(host.labels, 1)
        metrics = self._step_metrics(micro_batches, t0, mask_timer, loss_value, host.grad_norm, host.attention_flops)
        model_metrics = dict(zip(extras, host_values[len(dataclasses.fields(values)) :], strict=True))
        return metrics | model_metrics | self._objective_metrics(host.labels)

    def _auxiliary_loss(self, extras: dict[str, torch.Tensor], micro_batches: int) -> torch.Tensor | float:
        """What the model adds to the loss after its forward (a mixture of experts' load-balancing loss), a
        micro-batch's share of it; its metrics are added to ``extras``. 0.0 for a model without any."""
        auxiliary = getattr(self.raw_model, "auxiliary", None)
        found = auxiliary() if auxiliary is not None else None
        if found is None:
            return 0.0
        for name, value in found.metrics.items():
            extras[name] = extras.get(name, 0.0) + value.detach().float() / micro_batches
        return 0.0 if found.loss is None else found.loss / micro_batches

    def _reduced_extras(self, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        """The extras as one float64 vector, averaged over ranks under torchrun."""
        if not extras:
            return torch.zeros(0, device=self.device, dtype=torch.float64)
        stacked = torch.stack([value.double().reshape(()) for value in extras.values()])
        if self.dist.enabled:
            torch.distributed.all_reduce(stacked)
            stacked = stacked / self.world_size
        return stacked

    def _objective_metrics(self, count: float, prefix: str = "") -> dict[str, float]:
        """The objective's own metrics (e.g. ``rewards/margins``), summed over ranks, per unit of its count."""
        sums = self.objective.metric_sums()
        if not sums:
            return {}
        values = torch.stack(list(sums.values()))
        if self.dist.enabled:
            torch.distributed.all_reduce(values)
        return {prefix + key: value / max(count, 1) for key, value in zip(sums, values.tolist(), strict=True)}

    def _all_reduce(self, values: StepValues) -> StepValues:
        """The step's values summed over ranks, the gradient norm from the shards' squared norms."""
        summed = torch.stack(
            [values.loss_sum, values.attention_flops, values.stop, values.bad_weights]
            + [distributed.squared_norm_share(values.grad_norm, self.mesh)]
        )
        torch.distributed.all_reduce(summed)
        loss_sum, attention_flops, stop, bad_weights, squared_norm = summed.unbind()
        return StepValues(
            loss_sum=loss_sum,
            grad_norm=squared_norm.sqrt(),
            attention_flops=attention_flops,
            stop=stop,
            bad_weights=bad_weights,
            labels=values.labels,
        )

    def _step_metrics(self, micro_batches, t0: float, mask_timer, loss: float, grad_norm: float, attn_flops: float):
        finite = math.isfinite(loss) and math.isfinite(grad_norm)  # what the step's update went by
        if finite:
            self._consecutive_nonfinite = 0
        else:
            self.nonfinite_total += 1
            self._consecutive_nonfinite += 1
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        step_seconds = time.perf_counter() - t0
        tokens = sum(b["input_ids"].numel() for b in micro_batches) * self.world_size
        flops = self.flops_per_token * tokens + attn_flops
        metrics = {
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / step_seconds,
            "step_ms": 1000 * step_seconds,
            "mask_ms": 1000 * mask_timer.seconds(),
            "mfu": flops / step_seconds / (self.peak_flops * self.world_size) if self.peak_flops else None,
            "skipped_nonfinite": not finite,
            "nonfinite_total": self.nonfinite_total,
        }
        if self.device.type == "cuda":
            metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            metrics["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return metrics

    def _autocast_dtype(self) -> torch.dtype | None:
        if self.device.type == "cuda" and self.cfg.trainer.autocast_dtype == "bfloat16":
            return torch.bfloat16
        return None

    def _autocast(self):
        dtype = self._autocast_dtype()
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _build_mask(self, batch: dict[str, torch.Tensor]):
        # position_ids: a mask rule may read them (shared_prompt: where the positions restart)
        return self.raw_model.build_attention_mask(batch["input_ids"], self.eos_id, batch.get("position_ids"))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        if not self.val_batches:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for batch in self.val_batches:
            batch = self._to_device(batch)
            with self._autocast():
                loss = self.objective.loss(self.step_impl, self.model, batch, self._build_mask(batch))
            total += float(loss)
            count += self.objective.count(batch)
        self.model.train()
        if self.dist.enabled:
            total, count = distributed.all_reduce_sum([total, count], self.device)
        val_loss = total / max(count, 1)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))} | self._objective_metrics(count, "val_")

    def evaluate_tasks(self) -> dict[str, float]:
        """``trainer.eval_tasks`` scored by lm-eval on the model as it is (``eval/<task>/<metric>``)."""
        cfg = self.cfg.trainer
        if not cfg.eval_tasks or not self.is_main:
            return {}
        from nemo_lite.evaluation import evaluate_in_training

        with self._autocast():
            scores = evaluate_in_training(self.raw_model, self.tokenizer, cfg.eval_tasks, limit=cfg.eval_limit)
        self.model.train()
        self._log(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        self.eval_metrics = scores
        return scores

    # ---- checkpoints ------------------------------------------------------------------------------
    def save(self) -> Path:
        """A checkpoint of the step, with the converters' records (and, where a converter says so, the trainable
        parameters only: the frozen ones are model.pretrained_path's)."""
        self._check_weights_finite()  # a checkpoint is never written from non-finite weights
        state = self._train_state()
        if self.dist.enabled:
            del state["optimizer"]  # sharded through DCP with the model
            path = distributed.save_sharded(
                self.run_dir / "checkpoints",
                self.step,
                self.model,
                self.optimizer,
                state,
                self.dist,
                self.cfg.trainer.keep_last,
                only_trainable=self.only_trainable,
                layout=self._layout(),
            )
            self.last_checkpoint = path
            return path
        path = ckpt.save_checkpoint(
            self.run_dir / "checkpoints",
            self.step,
            self.raw_model,
            state,
            keep_last=self.cfg.trainer.keep_last,
            layout=self._layout(),
            only_trainable=self.only_trainable,
        )
        self.last_checkpoint = path
        return path

    def _train_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "optimizer_name": self.cfg.optim.name,
            "scheduler": self.scheduler.state_dict(),
            "data": self.train_loader.state_dict(),
            "rng": ckpt.rng_state(),
            "nonfinite_total": self.nonfinite_total,
            **converter_records(self.converters),
        }

    def _layout(self) -> dict[str, Any]:
        """What a checkpoint must agree with to be resumed by this run: the model's shape and the data's."""
        model = {f"model.{key}": value for key, value in dataclasses.asdict(self.raw_model.config).items()}
        data = {"data.seq_len": self.cfg.data.seq_len, "data.batch_size": self.cfg.data.batch_size}
        return {**model, **data, "tokenizer.vocab_size": self.train_loader.vocab_size}

    def _check_weights_finite(self) -> None:
        """Stop, naming the last good checkpoint, if the last update left NaN or Inf in the weights."""
        bad = self.step_impl.nonfinite_weights()
        if self.dist.enabled:
            bad = distributed.all_reduce_sum([float(bad)], self.device)[0]
        if float(bad) > 0:
            raise self._nonfinite_weights_error()

    def _nonfinite_weights_error(self) -> NonFiniteWeightsError:
        return NonFiniteWeightsError(
            f"step {self.step}: the update left NaN or Inf in the weights (too high an optim.lr?); stopping "
            f"without saving them. The last good checkpoint is {self._last_good() or 'none'}"
        )

    def _last_good(self) -> Path | None:
        return getattr(self, "last_checkpoint", None) or self.resumed_from

    def _resume(self, newest: Path) -> Path:
        """Load ``newest``, or when it is damaged the newest complete checkpoint before it (unless
        trainer.resume named that one checkpoint). Returns the checkpoint loaded."""
        exact = ckpt.named_exactly(self.cfg.trainer.resume)
        candidates = [newest] if exact else [newest, *ckpt.earlier_checkpoints(newest)]
        problems = []
        for path in candidates:
            try:
                self._load(path)
                return path
            except ckpt.CheckpointDamagedError as err:
                problems.append(f"{path.name}: {err}")
                if path is not candidates[-1]:
                    self._log(f"checkpoint {path} is damaged ({err}); resuming from the one before it")
        if exact:
            raise ckpt.ResumeError(
                f"cannot resume from {newest}: it is damaged ({problems[0].split(': ', 1)[1]}); name another "
                "checkpoint in trainer.resume, or pass trainer.resume=true for the newest usable one"
            )
        raise ckpt.ResumeError(
            f"no usable checkpoint in {newest.parent} ({'; '.join(problems)}): start fresh with "
            "trainer.resume=false trainer.overwrite=true (moves them aside), or in another run_dir"
        )

    def _load(self, path: Path) -> None:
        if self.dist.enabled or ckpt.is_sharded(path):  # any rank count -> this one (docs/distributed.md)
            distributed.verify_any(path, self.dist, layout=self._layout())  # before any of it is read
            peek = path / "rank00000.pt"  # the converters' records are the same in every rank's file
            if peek.is_file():
                saved = torch.load(peek, weights_only=True)
                check_resume(self.converters, path, saved)
                self._check_optimizer_name(path, saved)
            try:
                state = distributed.load_checkpoint_any(
                    path, self.model, self.optimizer, self.dist, only_trainable=self.only_trainable, verified=True
                )
            except ValueError as err:  # its refusals, in one line
                raise ckpt.ResumeError(str(err)) from None
        else:
            state = ckpt.load_checkpoint(path, None, layout=self._layout())
            check_resume(self.converters, path, state)  # before the weights, which may be only some of them
            self._check_optimizer_name(path, state)
            ckpt.load_weights(path, self.raw_model, self.device, only_trainable=self.only_trainable)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_loader.load_state_dict(state["data"])
        self._train_iter = iter(self.train_loader)
        ckpt.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.step_impl.weights_changed()
        self._log(f"resumed from {path} at step {self.step}")

    def _check_optimizer_name(self, path: Path, state: dict[str, Any]) -> None:
        saved = state.get("optimizer_name", "adamw")  # checkpoints from before the table hold AdamW's state
        if saved != self.cfg.optim.name:
            raise ckpt.ResumeError(
                f"checkpoint {path} holds optim={saved}'s state but this run has optim={self.cfg.optim.name}: "
                f"resume with optim={saved}, or start a fresh run"
            )

    # ---- the end of a run: validation, export, sample ---------------------------------------------
    def _finish(self, result: FitResult) -> None:
        """After the last step: the final validation, the export and the sample."""
        cfg = self.cfg.trainer
        step, final = self._validation
        if step != self.step:
            final = self.evaluate()
        if final:
            self._log(f"validation loss {final['val_loss']:.4f}, perplexity {final['val_ppl']:.2f}")
        if cfg.eval_tasks and step != self.step:
            self.evaluate_tasks()  # the last step's scores, unless the loop has just taken them
        result.eval_metrics = self.eval_metrics
        if cfg.export_hf or cfg.sample_tokens > 0:
            # a collective under torchrun, where rank 0 samples on it; one process samples on its own model
            plain = self._plain_model() if cfg.export_hf or self.dist.enabled else None
            if self.is_main and cfg.export_hf:
                self._export_or_interrupted(plain, result)
            if self.is_main and cfg.sample_tokens > 0 and result.status == "completed":
                on_device = plain if self.dist.enabled else None  # a converter's final model may be on the CPU
                result.sample = self.sample(cfg.sample_prompt, cfg.sample_tokens, on_device)

    def _plain_model(self):
        """The trained model as one unsharded module (the model itself when not distributed), or the one a
        converter builds for the export (``builds_final_model``); only rank 0 gets it."""
        for converter in self.converters:
            if converter.builds_final_model:
                return converter.final_model(
                    self.model, device=self.device, dist=self.dist, attention=self.cfg.attention
                )
        if not self.dist.enabled:
            return self.raw_model
        full = distributed.full_state_dict(self.model)
        plain = self.family.build(self.raw_model.config, attention=self.cfg.attention)
        plain.tokenizer_dir = self.raw_model.tokenizer_dir
        if self.is_main:
            plain.load_state_dict(full)
        return plain.to(self.device)

    def _export_missing(self) -> bool:
        """Whether the export this run should have is missing: ``trainer.export_hf`` and no export marker of
        this step (an export writes the marker last). Rank 0 looks; under torchrun every rank gets its answer."""
        missing = ""
        if self.is_main and self.cfg.trainer.export_hf:
            try:
                marker = json.loads((self.run_dir / rundir.EXPORT_MARKER).read_text())
                missing = "" if isinstance(marker, dict) and marker.get("step") == self.step else "missing"
            except (OSError, ValueError):
                missing = "missing"
        if self.dist.enabled:
            missing = distributed.broadcast_str(missing)
        return bool(missing)

    def _export_or_interrupted(self, model, result: FitResult) -> None:
        """:meth:`export` into ``result.hf_dir``; Ctrl-C or SIGTERM during it stops it cleanly (no temporary
        directory left, the earlier export kept, no marker) and marks ``result`` interrupted, to be redone by a
        resume."""
        try:
            with _raise_on_stop_signals():
                result.hf_dir = self.export(model)
        except ExportInterrupted as stop:
            result.status, result.signal, result.stopped_in = "interrupted", stop.signum, "export"
            self._log(
                f"received {signal.Signals(stop.signum).name} during the export, which was stopped without leaving "
                f"temporary files; resume with trainer.resume=true to redo the export of step {self.step}"
            )

    def export(self, model=None) -> Path:
        """The final model (:meth:`_plain_model`) as a Hugging Face directory (``<run_dir>/hf``) in
        ``trainer.export_dtype``, with the tokenizer, the chat template the run trained with as the tokenizer's own,
        and generation_config.json (the source checkpoint's stop ids, and the run's end of a turn or document);
        then what the converters write beside it (``export_extra``)."""
        from nemo_lite.components.models import hf

        model = model or self._plain_model()
        (self.run_dir / rundir.EXPORT_MARKER).unlink(missing_ok=True)  # written again once all of it is there
        tokenizer_dir = model.tokenizer_dir
        if tokenizer_dir is None and hasattr(self.tokenizer, "save_pretrained"):
            tokenizer_dir = self.run_dir / "tokenizer"
            self.tokenizer.save_pretrained(str(tokenizer_dir))
        generation = hf.generation_config_of(self.pretrained_dir, model.config)
        # Generation stops at the run's end of a turn (or of a document) and at every id the source stopped at; a
        # model from scratch has no source, and the id its config was built with delimits documents, ending none.
        end_id, stop_ids = self.train_loader.end_id, hf.eos_ids(generation) if self.pretrained_dir else []
        stop_ids = stop_ids if end_id in stop_ids else [end_id, *stop_ids]
        generation["eos_token_id"] = stop_ids if len(stop_ids) > 1 else end_id
        path = model.save_pretrained(
            self.run_dir / "hf",
            tokenizer_dir=tokenizer_dir,
            dtype=self._export_dtype(),
            generation=generation,
            chat_template=getattr(self.train_loader, "chat_template", None),
        )
        self._log(f"exported a Hugging Face checkpoint to {path}")
        for converter in self.converters:
            line = converter.export_extra(self.run_dir, path)
            if line:
                self._log(line)
        marker = self.run_dir / rundir.EXPORT_MARKER
        tmp = self.run_dir / f".{rundir.EXPORT_MARKER}.tmp"
        tmp.write_text(json.dumps({"step": self.step}) + "\n")
        os.replace(tmp, marker)
        return path

    def _export_dtype(self) -> torch.dtype:
        """``trainer.export_dtype``; "auto" is the dtype of model.pretrained_path's weights (float32 from scratch)."""
        from nemo_lite.components.models import hf

        name = self.cfg.trainer.export_dtype
        if name != "auto":
            return hf.EXPORT_DTYPES[name]
        return torch.float32 if self.pretrained_dir is None else hf.checkpoint_dtype(self.pretrained_dir)

    def sample(self, prompt: str | None, max_new_tokens: int, model=None) -> str:
        """Greedy continuation of ``prompt`` (None: the record kind's own), encoded and stopped by the loader's
        record kind (in a chat run one user turn, rendered with the chat template and its generation prompt,
        ending at the end of the turn). The prompt is seen causally, as one sequence, whatever mask the run
        trained with; generation runs over a KV cache (``components/models/generate.py``)."""
        from nemo_lite.components.models.generate import GenerationConfig, generate_ids

        prompt = self.train_loader.sample_prompt if prompt is None else prompt
        prompt_ids = self.train_loader.prompt_ids(prompt)
        config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=(self.train_loader.end_id,))
        with self._autocast():
            out = generate_ids(model or self.raw_model, [prompt_ids], config)
        text = self.tokenizer.decode(prompt_ids + out.tokens[0])
        self._log(f"sample ({self.train_loader.record_kind}, greedy, {max_new_tokens} tokens): {text!r}")
        return text

    def _log(self, message: str) -> None:
        if self.is_main:
            print(f"[nemo_lite] {message}", file=sys.stderr, flush=True)


class ExportInterrupted(BaseException):
    """Ctrl-C or SIGTERM arrived during the export (a BaseException: nothing on the way may swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _raise_on_stop_signals():
    """Ctrl-C and SIGTERM raise :class:`ExportInterrupted` in the main thread, so the atomic writers on the way
    remove their temporary directories (SIGTERM's default would end the process without cleaning up)."""
    if not threading_main():
        yield
        return

    raised = False

    def stop(signum, frame):
        nonlocal raised
        if not raised:  # a second signal must not cut short the clean-up the first one started
            raised = True
            raise ExportInterrupted(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def data_errors():
    """The data package refuses bad data (no documents, a missing field, a tokenizer without EOS) with a
    ValueError that names the file and the fix: a user error, raised as a ConfigError."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
