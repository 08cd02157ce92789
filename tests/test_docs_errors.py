"""Every error message quoted in docs/*.md and README.md is the one the program prints today.

The quotes are collected from the Markdown, so a new one cannot go unchecked:

- in a fenced block, the lines after ``$ python recipes/...``: that command's output. The command is
  run as written (plus a temporary ``run_dir``) and each line must be a line of its stderr;
- in a section about errors (a heading with "error" or "bad input"), every inline code span that reads
  like a sentence (five words or more, three of them English) and is not a command, and anywhere an
  inline span that starts with ``SomeError: ``: each must contain a needle of ``CASES``;
- anywhere, an inline span or a code-block line that contains a needle of ``CASES``.

``CASES`` maps each needle to what produces the message: a function call or a recipe run, in process
where the message comes from a function. A quote may shorten the message with ``…`` (or ``...``): the
pieces around it must appear in order. Without an ellipsis at an end, the quote runs to that end of the
message (a leading ``SomeError: `` names the exception's class or a base of it).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch
from recipe_utils import tiny_config

REPO = Path(__file__).resolve().parents[1]
DOCS = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]
ERROR_SECTION = re.compile(r"error|bad input", re.IGNORECASE)
COMMAND_WORDS = ("python ", "pytest ", "torchrun ", "pip ", "bash ")
ELLIPSIS = re.compile(r"\s*(?:…|\.\.\.)\s*")


@dataclass(frozen=True)
class Quote:
    where: str  # docs/x.md:LINE
    text: str
    command: str | None = None  # the `$ ...` line the quote is the output of
    needs_entry: bool = False  # must be in CASES (it is in an error section, or names an exception)


def _spans(text: str) -> list[tuple[int, str]]:
    """Inline code spans (a span may wrap a line) with their line numbers; ``\\|`` in a table is ``|``."""
    return [
        (text.count("\n", 0, m.start()) + 1, " ".join(m.group(1).replace("\\|", "|").split()))
        for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text)
    ]


def collect_quotes() -> list[Quote]:
    quotes = []
    for doc in DOCS:
        name = doc.relative_to(REPO).as_posix()
        prose, headings = [], []  # per line: the line outside fenced blocks ("" inside), its section heading
        in_block, command, heading = False, None, ""
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            where = f"{name}:{number}"
            if line.startswith("```"):
                in_block, command = not in_block, None
            elif in_block and line.startswith("$ "):
                command = line[2:].strip()
            elif in_block and command and line.strip():
                quotes.append(Quote(where, line.strip(), command))
            elif in_block and needle_of(line.strip(), where):
                quotes.append(Quote(where, line.strip()))
            elif line.startswith("#"):
                heading = line
            prose.append("" if in_block or line.startswith("```") else line)
            headings.append(heading)
        for number, span in _spans("\n".join(prose)):
            where = f"{name}:{number}"
            named_error = re.match(r"[A-Z]\w*Error: ", span) is not None
            words = [word for word in span.split() if re.fullmatch(r"[A-Za-z]{2,}", word)]
            message_like = len(span.split()) >= 5 and len(words) >= 3 and not span.startswith(COMMAND_WORDS)
            needs_entry = named_error or (message_like and ERROR_SECTION.search(headings[number - 1]) is not None)
            if needs_entry or needle_of(span, where):
                quotes.append(Quote(where, span, needs_entry=needs_entry))
    return quotes


def matches(quote: str, message: str) -> bool:
    """``quote`` is all of ``message``, where an ellipsis in the quote stands for any text."""
    pattern = ".*?".join(re.escape(piece) for piece in ELLIPSIS.split(quote.strip()))
    return re.fullmatch(pattern, message.strip(), re.DOTALL) is not None


# ---- what produces each message ------------------------------------------------------------------


def raised(fn: Callable[[], object]) -> list[str]:
    """The messages an error prints: bare, and led by the name of its class or of any base class."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - any error is what the docs quote
        return [str(err)] + [f"{cls.__name__}: {err}" for cls in type(err).__mro__ if issubclass(cls, Exception)]
    raise AssertionError("no error was raised")


@cache
def recipe_stderr(recipe: str, *args: str) -> tuple[int, list[str]]:
    """Run a recipe (stopping before any work is the point; the timeout is a hang guard, not a speed limit).
    Returns the exit code and the lines of stderr, plus each ``error: `` line without that prefix."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    env.pop("NEMO_LITE_DEBUG", None)
    with tempfile.TemporaryDirectory(prefix="docs-errors-") as run_dir:
        proc = subprocess.run(
            [sys.executable, str(REPO / "recipes" / f"{recipe}.py"), *args, f"run_dir={run_dir}"],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            cwd=REPO,
        )
    lines = proc.stderr.splitlines()
    return proc.returncode, lines + [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]


def without_the_project(tmp: Path) -> list[str]:
    """A recipe run by a Python that does not have nemo_lite installed (no site-packages: ``-S``)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    script = str(REPO / "recipes" / "pretrain.py")
    proc = subprocess.run([sys.executable, "-S", script], capture_output=True, text=True, cwd=tmp, env=env)
    return proc.stderr.splitlines()


def cli(*args: str) -> Callable[[Path], list[str]]:
    return lambda tmp: recipe_stderr("pretrain", *args)[1]


def fit_error(settings: dict[str, object]) -> Callable[[Path], list[str]]:
    """The error of the recipes' trainer on the tiny config with ``settings`` ({"data.source": value or
    a function of the case's temporary directory})."""

    def run(tmp: Path) -> list[str]:
        from nemo_lite.training.trainer import Trainer

        cfg = tiny_config(tmp / "run")
        for dotted, value in settings.items():
            section, key = dotted.split(".")
            setattr(getattr(cfg, section), key, value(tmp) if callable(value) else value)
        return raised(lambda: Trainer(cfg).fit())

    return run


def call_error(fn: Callable[[Path], object]) -> Callable[[Path], list[str]]:
    return lambda tmp: raised(lambda: fn(tmp))


