"""Writes train.json (the 5 few-shot examples) and test.json (48 questions) of the local ``prefix_mc`` task.

Simple generated multiple-choice questions (arithmetic, comparisons, alphabetical order, categories), so
that lm-eval runs offline on a task whose few-shot context every document shares. Deterministic: run it
again and the files do not change.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
FRUITS = ["apple", "banana", "cherry", "grape", "kiwi", "lemon", "mango", "orange", "peach", "pear", "plum"]
CATEGORIES = {
    "bird": ["sparrow", "eagle", "parrot", "robin", "owl"],
    "fish": ["salmon", "trout", "tuna", "cod", "carp"],
    "tool": ["hammer", "wrench", "saw", "drill", "chisel"],
    "color": ["red", "blue", "green", "yellow", "purple"],
}


def addition(rng: random.Random) -> dict:
    a, b = rng.randint(10, 60), rng.randint(10, 60)
    wrong = rng.sample([a + b + d for d in (-11, -10, -2, -1, 1, 2, 9, 10, 12) if a + b + d > 0], 3)
    return _doc(
        f"A farmer has {a} sheep and buys {b} more at the market. How many sheep does he have now?",
        str(a + b),
        [str(w) for w in wrong],
        rng,
    )


def largest(rng: random.Random) -> dict:
    numbers = rng.sample(range(3, 99), 4)
    text = ", ".join(str(n) for n in numbers)
    return _doc(
        f"Look at these numbers: {text}. Which of them is the largest number?",
        str(max(numbers)),
        [str(n) for n in numbers if n != max(numbers)],
        rng,
    )


def alphabetical(rng: random.Random) -> dict:
    words = rng.sample(FRUITS, 4)
    return _doc(
        f"Here are four fruits: {', '.join(words)}. Which fruit comes first in alphabetical order?",
        min(words),
        [w for w in words if w != min(words)],
        rng,
    )


def category(rng: random.Random) -> dict:
    kind, others = rng.choice(sorted(CATEGORIES)), []
    right = rng.choice(CATEGORIES[kind])
    for other in rng.sample([k for k in sorted(CATEGORIES) if k != kind], 3):
        others.append(rng.choice(CATEGORIES[other]))
    return _doc(f"Exactly one of the following words names a {kind}. Which word is it?", right, others, rng)


def _doc(question: str, answer: str, wrong: list[str], rng: random.Random) -> dict:
    choices = [answer, *wrong]
    rng.shuffle(choices)
    return {"question": question, "choices": choices, "answer": choices.index(answer)}


def make(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    makers = [addition, largest, alphabetical, category]
    return [makers[index % len(makers)](rng) for index in range(count)]


if __name__ == "__main__":
    for name, count, seed in (("train", 5, 1), ("test", 48, 2)):
        (HERE / f"{name}.json").write_text("\n".join(json.dumps(doc) for doc in make(count, seed)) + "\n")
