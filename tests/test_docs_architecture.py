"""docs/architecture.md stays true to the repository: every file, folder and module it names exists, and its
picture (drawn from the code by scripts/plot_architecture.py) shows the package as it is now."""

from __future__ import annotations

import importlib.util
import re
import struct
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "architecture.md"
PICTURE = REPO / "docs" / "img" / "architecture.png"
_spec = importlib.util.spec_from_file_location("plot_architecture", REPO / "scripts" / "plot_architecture.py")
plot_architecture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_architecture)

# Names the page gives to what a run writes, not to files of the repository.
RUN_OUTPUTS = {"adapter/"}
PATH = re.compile(r"^[\w.-]+(?:/[\w.-]+)*(?:/|\.(?:py|md|yaml|png|sh))$")
MODULE = re.compile(r"^nemo_lite(?:\.\w+)+$")
# Where a folder or file named without its full path may live.
ROOTS = [REPO, REPO / "nemo_lite", REPO / "nemo_lite" / "components", REPO / "configs"]


def _spans(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


def named_paths(text: str) -> list[tuple[str, list[Path]]]:
    """(name, folders it may be relative to) for each path-like code span and Markdown link of ``text``. In a
    table row, a bare file name is relative to the folders the row's first cell names."""
    found = []
    for line in text.splitlines():
        context: list[Path] = []
        if line.startswith("|"):
            first = line.split("|")[1]
            for span in _spans(first):
                target = REPO / span
                context.append(target if span.endswith("/") else target.parent)
        for span in _spans(line):
            for word in re.split(r"[\s,()]+", span):
                if PATH.match(word) and word not in RUN_OUTPUTS:
                    found.append((word, context))
                elif MODULE.match(word):
                    found.append((word, []))
        for link in re.findall(r"\]\(([^)#\s]+)", line):
            if "://" not in link:
                found.append((f"docs/{link}", []))
    return found


def exists(name: str, context: list[Path]) -> bool:
    if MODULE.match(name):
        base = REPO.joinpath(*name.split("."))
        return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
    if "/" not in name.rstrip("/") and name.endswith(".py") and not context:
        return any(p.is_file() for p in (REPO / "nemo_lite").rglob(name))  # a module named alone, anywhere
    return any((root / name).exists() for root in [*context, *ROOTS])


def test_every_named_path_and_module_exists():
    named = named_paths(PAGE.read_text())
    assert any(name == "nemo_lite/components/attention/" for name, _ in named)
    missing = sorted({name for name, context in named if not exists(name, context)})
    assert not missing, f"docs/architecture.md names files or modules that are not in the repository: {missing}"


def test_the_path_check_catches_a_moved_file():
    text = (
        "| `nemo_lite/components/models/` | `decoder.py`, `no_such_family.py` |\n"
        "See `nemo_lite/training/gone.py`, `nemo_lite.components.nowhere` and [a page](nowhere.md)."
    )
    missing = {name for name, context in named_paths(text) if not exists(name, context)}
    assert missing == {"no_such_family.py", "nemo_lite/training/gone.py", "nemo_lite.components.nowhere",
                       "docs/nowhere.md"}  # fmt: skip


def png_text(path: Path) -> dict[str, str]:
    """The tEXt chunks of a PNG file."""
    data, chunks, at = path.read_bytes(), {}, 8
    while at < len(data):
        (length,), kind = struct.unpack(">I", data[at : at + 4]), data[at + 4 : at + 8]
        if kind == b"tEXt":
            key, _, value = data[at + 8 : at + 8 + length].partition(b"\0")
            chunks[key.decode("latin-1")] = value.decode("latin-1")
        at += 12 + length
    return chunks


def test_the_picture_shows_the_package_as_it_is():
    folders, edges = plot_architecture.architecture_graph()
    drawn = png_text(PICTURE).get(plot_architecture.DIGEST_KEY)
    assert drawn == plot_architecture.digest(folders, edges), (
        "docs/img/architecture.png was drawn from another version of nemo_lite/ (its modules or the imports "
        "between its folders changed): run python scripts/plot_architecture.py"
    )


def test_the_graph_reads_folders_modules_and_lazy_imports(tmp_path):
    root = tmp_path / "nemo_lite"
    for name, text in {
        "__init__.py": "",
        "errors.py": "class Error(Exception): ...\n",
        "a/__init__.py": "",
        "a/one.py": "def f():\n    from nemo_lite.b import two\n",
        "b/__init__.py": "from nemo_lite.b.two import g\n",
        "b/two.py": "import nemo_lite.errors\n\ndef g(): ...\n",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    folders, edges = plot_architecture.architecture_graph(root)
    assert folders == {"nemo_lite": ["errors.py"], "nemo_lite/a": ["one.py"], "nemo_lite/b": ["__init__.py", "two.py"]}
    assert edges == {("nemo_lite/a", "nemo_lite/b"): 1, ("nemo_lite/b", "nemo_lite"): 1}


@pytest.mark.parametrize(
    "edges,expected",
    [
        ({("a", "b"): 1, ("b", "c"): 1, ("a", "c"): 1}, {"a": 2, "b": 1, "c": 0}),
        ({("a", "b"): 1, ("b", "a"): 1, ("b", "c"): 1}, {"a": 1, "b": 1, "c": 0}),  # a circle shares a column
    ],
)
def test_columns_put_importers_before_what_they_import(edges, expected):
    assert plot_architecture.columns(list(expected), edges) == expected
