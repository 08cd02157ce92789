"""DataConfig is the one data schema: the loader's argument and the recipes' ``data:`` group.

Every field can be set from YAML and the command line, the shipped data groups compose to the values
the recipes have always had, ``resolve_data_config`` turns recipe values into loader values, and the
package's modules import each other without a cycle.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from nemo_lite.components.datasets import DataConfig, build_tokenizer, resolve_data_config

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "nemo_lite.components.datasets"

# The data values of configs/pretrain.yaml (data: default), written out: these are the recipe's
# values from before DataConfig became its schema, plus the DataConfig-only keys at their defaults.
PRETRAIN_DATA = {
    "source": "default",
    "data_format": None,
    "kind": None,
    "text_field": "text",
    "prompt_field": None,
    "response_field": None,
    "mask_prompt_labels": True,
    "messages_field": None,
    "chosen_field": "chosen",
    "rejected_field": "rejected",
    "shared_prompt": False,
    "chat_template": None,
    "text_sample_by": "line",
    "hub_config": None,
    "train_split": "train",
    "validation_split": "validation",
    "validation_source": None,
    "validation_fraction": 0.02,
    "streaming": False,
    "shuffle_buffer": 10_000,
    "tokenizer": "default",
    "eos_id": None,
    "parse_special_tokens": False,
    "num_proc": None,
    "cache_dir": None,
    "seq_len": 256,
    "batch_size": 8,
    "position_ids": True,
    "mask_cross_document_labels": False,
    "shuffle": True,
    "seed": 0,
    "num_epochs": None,
    "prefetch": 2,
    "pin_memory": None,
}
# configs/finetune.yaml (data: finetune_text).
FINETUNE_DATA = PRETRAIN_DATA | {
    "tokenizer": "model",
    "seq_len": 512,
    "batch_size": 2,
    "mask_cross_document_labels": True,
}

# A value other than the default for every field, as YAML text.
EVERY_FIELD_YAML = """
source: [a.jsonl, "b/*.jsonl"]
data_format: json
text_field: body
prompt_field: question
response_field: answer
mask_prompt_labels: false
chosen_field: better
rejected_field: worse
shared_prompt: true
text_sample_by: paragraph
hub_config: en
train_split: train[:90%]
validation_split: test
validation_source: val.jsonl
validation_fraction: 0.0
streaming: true
shuffle_buffer: 500
tokenizer: some/tokenizer
eos_id: 2
parse_special_tokens: true
num_proc: 3
cache_dir: /tmp/hf
seq_len: 1024
batch_size: 4
position_ids: false
mask_cross_document_labels: true
shuffle: false
seed: 7
num_epochs: 2
prefetch: 0
pin_memory: true
"""


def test_the_defaults_are_the_recipe_defaults():
    assert dataclasses.asdict(DataConfig()) == PRETRAIN_DATA


# Conversations exclude prompt/response pairs: their keys are set on their own.
CHAT_FIELDS_YAML = """
kind: chat
messages_field: conversation
chat_template: template.jinja
"""


def test_every_field_is_settable_from_yaml():
    values = OmegaConf.to_container(OmegaConf.create(EVERY_FIELD_YAML))
    chat = OmegaConf.to_container(OmegaConf.create(CHAT_FIELDS_YAML))
    assert set(values) | set(chat) == {f.name for f in dataclasses.fields(DataConfig)}, "give every field a value"
    assert all((values | chat)[k] != v for k, v in PRETRAIN_DATA.items())
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.create(CHAT_FIELDS_YAML))
    assert {k: getattr(OmegaConf.to_object(merged), k) for k in chat} == chat
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.create(EVERY_FIELD_YAML))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, DataConfig) and dataclasses.asdict(cfg) == values | dict.fromkeys(chat)
    assert type(cfg.source) is list  # a plain list, not an OmegaConf ListConfig


def test_the_schema_checks_types_and_keys():
    schema = OmegaConf.structured(DataConfig)
    with pytest.raises(ValidationError):
        OmegaConf.merge(schema, {"seq_len": "long"})
    with pytest.raises(ConfigKeyError, match="shuffle_buffers"):
        OmegaConf.merge(schema, {"shuffle_buffers": 5})
    with pytest.raises(ValueError, match="DataConfig.source must be a string or a list"):
        OmegaConf.to_object(OmegaConf.merge(schema, {"source": 5}))
    with pytest.raises(ValueError, match="DataConfig.validation_source must be a string or a list"):
        DataConfig(validation_source=["a.jsonl", ""])
    with pytest.raises(ValueError, match="DataConfig.source is an empty list"):
        DataConfig(source=[])
    with pytest.raises(ValueError, match="both choose validation data; set validation_fraction=0"):
        DataConfig(validation_source="val.jsonl")  # the default validation_fraction is 0.02


@pytest.mark.parametrize("group,expected", [("default", PRETRAIN_DATA), ("finetune_text", FINETUNE_DATA)])
def test_shipped_data_groups_compose_on_the_schema(group, expected):
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(REPO / "configs/data" / f"{group}.yaml"))
    assert dataclasses.asdict(OmegaConf.to_object(merged)) == expected


def test_every_shipped_data_group_loads():
    for path in sorted((REPO / "configs/data").glob("*.yaml")):
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(path)))


def _compose(recipe: str, overrides: list[str] | None = None):
    pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir

    from nemo_lite.training.config import register_schema

    register_schema()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name=recipe, overrides=overrides or []))


@pytest.mark.parametrize("recipe,expected", [("pretrain", PRETRAIN_DATA), ("finetune", FINETUNE_DATA)])
def test_recipes_compose_to_the_same_data_values(recipe, expected):
    data = _compose(recipe).data
    assert isinstance(data, DataConfig), "RecipeConfig.data must be DataConfig, the one data schema"
    assert dataclasses.asdict(data) == expected


def test_command_line_sets_any_key_and_lists_of_sources():
    overrides = ["data.source='a.jsonl,b.jsonl'", "data.shuffle_buffer=5", "data.pin_memory=false"]
    data = _compose("pretrain", overrides).data
    assert (data.shuffle_buffer, data.pin_memory) == (5, False)
    assert resolve_data_config(data, pretrained_path=None, pin_memory=True).source == ["a.jsonl", "b.jsonl"]
    assert _compose("pretrain", ["data.source=[a.jsonl,b.jsonl]"]).data.source == ["a.jsonl", "b.jsonl"]


# -- resolve_data_config ----------------------------------------------------------------------
def test_resolve_fills_in_the_recipe_values(tmp_path):
    cfg = DataConfig(
        tokenizer="model", source="a.jsonl, b.jsonl,", validation_source="v1.txt,v2.txt", validation_fraction=0
    )
    out = resolve_data_config(cfg, pretrained_path=str(tmp_path), pin_memory=True)
    assert out.tokenizer == str(tmp_path) and out.pin_memory is True
    assert out.source == ["a.jsonl", "b.jsonl"] and out.validation_source == ["v1.txt", "v2.txt"]
    assert cfg.tokenizer == "model" and cfg.source == "a.jsonl, b.jsonl," and cfg.pin_memory is None  # a new one


def test_resolve_keeps_what_needs_no_resolving():
    cfg = DataConfig(source=["x,1.jsonl"], tokenizer="default", pin_memory=False)
    out = resolve_data_config(cfg, pretrained_path="/ckpt", pin_memory=True)
    assert out == cfg  # lists are kept as given, an explicit pin_memory wins, the tokenizer stays
    assert resolve_data_config(DataConfig(), pretrained_path=None, pin_memory=False) == DataConfig(pin_memory=False)


def test_resolve_model_tokenizer_needs_a_pretrained_path():
    with pytest.raises(ValueError) as err:
        resolve_data_config(DataConfig(tokenizer="model"), pretrained_path=None, pin_memory=False)
    assert str(err.value) == "data.tokenizer=model needs model.pretrained_path (a directory with a tokenizer)"
    with pytest.raises(ValueError, match="resolve_data_config"):
        build_tokenizer(DataConfig(tokenizer="model"))


# -- module structure -------------------------------------------------------------------------
def _package_imports() -> dict[str, list[tuple[str, bool]]]:
    """module -> [(imported package module, at module level)] for the package's own modules."""
    graph = {}
    for path in sorted((REPO / "nemo_lite/components/datasets").glob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE + "."):
                edges.append((node.module.removeprefix(PACKAGE + "."), id(node) in top))
        graph[path.stem] = edges
    return graph


def test_package_modules_import_each_other_at_the_top_without_a_cycle():
    graph = _package_imports()
    lazy = {m: [n for n, top in edges if not top] for m, edges in graph.items()}
    assert not any(lazy.values()), f"function-level or TYPE_CHECKING imports of package modules: {lazy}"
    deps = {m: {n for n, _ in edges} for m, edges in graph.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, f"import cycle: {' -> '.join([*path, module])}"
        if module not in done:
            for dep in deps.get(module, ()):
                visit(dep, [*path, module])
            done.add(module)

    for module in deps:
        visit(module, [])
