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


def package_imports() -> dict[str, set[str]]:
    """module -> the package modules it imports, at any level (lazy imports count)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nemo_lite"):
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def test_no_import_cycle_in_the_package():
    """A package importing its own submodules (re-exports) is not a cycle; anything else is."""
    graph = package_imports()

    def edges(module: str) -> set[str]:
        return {t for t in graph[module] if not t.startswith(module + ".") and not module.startswith(t + ".")}

    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, f"import cycle: {' -> '.join([*path, module])}"
        if module not in done:
            for dep in edges(module):
                visit(dep, [*path, module])
            done.add(module)

    for module in graph:
        visit(module, [])


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
    assert {m for m in importers if not m.startswith("nemo_lite.training.fast")} == {"nemo_lite.training.step"}


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
    assert calls == ["blocks", "flops"]
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_a_family_cannot_take_another_familys_preset():
    from nemo_lite.components.models import HFFacts, ModelFamily, get_model_family, register_model_family

    llama = get_model_family("llama")
    fields = {f: getattr(llama, f) for f in llama.__dataclass_fields__}
    clash = ModelFamily(**{**fields, "name": "clash", "hf": HFFacts(model_types=("clash",), architecture="X")})
    with pytest.raises(ValueError, match=r"preset\(s\) .*'tiny'.* already belong to 'llama'"):
        register_model_family(clash)
