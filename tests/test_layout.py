"""The shape of the code that the design relies on: no import cycle in the package, model files without
speed hooks, attention names compared only inside the attention package, a training step on one screen,
and a model family added without touching ``nemo_lite/training``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "nemo_lite"


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The module an ``ImportFrom`` names, relative imports resolved."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    base = parts[: len(parts) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def package_imports() -> dict[str, set[str]]:
    """module -> the package modules it imports, as a reader follows them: at any level (lazy imports count),
    ``from pkg import sub`` to the submodule, ``from pkg import name`` to the module whose name ``pkg``'s
    ``__init__`` re-exports (else to ``pkg`` itself), and a package's imports of its own submodules included."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    trees = {m: ast.parse(p.read_text()) for m, p in paths.items()}

    def source_of(package: str, name: str) -> str:
        if paths[package].name != "__init__.py":
            return package
        for node in ast.walk(trees[package]):
            if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
                target = _absolute(package, node, is_package=True)
                if target in paths:
                    return target
        return package

    graph: dict[str, set[str]] = {m: set() for m in paths}
    for name, tree in trees.items():
        is_package = paths[name].name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _absolute(name, node, is_package)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found = sub if sub in paths else source_of(target, alias.name) if target in paths else None
                    if found and found != name:
                        graph[name].add(found)
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in paths and a.name != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycle_in_the_package():
    """Counted as a reader follows imports: lazy ones and a package's own submodules included."""
    assert import_cycles(package_imports()) == []


def test_the_cycle_count_sees_lazy_and_package_edges():
    graph = {"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p"}, "q": set()}  # p's __init__ imports a, b imports p
    assert import_cycles(graph) == [["p", "p.a", "p.b"]]


def test_model_files_hold_no_optimizer_or_kernel_hook():
    hooks = re.compile(r"weight_copy|embedding_lookup|output_projection_weight|triton|lookup_gradient|optimizer")
    found = [
        f"{p.relative_to(REPO)}:{i}"
        for p in (PACKAGE / "components" / "models").rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if hooks.search(line)
    ]
    assert not found, found


def test_only_the_attention_package_compares_backend_names():
    compare = re.compile(r"(==|!=|\bin\b)\s*[\(\[{]?\s*['\"](flex|sdpa|eager|varlen)['\"]")
    found = [
        f"{p.relative_to(REPO)}:{i}"
        for p in PACKAGE.rglob("*.py")
        if "attention" not in p.relative_to(PACKAGE).parts
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if compare.search(line)
    ]
    assert not found, found


def test_only_the_fast_package_knows_the_speed_parts():
    """Outside nemo_lite/training/fast, only the step resolver imports it, and nothing names its parts."""
    graph = package_imports()
    importers = {m for m, deps in graph.items() for d in deps if d.startswith("nemo_lite.training.fast")}
    assert {m for m in importers if not m.startswith("nemo_lite.training.fast")} == {"nemo_lite.training.step_choice"}


def test_the_training_step_reads_on_one_screen():
    tree = ast.parse((PACKAGE / "training" / "trainer.py").read_text())
    (step,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "train_step"]
    assert step.end_lineno - step.lineno + 1 <= 50


def test_a_second_model_family_trains_without_touching_training(tmp_path):
    """A family registered from outside (a Llama with another class name and its own preset) goes through
    the trainer by its entry: build, FLOPs, blocks and compile units come from the entry."""
    from recipe_utils import tiny_config

    from nemo_lite.components.models import (
        HFFacts,
        LlamaForCausalLM,
        ModelFamily,
        get_model_family,
        register_model_family,
        unregister_model_family,
    )
    from nemo_lite.training.trainer import Trainer

    class OtherLM(LlamaForCausalLM):
        pass

    llama = get_model_family("llama")
    calls = []

    def flops_per_token(model: nn.Module) -> int:
        calls.append("flops")
        return llama.flops_per_token(model)

    family = ModelFamily(
        name="other",
        model_cls=OtherLM,
        config_cls=llama.config_cls,
        presets={"other-tiny": llama.preset("tiny", num_hidden_layers=1)},
        hf=HFFacts(model_types=("other",), architecture="LlamaForCausalLM"),
        load_pretrained=OtherLM.from_pretrained,
        blocks=lambda model: calls.append("blocks") or list(model.layers),
        compile_units=llama.compile_units,
        shard=llama.shard,
        num_parameters=llama.num_parameters,
        flops_per_token=flops_per_token,
        attention_flops=llama.attention_flops,
    )
    register_model_family(family)
    try:
        cfg = tiny_config(tmp_path, "sdpa", steps=2)
        cfg.model.preset = "other-tiny"
        cfg.trainer.activation_checkpointing = True
        cfg.trainer.sample_tokens, cfg.trainer.export_hf = 0, False
        trainer = Trainer(cfg)
        result = trainer.fit()
    finally:
        unregister_model_family("other")
    assert type(trainer.raw_model) is OtherLM and trainer.family is family
    assert len(trainer.raw_model.layers) == 1 and result.steps == 2
    assert calls == ["blocks", "flops", "blocks"]  # activation checkpointing, MFU, the optimizer's blocks
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_a_family_cannot_take_another_familys_preset():
    from nemo_lite.components.models import HFFacts, ModelFamily, get_model_family, register_model_family

    llama = get_model_family("llama")
    fields = {f: getattr(llama, f) for f in llama.__dataclass_fields__}
    clash = ModelFamily(**{**fields, "name": "clash", "hf": HFFacts(model_types=("clash",), architecture="X")})
    with pytest.raises(ValueError, match=r"preset\(s\) .*'tiny'.* already belong to 'llama'"):
        register_model_family(clash)


# A clock read (time.time/monotonic/perf_counter) or a sleep of a second or more: a test that measures the
# machine, or a helper process whose lifetime is a budget (one that lives until killed serves instead).
_WALL_CLOCK = re.compile(r"\btime\.(time|monotonic|perf_counter)\(|\bsleep\(\s*(?:[1-9]|0\.[5-9])")


def test_no_test_depends_on_wall_clock_time():
    """A timed unit test is not a benchmark: under load it fails without a bug. Benchmarks live in scripts/."""
    offenders = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sorted((REPO / "tests").glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _WALL_CLOCK.search(line)
    ]
    assert not offenders, "\n".join(offenders)