def _jsonl(name: str, rows: list[dict]) -> Callable[[Path], str]:
    def write(tmp: Path) -> str:
        (tmp / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(tmp / name)

    return write


def _tiny_checkpoint(tmp: Path, edit: Callable[[dict], None] | None = None, config_edit=None) -> Path:
    from safetensors.torch import load_file, save_file

    from nemo_lite.components.models import LlamaForCausalLM, get_preset

    model = LlamaForCausalLM(get_preset("tiny", vocab_size=8192, eos_token_id=0))
    model.init_weights(0)
    path = model.save_pretrained(tmp / "ckpt")
    if edit is not None:
        tensors = load_file(path / "model.safetensors")
        edit(tensors)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    if config_edit is not None:
        config = json.loads((path / "config.json").read_text())
        config_edit(config)
        (path / "config.json").write_text(json.dumps(config))
    return path


def _missing_tensor(tensors):
    del tensors["model.layers.1.mlp.up_proj.weight"]


def _extra_and_misshaped(tensors):
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    tensors["model.extra.weight"] = torch.zeros(2)


def _load_models_md_example(tmp):  # docs/models.md's example of one CheckpointError
    from nemo_lite.components.models import LlamaForCausalLM

    def edit(tensors):
        del tensors["model.embed_tokens.weight"]
        tensors["extra.weight"] = torch.zeros(2)
        tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)

    LlamaForCausalLM.from_pretrained(_tiny_checkpoint(tmp, edit))


def _load_models_md_example_config(tmp, **values):
    from nemo_lite.components.models import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(_tiny_checkpoint(tmp, config_edit=lambda c: c.update(values)))


def _build(name: str, **kwargs):
    from nemo_lite.components.attention import build_attention_backend

    return build_attention_backend(name, **kwargs)


def _mask_of_another_batch(tmp):
    backend = _build("sdpa", attn_mask_type="block_causal")
    mask = backend.build_mask(torch.tensor([[1, 2, 0, 3], [4, 0, 5, 6]]), 0, sliding_windows=(0,))
    q = torch.randn(1, 2, 4, 8)
    backend(q, q, q, attention_mask=mask)


def _seed_mask_of_another_batch(tmp):
    from nemo_lite.components.attention.flex_attention import FlexAttention

    layer = FlexAttention(attn_mask_type="block_causal")
    FlexAttention.init_attention_mask(torch.tensor([[1, 2, 0, 3], [4, 0, 5, 6]]), 0)
    q = torch.randn(1, 2, 4, 8)
    with torch.no_grad():
        layer(q, q, q)


def _a_backend_of_your_own(tmp):  # docs/attention.md, "Adding a backend"
    from nemo_lite.components.attention.base import AttentionBackend
    from nemo_lite.components.attention.registry import register_attention_backend, unregister_attention_backend

    @register_attention_backend("mine")
    class MyAttention(AttentionBackend):
        def __init__(self, attn_mask_type="causal", fixed_block_size=None, *, temperature: float = 1.0):
            super().__init__(attn_mask_type, fixed_block_size)
            self.temperature = temperature

    try:
        _build("mine", options={"temp": 0.5})
    finally:
        unregister_attention_backend("mine")


def _fast_step_with_a_gradient_hook(tmp):  # docs/step.md
    pytest.importorskip("triton")
    from nemo_lite.components.attention import AttentionConfig
    from nemo_lite.components.models import LlamaForCausalLM, get_preset
    from nemo_lite.training.config import OptimSection
    from nemo_lite.training.fast.step import FastStep

    model = LlamaForCausalLM(get_preset("tiny", num_hidden_layers=1), attention=AttentionConfig(backend="eager"))
    model.embed_tokens.weight.register_hook(lambda grad: grad)
    # On a CUDA device the fast step would convert the embedding; the model stays on the CPU, nothing runs.
    FastStep(model, OptimSection(), device=torch.device("cuda"), distributed=False, autocast_bf16=True)


def _dp_replicate_not_dividing(tmp):
    from nemo_lite.training.distributed import check_dp_replicate

    check_dp_replicate(3, 8)


def _resume_nowhere(tmp):
    from nemo_lite.training.checkpoint import resolve_resume

    resolve_resume("/nonexistent/run", tmp)


def _tokenizer_model_without_a_checkpoint(tmp):
    from nemo_lite.components.datasets import DataConfig, resolve_data_config

    resolve_data_config(DataConfig(tokenizer="model"), pretrained_path=None, pin_memory=False)


def _no_eos_tokenizer(tmp):
    from nemo_lite.components.datasets import default_tokenizer_file

    return str(default_tokenizer_file())  # a bare tokenizer.json names no EOS


def _quick_trainer(run_dir: Path, steps: int = 4, **trainer_settings):
    """The tiny model on synthetic batches (nothing to tokenize), saving every 2 steps."""
    from nemo_lite.testing.data import SyntheticPackedLoader
    from nemo_lite.training.trainer import Trainer

    cfg = tiny_config(run_dir, "sdpa", steps=steps)
    t = cfg.trainer
    t.save_every, t.keep_last, t.val_every, t.sample_tokens, t.export_hf = 2, 10, 0, 0, False
    for key, value in trainer_settings.items():
        setattr(t, key, value)
    return Trainer(cfg, train_loader=SyntheticPackedLoader(4, 64, vocab_size=512, eos_id=0, seed=1, learnable=True))


