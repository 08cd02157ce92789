"""The data of nemo_lite's offline lm-eval tasks: ``arithmetic.jsonl`` beside this file, as a ``test`` split.

The tasks' YAML files name :func:`load` as their ``custom_dataset``, so they run without a network."""

from __future__ import annotations

from pathlib import Path


def load(**kwargs):
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(Path(__file__).with_name("arithmetic.jsonl"))})
