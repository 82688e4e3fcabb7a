"""R1-Zero's two rule-based rewards, kept apart so each is logged: accuracy (the task's verifier on the
extracted answer) and format (<think>…</think><answer>…</answer>, nothing else)."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from slimlm.zero.tasks import Problem, Task
from slimlm.zero.template import Template

_FORMAT = re.compile(r"\A\s*<think>.*?</think>\s*<answer>.*?</answer>\s*\Z", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def format_reward(response: str) -> float:
    """1.0 when the response is exactly one think block followed by one answer block, else 0.0."""
    ok = _FORMAT.match(response) and response.count("<answer>") == 1 and response.count("<think>") == 1
    return 1.0 if ok else 0.0


def extract_answer(response: str) -> str:
    """The last <answer>…</answer> content; without one, the last non-empty line (so a right answer in the
    wrong format still counts as correct, and format and correctness can be told apart)."""
    found = _ANSWER.findall(response)
    if found:
        return found[-1].strip()
    lines = [ln.strip() for ln in response.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def accuracy_reward(task: Task, problem: Problem, response: str) -> float:
    return 1.0 if task.check(problem, extract_answer(response)) else 0.0


def problem_row(problem: Problem, prompt: str) -> dict[str, str]:
    """A dataset row for TRL: the rendered prompt plus the columns the reward functions read back."""
    return {"prompt": prompt, "question": problem.question, "answer": problem.answer,
            "data": json.dumps(problem.data)}


def reward_funcs(task: Task, template: Template) -> list[Callable[..., list[float]]]:
    """TRL reward functions (named ``accuracy`` and ``format``, so TRL logs rewards/accuracy/mean and
    rewards/format/mean); they read the problem back from the dataset columns of ``problem_row``."""

    def accuracy(prompts: list[str], completions: list[str], question: list[str], answer: list[str],
                 data: list[str], **_: Any) -> list[float]:
        return [accuracy_reward(task, Problem(q, a, json.loads(d)), template.prefill + c)
                for c, q, a, d in zip(completions, question, answer, data)]

    def format(prompts: list[str], completions: list[str], **_: Any) -> list[float]:  # noqa: A001
        return [format_reward(template.prefill + c) for c in completions]

    return [accuracy, format]