def _run_dir_in_use(tmp):
    run = tmp / "run"
    run.mkdir()
    code = "import sys, time; from nemo_lite.training.run_dir import RunLock; RunLock(sys.argv[1]); print(1, flush=1)"
    # The holder keeps the lock until its stdin closes (killed below), however long the run takes to refuse.
    holder = subprocess.Popen(
        [sys.executable, "-c", f"{code}; sys.stdin.read()", str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        holder.stdout.readline()
        _quick_trainer(run).fit()
    finally:
        holder.kill()
        holder.wait()


def _fresh_run_over_checkpoints(tmp):
    from nemo_lite.training.checkpoint import save_checkpoint

    save_checkpoint(tmp / "run" / "checkpoints", 2, torch.nn.Linear(2, 2), {"step": 2}, keep_last=2)
    _quick_trainer(tmp / "run").fit()


def _run_dir_is_a_file(tmp):
    (tmp / "run").write_text("")
    _quick_trainer(tmp / "run").fit()


def _index_outside(tmp):
    from safetensors import safe_open

    from nemo_lite.components.models import LlamaForCausalLM

    path = _tiny_checkpoint(tmp)
    with safe_open(path / "model.safetensors", "pt") as f:
        weight_map = dict.fromkeys(f.keys(), "../outside.safetensors")  # noqa: SIM118 - safe_open is not a dict
    (path / "model.safetensors").rename(path / "shard.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    LlamaForCausalLM.from_pretrained(path)


def _revision_outside_the_cache(tmp):
    from nemo_lite.components.models.hub import resolve_pretrained

    resolve_pretrained("org/name@../../x")


def _preflight(run_dir, *overrides: str) -> str | None:
    from nemo_lite.training import launch

    return launch.preflight(str(REPO / "configs"), "pretrain", [f"run_dir={run_dir}", *overrides])


def _touch(path: Path) -> Path:
    path.write_text("")
    return path


def _dangling_link(tmp: Path) -> Path:
    (tmp / "link").symlink_to(tmp / "gone")
    return tmp / "link"


def _read_only_run_dir(tmp):
    import errno
    from unittest import mock

    def refuse(self, data):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    with mock.patch("nemo_lite.training.run_dir.Path.write_bytes", refuse):
        _quick_trainer(tmp / "run").fit()


def _small_disk(tmp):
    from unittest import mock

    import nemo_lite.training.run_dir as rundir

    usage = rundir.shutil.disk_usage(tmp)._replace(free=1_000_000)
    with mock.patch.object(rundir.shutil, "disk_usage", lambda path: usage):
        _quick_trainer(tmp / "run").fit()


def _small_disk_on_resume(tmp):
    from unittest import mock

    import nemo_lite.training.run_dir as rundir

    _quick_trainer(tmp / "run").fit()
    usage = rundir.shutil.disk_usage(tmp)._replace(free=1_000_000)
    with mock.patch.object(rundir.shutil, "disk_usage", lambda path: usage):
        _quick_trainer(tmp / "run", steps=6, resume="true").fit()


def _poisoned_update(tmp):
    trainer = _quick_trainer(tmp / "run", steps=8)
    trainer.setup()
    real_step = trainer.step_impl.optimizer.step

    def step(*args, **kwargs):
        real_step(*args, **kwargs)
        if trainer.step + 1 == 5:
            with torch.no_grad():
                next(trainer.raw_model.parameters()).view(-1)[0] = float("inf")

    trainer.step_impl.optimizer.step = step
    trainer.fit()


def _disk_full_during_a_save(tmp):
    import errno

    trainer = _quick_trainer(tmp / "run", steps=6)
    trainer.setup()

    def full(name):
        if trainer.step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")

    from nemo_lite.testing.hooks import after_each_checkpoint_file

    with after_each_checkpoint_file(full):
        trainer.fit()


def _disk_full_elsewhere(tmp):
    import errno

    from nemo_lite.training.launch import user_error_line

    raise RuntimeError(user_error_line(OSError(errno.ENOSPC, "No space left", str(tmp / "run" / "metrics.jsonl"))))


def _exporting_trainer(run_dir: Path, **trainer_settings):
    """The tiny model on the default data, 4 steps, exporting at the end."""
    from nemo_lite.training.trainer import Trainer

    cfg = tiny_config(run_dir, "sdpa", steps=4)
    t = cfg.trainer
    t.val_every, t.sample_tokens, t.export_hf = 0, 0, True
    for key, value in trainer_settings.items():
        setattr(t, key, value)
    return Trainer(cfg)


def _log_of(fn: Callable[[], object]) -> list[str]:
    import contextlib
    import io

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        fn()
    return [line.removeprefix("[nemo_lite] ") for line in stderr.getvalue().splitlines()]


def _fresh_run_from_its_own_export(tmp):
    _exporting_trainer(tmp / "run").fit()
    trainer = _exporting_trainer(tmp / "run", overwrite=True)
    trainer.cfg.model.pretrained_path = str(tmp / "run" / "hf")
    trainer.fit()


def _finished_run_without_its_export(tmp) -> list[str]:
    _exporting_trainer(tmp / "run").fit()
    (tmp / "run" / "export.json").unlink()  # as a run killed before its export finished leaves it
    return _log_of(lambda: _exporting_trainer(tmp / "run", resume="true").fit())


def _resume_with_another_lr(tmp) -> list[str]:
    _quick_trainer(tmp / "run").fit()
    trainer = _quick_trainer(tmp / "run", steps=6, resume="true")
    trainer.cfg.optim.lr = 0.0005
    return _log_of(trainer.fit)


def _sigterm_during_the_export(tmp) -> list[str]:
    import signal
    from unittest import mock

    import safetensors.torch

    real = safetensors.torch.save_file

    def save_then_sigterm(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        if ".hf.tmp-" in str(filename):
            os.kill(os.getpid(), signal.SIGTERM)

    with mock.patch.object(safetensors.torch, "save_file", save_then_sigterm):
        return _log_of(lambda: _exporting_trainer(tmp / "run").fit())


def _disk_full_during_the_export(tmp):
    from unittest import mock

    import safetensors.torch
    from safetensors import SafetensorError

    from nemo_lite.training.launch import user_error_line

    real = safetensors.torch.save_file

    def full(tensors, filename, *args, **kwargs):
        if ".hf.tmp-" not in str(filename):
            return real(tensors, filename, *args, **kwargs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with mock.patch.object(safetensors.torch, "save_file", full):
        try:
            _exporting_trainer(tmp / "run").fit()
        except OSError as err:
            raise RuntimeError(user_error_line(err)) from None


def _damaged_newest_checkpoint(tmp) -> list[str]:
    import contextlib
    import io

    _quick_trainer(tmp / "run").fit()
    model_file = tmp / "run" / "checkpoints" / "step_000004" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        _quick_trainer(tmp / "run", resume="true").setup()
    return [line.removeprefix("[nemo_lite] ") for line in stderr.getvalue().splitlines()]


def _no_usable_checkpoint(tmp):
    _quick_trainer(tmp / "run").fit()
    for step in ("step_000002", "step_000004"):
        (tmp / "run" / "checkpoints" / step / "train_state.pt").write_bytes(b"")
    _quick_trainer(tmp / "run", resume="true").fit()


def _sharded_checkpoint(tmp) -> Path:
    """A sharded checkpoint of a Linear(4, 4), saved by one gloo rank in this process."""
    import torch.distributed as dist

    from nemo_lite.training import distributed

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = torch.nn.Linear(4, 4)
        optimizer = torch.optim.AdamW(model.parameters())
        return distributed.save_sharded(tmp, 1, model, optimizer, {"step": 1}, distributed.DistInfo(), 2)
    finally:
        dist.destroy_process_group()


def _damaged_shard(tmp):
    from nemo_lite.training import distributed

    path = _sharded_checkpoint(tmp)
    shard = path / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    distributed.verify_any(path, distributed.DistInfo())


def _tampered_metadata(tmp):
    import pickle

    from nemo_lite.training.sharded_checkpoint import SafeReader

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    (tmp / "dcp").mkdir()
    (tmp / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload()))
    SafeReader(str(tmp / "dcp")).read_metadata()


def _sharded_of_another_model(tmp):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from nemo_lite.training import distributed

    model = torch.nn.Linear(4, 4)
    model_sd, optim_sd = get_state_dict(model, torch.optim.AdamW(model.parameters()))
    dcp_dir = tmp / "step_000001" / "dcp"
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(dcp_dir), no_dist=True)
    other = torch.nn.Linear(4, 8)
    distributed._load_dcp(dcp_dir, other, torch.optim.AdamW(other.parameters()))


def _resume_with_another_shape(tmp):
    from nemo_lite.testing.data import SyntheticPackedLoader
    from nemo_lite.training.trainer import Trainer

    _quick_trainer(tmp / "run").fit()
    cfg = tiny_config(tmp / "other", "sdpa", steps=6)
    cfg.trainer.resume, cfg.model.overrides, cfg.data.seq_len = str(tmp / "run"), {"num_hidden_layers": 3}, 32
    Trainer(cfg, train_loader=SyntheticPackedLoader(4, 32, vocab_size=512, eos_id=0, seed=1)).fit()


def _truncated_safetensors(tmp):
    from nemo_lite.components.models import LlamaForCausalLM

    path = _tiny_checkpoint(tmp)
    (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:1000])
    LlamaForCausalLM.from_pretrained(path)


def _config_json_list(tmp):
    from nemo_lite.components.models import LlamaForCausalLM

    path = _tiny_checkpoint(tmp)
    (path / "config.json").write_text("[1, 2, 3]")
    LlamaForCausalLM.from_pretrained(path)


def _tied_with_a_distinct_lm_head(tmp):
    from safetensors.torch import save_file

    from nemo_lite.components.models import LlamaForCausalLM, get_preset

    model = LlamaForCausalLM(get_preset("tiny", vocab_size=512, tie_word_embeddings=True))
    path = model.save_pretrained(tmp / "tied")
    tensors = {"lm_head.weight": torch.ones(512, 64), **{k: v for k, v in _load_file(path).items()}}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    LlamaForCausalLM.from_pretrained(path)


def _load_file(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _lr_inf(tmp):
    from nemo_lite.training.config import RecipeConfig, validate

    cfg = RecipeConfig()
    cfg.optim.lr = float("inf")
    validate(cfg)


def _optim(**values):  # docs/optimizers.md
    from nemo_lite.training.config import RecipeConfig, validate

    cfg = RecipeConfig()
    for key, value in values.items():
        setattr(cfg.optim, key, value)
    validate(cfg)


def _resume_with_another_optimizer(tmp):  # docs/optimizers.md
    from nemo_lite.testing.data import SyntheticPackedLoader
    from nemo_lite.training.trainer import Trainer

    for name, steps, resume in (("muon", 2, False), ("adamw", 4, True)):
        cfg = tiny_config(tmp / "run", "sdpa", steps=steps)
        cfg.optim.name, t = name, cfg.trainer
        t.save_every, t.val_every, t.sample_tokens, t.export_hf, t.resume = 2, 0, 0, False, resume
        Trainer(cfg, train_loader=SyntheticPackedLoader(4, 64, vocab_size=512, eos_id=0, seed=1)).fit()


def _peft(**changes):
    from nemo_lite.training.converters.lora import LoraConverter, PeftSection

    return lambda tmp: LoraConverter.check_section(PeftSection(method="lora", **changes))


def _qlora_check(**changes):
    def check(tmp):
        from nemo_lite.training.config import RecipeConfig
        from nemo_lite.training.converters.lora import LoraConverter

        cfg = RecipeConfig()
        cfg.model.pretrained_path = str(tmp)
        cfg.peft.method, cfg.peft.quantize_base = "lora", "nf4"
        for dotted, value in changes.items():
            section, key = dotted.split(".")
            setattr(getattr(cfg, section), key, value)
        LoraConverter.check_config(cfg)

    return check


def _qlora_resume_unquantized(tmp):
    from nemo_lite.training.converters.lora import LoraConverter

    record = {"r": 16, "targets": ["q_proj"], "parameters": [], "base": {"path": "/base", "sha256": "0"}}
    LoraConverter.check_record(tmp / "step_000100", record | {"quantize_base": "nf4 from bfloat16"}, record)


def _peft_none_with_an_adapter():
    from nemo_lite.training.converters.lora import LoraConverter, PeftSection

    LoraConverter.check_section(PeftSection(method="none", adapter_path="runs/finetune/adapter"))


def _lora_without_a_checkpoint(tmp):
    from nemo_lite.training.config import RecipeConfig, validate

    cfg = RecipeConfig()
    cfg.peft.method = "lora"
    validate(cfg)


def _lora_target_matching_nothing(tmp):
    from nemo_lite.components.attention import AttentionConfig
    from nemo_lite.components.models import LlamaForCausalLM, get_preset
    from nemo_lite.testing.models import family_of_model
    from nemo_lite.training.config import PeftSection
    from nemo_lite.training.converters.lora import LoraConverter

    model = LlamaForCausalLM(get_preset("tiny", num_hidden_layers=1), attention=AttentionConfig(backend="eager"))
    LoraConverter(PeftSection(method="lora", target_modules=["qkv"])).convert(model, family_of_model(model))


def _lora_on_a_tiny_moe(**changes):
    def convert(tmp):
        from nemo_lite.components.attention import AttentionConfig
        from nemo_lite.components.models import get_model_family
        from nemo_lite.components.models.families.qwen3_moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
        from nemo_lite.training.config import PeftSection
        from nemo_lite.training.converters.lora import LoraConverter

        config = Qwen3MoeConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=24,
            moe_intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
        )
        model = Qwen3MoeForCausalLM(config, attention=AttentionConfig(backend="eager"))
        LoraConverter(PeftSection(method="lora", **changes)).convert(model, get_model_family("qwen3_moe"))

    return convert


def _lora_resume_with_another_alpha(tmp):
    from nemo_lite.training.converters.lora import LoraConverter

    record = {"method": "lora", "r": 4, "alpha": 8.0, "targets": ["q_proj"], "parameters": []}
    record["base"] = {"path": "/base", "sha256": "0", "covers": "every byte"}
    LoraConverter.check_record(tmp / "run" / "checkpoints" / "step_000004", record, {**record, "alpha": 16.0})


def _lora_resume_on_a_changed_base(tmp):
    from safetensors.torch import save_file

    from nemo_lite.training.converters.lora import LoraConverter, base_fingerprint

    (tmp / "base").mkdir()
    (tmp / "base" / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2**22, dtype=torch.uint8)}, tmp / "base" / "model.safetensors")
    record = {"method": "lora", "r": 4, "alpha": 8.0, "targets": ["q_proj"], "parameters": []}
    saved = {**record, "base": base_fingerprint(tmp / "base")}
    data = bytearray((tmp / "base" / "model.safetensors").read_bytes())
    data[len(data) // 4] ^= 1  # one byte, a quarter into the file
    (tmp / "base" / "model.safetensors").write_bytes(bytes(data))
    current = {**record, "base": base_fingerprint(tmp / "base")}
    LoraConverter.check_record(tmp / "run" / "checkpoints" / "step_000004", saved, current)


def _tiny_hf_llama(path: Path, **changes) -> Path:
    import transformers

    settings = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**settings, **changes})).save_pretrained(path)
    return path


