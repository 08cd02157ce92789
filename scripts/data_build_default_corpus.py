"""Build the default corpus and its tokenizer now (they are otherwise built on first use).

    python scripts/data_build_default_corpus.py            # corpus into $NEMO_LITE_CACHE
    python scripts/data_build_default_corpus.py --ship     # also retrain nemo_lite/assets/default_tokenizer.json

The shipped tokenizer was trained with --ship on CPython 3.11.7; retrain it only on purpose: a
new one changes every token id of the default pipeline (and so invalidates checkpoints).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from nemo_lite.components.datasets.default_corpus import (
    DEFAULT_EOS_TOKEN,
    default_corpus_file,
    default_tokenizer_file,
    shipped_tokenizer_file,
    train_default_tokenizer,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ship", action="store_true", help="retrain the tokenizer shipped in nemo_lite/assets")
    args = parser.parse_args()

    t0 = time.perf_counter()
    corpus = default_corpus_file()
    if args.ship:
        train_default_tokenizer(corpus, shipped_tokenizer_file())
    tokenizer_path = default_tokenizer_file()
    elapsed = time.perf_counter() - t0

    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_path), eos_token=DEFAULT_EOS_TOKEN)
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    ids = tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    n_tokens = sum(map(len, ids))
    n_chars = sum(map(len, texts))
    print(f"python      {sys.version.split()[0]}")
    print(f"corpus      {corpus}: {len(texts)} documents, {n_chars / 1e6:.2f} M chars")
    print(f"tokenizer   {tokenizer_path}: {len(tok)} ids, eos {DEFAULT_EOS_TOKEN!r} = {tok.eos_token_id}")
    per_doc = n_tokens / len(texts)
    print(f"tokens      {n_tokens / 1e6:.3f} M ({n_chars / n_tokens:.2f} chars/token), mean document {per_doc:.0f}")
    print(f"built in    {elapsed:.1f} s")


if __name__ == "__main__":
    main()
