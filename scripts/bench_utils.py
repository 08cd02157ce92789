"""What the benchmark scripts share: the one-GPU workload (Llama-3.2-1B shape, 2 x 4096 packed tokens of
random documents), the recipe config and training run that measure nemo_lite on it, the training loop that
measures Hugging Face transformers on the same batches, CUDA-event timing, medians after warm-up, and the
record of where a figure was measured (card, versions, date, command)."""

from __future__ import annotations

import gc
import importlib.util
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date
from typing import Any

import torch

ROWS, SEQ_LEN = 2, 4096
EOS, VOCAB = 128001, 128256  # Llama 3's end-of-text id and vocabulary
MEAN_DOC = 600.0
PEAK_FLOPS = 989e12  # H100 and H200, bf16 dense


def synthetic_loader(
    seed: int = 0, *, vocab_size: int = VOCAB, eos_id: int = EOS, learnable: bool = False, shape=(ROWS, SEQ_LEN)
):
    """EOS-delimited random documents with fixed-seed log-normal lengths, a new layout every step; ``shape``
    is (rows, tokens a row). Pinned where there is a GPU to copy to."""
    from nemo_lite.testing.data import SyntheticPackedLoader

    return SyntheticPackedLoader(
        *shape, vocab_size=vocab_size, eos_id=eos_id, mean_doc=MEAN_DOC, seed=seed,
        pin_memory=torch.cuda.is_available(), learnable=learnable,
    )  # fmt: skip