def _peft_adapter(tmp: Path) -> Path:
    """A PEFT adapter (q_proj, v_proj, r=4) on a tiny transformers Llama saved in ``tmp/base``."""
    import peft
    import transformers

    base = _tiny_hf_llama(tmp / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base), config).save_pretrained(tmp / "adapter")
    return tmp / "adapter"


def _edited_adapter(tmp: Path, edit) -> Path:
    adapter = _peft_adapter(tmp)
    config = json.loads((adapter / "adapter_config.json").read_text())
    edit(config)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


def _read_adapter(make):
    from nemo_lite.training.converters.peft_adapter import read_adapter

    return lambda tmp: read_adapter(str(make(tmp)))


def _adapter_onto(changes: dict, *, base_changes: dict | None = None):
    """Load the adapter into nemo_lite's model of another base (``base_changes``), or with other peft settings."""

    def load(tmp):
        from nemo_lite.components.attention import AttentionConfig
        from nemo_lite.components.models import AutoModelForCausalLM, family_of_checkpoint
        from nemo_lite.training.converters.lora import LoraConverter, PeftSection
        from nemo_lite.training.converters.peft_adapter import read_adapter, section_of

        adapter = read_adapter(str(_peft_adapter(tmp)))
        if "target_modules" in changes:
            adapter.config["target_modules"] = changes["target_modules"]
        section = section_of(adapter, PeftSection(method="lora", **{k: v for k, v in changes.items() if k == "r"}))
        base = _tiny_hf_llama(tmp / "other", **base_changes) if base_changes else tmp / "base"
        model = AutoModelForCausalLM.from_pretrained(base, attention=AttentionConfig(backend="sdpa"))
        LoraConverter(section, adapter=adapter, base_path=str(base)).convert(model, family_of_checkpoint(base))

    return load


