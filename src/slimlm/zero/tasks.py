"""Verifiable tasks: seeded problem generators with a difficulty knob, exact checkers, a disjoint held-out split.

A problem's split is a property of the problem itself (a hash of its canonical key), not of the seed, so the
training and held-out problems of any two runs can never overlap: training draws reject held-out problems and
held-out draws reject training ones.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import operator
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from slimlm.errors import SlimlmError

HELDOUT_ONE_IN = 5  # one problem in five (by hash) belongs to the held-out split
SPLITS = ("train", "heldout")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Problem:
    """One task instance: the question shown to the model, a reference answer, and what the checker needs."""

    question: str
    answer: str
    data: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"question": self.question, "answer": self.answer, "data": self.data}


def split_of(task_name: str, key: str) -> str:
    """'heldout' for one key in HELDOUT_ONE_IN (by SHA-256), else 'train'; the same for every seed."""
    digest = hashlib.sha256(f"{task_name}\0{key}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % HELDOUT_ONE_IN == 0 else "train"


class Task(ABC):
    """A family of problems. Subclasses define ``make`` (one random problem), ``check`` (is this answer text
    right) and, where two questions can state one problem, ``key``."""

    name = "task"
    description = ""

    def __init__(self, difficulty: int = 1) -> None:
        if difficulty < 1:
            raise SlimlmError(f"difficulty must be 1 or more, got {difficulty}")
        self.difficulty = difficulty

    def make(self, rng: random.Random) -> Problem:
        """One random problem of this task at its difficulty (generators override it; a fixed list, as a user's
        JSONL, overrides ``problems`` instead)."""
        raise SlimlmError(f"task {self.name!r} has a fixed problem list, not a generator")

    @abstractmethod
    def check(self, problem: Problem, answer: str) -> bool:
        """Whether ``answer`` (the extracted answer text) solves ``problem``."""

    def key(self, problem: Problem) -> str:
        return problem.question

    def problems(self, n: int, split: str = "train", seed: int = 0) -> list[Problem]:
        """``n`` distinct problems of ``split``, the same for the same (difficulty, split, seed)."""
        if split not in SPLITS:
            raise SlimlmError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        rng = random.Random(f"{self.name}:{self.difficulty}:{split}:{seed}")
        seen: set[str] = set()
        out: list[Problem] = []
        for _ in range(max(1000, 200 * n)):
            if len(out) == n:
                return out
            problem = self.make(rng)
            key = self.key(problem)
            if key not in seen and split_of(self.name, key) == split:
                seen.add(key)
                out.append(problem)
        if len(out) == n:
            return out
        raise SlimlmError(f"task {self.name} at difficulty {self.difficulty} has only about {len(out)} distinct "
                          f"{split} problems; ask for fewer or raise --difficulty")


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


class Arithmetic(Task):
    """A chain of difficulty+1 integers joined by + and - (and * from difficulty 2): give its value."""

    name = "arithmetic"
    description = "evaluate a chain of integer + - * (difficulty+1 operands)"

    def make(self, rng: random.Random) -> Problem:
        ops = "+-*" if self.difficulty >= 2 else "+-"
        terms = [str(rng.randint(1, 99))]
        for _ in range(self.difficulty):
            op = rng.choice(ops)
            terms += [op, str(rng.randint(1, 9) if op == "*" else rng.randint(1, 99))]
        expr = " ".join(terms)
        return Problem(f"What is {expr}?", str(_eval_expr(expr)), {"expression": expr})

    def check(self, problem: Problem, answer: str) -> bool:
        value = last_number(answer)
        return value is not None and value == float(problem.answer)


class Countdown(Task):
    """Reach a target with the given numbers (each exactly once) and + - * /: the TinyZero task."""

    name = "countdown"
    description = "combine difficulty+2 numbers with + - * / to reach a target"

    def make(self, rng: random.Random) -> Problem:
        while True:
            nums = [rng.randint(1, 20) for _ in range(self.difficulty + 2)]
            items = [(str(n), Fraction(n)) for n in nums]
            while len(items) > 1:
                (ea, va), (eb, vb) = items.pop(rng.randrange(len(items))), items.pop(rng.randrange(len(items)))
                op = rng.choice("+-*/" if vb != 0 and va % vb == 0 else "+-*")
                items.append((f"({ea} {op} {eb})", _OPS[op](va, vb)))
            expr, value = items[0]
            if value.denominator == 1 and 1 <= value <= 200:
                break
        target = int(value)
        question = (f"Using the numbers {nums}, each exactly once, and the operations + - * /, "
                    f"write an expression equal to {target}.")
        return Problem(question, expr[1:-1] if expr.startswith("(") else expr, {"numbers": nums, "target": target})

    def key(self, problem: Problem) -> str:
        return json.dumps([sorted(problem.data["numbers"]), problem.data["target"]])

    def check(self, problem: Problem, answer: str) -> bool:
        want = sorted(problem.data["numbers"])
        for side in answer.split("="):
            expr = re.sub(r"[^0-9+\-*/(). ]", "", side.replace("×", "*").replace("÷", "/")).strip()
            try:
                value, used = _eval_counting(expr)
            except (SyntaxError, ValueError, ZeroDivisionError):
                continue
            if sorted(used) == want:
                return value == problem.data["target"]
        return False


_NAMES = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Niaj",
          "Olivia", "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter", "Zoe")
_RELATIONS = (("taller", "tallest", "shortest"), ("older", "oldest", "youngest"), ("faster", "fastest", "slowest"))


class Ordering(Task):
    """A logic puzzle: difficulty+2 people, shuffled pairwise facts 'X is taller than Y'; who is the tallest
    (or shortest)? Solving it means chaining the facts into one order."""

    name = "ordering"
    description = "deduce the extreme of difficulty+2 people from shuffled pairwise comparisons"

    def make(self, rng: random.Random) -> Problem:
        people = rng.sample(_NAMES, self.difficulty + 2)  # people[0] is the most, people[-1] the least
        more, most, least = rng.choice(_RELATIONS)
        facts = [f"{a} is {more} than {b}." for a, b in zip(people, people[1:])]
        rng.shuffle(facts)
        ask_most = rng.random() < 0.5
        question = " ".join(facts) + f" Who is the {most if ask_most else least}? Answer with a name."
        return Problem(question, people[0] if ask_most else people[-1], {"people": sorted(people)})

    def check(self, problem: Problem, answer: str) -> bool:
        named = {n for n in problem.data["people"] if re.search(rf"\b{n}\b", answer, re.IGNORECASE)}
        return named == {problem.answer}


VERIFIERS = ("exact", "numeric")


class JsonlTask(Task):
    """A user's own problems: JSONL rows with ``prompt`` and ``answer``, checked by exact match (case and
    surrounding whitespace ignored) or numerically (last number in the answer, relative tolerance 1e-6)."""

    name = "jsonl"
    description = "your own JSONL of prompt/answer pairs (--verifier exact|numeric)"

    def __init__(self, path: str | Path, verifier: str = "exact") -> None:
        super().__init__(1)
        if verifier not in VERIFIERS:
            raise SlimlmError(f"unknown verifier {verifier!r}; choose one of {', '.join(VERIFIERS)}")
        self.path, self.verifier = Path(path), verifier
        self.name = f"jsonl:{self.path.name}"
        self.rows = _read_jsonl(self.path)

    def problems(self, n: int, split: str = "train", seed: int = 0) -> list[Problem]:
        """Up to ``n`` problems of ``split`` in a seeded order; training cycles through its rows when ``n`` is more."""
        pool = [Problem(r["prompt"], r["answer"]) for r in self.rows if split_of(self.name, r["prompt"]) == split]
        if not pool:
            raise SlimlmError(f"{self.path} has no {split} problems (one prompt in {HELDOUT_ONE_IN} is held out)")
        rng, out = random.Random(f"{self.name}:{split}:{seed}"), []
        while len(out) < n:
            batch = pool[:]
            rng.shuffle(batch)
            out += batch
            if split == "heldout":
                break
        return out[:n]

    def check(self, problem: Problem, answer: str) -> bool:
        return check_text(self.verifier, answer, problem.answer)


def check_text(verifier: str, answer: str, reference: str) -> bool:
    """``exact``: equal ignoring case, surrounding whitespace and a final period; ``numeric``: the last numbers
    agree within a relative 1e-6."""
    if verifier == "numeric":
        got, want = last_number(answer), last_number(reference)
        return got is not None and want is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)
    return answer.strip().rstrip(".").strip().lower() == reference.strip().lower()


TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (Arithmetic, Countdown, Ordering)}


def get_task(name: str | Task, difficulty: int = 1, verifier: str = "exact") -> Task:
    """A task by name (or a .jsonl path); an unknown name lists the known ones."""
    if isinstance(name, Task):
        return name
    if str(name).endswith(".jsonl"):
        return JsonlTask(name, verifier)
    if name not in TASKS:
        raise SlimlmError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}, or a .jsonl file of "
                          "prompt/answer rows")
    return TASKS[name](difficulty)


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise SlimlmError(f"{path} does not exist")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append({"prompt": str(row["prompt"]), "answer": str(row["answer"])})
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SlimlmError(f"{path}:{i} is not a JSON object with 'prompt' and 'answer'") from None
    if not rows:
        raise SlimlmError(f"{path} holds no problems")
    return rows


_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def _eval_counting(expr: str) -> tuple[Fraction, list[int]]:
    """Value of an arithmetic expression (integers, + - * /, parentheses) in exact fractions, and the integers
    it uses; anything else raises ValueError. Never calls eval()."""
    used: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            return _OPS[_AST_OPS[type(node.op)]](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            used.append(node.value)
            return Fraction(node.value)
        raise ValueError("not a + - * / expression of integers")

    if not expr or len(expr) > 200:
        raise ValueError("empty or too long")
    return walk(ast.parse(expr, mode="eval").body), used


def _eval_expr(expr: str) -> int:
    value, _ = _eval_counting(expr)
    return int(value)
