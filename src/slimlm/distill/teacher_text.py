"""Teacher-generated training data (the R1-Distill recipe): prompts in, verified unique responses out (JSONL).

Only text passes from teacher to student, so this works across tokenizers and architectures.
"""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path
from typing import Any, Callable

import torch

from slimlm.errors import SlimlmError
from slimlm.util.cpu import use_bf16
from slimlm.writers.atomic import atomic_path


def read_prompts(path: Path, field: str = "prompt") -> list[str]:
    """Prompts from a .jsonl (``field``) or a text file (one per non-empty line)."""
    if not Path(path).is_file():
        raise SlimlmError(f"{path} does not exist")
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if str(path).endswith(".jsonl"):
        prompts = []
        for i, line in enumerate(lines, 1):
            if line.strip():
                try:
                    prompts.append(str(json.loads(line)[field]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise SlimlmError(f"{path}:{i} is not a JSON object with a {field!r} field") from None
    else:
        prompts = [ln.strip() for ln in lines if ln.strip()]
    if not prompts:
        raise SlimlmError(f"{path} holds no prompts")
    return prompts


def load_verifier(spec: str | None, prompts: Path | None = None) -> Callable[[str, str], bool] | None:
    """``module:function`` taking (prompt, response) -> bool; responses it rejects are dropped. ``answers``:
    the task verifier of each prompt's row in ``prompts`` (written by `slimlm zero --write-prompts`)."""
    if not spec:
        return None
    if spec == "answers":
        from slimlm.zero.prompts import answers_verifier

        if prompts is None:
            raise SlimlmError("--verifier answers needs --prompts written by `slimlm zero --write-prompts`")
        return answers_verifier(prompts)
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise SlimlmError(f"cannot import verifier {spec!r} (expected module:function)") from None


def chat_prompt(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


@torch.no_grad()
def generate_responses(teacher: torch.nn.Module, tokenizer, prompts: list[str], out: Path, *,
                       max_new_tokens: int = 128, temperature: float = 0.7, top_p: float = 0.95,
                       samples_per_prompt: int = 1, seed: int = 0, batch_size: int = 16,
                       verifier: Callable[[str, str], bool] | None = None,
                       progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Sample responses (chat template applied), drop duplicates and rejected ones, write JSONL atomically.
    Where bf16 is fast the sampling runs on a bf16 copy of the teacher (half the time on an AMX CPU); the fp32
    teacher stays as it is for the held-out comparison."""
    torch.manual_seed(seed)
    teacher.eval()
    dtype = next(teacher.parameters()).dtype
    if use_bf16() and dtype != torch.bfloat16:
        teacher, dtype = copy.deepcopy(teacher).to(torch.bfloat16), torch.bfloat16
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    seen: set[tuple[str, str]] = set()
    rows, rejected, duplicates = [], 0, 0
    jobs = [p for p in prompts for _ in range(samples_per_prompt)]
    for lo in range(0, len(jobs), batch_size):
        batch = jobs[lo:lo + batch_size]
        enc = tokenizer([chat_prompt(tokenizer, p) for p in batch], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        gen = teacher.generate(**enc, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                               temperature=temperature if temperature > 0 else None,
                               top_p=top_p if temperature > 0 else None, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(gen[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        for prompt, response in zip(batch, texts):
            response = response.strip()
            if (prompt, response) in seen:
                duplicates += 1
                continue
            seen.add((prompt, response))
            if verifier is not None and not verifier(prompt, response):
                rejected += 1
                continue
            rows.append({"prompt": prompt, "response": response})
        if progress:
            progress(min(lo + batch_size, len(jobs)), len(jobs))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return {"path": str(out), "prompts": len(prompts), "generated": len(jobs), "kept": len(rows),
            "duplicates": duplicates, "rejected": rejected,
            "sampling": {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                         "samples_per_prompt": samples_per_prompt, "seed": seed,
                         "dtype": str(dtype).removeprefix("torch.")}}


def sft_sequences(tokenizer, jsonl: Path, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Pack whole (chat-formatted prompt, response + EOS) pairs into [N, seq_len] rows; prompt and padding tokens
    are not scored. A pair never straddles two rows: a response cut off from its prompt teaches the student to
    answer a question it cannot see. A pair longer than a row keeps its first ``seq_len`` tokens (counted)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows: list[tuple[list[int], list[bool]]] = []
    ids: list[int] = []
    scored: list[bool] = []
    pairs = truncated = 0
    for line in Path(jsonl).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        p = tokenizer(chat_prompt(tokenizer, row["prompt"]), add_special_tokens=False).input_ids
        r = tokenizer(row["response"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        pair, pair_scored = (p + r)[:seq_len], ([False] * len(p) + [True] * len(r))[:seq_len]
        pairs += 1
        truncated += len(p) + len(r) > seq_len
        if len(ids) + len(pair) > seq_len:
            rows.append((ids, scored))
            ids, scored = [], []
        ids.extend(pair)
        scored.extend(pair_scored)
    rows.append((ids, scored))
    scored_tokens = sum(map(sum, (s for _, s in rows)))
    if scored_tokens == 0:
        raise SlimlmError(f"{jsonl} has no response tokens to train on within sequences of {seq_len}")
    t = torch.tensor([i + [pad] * (seq_len - len(i)) for i, _ in rows])
    prompt_mask = ~torch.tensor([s + [False] * (seq_len - len(s)) for _, s in rows])
    return t, prompt_mask, {"pairs": pairs, "sequences": len(rows), "truncated": truncated,
                            "scored_tokens": scored_tokens}
