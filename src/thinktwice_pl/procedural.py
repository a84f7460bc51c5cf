"""Generated arithmetic word problems, offline: problem i depends only on (seed, difficulty, i).

Eight difficulties, from bare one-digit sums (within reach of the CPU quickstart's small model) to two-step
stories; every answer is a non-negative integer. `text_side` splits the problem texts into two halves by a hash, so
a training set and a held-out set drawn from different halves never share a problem text; `heldout_part` splits the
held-out half again into validation and test texts.
"""

from __future__ import annotations

import hashlib
import random
from typing import Literal

from thinktwice_pl.errors import UserError
from thinktwice_pl.types import Problem

_NAMES = [
    ("Mia", "she"),
    ("Liam", "he"),
    ("Ava", "she"),
    ("Noah", "he"),
    ("Emma", "she"),
    ("Omar", "he"),
    ("Sofia", "she"),
    ("Lucas", "he"),
    ("Zoe", "she"),
    ("Ben", "he"),
    ("Priya", "she"),
    ("Kenji", "he"),
]
_OBJECTS = [
    ("apple", "apples"),
    ("marble", "marbles"),
    ("pencil", "pencils"),
    ("sticker", "stickers"),
    ("book", "books"),
    ("cookie", "cookies"),
    ("shell", "shells"),
    ("card", "cards"),
    ("stamp", "stamps"),
    ("balloon", "balloons"),
    ("candy", "candies"),
    ("toy car", "toy cars"),
]
_CONTAINERS = ["bags", "boxes", "jars", "packs"]


def procedural_problems(
    num_problems: int,
    seed: int,
    difficulty: int,
    text_split: Literal["all", "train", "heldout", "val", "test"] = "all",
    flag_prefix: str = "data.train",
) -> list[Problem]:
    """The first `num_problems` problems of the generator, or, with a `text_split`, of its problems whose text falls
    on that side of `text_side` ("val" and "test": on that part of the held-out side, `heldout_part`; every side
    but "train" keeps each text once).

    Raises:
        UserError: the side has fewer distinct texts than asked for.
    """
    if text_split == "all":
        return [procedural_problem(seed, difficulty, i) for i in range(num_problems)]
    problems: list[Problem] = []
    seen: set[str] = set()
    index = misses = 0
    while len(problems) < num_problems:
        problem = procedural_problem(seed, difficulty, index)
        index += 1
        text = problem.prompt_text
        if not _on_side(text, text_split) or (text_split != "train" and text in seen):
            misses += 1
            if misses > 10_000:  # the side's distinct texts are used up
                raise UserError(
                    f"{flag_prefix} asks for {num_problems} problems from the {text_split!r} side of difficulty "
                    f"{difficulty}, which has only {len(problems)} distinct texts; lower {flag_prefix}.num_problems "
                    "or pick a difficulty with more possible problems"
                )
            continue
        misses = 0
        seen.add(text)
        problems.append(problem)
    return problems


def _on_side(text: str, text_split: str) -> bool:
    side = text_side(text)
    if text_split in ("train", "heldout"):
        return side == text_split
    return side == "heldout" and heldout_part(text) == text_split


def heldout_part(text: str) -> Literal["val", "test"]:
    """Which half of the held-out texts `text` belongs to: the second byte of its sha256, even = val, odd = test.
    A validation set and a test set drawn from the two parts never share a text, so model selection on one does not
    see the other."""
    return "val" if hashlib.sha256(text.encode()).digest()[1] % 2 == 0 else "test"


def text_side(text: str) -> Literal["train", "heldout"]:
    """Which half of the problem texts `text` belongs to: the first byte of its sha256, even = train, odd = heldout.

    It depends on the text alone, so procedural sets drawn with any seeds from different sides are disjoint.
    """
    return "train" if hashlib.sha256(text.encode()).digest()[0] % 2 == 0 else "heldout"


