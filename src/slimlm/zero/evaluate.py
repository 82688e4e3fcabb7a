"""Held-out evaluation: each problem answered once (greedy by default), scored by the task's verifier; accuracy
with its standard error, and the paired difference of two models on the same problems."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch

from slimlm.util.cpu import use_bf16
from slimlm.zero.rewards import accuracy_reward, format_reward
from slimlm.zero.tasks import Task, get_task
from slimlm.zero.template import Template


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n)); SE is 0 for fewer than two values."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def paired_difference(after: list[float], before: list[float]) -> dict[str, float]:
    """after − before over the same problems: the mean difference, its SE from the per-problem differences
    (tighter than two independent SEs when the models agree on many problems), and difference / SE."""
    if len(after) != len(before):
        raise ValueError("paired scores must cover the same problems")
    diff, se = mean_se([a - b for a, b in zip(after, before)])
    return {"difference": diff, "se": se, "z": diff / se if se > 0 else (0.0 if diff == 0 else math.inf),
            "n": len(after)}


@torch.no_grad()
def generate_completions(model: torch.nn.Module, tokenizer, prompts: list[str], *, max_new_tokens: int,
                         temperature: float = 0.0, batch_size: int = 16, seed: int = 0,
                         progress: Callable[[int, int], None] | None = None) -> list[str]:
    """One completion per prompt (left-padded batches; greedy when temperature is 0)."""
    torch.manual_seed(seed)
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    out: list[str] = []
    for lo in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[lo:lo + batch_size], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(device)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0} if temperature > 0 else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
        out += tokenizer.batch_decode(gen[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        if progress:
            progress(len(out), len(prompts))
    return out


def evaluate_task(model: str | Path, task: str | Task, *, n: int = 200, seed: int = 0, difficulty: int = 1,
                  template: Template | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
                  batch_size: int = 16, verifier: str = "exact", keep: int = 3, bf16: bool | None = None,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Score ``model`` on ``n`` held-out problems of ``task``: accuracy ± SE, format rate ± SE, both together,
    mean completion length, per-problem scores (for paired differences) and ``keep`` sample completions.
    ``bf16``: sample on bf16 weights (None: where bf16 is fast, about half the time there; else fp32)."""
    from slimlm.models import load_model

    task = get_task(task, difficulty, verifier)
    template = template or Template()
    dtype = "bf16" if use_bf16(bf16) else "fp32"
    loaded = load_model(model, dtype)
    tok = loaded.tokenizer
    if torch.cuda.is_available():
        loaded.model.to("cuda")
    template.check(tok, str(model))
    problems = task.problems(n, "heldout", seed)
    prompts = [template.render(tok, p.question) for p in problems]
    completions = generate_completions(loaded.model, tok, prompts, max_new_tokens=max_new_tokens,
                                       temperature=temperature, batch_size=batch_size, seed=seed, progress=progress)
    responses = [template.prefill + c for c in completions]
    correct = [accuracy_reward(task, p, r) for p, r in zip(problems, responses)]
    formatted = [format_reward(r) for r in responses]
    both = [c * f for c, f in zip(correct, formatted)]
    lengths = [len(tok(c, add_special_tokens=False).input_ids) for c in completions]
    acc, acc_se = mean_se(correct)
    fmt, fmt_se = mean_se(formatted)
    strict, strict_se = mean_se(both)
    return {"model": str(model), "task": task.name, "difficulty": task.difficulty, "split": "heldout",
            "seed": seed, "n": len(problems), "temperature": temperature, "dtype": dtype,
            "max_new_tokens": max_new_tokens,
            "template": {"style": template.style, "prefill": template.prefill},
            "accuracy": acc, "accuracy_se": acc_se, "format": fmt, "format_se": fmt_se,
            "correct_and_formatted": strict, "correct_and_formatted_se": strict_se,
            "mean_completion_tokens": sum(lengths) / max(len(lengths), 1),
            "scores": {"correct": correct, "format": formatted},
            "samples": [{"question": p.question, "answer": p.answer, "completion": c}
                        for p, c in zip(problems[:keep], completions[:keep])]}
