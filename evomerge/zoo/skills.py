"""Synthetic skills of the toy zoo: text formats, their generators and fixed splits.

Every example is one line, ``PROMPT ANSWER`` with the prompt ending in ``=``, e.g.
``add:23+45=68``. A model "has" a skill when greedy decoding after the prompt yields the
answer followed by a newline. The zoo is synthetic and says so: these are stand-ins for
"math" and "language" experts, small enough to train on two CPUs in minutes.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _copy(rng: random.Random) -> Example:
    s = _letters(rng, 2, 8)
    return Example(f"cp:{s}=", s)


def _sort(rng: random.Random) -> Example:
    s = _letters(rng, 3, 6)
    return Example(f"sort:{s}=", "".join(sorted(s)))


def _add_one_digit(rng: random.Random) -> Example:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return Example(f"add:{a}+{b}=", str(a + b))


def _add_two_digit(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return Example(f"add:{a}+{b}=", str(a + b))


def _rev_short(rng: random.Random) -> Example:
    s = _letters(rng, 2, 3)
    return Example(f"rev:{s}=", s[::-1])


def _rev_long(rng: random.Random) -> Example:
    s = _letters(rng, 4, 8)
    return Example(f"rev:{s}=", s[::-1])


def _sum_and_reverse(a: int, b: int, s: str) -> Example:
    return Example(f"ar:{a}+{b}|{s}=", f"{a + b}|{s[::-1]}")


def _ar_easy(rng: random.Random) -> Example:
    return _sum_and_reverse(rng.randint(0, 9), rng.randint(0, 9), _letters(rng, 2, 3))


def _ar_hard(rng: random.Random) -> Example:
    return _sum_and_reverse(rng.randint(10, 99), rng.randint(10, 99), _letters(rng, 4, 8))


def _noise(rng: random.Random) -> Example:
    # Random text with no structure: teaches the character distribution, nothing else.
    alphabet = LETTERS + string.digits + "+=:|"
    return Example("", "".join(rng.choice(alphabet) for _ in range(rng.randint(6, 16))))


Generator = Callable[[random.Random], Example]


@dataclass(frozen=True)
class Skill:
    """A named example generator. ``evaluated`` skills ship as lm-eval tasks."""

    name: str
    generate: Generator
    description: str
    evaluated: bool = True


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in [
        Skill("add", _add_two_digit, "two-digit addition, add:23+45=68"),
        Skill("rev", _rev_long, "reversal of 4-8 letters, rev:abcde=edcba"),
        Skill("sort", _sort, "sorting 3-6 letters, sort:dbca=abcd"),
        Skill("ar", _ar_hard, "needs both skills: a two-digit sum and a 4-8 letter reversal"),
        Skill("copy", _copy, "copying 2-8 letters, cp:abc=abc", evaluated=False),
        Skill("add1", _add_one_digit, "one-digit addition", evaluated=False),
        Skill("rev_short", _rev_short, "reversal of 2-3 letters", evaluated=False),
        Skill("ar_easy", _ar_easy, "one-digit sum and 2-3 letter reversal", evaluated=False),
        Skill("noise", _noise, "random characters", evaluated=False),
    ]
}

EVALUATED_SKILLS = [name for name, s in SKILLS.items() if s.evaluated]

# What the base model is pre-trained on: every format, but only the easy cases of addition
# and reversal, so that two-digit addition and long reversal are left for the experts.
BASE_MIXTURE = ["noise", "copy", "sort", "add1", "rev_short", "ar_easy"]


def sample_mixture(rng: random.Random, skills: list[str]) -> Example:
    return SKILLS[rng.choice(skills)].generate(rng)


def make_splits(skill: str, sizes: dict[str, int], seed: int) -> dict[str, list[Example]]:
    """Disjoint, deduplicated splits of one skill (e.g. ``{"fit": 256, "heldout": 200}``)."""
    rng = random.Random(f"{seed}:{skill}:splits")
    seen: set[str] = set()
    out: dict[str, list[Example]] = {}
    for split, n in sizes.items():
        examples: list[Example] = []
        while len(examples) < n:
            ex = SKILLS[skill].generate(rng)
            if ex.prompt not in seen:
                seen.add(ex.prompt)
                examples.append(ex)
        out[split] = examples
    return out