def parse_tokens(spec: str) -> tuple[int, int]:
    """``N`` -> (1, N); ``BxS`` -> (B, S)."""
    parts = spec.lower().split("x")
    try:
        shape = (1, int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        shape = (0, 0)
    if len(parts) > 2 or min(shape) < 1:
        raise SystemExit(f"--tokens takes N or BxS (positive integers), e.g. 4096 or 2x4096; got {spec!r}")
    return shape


def nemo_model(preset: str = "llama-3.2-1b", *, device: str = "cuda", **overrides):
    """nemo_lite's model of ``preset`` with random weights (uninitialized on the meta device)."""
    from nemo_lite.components.models import LlamaForCausalLM, get_preset

    with torch.device(device):
        model = LlamaForCausalLM(get_preset(preset, **overrides))
    if device != "meta":
        model.init_weights(seed=0)
    return model


def hf_model(preset: str = "llama-3.2-1b", *, attn_implementation: str):
    """transformers' model of ``preset``, with its own random init, on the GPU."""
    import transformers

    from nemo_lite.components.models import get_preset
    from nemo_lite.components.models.hf import config_to_hf

    config = transformers.LlamaConfig(**config_to_hf(get_preset(preset)))
    config._attn_implementation = attn_implementation
    return transformers.LlamaForCausalLM(config).cuda()


def gpu_recipe(run_dir: str, steps: int, *, preset: str | None = "llama-3.2-1b", recipe: str = "pretrain", **keys):
    """The recipe config of a benchmark run: flex attention, compiled blocks, ``ROWS x SEQ_LEN`` tokens a step,
    no validation, export or sample. ``keys`` set sections' fields by dotted name, e.g.
    ``**{"attention.backend": "sdpa", "trainer.step_impl": "plain"}``."""
    from nemo_lite.training.config import RecipeConfig

    cfg = RecipeConfig(recipe=recipe)
    cfg.run_dir = run_dir
    if preset is not None:
        cfg.model.preset = preset
    cfg.attention.backend = "flex"
    cfg.data.seq_len, cfg.data.batch_size = SEQ_LEN, ROWS
    t = cfg.trainer
    t.max_steps, t.compile = steps, True
    t.val_every = t.save_every = t.sample_tokens = 0
    t.export_hf = t.progress_bar = False
    cfg.optim.warmup_steps = 5
    for dotted, value in keys.items():
        section, name = dotted.rsplit(".", 1)
        owner = cfg
        for part in section.split("."):
            owner = getattr(owner, part)
        if not hasattr(owner, name):
            raise SystemExit(f"the recipe schema has no key {dotted!r}")
        setattr(owner, name, value)
    return cfg


@dataclass
class Run:
    trainer: Any
    records: list[dict]  # each step's metrics
    setup_gib: float  # GPU memory held before the first step: weights, optimizer state
    setup_peak_gib: float = 0.0  # the most GPU memory allocated while the model was loaded and set up


def train(
    cfg, train_loader=None, *, keep: bool = False, on_step: Callable | None = None, before_fit: Callable | None = None
) -> Run:
    """Train ``cfg`` (``before_fit(trainer)`` is called after set-up, ``on_step(trainer)`` after each step). No
    checkpoint is written (a 1B one is 15 GB, a 3B one 38 GB); the run directory is removed afterwards unless
    ``keep``."""
    from nemo_lite.training import run_dir
    from nemo_lite.training.trainer import Trainer

    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    run_dir.FREE_SPACE_FACTOR = 0  # no checkpoint is written: the free-space check is moot
    from nemo_lite.testing.hooks import after_each_step

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(cfg, train_loader=train_loader)
    trainer.setup()
    trainer.save = lambda: None
    if before_fit is not None:
        before_fit(trainer)
    setup_gib = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    setup_peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    records: list[dict] = []

    def after_step(tr, metrics: dict) -> None:
        records.append({"step": tr.step, **metrics})
        if on_step is not None:
            on_step(tr)

    after_each_step(trainer, after_step)
    trainer.fit()
    if not keep:
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
    return Run(trainer, records, setup_gib, setup_peak_gib)


def hf_train(
    model,
    params: list[torch.nn.Parameter],
    steps: int,
    *,
    lr: float,
    weight_decay: float,
    loader=None,
    forward: Callable[[dict], torch.Tensor] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> list[dict]:
    """The transformers baseline: ``model`` (a Hugging Face causal LM) trained on the benchmarks' batches
    (``loader``, None: :func:`synthetic_loader`) as transformers users write it: bf16 autocast (on a GPU),
    documents told apart by ``position_ids``, the loss in float32 (``forward(batch)``, None: the mean
    cross-entropy of the model's logits), clip 1.0, torch's AdamW over ``params`` (fused on a GPU).
    ``on_step(step)`` is called after each (1-based) step. Per step: tokens/s, step ms, loss, and the
    document-mask pairs (for MFU)."""
    device = params[0].device
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, fused=cuda)
    batches = iter(synthetic_loader() if loader is None else loader)

    def mean_loss(batch: dict) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())

    model.train()
    records = []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = (forward or mean_loss)(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
        dt = time.perf_counter() - t0
        tokens = batch["input_ids"].numel()
        pairs = int((batch["position_ids"] + 1).sum())  # each query sees its document's prefix
        records.append(
            {"tokens": tokens, "tokens_per_s": tokens / dt, "step_ms": 1000 * dt, "loss": loss_value, "pairs": pairs}
        )
        if on_step is not None:
            on_step(step)
    del opt
    return records


def run_facts(run: Run) -> dict:
    """What a nemo_lite row records besides its timings: memory held before step 1, parameters (all and
    trainable), the step's and the converters' one-line descriptions."""
    trainer = run.trainer
    return {
        "model_mem_gib": run.setup_gib,
        "params": trainer.n_params,
        "trainable_params": sum(p.numel() for p in trainer.raw_model.parameters() if p.requires_grad),
        "step": trainer.step_impl.description,
        "converters": [c.description for c in trainer.converters],
    }


def hf_attention(choice: str) -> str:
    """transformers' attention for a baseline: ``choice``, or with ``auto`` its best installed one."""
    if choice != "auto":
        return choice
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "sdpa"


def medians(records: list[dict], skip: int, keys: Iterable[str] = ("tokens_per_s", "step_ms")) -> dict:
    """Per key, the median over the steps after ``skip``; with the first and last loss."""
    out = {key: median_after_warmup((r[key] for r in records), skip) for key in keys}
    return out | {"first_loss": records[0]["loss"], "last_loss": records[-1]["loss"]}


def cuda_time_ms(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` calls, each timed alone with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def median_after_warmup(values: Iterable[float], skip: int) -> float:
    """The median of ``values`` without the first ``skip`` (compilation, allocator warm-up)."""
    kept = list(values)[skip:]
    if not kept:
        raise ValueError(f"nothing left after skipping {skip} warm-up values")
    return statistics.median(kept)


def run_all(names: list[str], runs: dict[str, Callable[[], dict]], write: Callable[[list[dict]], None]) -> list[dict]:
    """Run each named config in turn; an error (out of memory included) is recorded as its row and the others
    go on. ``write`` gets the rows after each, so a time-out keeps what finished."""
    rows = []
    for name in names:
        if name not in runs:
            sys.exit(f"unknown config {name!r}; choose from {', '.join(runs)}")
        t0 = time.perf_counter()
        try:
            row = runs[name]()
        except torch.OutOfMemoryError:
            row = {"config": name, "error": "OOM"}
        except Exception as err:  # record it and go on with the other configs
            row = {"config": name, "error": f"{type(err).__name__}: {str(err)[:400]}"}
        row["seconds"] = time.perf_counter() - t0
        print(json.dumps(row, default=str), file=sys.stderr, flush=True)
        rows.append(row)
        gc.collect()
        torch.cuda.empty_cache()
        write(rows)
    return rows


def meta() -> dict:
    """Where and when a figure was measured."""
    out = {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "date": date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
    }
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    return out
