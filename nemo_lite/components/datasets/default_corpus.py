"""The default corpus: real English text that every Python installation carries, no network.

Documents, in a fixed order:

1. The Python language reference topics of ``pydoc_data.topics`` (what ``help("if")`` shows;
   79 topics, ~0.5 MB in CPython 3.11), one document per topic.
2. The docstrings of the standard library's own modules (module, class and function docstrings,
   read with ``ast`` from the ``.py`` sources, no module is imported; ~1.6 MB), one document per
   module. Tests, demos and vendored packages are left out.

It is written once as jsonl (``{"text", "source"}`` per line) under the cache directory
(``$NEMO_LITE_CACHE``, default ``~/.cache/nemo_lite``), per Python minor version since the text
differs between versions. The default tokenizer is a byte-level BPE (8192 ids, EOS
``<|endoftext|>`` = 0) trained on this corpus with ``tokenizers``; it ships in
``nemo_lite/assets/default_tokenizer.json`` (trained on CPython 3.11.7) so that every machine
tokenizes identically, and is trained into the cache only when the asset is missing.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

DEFAULT_EOS_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 8192
CORPUS_VERSION = 1

# Standard-library folders that are not documentation prose (tests, demos, vendored code).
_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "idlelib", "turtledemo", "lib2to3", "ensurepip", "site-packages",
     "dist-packages", "__pycache__", "pydoc_data", "__phello__"}
)  # fmt: skip
_MIN_MODULE_CHARS = 200


def cache_dir() -> Path:
    """``$NEMO_LITE_CACHE``, or ``~/.cache/nemo_lite``."""
    return Path(os.environ.get("NEMO_LITE_CACHE") or Path.home() / ".cache" / "nemo_lite").expanduser()


def _log(message: str) -> None:
    print(f"nemo_lite: {message}", file=sys.stderr, flush=True)


def _atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` to a temporary file beside ``path``, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -- the documents ----------------------------------------------------------------------------
def _topic_documents() -> Iterator[dict[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some minimal distributions strip it
        raise RuntimeError(
            "the default corpus needs the standard library's pydoc_data module, which this Python "
            "lacks; install the full standard library or set DataConfig.source to your own files"
        ) from e
    for key in sorted(topics):
        text = topics[key].strip()
        if text:
            yield {"text": text, "source": f"pydoc_data.topics:{key}"}


def _module_docstrings(path: Path, module: str) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    parts: list[str] = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {module}\n\n{doc}")

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                kind = "class" if isinstance(node, ast.ClassDef) else "def"
                name = f"{prefix}{node.name}"
                node_doc = ast.get_docstring(node)
                if node_doc:
                    parts.append(f"{kind} {name}\n\n{node_doc}")
                if isinstance(node, ast.ClassDef):
                    visit(node.body, f"{name}.")

    visit(tree.body, f"{module}.")
    return "\n\n".join(parts)


def _docstring_documents() -> Iterator[dict[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not stdlib.is_dir():
        return
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith(("config-", ".")))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = Path(root) / name
            rel = path.relative_to(stdlib).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            module = ".".join(parts)
            text = _module_docstrings(path, module)
            if len(text) >= _MIN_MODULE_CHARS:
                yield {"text": text, "source": f"docstrings:{module}"}


def iter_default_documents() -> Iterator[dict[str, str]]:
    """The default corpus's documents, in their fixed order."""
    yield from _topic_documents()
    yield from _docstring_documents()


# -- the cached files -------------------------------------------------------------------------
def default_corpus_file() -> Path:
    """Path of the default corpus (jsonl), built on first use (~5 s)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    path = cache_dir() / "default_corpus" / f"python{version}-v{CORPUS_VERSION}.jsonl"
    if path.is_file():
        return path
    _log(f"building the default corpus (Python {version} reference topics + stdlib docstrings) -> {path}")
    t0 = time.perf_counter()
    docs = list(iter_default_documents())

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")

    _atomic_write(path, write)
    chars = sum(len(d["text"]) for d in docs)
    _log(f"default corpus: {len(docs)} documents, {chars / 1e6:.2f} M characters, {time.perf_counter() - t0:.1f} s")
    return path


def shipped_tokenizer_file() -> Path:
    return Path(__file__).resolve().parents[2] / "assets" / "default_tokenizer.json"


def train_default_tokenizer(corpus: Path, out: Path, *, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Train the default byte-level BPE on a jsonl corpus; deterministic for a given corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[DEFAULT_EOS_TOKEN],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    _atomic_write(out, lambda tmp: tok.save(tmp))
    return out


def default_tokenizer_file() -> Path:
    """The shipped tokenizer.json, or (when the package was installed without it) one trained
    into the cache from this machine's default corpus on first use (~2 s)."""
    shipped = shipped_tokenizer_file()
    if shipped.is_file():
        return shipped
    corpus = default_corpus_file()
    digest = hashlib.sha256(corpus.read_bytes()).hexdigest()[:12]
    path = cache_dir() / "tokenizers" / f"default_bpe{DEFAULT_VOCAB_SIZE}-{digest}.json"
    if not path.is_file():
        _log(f"training the default byte-level BPE tokenizer ({DEFAULT_VOCAB_SIZE} ids) -> {path}")
        t0 = time.perf_counter()
        train_default_tokenizer(corpus, path)
        _log(f"default tokenizer trained in {time.perf_counter() - t0:.1f} s")
    return path
