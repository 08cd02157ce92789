"""docs/benchmarks.md stays a page of current figures a reader can act on: at most 200 lines, every recipe
key it names exists in the schema, every raw result it cites is in docs/results/ and every file there is
cited by some page, every script it runs exists, and every link into it from another page lands on a
heading. Every ``scripts/`` command of any page uses only flags its script has."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from nemo_lite.training.config import RecipeConfig

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "benchmarks.md"
PAGES = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]
MAX_LINES = 200

SECTIONS = tuple(name for name, value in vars(RecipeConfig()).items() if dataclasses.is_dataclass(value))
# `section.key` or `section.key.sub` as a recipe override or a key named in prose; a file name such as
# `trainer.py` is not a key.
KEY = re.compile(rf"(?<![\w./-])(?:\+\+?)?((?:{'|'.join(SECTIONS)})(?:\.\w+)+)(?![\w/-])")
FILE_SUFFIXES = {"py", "md", "json", "jsonl", "yaml", "png", "txt", "gz"}


def _code(text: str) -> list[str]:
    """The page's inline code spans and fenced code blocks (where keys and commands are written)."""
    fenced = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.DOTALL)
    inline = re.findall(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)*)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.DOTALL))
    return fenced + inline


def named_keys(text: str) -> set[str]:
    keys = set()
    for span in _code(text):
        for match in KEY.finditer(span):
            key = match.group(1)
            if key.rsplit(".", 1)[-1] not in FILE_SUFFIXES:
                keys.add(key)
    return keys


def key_exists(key: str) -> bool:
    """Whether ``section.name[.sub...]`` is a field of the recipe schema (a dict-valued field takes any sub-key)."""
    node: object = RecipeConfig()
    for part in key.split("."):
        if isinstance(node, dict):
            return True
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = getattr(node, part)
    return True


def test_the_page_is_short():
    lines = PAGE.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"docs/benchmarks.md has {len(lines)} lines; keep it at most {MAX_LINES}"


def test_every_named_key_exists_in_the_schema():
    keys = named_keys(PAGE.read_text())
    assert {"trainer.compile", "attention.options.kernel_options", "data.seq_len"} <= keys, keys
    missing = sorted(k for k in keys if not key_exists(k))
    assert not missing, f"docs/benchmarks.md names keys the recipe schema does not have: {missing}"


def test_the_key_check_catches_a_stale_key():
    text = "run `python recipes/pretrain.py trainer.loss_kernel=true optim.kernel=triton` and see `trainer.py`"
    keys = named_keys(text)
    assert keys == {"trainer.loss_kernel", "optim.kernel"}
    assert not any(key_exists(k) for k in keys)
    assert key_exists("trainer.max_steps") and key_exists("attention.options.anything")
    assert not key_exists("attention.backend.nested")


def _expand(path: str) -> list[str]:
    """``a_{1b,3b}_b`` -> ``a_1b_b``, ``a_3b_b`` (how the pages name a pair of files)."""
    match = re.search(r"\{([^}]+)\}", path)
    if not match:
        return [path]
    return [p for choice in match.group(1).split(",") for p in _expand(path.replace(match.group(0), choice, 1))]


def cited_results(text: str) -> set[str]:
    """Raw results a page cites (a command's ``--out`` path is where a new run writes, not a citation); a
    pattern such as ``docs/results/bench_scaling_*.json`` cites the files it matches, and at least one."""
    found = re.findall(r"(?<!--out )docs/results/[\w{},.*-]+", text)
    paths = {p for raw in found for p in _expand(raw.rstrip(".,"))}
    globbed = {p: sorted(m.relative_to(REPO).as_posix() for m in REPO.glob(p)) for p in paths if "*" in p}
    return (paths - set(globbed)) | {m for p, matches in globbed.items() for m in matches or [p]}


def test_every_cited_result_exists_and_every_result_is_cited():
    cited = {p for page in PAGES for p in cited_results(page.read_text())}
    assert cited_results(PAGE.read_text()), "docs/benchmarks.md cites no raw result"
    missing = sorted(p for p in cited if not (REPO / p).is_file())
    assert not missing, f"pages cite raw results that are not in docs/results/: {missing}"
    kept = {p.relative_to(REPO).as_posix() for p in (REPO / "docs" / "results").iterdir()}
    uncited = sorted(kept - cited)
    assert not uncited, f"docs/results/ holds files no page cites (delete them or cite them): {uncited}"


def test_every_script_the_page_runs_exists():
    scripts = set(re.findall(r"scripts/\w+\.(?:py|sh)", PAGE.read_text()))
    assert "scripts/bench_train.py" in scripts
    missing = sorted(s for s in scripts if not (REPO / s).is_file())
    assert not missing, f"docs/benchmarks.md runs scripts that do not exist: {missing}"


def script_commands(text: str) -> list[tuple[str, list[str]]]:
    """(script, the flags written after it) for every ``scripts/NAME.py`` command in a page's code (a command
    may wrap over lines; the next command starts at ``python``, ``torchrun`` or ``bash``)."""
    found = []
    for code in _code(text):
        code = re.sub(r"#.*", "", code).replace("\\\n", " ")
        for command in re.split(r"(?<!\S)(?=python |torchrun |bash )", code):
            for match in re.finditer(r"scripts/(\w+\.py)(.*)", command, flags=re.DOTALL):
                found.append((match.group(1), re.findall(r"(?<!\S)(--[a-z][\w-]*)", match.group(2))))
    return found


def test_every_documented_script_command_uses_flags_the_script_has():
    commands = [(page, *c) for page in PAGES for c in script_commands(page.read_text())]
    assert ("bench_train.py", ["--steps", "--configs"]) in [c[1:] for c in commands]
    wrong = []
    for page, script, flags in commands:
        path = REPO / "scripts" / script
        if not path.is_file():
            wrong.append(f"{page.name}: scripts/{script} does not exist")
            continue
        source = path.read_text()
        wrong += [f"{page.name}: scripts/{script} has no {flag}" for flag in flags if f'"{flag}"' not in source]
    assert not wrong, wrong


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", re.sub(r"```.*?```", "", text, flags=re.DOTALL), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_into_the_page_land_on_a_heading(page):
    targets = anchors(PAGE.read_text())
    assert "several-gpus-fsdp2" in targets
    for anchor in re.findall(r"benchmarks\.md#([\w-]+)", page.read_text()):
        assert anchor in targets, f"{page.name} links to benchmarks.md#{anchor}; the headings are {sorted(targets)}"
