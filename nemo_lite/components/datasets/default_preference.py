"""The default preference set: small prompt/chosen/rejected pairs the project writes itself, offline.

``source: default_preference`` (configs/data/preference.yaml) reads it. Every pair comes from a template
with a seeded ``random.Random``, so every machine writes the same file. The prompt is a one-turn
conversation from the default conversation set's kinds (arithmetic, unit conversions, capitals, with a
system prompt on some); the chosen answer is the right one and the rejected answer a plausible wrong one
(a number off by a little, the capital of another country, the conversion factor misapplied). Records are
in TRL's conversational format with an explicit prompt::

    {"prompt": [{"role": "user", "content": "What is 17 plus 25?"}],
     "chosen": [{"role": "assistant", "content": "17 plus 25 is 42."}],
     "rejected": [{"role": "assistant", "content": "17 plus 25 is 43."}]}

The preference is a fixed function of the prompt, so a model's reward accuracy on held-out pairs rises
within a few dozen steps. Written once as jsonl under the cache directory (``$NEMO_LITE_CACHE``).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from nemo_lite.components.datasets.default_chat import _OPS, CAPITALS, SYSTEM_PROMPTS, UNITS
from nemo_lite.components.datasets.default_corpus import _atomic_write, _log, cache_dir

DEFAULT_PREFERENCE_SOURCE = "default_preference"  # the DataConfig.source value that names this set
PREFERENCE_SET_VERSION = 1
NUM_PAIRS = 2000

Pair = tuple[str, str, str]  # question, right answer, wrong answer


def _wrong_number(rng: random.Random, right: int) -> int:
    return right + rng.choice((-10, -2, -1, 1, 2, 10))


def _arithmetic(rng: random.Random) -> Pair:
    op = rng.choice(sorted(_OPS))
    a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "times" else (rng.randint(1, 99), rng.randint(1, 99))
    right = _OPS[op](a, b)
    wrong = _wrong_number(rng, right)
    return f"What is {a} {op} {b}?", f"{a} {op} {b} is {right}.", f"{a} {op} {b} is {wrong}."


def _unit(rng: random.Random) -> Pair:
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(2, 20)
    wrong = n * factor // 10 if rng.random() < 0.5 else n * factor * 10  # the factor misapplied
    question = f"How many {small} are in {n} {big}?"
    return question, f"{n} {big} is {n * factor} {small}.", f"{n} {big} is {wrong} {small}."


def _capital(rng: random.Random) -> Pair:
    country, other = rng.sample(sorted(CAPITALS), 2)
    return (
        f"What is the capital of {country}?",
        f"The capital of {country} is {CAPITALS[country]}.",
        f"The capital of {country} is {CAPITALS[other]}.",
    )


_KINDS = ((_arithmetic, 4), (_unit, 3), (_capital, 3))  # (generator, weight)


def generate_pairs(n: int = NUM_PAIRS, seed: int = 0) -> list[dict[str, list[dict[str, str]]]]:
    """``n`` preference records, the same on every machine for a given ``seed``."""
    rng = random.Random(f"nemo_lite/default_preference/v{PREFERENCE_SET_VERSION}/{seed}")
    kinds = [kind for kind, weight in _KINDS for _ in range(weight)]
    records = []
    for _ in range(n):
        question, right, wrong = rng.choice(kinds)(rng)
        prompt = [{"role": "user", "content": question}]
        if rng.random() < 0.25:
            prompt = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}, *prompt]
        records.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": right}],
                "rejected": [{"role": "assistant", "content": wrong}],
            }
        )
    return records


def default_preference_file() -> Path:
    """Path of the default preference set (jsonl), written on first use."""
    path = cache_dir() / "default_preference" / f"preference-v{PREFERENCE_SET_VERSION}-{NUM_PAIRS}.jsonl"
    if path.is_file():
        return path
    t0 = time.perf_counter()
    records = generate_pairs()

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    _atomic_write(path, write)
    _log(f"wrote the default preference set ({len(records)} pairs, {time.perf_counter() - t0:.2f} s) -> {path}")
    return path