def _uncached_hub_adapter(tmp):
    from unittest import mock

    import huggingface_hub

    from nemo_lite.training.converters.peft_adapter import resolve_adapter

    with mock.patch.multiple(huggingface_hub.constants, HF_HUB_OFFLINE=True, HF_HUB_CACHE=str(tmp)):
        resolve_adapter("someone/lora")


def _hub_repo_without_an_adapter(tmp):
    from unittest import mock

    import huggingface_hub

    from nemo_lite.testing.hub import cache_repo
    from nemo_lite.training.converters.peft_adapter import resolve_adapter

    (tmp / "files").mkdir()
    (tmp / "files" / "README.md").write_text("no adapter here")
    cache_repo(tmp / "hub", "someone/readme-only", tmp / "files")
    with mock.patch.multiple(huggingface_hub.constants, HF_HUB_OFFLINE=True, HF_HUB_CACHE=str(tmp / "hub")):
        resolve_adapter("someone/readme-only")


def _adapter_without_safetensors(tmp):
    adapter = _peft_adapter(tmp)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    return adapter


def _fresh_run_from_its_own_adapter(tmp):
    from nemo_lite.training.config import validate

    adapter = _peft_adapter(tmp / "run")
    cfg = tiny_config(tmp / "run")
    cfg.model.pretrained_path, cfg.peft.method, cfg.peft.adapter_path = str(tmp / "run" / "base"), "lora", str(adapter)
    validate(cfg)


def _resume_beside_an_export(tmp):
    import shutil

    _quick_trainer(tmp / "run", steps=2).fit()
    shutil.rmtree(tmp / "run" / "checkpoints")  # the exports kept, the checkpoints deleted
    (tmp / "run" / "adapter").mkdir()
    (tmp / "run" / "hf").mkdir()
    _quick_trainer(tmp / "run", steps=2, resume=True).fit()


def _tokenizer_without_a_chat_template(tmp):
    from transformers import PreTrainedTokenizerFast

    from nemo_lite.components.datasets import default_tokenizer_file
    from nemo_lite.components.datasets.chat import chat_template_of

    chat_template_of(PreTrainedTokenizerFast(tokenizer_file=str(default_tokenizer_file())))


def _message_without_role(tmp):
    from nemo_lite.components.datasets.chat import _check_messages

    _check_messages([{"role": "user", "content": "hi"}, {"text": "hello"}], "conversation 0 of chat.jsonl")


def _content_number(tmp):
    from nemo_lite.components.datasets.chat import _check_messages

    _check_messages([{"role": "user", "content": 3}], "conversation 1 of chat.jsonl")


def _image_part(tmp):
    from nemo_lite.components.datasets.chat import _check_messages

    image = {"role": "assistant", "content": [{"type": "image", "url": "x.png"}]}
    _check_messages([{"role": "user", "content": "Hi"}, image], "conversation 1 of chat.jsonl")


def _text_among_numbers(tmp):
    from nemo_lite.components.datasets import DataConfig, build_dataloader

    (tmp / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["Hello", 3]))
    build_dataloader(DataConfig(source=str(tmp / "a.jsonl"), seq_len=16, batch_size=1, validation_fraction=0.0))


def _messages_and_prompts(tmp):
    from nemo_lite.components.datasets import DataConfig

    DataConfig(messages_field="messages", prompt_field="prompt", response_field="response")


