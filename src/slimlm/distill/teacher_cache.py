"""The teacher's top-k next-token distribution, computed once and stored compactly on disk.

Layout (safetensors, no pickle): input_ids int32 [N, L]; topk_idx uint16 (int32 when the vocabulary
exceeds 65,536) [N, L, k]; topk_logprobs float16 [N, L, k] (log-probs at temperature 1 over the full
vocabulary). Bytes per token = k * (2 or 4) + k * 2, e.g. 64 bytes for k = 16 with a 49k vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slimlm.errors import SlimlmError
from slimlm.writers.atomic import atomic_path


@torch.no_grad()
def cache_teacher(teacher: torch.nn.Module, input_ids: torch.Tensor, out: Path, *, top_k: int = 16,
                  batch_size: int = 4, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run the teacher over every sequence once; write the top-k cache to ``out`` (temp file, then rename)."""
    teacher.eval()
    vocab = int(teacher.config.vocab_size)
    if top_k < 1 or top_k > vocab:
        raise SlimlmError(f"--top-k must be between 1 and the vocabulary size {vocab}")
    idx_dtype = torch.uint16 if vocab <= 65536 else torch.int32
    n, length = input_ids.shape
    all_idx = torch.empty(n, length, top_k, dtype=idx_dtype)
    all_lp = torch.empty(n, length, top_k, dtype=torch.float16)
    for lo in range(0, n, batch_size):
        logits = teacher(input_ids=input_ids[lo:lo + batch_size]).logits.float()
        lp = torch.log_softmax(logits, dim=-1)
        values, indices = lp.topk(top_k, dim=-1)
        all_idx[lo:lo + batch_size] = indices.to(idx_dtype)
        all_lp[lo:lo + batch_size] = values.half()
        if progress:
            progress(min(lo + batch_size, n), n)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"top_k": str(top_k), "vocab_size": str(vocab), "teacher": str(getattr(teacher.config, "_name_or_path", "")),
            "layout": "input_ids int32 [N,L]; topk_idx [N,L,k]; topk_logprobs float16 [N,L,k] (T=1, full-vocab log-probs)"}
    with atomic_path(out) as tmp:
        save_file({"input_ids": input_ids.to(torch.int32).contiguous(), "topk_idx": all_idx,
                   "topk_logprobs": all_lp}, str(tmp), metadata=meta)
    bytes_per_token = top_k * (all_idx.element_size() + 2)
    return {"path": str(out), "sequences": n, "seq_len": length, "top_k": top_k,
            "bytes_per_token": bytes_per_token, "file_bytes": out.stat().st_size}


def load_teacher_cache(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, str]]:
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            ids = f.get_tensor("input_ids").long()
            idx = f.get_tensor("topk_idx").to(torch.int64)
            lp = f.get_tensor("topk_logprobs")
    except Exception as exc:  # safetensors raises several types for a bad file
        raise SlimlmError(f"{path} is not a slimlm teacher cache: {exc}") from None
    if "top_k" not in meta:
        raise SlimlmError(f"{path} is not a slimlm teacher cache (no top_k metadata)")
    return ids, idx, lp, meta
