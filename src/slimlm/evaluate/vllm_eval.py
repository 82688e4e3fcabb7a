"""Perplexity through vLLM (``slimlm eval --backend vllm``): the same windows and scored half as
:mod:`slimlm.evaluate.perplexity`, the log-probs from vLLM's ``prompt_logprobs`` instead of a torch forward."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from slimlm.data.text import read_text, tokenize_text
from slimlm.errors import SlimlmError
from slimlm.evaluate.perplexity import make_windows, perplexity_stats, scored_span
from slimlm.models.loader import load_tokenizer, tokenizer_adds_bos
from slimlm.runtime import vllm_engine


def scored_nll(logprobs: list[list[float | None]], ctx: int) -> torch.Tensor:
    """NLL of the scored positions of each window: the tokens ctx/2+1 .. ctx-1 (logprobs[i] is token i's)."""
    first, count = scored_span(ctx)
    rows = []
    for row in logprobs:
        if len(row) != ctx:
            raise SlimlmError(f"vLLM returned {len(row)} prompt log-probs for a window of {ctx}")
        rows.append([-float(v) for v in row[first + 1:first + 1 + count]])
    return torch.tensor(rows, dtype=torch.float64)


def evaluate_vllm(model: str | Path, data: str | Path, *, ctx: int = 512, chunks: int | None = None,
                  tokenizer: str | Path | None = None, text_field: str = "text", dtype: str = "bfloat16",
                  tensor_parallel_size: int = 1) -> dict[str, Any]:
    """Perplexity ± standard error of ``model`` on ``data`` as vLLM scores it, and which kernels it used."""
    started = time.perf_counter()
    path = Path(model)
    tok_source = tokenizer or (path if path.is_dir() else None)
    if tok_source is None:
        raise SlimlmError("give --tokenizer DIR for a GGUF file on vLLM")
    tok = load_tokenizer(tok_source)
    add_bos, bos = tokenizer_adds_bos(tok)
    tokens = tokenize_text(tok, read_text(data, field=text_field), add_bos=add_bos, bos_token_id=bos,
                           source=str(data))
    windows = make_windows(tokens, ctx, chunks)
    answer = vllm_engine.prompt_logprobs(path, windows.tolist(), dtype=dtype, max_model_len=ctx + 8,
                                         tensor_parallel_size=tensor_parallel_size,
                                         tokenizer=tokenizer if path.is_file() else None)
    stats = perplexity_stats(scored_nll(answer["logprobs"], ctx).reshape(-1))
    return {"model": {"path": str(path), "engine": "vllm", "vllm_version": answer["vllm_version"],
                      "quantization": answer["quantization"], "kernels": answer["kernels"], "dtype": dtype},
            "data": str(data), "ctx": ctx, "chunks": int(windows.shape[0]), "n_text_tokens": int(tokens.ids.numel()),
            "perplexity": stats.to_dict(), "seconds": time.perf_counter() - started,
            "scored_tokens_per_second": stats.n_tokens / (time.perf_counter() - started)}
