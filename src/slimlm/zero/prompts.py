"""The bridge to `distill --method sequence` (the R1 story): a task's training prompts with their answers as
JSONL, and a verifier that keeps only the teacher responses those answers confirm."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from slimlm.errors import SlimlmError
from slimlm.writers.atomic import atomic_path
from slimlm.zero.rewards import accuracy_reward, extract_answer
from slimlm.zero.tasks import JsonlTask, Problem, Task, check_text, get_task
from slimlm.zero.template import Template


def write_prompts(task: Task, path: str | Path, *, n: int, seed: int = 0, split: str = "train") -> dict:
    """``n`` problems of ``split`` as JSONL rows {prompt (the chat user turn), answer, task, difficulty, data};
    `distill --prompts FILE --verifier answers` reads them."""
    path = Path(path)
    rows = []
    for p in task.problems(n, split, seed):
        row = {"prompt": Template().user_message(p.question), "answer": p.answer, "question": p.question,
               "task": task.name, "difficulty": task.difficulty, "data": p.data}
        if isinstance(task, JsonlTask):
            row.update(task="jsonl", verifier=task.verifier)
        rows.append(row)
    _write_jsonl(path, rows)
    return {"path": str(path), "problems": len(rows), "task": task.name, "split": split, "seed": seed}


def answers_verifier(path: str | Path) -> Callable[[str, str], bool]:
    """(prompt, response) -> bool: the response's answer is right by the task's verifier for that prompt's row
    in ``path`` (written by write_prompts); prompts not in the file are rejected."""
    checks: dict[str, Callable[[str], bool]] = {}
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, answer, name = row["prompt"], row["answer"], row["task"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SlimlmError(f"{path}:{i} has no prompt/answer/task: --verifier answers needs prompts written "
                              "by `slimlm zero --write-prompts`") from None
        if name == "jsonl":
            verifier = row.get("verifier", "exact")
            checks[prompt] = lambda r, a=answer, v=verifier: check_text(v, extract_answer(r), a)
        else:
            task, problem = get_task(name, int(row.get("difficulty", 1))), Problem(row["question"], answer,
                                                                                     row.get("data", {}))
            checks[prompt] = lambda r, t=task, p=problem: accuracy_reward(t, p, r) == 1.0
    return lambda prompt, response: prompt in checks and checks[prompt](response)


def write_reference_responses(prompts: str | Path, path: str | Path) -> dict:
    """The task's reference answers as prompt/response pairs (an empty think block, then the answer): what a
    student learns from the answers alone, the baseline a Zero teacher's verified traces must beat."""
    rows = [json.loads(ln) for ln in Path(prompts).read_text(encoding="utf-8").splitlines() if ln.strip()]
    _write_jsonl(Path(path), [{"prompt": r["prompt"], "response": f"<think> </think> <answer>{r['answer']}</answer>"}
                              for r in rows])
    return {"path": str(path), "pairs": len(rows)}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Written beside ``path`` and renamed in: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