def _mixed_preference_record(tmp):
    from nemo_lite.components.datasets import DataConfig, build_encoder, build_tokenizer

    encoder = build_encoder(DataConfig(kind="preference", eos_id=1), build_tokenizer("default"),
                            description="'pairs.jsonl' (1 json file)")  # fmt: skip
    prompt = [{"role": "user", "content": "Hi"}]
    encoder.documents([("Hi", " yes", " no"), (prompt, " yes", " no")], [0, 1])


def _smollm2_not_converted(tmp: Path) -> list[str]:
    """model.pretrained_path at the directory scripts/convert_smollm2.py writes, before it ran."""
    saved = os.environ.get("NEMO_LITE_CACHE")
    os.environ["NEMO_LITE_CACHE"] = str(tmp / "cache")
    try:
        return fit_error({"model.pretrained_path": lambda tmp: str(tmp / "cache" / "smollm2-135m")})(tmp)
    finally:
        if saved is None:
            del os.environ["NEMO_LITE_CACHE"]
        else:
            os.environ["NEMO_LITE_CACHE"] = saved


def _convert_without_gguf(tmp: Path) -> list[str]:
    """scripts/convert_smollm2.py where gguf cannot be imported: its one line on stderr."""
    code = (
        "import importlib.util, runpy, sys; real = importlib.util.find_spec; "
        "importlib.util.find_spec = lambda name, *a: None if name == 'gguf' else real(name, *a); "
        f"sys.argv = ['convert_smollm2.py', '--out', {str(tmp / 'out')!r}]; "
        f"runpy.run_path({str(REPO / 'scripts' / 'convert_smollm2.py')!r}, run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr
    return [proc.stderr.strip().removeprefix("error: ")]


def _encode_with(template: Callable[[str], str]) -> Callable[[Path], object]:
    """A multi-turn conversation encoded with ``template(Qwen3's stock template)``."""

    def encode(tmp: Path) -> object:
        from nemo_lite.components.datasets.chat import ChatEncoder, chat_delimiter_id
        from nemo_lite.testing.chat_templates import QWEN3_STOCK_TEMPLATE, qwen_style_tokenizer

        tokenizer, text = qwen_style_tokenizer(), template(QWEN3_STOCK_TEMPLATE)
        delimiter = chat_delimiter_id(tokenizer, text)
        encoder = ChatEncoder(
            tokenizer, "messages", template=text, delimiter_id=delimiter, max_tokens=512, description="x"
        )
        return encoder.encode(_MULTI_TURN, 0)

    return encode


_MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "5."},
    {"role": "user", "content": "And 4 plus 4?"},
    {"role": "assistant", "content": "8."},
]


def _unknown_chat_template(tmp: Path) -> None:
    from nemo_lite.components.datasets.chat import chat_template_of

    chat_template_of(None, "qwen9")


