"""docs/recipes.md's tables are the configs as they are: every config group and its choices, every trainer key
and its default."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from nemo_lite.training.config import TrainerSection

REPO = Path(__file__).resolve().parents[1]
RECIPES_MD = (REPO / "docs" / "recipes.md").read_text()


def table(header: str) -> list[list[str]]:
    """The rows (cells stripped) of the markdown table whose header line is ``header``."""
    lines = RECIPES_MD.split(header + "\n", 1)[1].splitlines()[1:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_the_groups_table_lists_every_group_and_choice():
    groups = {row[0].strip("`"): set(names(row[1])) for row in table("| group | choices | what it sets |")}
    on_disk = {d.name: {f.stem for f in d.glob("*.yaml")} for d in (REPO / "configs").iterdir() if d.is_dir()}
    assert groups == on_disk


def _as_written(value: object) -> str:
    """A default as the table writes it: true/false, null, names bare, text (a prompt) in quotes."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return f'"{value}"' if isinstance(value, str) and value != value.lower() else str(value)


def test_the_trainer_table_lists_every_key_with_its_default():
    documented = {}
    for row in table("| key | default | meaning |"):
        keys = names(row[0])
        defaults = [row[1].split(" (")[0]] if len(keys) == 1 else row[1].split(", ")
        assert len(defaults) == len(keys), row
        documented.update(zip(keys, defaults, strict=True))
    fields = {
        f.name: _as_written(f.default if f.default_factory is dataclasses.MISSING else f.default_factory())
        for f in dataclasses.fields(TrainerSection)
    }
    assert documented == fields


def test_every_script_is_named_in_the_docs():
    """A user finds each script by reading the docs (helpers that scripts import say so in their docstring)."""
    docs = "".join(p.read_text() for p in [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"])
    helpers = {"bench_utils.py"}  # imported by the bench_*.py scripts, not run
    unnamed = [p.name for p in sorted((REPO / "scripts").iterdir()) if p.is_file() and p.name not in helpers]
    assert [name for name in unnamed if f"scripts/{name}" not in docs] == []


def test_no_snippet_hands_a_tilde_path_to_transformers():
    """transformers and PEFT take "~/..." literally (a hub id that does not exist), unlike nemo_lite's own
    from_pretrained: a snippet that loads with them expands it first."""
    found = []
    for doc in [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]:
        for block in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S):
            uses_them = re.search(r"^(from|import) (transformers|peft)\b", block, flags=re.M)
            if uses_them and re.search(r"from_pretrained\(\s*[\"']~", block):
                found.append(doc.name)
    assert found == []
