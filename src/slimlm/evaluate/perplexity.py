"""Perplexity with llama.cpp's llama-perplexity protocol, computed in batched torch.

Protocol (so our numbers compare with llama.cpp's): the text is tokenized once; window i is
tokens[i*ctx:(i+1)*ctx], its first token replaced by BOS when the tokenizer adds one; only the second
half is scored: logits at positions ctx/2 .. ctx-2 predict tokens ctx/2+1 .. ctx-1. At least 2*ctx
tokens are required, as llama.cpp requires. ppl = exp(mean NLL), its standard error as llama.cpp's.

Speed: several windows per forward pass; the output layer runs only on the scored positions
(``logits_to_keep``), and log-softmax is applied in place in row chunks, so the only big tensor is the
scored half of the logits, once.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Iterator

import torch

from slimlm.errors import SlimlmError
from slimlm.data.text import TokenizedText
from slimlm.evaluate.kld import mean_and_stderr

_ROW_CHUNK = 64  # rows of the vocab-wide log-softmax done at a time: 64 x 49152 x 4 B = 12.6 MB scratch


def scored_span(ctx: int) -> tuple[int, int]:
    """(first, count): logits at positions first .. first+count-1 are scored; llama.cpp's first = ctx/2."""
    first = ctx // 2
    return first, ctx - 1 - first


def make_windows(tokens: TokenizedText, ctx: int, chunks: int | None = None) -> torch.Tensor:
    """The (n_windows, ctx) int64 windows llama-perplexity evaluates, BOS-substituted when add_bos."""
    if ctx < 4:
        raise SlimlmError(f"--ctx {ctx} is too small (at least 4)")
    n_tokens = int(tokens.ids.numel())
    if n_tokens < 2 * ctx:
        raise SlimlmError(f"{tokens.source or 'the data'} tokenizes to only {n_tokens} tokens; ctx {ctx} needs at "
                          f"least {2 * ctx} (llama.cpp's rule)")
    if chunks is not None and chunks < 1:
        raise SlimlmError(f"--chunks must be at least 1 (got {chunks})")
    n = n_tokens // ctx if chunks is None else min(chunks, n_tokens // ctx)
    windows = tokens.ids[: n * ctx].reshape(n, ctx).clone()
    if tokens.add_bos:
        windows[:, 0] = tokens.bos_token_id
    return windows


def log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Turn float32 logits (..., V) into log-probabilities in place, a few rows at a time (no full copy)."""
    rows = logits.view(-1, logits.shape[-1])
    for start in range(0, rows.shape[0], _ROW_CHUNK):
        block = rows[start:start + _ROW_CHUNK]
        block.copy_(torch.log_softmax(block, dim=-1))
    return logits


def _forward_kwargs(model: torch.nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def iter_scored_logprobs(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1
                         ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (lo, hi, logprobs) for windows[lo:hi]: float32 (hi-lo, n_scored, V) log-probabilities.

    Only the scored positions reach the output layer when the model accepts ``logits_to_keep``.
    """
    ctx = windows.shape[1]
    first, count = scored_span(ctx)
    keep = torch.arange(first, first + count)
    accepts_keep = "logits_to_keep" in _forward_kwargs(model)
    device = next(model.parameters()).device
    for lo in range(0, windows.shape[0], batch_size):
        hi = min(lo + batch_size, windows.shape[0])
        ids = windows[lo:hi].to(device)
        # Inference mode only around the forward, never across the yield: a generator suspended inside the
        # context would leak the mode into its caller (and two interleaved ones restore it out of order).
        with torch.inference_mode():
            if accepts_keep:
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep.to(device)).logits
            else:
                logits = model(input_ids=ids, use_cache=False).logits[:, first:first + count]
            if logits.dtype != torch.float32 or not logits.is_contiguous() or logits.device.type != "cpu":
                logits = logits.float().contiguous().cpu()
            logprobs = log_softmax_(logits)
        yield lo, hi, logprobs


def window_targets(windows: torch.Tensor) -> torch.Tensor:
    """(n, n_scored) ids the scored positions predict: tokens ctx/2+1 .. ctx-1 of each window."""
    first, count = scored_span(windows.shape[1])
    return windows[:, first + 1:first + 1 + count]


def token_nll(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood (flattened, float64) from (b, n, V) log-probs and (b, n) targets."""
    return -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).reshape(-1).double()


def windows_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """Per-token NLL (float64) of every scored position, ``(n_windows, n_scored)``, window by window."""
    return torch.cat([token_nll(lp, window_targets(windows[lo:hi])).reshape(hi - lo, -1)
                      for lo, hi, lp in iter_scored_logprobs(model, windows, batch_size)])


@dataclass
class PerplexityStats:
    ppl: float
    ppl_stderr: float
    nll_mean: float
    n_tokens: int

    def to_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def perplexity_stats(nll: torch.Tensor) -> PerplexityStats:
    """exp(mean NLL) ± ppl·sqrt(var/(N-1)), the uncertainty llama-perplexity prints."""
    mean, stderr = mean_and_stderr(nll)
    ppl = math.exp(mean)
    return PerplexityStats(ppl=ppl, ppl_stderr=ppl * stderr, nll_mean=mean, n_tokens=int(nll.numel()))
