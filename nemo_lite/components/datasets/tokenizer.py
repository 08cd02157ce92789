"""The tokenizer and the EOS id. ``transformers`` is imported here, when a tokenizer is built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nemo_lite.components.datasets.config import MODEL_TOKENIZER, DataConfig
from nemo_lite.components.datasets.default_corpus import DEFAULT_EOS_TOKEN, default_tokenizer_file

# Tokens that commonly end a document; only used to suggest an eos_id in an error message.
_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]")


def build_tokenizer(cfg: DataConfig | str) -> Any:
    """A Hugging Face tokenizer (``PreTrainedTokenizerFast`` for all but slow-only tokenizers).

    ``cfg.tokenizer`` (or the string given) is ``"default"`` (the byte-level BPE of the default
    corpus), a directory with a saved tokenizer, a ``tokenizer.json`` file, or a hub name.
    """
    spec = cfg if isinstance(cfg, str) else cfg.tokenizer
    if spec == MODEL_TOKENIZER:
        raise ValueError(
            "tokenizer='model' (the checkpoint's own tokenizer) is a recipe value: resolve it with "
            "resolve_data_config(cfg, pretrained_path=...), or give the checkpoint directory"
        )
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if spec == "default":
        return PreTrainedTokenizerFast(
            tokenizer_file=str(default_tokenizer_file()), eos_token=DEFAULT_EOS_TOKEN, pad_token=DEFAULT_EOS_TOKEN
        )
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".json":
            raise ValueError(
                f"tokenizer {spec!r} is a file but not a tokenizer.json; give a tokenizer.json, a directory "
                "saved with save_pretrained, or a hub name"
            )
        # A bare tokenizer.json does not say which token is EOS: resolve_eos_id asks for eos_id.
        return PreTrainedTokenizerFast(tokenizer_file=str(path))
    if path.is_dir():
        try:
            return AutoTokenizer.from_pretrained(str(path))
        except Exception as e:
            raise ValueError(
                f"could not load a tokenizer from directory {spec!r} (expected tokenizer.json and "
                f"tokenizer_config.json, as written by save_pretrained): {type(e).__name__}: {e}"
            ) from e
    if spec.startswith(("/", ".", "~")) or spec.endswith(".json"):
        raise FileNotFoundError(f"tokenizer {spec!r} does not exist (a tokenizer.json or a tokenizer directory)")
    try:
        return AutoTokenizer.from_pretrained(spec)
    except Exception as e:
        raise ValueError(
            f"tokenizer {spec!r} is not a local file or directory, so it was loaded from the Hugging Face "
            f"hub, which failed: {type(e).__name__}: {e}"
        ) from e


def resolve_eos_id(tokenizer: Any, cfg_eos_id: int | None) -> int:
    """The id that ends every document: ``cfg_eos_id`` if given, else the tokenizer's EOS."""
    vocab_size = len(tokenizer)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    eos_id = cfg_eos_id if cfg_eos_id is not None else getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        vocab = tokenizer.get_vocab()
        found = {t: vocab[t] for t in _EOS_CANDIDATES if t in vocab}
        hint = f" Candidates in its vocabulary: {found}." if found else ""
        raise ValueError(
            f"tokenizer {name!r} has no EOS token and DataConfig.eos_id is not set; every document must "
            f"end with an EOS id. Set DataConfig.eos_id to the id of the token that ends a document.{hint}"
        )
    if isinstance(eos_id, bool) or not isinstance(eos_id, int) or not 0 <= eos_id < vocab_size:
        raise ValueError(
            f"eos_id={eos_id!r} is outside the vocabulary of tokenizer {name!r} (size {vocab_size}); "
            f"it must be an int in [0, {vocab_size})"
        )
    return eos_id