CASES: dict[str, Callable[[Path], list[str]]] = {
    "packs both answers after one prompt": fit_error({"data.kind": "preference", "data.shared_prompt": True}),
    "cannot express attn_mask_type=shared_prompt": call_error(
        lambda tmp: _build("varlen", attn_mask_type="shared_prompt")
    ),
    "holds str but 'prompt' holds a conversation": call_error(_mixed_preference_record),
    "field 'content' holds int (3); content must be": call_error(_content_number),
    "can be trained on as text": call_error(_image_part),
    "holds text in some records and other values": call_error(_text_among_numbers),
    # the README: a recipe run outside the quickstart's environment
    "No module named 'nemo_lite'": without_the_project,
    # docs/finetuning.md
    "must be an integer > 0 (the adapters' rank)": call_error(_peft(r=0)),
    "all-linear already names every linear": call_error(_peft(target_modules=["all-linear", "q_proj"])),
    "peft=lora adapts a pretrained model": call_error(_lora_without_a_checkpoint),
    "peft.quantize_base='int4' is not valid": call_error(_peft(quantize_base="int4")),
    "quantizes the frozen base under LoRA adapters": call_error(_qlora_check(**{"peft.method": "none"})),
    "float8 casts high-precision weights": call_error(_qlora_check(**{"float8.enabled": True})),
    "only linears are quantized": call_error(_qlora_check(**{"peft.target_parameters": ["down_proj"]})),
    "PEFT's DoRA reads the base weight itself": call_error(_qlora_check(**{"peft.use_dora": True})),
    "has adapters trained on the base quantized as": call_error(_qlora_resume_unquantized),
    "match(es) no module of this model": call_error(_lora_target_matching_nothing),
    "are stacked weights, not linears: name them in": call_error(_lora_on_a_tiny_moe(target_modules=["gate_up_proj"])),
    "match(es) no stacked weight of this model": call_error(_lora_on_a_tiny_moe(target_parameters=["w1"])),
    "has adapters with peft alpha=8.0": call_error(_lora_resume_with_another_alpha),
    "is a different checkpoint (fingerprint differs)": call_error(_lora_resume_on_a_changed_base),
    "PEFT's LoRA on stacked weights has no dropout": call_error(_peft(dropout=0.1, target_parameters=["down_proj"])),
    "must be true or false": call_error(_peft(use_dora="yes")),
    "PEFT has no DoRA for stacked expert weights": call_error(_peft(use_dora=True, target_parameters=["down_proj"])),
    "trains a LoRA adapter on, but peft.method is none": call_error(lambda tmp: _peft_none_with_an_adapter()),
    "is not a PEFT adapter directory (no adapter_config.json)": call_error(_read_adapter(lambda tmp: tmp / "nowhere")),
    "someone/lora is not in the Hugging Face cache": call_error(_uncached_hub_adapter),
    "has no adapter_config.json: it is not a PEFT adapter": call_error(_hub_repo_without_an_adapter),
    "adapter_config.json is not a LoRA config": call_error(
        _read_adapter(lambda tmp: _edited_adapter(tmp, lambda c: c.pop("r")))
    ),
    "only safetensors are read, never a pickle adapter_model.bin": call_error(
        _read_adapter(_adapter_without_safetensors)
    ),
    "only LoRA adapters (peft_type LORA) train here": call_error(
        _read_adapter(lambda tmp: _edited_adapter(tmp, lambda c: c.update(peft_type="IA3")))
    ),
    "which nemo_lite's LoRA does not train": call_error(
        _read_adapter(lambda tmp: _edited_adapter(tmp, lambda c: c.update(modules_to_save=["lm_head"])))
    ),
    "peft.r=8 disagrees with the adapter": call_error(_adapter_onto({"r": 8})),
    "which the base model.pretrained_path=": call_error(_adapter_onto({"target_modules": ["q_proj", "qkv_proj"]})),
    "in the adapter and [4, 16] on this base": call_error(_adapter_onto({}, base_changes={"hidden_size": 16})),
    "tensor(s) this base has no place for": call_error(_adapter_onto({}, base_changes={"num_hidden_layers": 1})),
    "tensor(s) that its settings put on this base": call_error(
        _adapter_onto({}, base_changes={"num_hidden_layers": 3})
    ),
    "is the earlier run's adapter in run_dir": call_error(_fresh_run_from_its_own_adapter),
    "but no checkpoint, so trainer.resume=true has nothing to resume": call_error(_resume_beside_an_export),
    "has no chat template, so conversations": call_error(_tokenizer_without_a_chat_template),
    "each message needs a string 'role'": call_error(_message_without_role),
    "are two kinds of fine-tuning data": call_error(_messages_and_prompts),
    "pass data.chat_template=qwen3 (the same template": call_error(_encode_with(lambda stock: stock)),
    "in a copy of the template and pass it as data.chat_template=FILE": call_error(
        _encode_with(lambda stock: "{{ messages | length }}\n" + stock)
    ),
    "nor a template nemo_lite ships": call_error(_unknown_chat_template),
    "trainer.export_dtype='fp8' is not valid": fit_error({"trainer.export_dtype": "fp8"}),
    # the command line (docs/reliability.md, docs/recipes.md)
    "unknown config key 'trainer.max_step'": cli("trainer.max_step=5"),
    "attention=flash9 is not one of the attention configs": cli("attention=flash9"),
    "attention='flash9' is not valid": cli("attention.backend=flash9"),
    "trainer.max_steps='many' is not valid": cli("trainer.max_steps=many"),
    # attention backends (docs/attention.md)
    "unknown attention backend 'flash9'": call_error(lambda tmp: _build("flash9")),
    "attention=flex has no option 'host_sync'": call_error(lambda tmp: _build("flex", options={"host_sync": True})),
    "attention=sdpa has no option 'kernel_options'": call_error(
        lambda tmp: _build("sdpa", options={"kernel_options": "auto"})
    ),
    "attention=flex option kernel_options='fast'": call_error(
        lambda tmp: _build("flex", options={"kernel_options": "fast"})
    ),
    "attention=varlen option host_sync='no'": call_error(lambda tmp: _build("varlen", options={"host_sync": "no"})),
    "attention=flex on GPU needs data.seq_len": call_error(
        lambda tmp: _build("flex").check_run(seq_len=1000, device_type="cuda", options={})
    ),
    "attn_mask_type='sliding' is not supported": call_error(lambda tmp: _build("sdpa", attn_mask_type="sliding")),
    "attention_mask is for batch_size=2, q has 1": call_error(_mask_of_another_batch),
    "the mask stored by FlexAttention.init_attention_mask": call_error(_seed_mask_of_another_batch),
    "attention=mine has no option 'temp'": call_error(_a_backend_of_your_own),
    # the training step (docs/step.md)
    "so their gradient hooks would never run": call_error(_fast_step_with_a_gradient_hook),
    # data (docs/reliability.md, docs/data.md)
    "nowhere.jsonl' does not exist": fit_error({"data.source": lambda tmp: str(tmp / "nowhere.jsonl")}),
    "the files are empty": fit_error({"data.source": _jsonl("empty.jsonl", [])}),
    "all 5 documents are empty": fit_error({"data.source": _jsonl("blank.jsonl", [{"text": ""}] * 5)}),
    "field 'text' is not in": fit_error({"data.source": _jsonl("a.jsonl", [{"body": "some text"}])}),
    "field 'id' of": fit_error(
        {"data.source": _jsonl("ids.jsonl", [{"id": i, "text": "x"} for i in range(5)]), "data.text_field": "id"}
    ),
    "has no EOS token and DataConfig.eos_id is not set": fit_error({"data.tokenizer": _no_eos_tokenizer}),
    "model.pad_embedding_gradient=false needs a pad_token_id": fit_error(
        {"model.pad_embedding_gradient": False, "model.overrides": {"pad_token_id": None}}
    ),
    "so no row is the pad token's": fit_error(
        {"model.pad_embedding_gradient": False, "model.overrides": {"pad_token_id": 100000}}
    ),
    "eos_id=1000000 is outside the vocabulary": fit_error({"data.eos_id": 10**6}),
    "unknown record kind DataConfig.kind='pairs'": fit_error({"data.kind": "pairs"}),
    "data.tokenizer=model needs model.pretrained_path": call_error(_tokenizer_model_without_a_checkpoint),
    # checkpoints (docs/reliability.md, docs/models.md)
    "missing tensors: model.layers.1.mlp.up_proj.weight": fit_error(
        {"model.pretrained_path": lambda tmp: str(_tiny_checkpoint(tmp, _missing_tensor))}
    ),
    "unexpected tensors: model.extra.weight": fit_error(
        {"model.pretrained_path": lambda tmp: str(_tiny_checkpoint(tmp, _extra_and_misshaped))}
    ),
    "unexpected tensors: extra.weight": call_error(_load_models_md_example),
    "model_type='gpt2' is not supported": fit_error(
        {
            "model.pretrained_path": lambda tmp: str(
                _tiny_checkpoint(tmp, config_edit=lambda c: c.update(model_type="gpt2"))
            )
        }
    ),
    "holds no Hugging Face checkpoint (no config.json) and is not a hub id (org/name or org/name@revision). Give": (
        fit_error({"model.pretrained_path": lambda tmp: str(tmp / "none")})
    ),
    "Create it with: python scripts/convert_smollm2.py": _smollm2_not_converted,
    "converting SmolLM2-135M needs gguf": _convert_without_gguf,
    "trainer.resume='/nonexistent/run': no checkpoint there": call_error(_resume_nowhere),
    "model.overrides has unknown field(s) ['num_layers']": fit_error({"model.overrides": {"num_layers": 2}}),
    # run directory, checkpoints and weights (docs/reliability.md)
    "is in use by another run": call_error(_run_dir_in_use),
    "already holds checkpoints of an earlier run": call_error(_fresh_run_over_checkpoints),
    "is a file, not a directory": call_error(_run_dir_is_a_file),
    "DataConfig.batch_size must be an int >= 1, got 0": lambda tmp: [_preflight(tmp / "run", "data.batch_size=0")],
    "is a file; choose another run_dir": lambda tmp: [_preflight(_touch(tmp / "f") / "run")],
    "which does not exist: create its target": lambda tmp: [_preflight(_dangling_link(tmp))],
    "Interpolation key 'x' not found": lambda tmp: [_preflight("runs/${x}")],
    "for one step's batches and": fit_error({"data.seq_len": 1_000_000_000}),
    "is not writable (Read-only file system)": call_error(_read_only_run_dir),
    "the checkpoints need about": call_error(_small_disk),
    "its checkpoints hold, and at least one checkpoint": call_error(_small_disk_on_resume),
    "whose training state needs about": fit_error({"model.overrides": {"num_hidden_layers": 5_000_000}}),
    "the model's vocabulary has 256": fit_error({"model.overrides": {"vocab_size": 256}}),
    "optim.lr=inf must be a finite number": call_error(_lr_inf),
    # optimizers (docs/optimizers.md)
    "optim.name='sgd' is not valid": call_error(lambda tmp: _optim(name="sgd")),
    "optim.options.beta is not an option of optim=muon": call_error(
        lambda tmp: _optim(name="muon", options={"beta": 1})
    ),
    "holds optim=muon's state but this run has optim=adamw": call_error(_resume_with_another_optimizer),
    "the update left NaN or Inf in the weights": call_error(_poisoned_update),
    "the partial checkpoint was removed": call_error(_disk_full_during_a_save),
    "failed; free some space or choose another run_dir": call_error(_disk_full_elsewhere),
    "which a fresh run there moves aside": call_error(_fresh_run_from_its_own_export),
    "its export is missing or incomplete: exporting it now": _finished_run_without_its_export,
    "had other settings (optim.lr 0.003 -> 0.0005": _resume_with_another_lr,
    "during the export, which was stopped without leaving temporary files": _sigterm_during_the_export,
    "hf/model.safetensors failed": call_error(_disk_full_during_the_export),
    "resuming from the one before it": _damaged_newest_checkpoint,
    "no usable checkpoint in": call_error(_no_usable_checkpoint),
    "it was saved by a run of another shape": call_error(_resume_with_another_shape),
    "distcp does not match its checksum": call_error(_damaged_shard),
    "which is not part of DCP checkpoint metadata": call_error(_tampered_metadata),
    "its shards do not fit this model": call_error(_sharded_of_another_model),
    "is not a readable safetensors file": call_error(_truncated_safetensors),
    "holds a JSON list, not an object": call_error(_config_json_list),
    "names shard files outside its directory": call_error(_index_outside),
    "is not a branch, a tag or a commit hash": call_error(_revision_outside_the_cache),
    "rms_norm_eps='1e-5' must be a number": call_error(
        lambda tmp: _load_models_md_example_config(tmp, rms_norm_eps="1e-5")
    ),
    "lm_head.weight differs from model.embed_tokens.weight": call_error(_tied_with_a_distinct_lm_head),
    "trainer.dp_replicate=3 must divide the number of ranks, 8": call_error(_dp_replicate_not_dividing),
}