def procedural_problem(seed: int, difficulty: int, index: int) -> Problem:
    """Generates arithmetic word problem `index`; it depends only on (seed, difficulty, index).

    Args:
        seed: generator seed.
        difficulty: 0 bare one-digit sums ("What is 3 + 4?"), 1 single-digit add/sub stories, 2 two-digit
            add/sub, 3 add/sub/mul/div, 4 two-step problems, 5 bare add/sub with operands 1 to 30 ("What is
            27 - 9?", never negative; 1365 distinct texts), 6 three one-digit operands with + and - ("What is
            8 - 3 + 6?", never negative on the way; 1899 distinct texts), 7 products of a factor 2 to 12 and a factor
            2 to 25 in either order ("What is 16 * 9?"; 407 distinct texts).
        index: position of the problem in the set.

    Returns:
        A problem whose answer is a non-negative integer string.
    """
    rng = random.Random(f"thinktwice-{seed}-{difficulty}-{index}")
    if difficulty == 0:  # small models (the CPU quickstart) need a task they sometimes get right
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return _problem(seed, difficulty, index, f"What is {a} + {b}?", a + b)
    if difficulty == 5:  # the CPU comparison (configs/smollm2): SmolLM2-135M gets about a quarter right
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        if rng.random() < 0.5:
            return _problem(seed, difficulty, index, f"What is {a} + {b}?", a + b)
        a, b = max(a, b), min(a, b)  # no negative results
        return _problem(seed, difficulty, index, f"What is {a} - {b}?", a - b)
    if difficulty == 6:  # configs/smollm2-chains: two steps, each a slip a review can catch
        return _problem(seed, difficulty, index, *_chain(rng))
    if difficulty == 7:  # the second CPU task (configs/smollm2-products): SmolLM2-135M gets about a fifth right
        a, b = rng.randint(2, 25), rng.randint(2, 12)
        a, b = (a, b) if rng.random() < 0.5 else (b, a)
        return _problem(seed, difficulty, index, f"What is {a} * {b}?", a * b)
    (name, pronoun), (other, _) = rng.sample(_NAMES, 2)
    one, many = rng.choice(_OBJECTS)
    box, she = rng.choice(_CONTAINERS), pronoun.capitalize()
    has_now, has_left = f"How many {many} does {name} have now?", f"How many {many} does {name} have left?"

    def n(count: int) -> str:
        return f"{count} {one if count == 1 else many}"

    if difficulty == 4:
        kind = rng.choice(["buy_boxes", "give_find", "share", "box_give"])
        if kind == "buy_boxes":
            a, b, c = rng.randint(2, 30), rng.randint(2, 6), rng.randint(2, 10)
            text, answer = f"{name} has {n(a)}. {she} buys {b} {box} with {c} {many} in each. {has_now}", a + b * c
        elif kind == "give_find":
            a = rng.randint(10, 50)
            b, c = rng.randint(1, a), rng.randint(2, 20)
            text = f"{name} has {n(a)}. {she} gives {b} to {other} and then finds {c} more. {has_now}"
            answer = a - b + c
        elif kind == "share":
            c, answer = rng.randint(2, 6), rng.randint(2, 10)
            a = rng.randint(1, c * answer - 1)
            text = (
                f"{name} has {n(a)} and buys {c * answer - a} more. {she} shares them equally among {c} friends. "
                f"How many {many} does each friend get?"
            )
        else:
            a, b = rng.randint(2, 9), rng.randint(2, 12)
            c = rng.randint(1, a * b)
            text, answer = f"{name} buys {a} {box} of {b} {many} and gives {c} to {other}. {has_left}", a * b - c
        return _problem(seed, difficulty, index, text, answer)

    kind = rng.choice(["add", "combine", "remove", "compare"] + ["multiply", "divide"] * 2 * (difficulty == 3))
    low, high = (1, 9) if difficulty == 1 else (10, 99)
    a, b = sorted((rng.randint(low, high), rng.randint(low, high)), reverse=True)  # a >= b: no negative results
    if kind == "add":
        text, answer = f"{name} has {n(a)} and {rng.choice(['buys', 'finds', 'gets'])} {b} more. {has_now}", a + b
    elif kind == "combine":
        text, answer = f"{name} has {n(a)} and {other} has {n(b)}. How many {many} do they have together?", a + b
    elif kind == "remove":
        verb = rng.choice([f"gives {b} to {other}", f"loses {b}"])
        text, answer = f"{name} has {n(a)}. {she} {verb}. {has_left}", a - b
    elif kind == "compare":
        if a == b:  # "how many more" with equal counts reads oddly
            a, b = (a + 1, b) if a < high else (a, b - 1)
        text = f"{name} has {n(a)} and {other} has {n(b)}. How many more {many} does {name} have than {other}?"
        answer = a - b
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        if kind == "multiply":
            text = f"{name} has {a} {box} with {b} {many} in each. How many {many} does {name} have in total?"
            answer = a * b
        else:
            text = f"{name} shares {a * b} {many} equally among {b} friends. How many {many} does each friend get?"
            answer = a
    return _problem(seed, difficulty, index, text, answer)


def _chain(rng: random.Random) -> tuple[str, int]:
    """Three one-digit operands joined by + or -, left to right, never negative on the way ("What is 8 - 3 + 6?")."""
    while True:
        a, b, c = (rng.randint(1, 9) for _ in range(3))
        first, second = rng.choice("+-"), rng.choice("+-")
        middle = a + b if first == "+" else a - b
        answer = middle + c if second == "+" else middle - c
        if middle >= 0 and answer >= 0:
            return f"What is {a} {first} {b} {second} {c}?", answer


def _problem(seed: int, difficulty: int, index: int, text: str, answer: int) -> Problem:
    return Problem(f"procedural-d{difficulty}-s{seed}-{index}", text, str(answer), source="procedural")
