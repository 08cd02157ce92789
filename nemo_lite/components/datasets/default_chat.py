"""The default conversation set: small chat data the project writes itself, offline, in well under a second.

``source: default_chat`` (configs/data/chat.yaml) reads it. Every conversation is generated from a
template with a seeded ``random.Random``, so every machine writes the same file. The kinds, mixed:

- arithmetic ("What is 17 plus 25?" -> "17 plus 25 is 42."), plus, minus and times;
- unit conversions (kilometres/metres, hours/minutes, kilograms/grams, metres/centimetres, ...);
- capitals from a small table ("What is the capital of Kenya?" -> "The capital of Kenya is Nairobi.");
- multi-turn follow-ups ("And if you add 8 to that?", "And of Peru?") that need the earlier turns;
- a tool turn: the assistant calls a calculator, a ``tool`` message answers, the assistant reports it;
- a system prompt on some conversations.

The answers are a fixed function of the question, so a model learns them within a few dozen steps
and its loss on held-out conversations falls. Written once as jsonl (``{"messages": [...]}`` per
line) under the cache directory (``$NEMO_LITE_CACHE``, default ``~/.cache/nemo_lite``).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path

from nemo_lite.components.datasets.default_corpus import _atomic_write, _log, cache_dir

DEFAULT_CHAT_SOURCE = "default_chat"  # the DataConfig.source value that names this set
CHAT_SET_VERSION = 1
NUM_CONVERSATIONS = 3000

SYSTEM_PROMPTS = (
    "You are a concise assistant. Answer in one sentence.",
    "You answer questions about numbers, units and geography.",
)

# Country -> capital (a small, uncontroversial table).
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Poland": "Warsaw", "Austria": "Vienna", "Greece": "Athens", "Ireland": "Dublin", "Hungary": "Budapest",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Ghana": "Accra", "Morocco": "Rabat", "Senegal": "Dakar",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "Indonesia": "Jakarta", "Peru": "Lima", "Chile": "Santiago", "Argentina": "Buenos Aires",
    "Colombia": "Bogota", "Mexico": "Mexico City", "Canada": "Ottawa", "Cuba": "Havana",
    "Australia": "Canberra", "New Zealand": "Wellington", "Iceland": "Reykjavik", "Turkey": "Ankara",
}  # fmt: skip

# (plural big unit, plural small unit, small units per big unit)
UNITS = (
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("days", "hours", 24),
    ("weeks", "days", 7),
)

_OPS: dict[str, Callable[[int, int], int]] = {
    "plus": lambda a, b: a + b,
    "minus": lambda a, b: a - b,
    "times": lambda a, b: a * b,
}


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _arithmetic(rng: random.Random) -> list[dict[str, str]]:
    op = rng.choice(list(_OPS))
    a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "times" else (rng.randint(1, 99), rng.randint(1, 99))
    return [_user(f"What is {a} {op} {b}?"), _assistant(f"{a} {op} {b} is {_OPS[op](a, b)}.")]


def _arithmetic_follow_up(rng: random.Random) -> list[dict[str, str]]:
    a, b, c = rng.randint(1, 60), rng.randint(1, 60), rng.randint(1, 30)
    first = a + b
    if rng.random() < 0.5:
        follow, answer = f"And if you add {c} to that?", f"{first} plus {c} is {first + c}."
    else:
        follow, answer = f"And if you subtract {c} from that?", f"{first} minus {c} is {first - c}."
    return [_user(f"What is {a} plus {b}?"), _assistant(f"{a} plus {b} is {first}."), _user(follow), _assistant(answer)]


def _unit(rng: random.Random) -> list[dict[str, str]]:
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(2, 20)
    if rng.random() < 0.5:
        return [_user(f"How many {small} are in {n} {big}?"), _assistant(f"{n} {big} is {n * factor} {small}.")]
    return [_user(f"Convert {n * factor} {small} to {big}."), _assistant(f"{n * factor} {small} is {n} {big}.")]


def _capital(rng: random.Random) -> list[dict[str, str]]:
    country = rng.choice(sorted(CAPITALS))
    return [
        _user(f"What is the capital of {country}?"),
        _assistant(f"The capital of {country} is {CAPITALS[country]}."),
    ]


def _capital_follow_up(rng: random.Random) -> list[dict[str, str]]:
    first, second = rng.sample(sorted(CAPITALS), 2)
    return [
        _user(f"What is the capital of {first}?"),
        _assistant(f"The capital of {first} is {CAPITALS[first]}."),
        _user(f"And of {second}?"),
        _assistant(f"The capital of {second} is {CAPITALS[second]}."),
    ]


def _tool(rng: random.Random) -> list[dict[str, str]]:
    a, b = rng.randint(11, 99), rng.randint(11, 99)
    return [
        _user(f"Please multiply {a} by {b}."),
        _assistant(f"calculator({a} * {b})"),
        {"role": "tool", "content": str(a * b)},
        _assistant(f"{a} times {b} is {a * b}."),
    ]


# (generator, weight)
_KINDS = (
    (_arithmetic, 4),
    (_arithmetic_follow_up, 2),
    (_unit, 3),
    (_capital, 3),
    (_capital_follow_up, 2),
    (_tool, 1),
)


def generate_conversations(n: int = NUM_CONVERSATIONS, seed: int = 0) -> list[list[dict[str, str]]]:
    """``n`` conversations, the same on every machine for a given ``seed``."""
    rng = random.Random(f"nemo_lite/default_chat/v{CHAT_SET_VERSION}/{seed}")
    kinds = [kind for kind, weight in _KINDS for _ in range(weight)]
    conversations = []
    for _ in range(n):
        messages = rng.choice(kinds)(rng)
        if rng.random() < 0.25:
            messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}, *messages]
        conversations.append(messages)
    return conversations


def default_chat_file() -> Path:
    """Path of the default conversation set (jsonl), written on first use."""
    path = cache_dir() / "default_chat" / f"chat-v{CHAT_SET_VERSION}-{NUM_CONVERSATIONS}.jsonl"
    if path.is_file():
        return path
    t0 = time.perf_counter()
    conversations = generate_conversations()

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for messages in conversations:
                f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")

    _atomic_write(path, write)
    _log(f"wrote the default conversation set ({len(conversations)} conversations, "
         f"{time.perf_counter() - t0:.2f} s) -> {path}")  # fmt: skip
    return path