def needle_of(text: str, where: str) -> str | None:
    """The one needle of CASES in ``text`` (None: no case)."""
    found = [needle for needle in CASES if needle in text]
    assert len(found) <= 1, f"{where}: {text!r} holds the needles {found}: make them more specific"
    return found[0] if found else None


QUOTES = collect_quotes()


@pytest.fixture(scope="module")
def messages(tmp_path_factory):
    """needle -> the messages its case produces (each case runs once)."""
    produced: dict[str, list[str]] = {}

    def get(needle: str) -> list[str]:
        if needle not in produced:
            produced[needle] = CASES[needle](tmp_path_factory.mktemp("case"))
        return produced[needle]

    return get


def test_the_docs_quote_error_messages_and_every_case_is_quoted():
    docs_with_quotes = {quote.where.split(":")[0] for quote in QUOTES}
    assert {"docs/recipes.md", "docs/attention.md", "docs/reliability.md", "docs/data.md"} <= docs_with_quotes
    quoted = {needle_of(quote.text, quote.where) for quote in QUOTES if quote.command is None}
    assert not set(CASES) - quoted, f"cases no doc quotes any more (remove them): {sorted(set(CASES) - quoted)}"


@pytest.mark.parametrize("quote", [q for q in QUOTES if q.command is None], ids=lambda q: q.where)
def test_a_quoted_message_is_what_the_program_prints(quote, messages):
    needle = needle_of(quote.text, quote.where)
    assert needle is not None, (
        f"{quote.where} quotes {quote.text!r}, which no case of tests/test_docs_errors.py produces: add one to CASES"
    )
    got = messages(needle)
    assert any(matches(quote.text, message) for message in got), (
        f"{quote.where} quotes\n  {quote.text}\nbut the program prints\n  " + "\n  ".join(got[:2])
    )


@pytest.mark.parametrize("quote", [q for q in QUOTES if q.command is not None], ids=lambda q: q.where)
def test_a_quoted_command_prints_the_quoted_line_and_exits_2(quote):
    words = shlex.split(quote.command)
    assert words[0] == "python" and words[1].startswith("recipes/"), f"{quote.where}: cannot run {quote.command!r}"
    recipe = Path(words[1]).stem
    returncode, lines = recipe_stderr(recipe, *words[2:])
    assert any(matches(quote.text, line) for line in lines), (
        f"{quote.where}: `{quote.command}` prints\n  " + "\n  ".join(lines[-3:]) + f"\nnot\n  {quote.text}"
    )
    if quote.text.startswith("error: "):  # what the docs promise for a bad command line
        assert returncode == 2, f"{quote.where}: `{quote.command}` exited {returncode}"
        assert len([line for line in lines if line.startswith("error: ")]) == 1
        assert not any(line.startswith("Traceback") for line in lines)


def test_matching_rules():
    message = "ValueError: no documents in '/tmp/x/empty.jsonl' (1 json file): the files are empty"
    assert matches("ValueError: no documents in '…/empty.jsonl' (1 json file): the files are empty", message)
    assert matches("no documents in '…/empty.jsonl' (1 json file): the files are empty", message.split(": ", 1)[1])
    assert matches("ValueError: no documents in …", message)
    assert matches("… the files are empty", message)
    assert not matches("no documents in '…/empty.jsonl' (1 json file)", message)  # the end is missing
    assert not matches("no documents in '…/empty.jsonl' (2 json files): the files are empty", message)
