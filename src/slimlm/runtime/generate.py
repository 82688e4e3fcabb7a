"""Text generation with a KV cache on any transformers causal LM (quantized or not), batch 1 or batched.

A plain loop over the model's forward (the lean one in runtime.fastpath where it applies), not ``model.generate``,
so TTFT, inter-token latencies and tokens/s come from the run that made the text, and a callback streams each
new token. Batches are left-padded, so all rows decode in step.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from slimlm.errors import SlimlmError
from slimlm.runtime.fastpath import lean_model


@dataclass
class SamplingConfig:
    """Greedy when ``greedy`` (or temperature 0); otherwise temperature then nucleus (top-p) sampling."""

    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        if self.temperature < 0:
            raise SlimlmError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SlimlmError(f"top-p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    """New token ids per row (without prompt or padding), and the timings of the run."""

    new_ids: list[list[int]]
    prompt_lengths: list[int]
    ttft_s: float  # prompt forward + first token choice
    step_s: list[float] = field(default_factory=list)  # each later decode step (one token per row)
    texts: list[str] | None = None

    @property
    def batch(self) -> int:
        return len(self.new_ids)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens made per second of decode steps (all rows together), prefill excluded."""
        total = sum(self.step_s)
        return self.batch * len(self.step_s) / total if total > 0 else float("nan")

    def itl_ms(self, q: float) -> float:
        """Inter-token latency quantile in ms (0.5 = p50, 0.95 = p95)."""
        if not self.step_s:
            return float("nan")
        if len(self.step_s) == 1:
            return self.step_s[0] * 1e3
        return statistics.quantiles(self.step_s, n=100, method="inclusive")[round(q * 100) - 1] * 1e3

    def to_dict(self) -> dict:
        return {"texts": self.texts, "new_ids": self.new_ids, "prompt_lengths": self.prompt_lengths,
                "new_tokens": sum(len(r) for r in self.new_ids), "ttft_ms": self.ttft_s * 1e3,
                "itl_p50_ms": self.itl_ms(0.5), "itl_p95_ms": self.itl_ms(0.95),
                "decode_tokens_per_s": self.decode_tokens_per_s}


def cache_kwarg(model: torch.nn.Module) -> str:
    """transformers ≥ 5.2x names the KV-cache argument ``cache``; earlier versions ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def choose_next(logits: torch.Tensor, sampling: SamplingConfig, gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row from last-position logits ``(B, V)``."""
    if sampling.greedy or sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= sampling.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.inference_mode()
def forward_logits(model: torch.nn.Module, input_ids: torch.Tensor, logits_to_keep: int = 1, lean: bool = True
                   ) -> torch.Tensor:
    """One cache-free forward (a prompt's prefill), through the lean forward where it applies."""
    fast = lean_model(model) if lean and input_ids.device.type == "cpu" else None
    if fast is not None:
        return fast.forward(input_ids, logits_to_keep=logits_to_keep)
    return model(input_ids=input_ids, use_cache=False, logits_to_keep=logits_to_keep).logits


@torch.inference_mode()
def generate_ids(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 32, sampling: SamplingConfig | None = None, eos_ids: set[int] | None = None,
                 pad_id: int = 0, on_step: Callable[[torch.Tensor], None] | None = None,
                 lean: bool = True) -> GenerationResult:
    """Decode up to ``max_new_tokens`` per row from left-padded ``input_ids`` ``(B, T)``.

    Rows that emit an id in ``eos_ids`` stop (later positions get ``pad_id`` and are not reported); ``on_step``
    gets each step's ``(B,)`` new tokens. ``lean=False`` forces transformers' forward and its dynamic cache.
    """
    sampling = sampling or SamplingConfig()
    sampling.check()
    if max_new_tokens < 1:
        raise SlimlmError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
    gen = None
    if not sampling.greedy and sampling.seed is not None:
        gen = torch.Generator().manual_seed(sampling.seed)
    device = next(model.parameters(), torch.empty(0)).device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    batch = input_ids.shape[0]
    prompt_lengths = attention_mask.sum(1).tolist()
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
    fast = lean_model(model) if lean and device.type == "cpu" else None
    if fast is not None:
        static = fast.new_cache(batch, input_ids.shape[1] + max_new_tokens)

        def forward(ids, mask, positions, keep=0):
            return fast.forward(ids, positions, mask, static, logits_to_keep=keep)
    else:
        cache = {cache_kwarg(model): DynamicCache()}

        def forward(ids, mask, positions, keep=0):
            return model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache, use_cache=True,
                         logits_to_keep=keep).logits
    eos = torch.tensor(sorted(eos_ids or []), dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens: list[torch.Tensor] = []
    step_s: list[float] = []

    start = time.perf_counter()
    logits = forward(input_ids, attention_mask, position_ids, 1)
    token = choose_next(logits[:, -1, :], sampling, gen)
    ttft = time.perf_counter() - start
    for step in range(max_new_tokens):
        token = torch.where(done, torch.full_like(token, pad_id), token)
        new_tokens.append(torch.where(done, torch.full_like(token, -1), token))
        if on_step is not None:
            on_step(token)
        if eos.numel():
            done |= torch.isin(token, eos)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        t0 = time.perf_counter()
        attention_mask = torch.cat([attention_mask, (~done).long()[:, None]], dim=1)
        position_ids = position_ids[:, -1:] + 1
        logits = forward(token[:, None], attention_mask, position_ids)
        token = choose_next(logits[:, -1, :], sampling, gen)
        step_s.append(time.perf_counter() - t0)
    ids = torch.stack(new_tokens, dim=1).tolist()
    rows = [[t for t in row if t >= 0] for row in ids]
    return GenerationResult(rows, prompt_lengths, ttft, step_s)


def generate(model: torch.nn.Module, tokenizer, prompts: str | list[str], max_new_tokens: int = 64,
             sampling: SamplingConfig | None = None, on_text: Callable[[str], None] | None = None,
             chat: bool = False) -> GenerationResult:
    """Generate text for one prompt or a batch; ``on_text`` streams the first row's text as it grows; ``chat=True``
    wraps each prompt in the tokenizer's chat template."""
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    if not prompts:
        raise SlimlmError("no prompt given")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise SlimlmError("this tokenizer has no chat template; drop --chat")
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token_id = pad_id
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = old_side
    if enc["input_ids"].shape[1] == 0:
        raise SlimlmError("the prompt tokenizes to nothing")
    eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    streamed: list[int] = []
    shown = ""

    def on_step(token: torch.Tensor) -> None:
        nonlocal shown
        if on_text is None or int(token[0]) in eos_ids:
            return
        streamed.append(int(token[0]))
        text = tokenizer.decode(streamed, skip_special_tokens=True)
        if len(text) > len(shown) and not text.endswith("\ufffd"):  # hold back half a multi-byte character
            on_text(text[len(shown):])
            shown = text

    result = generate_ids(model, enc["input_ids"], enc["attention_mask"], max_new_tokens, sampling, eos_ids,
                          pad_id, on_step)
    result.texts = [tokenizer.decode([t for t in row if t not in eos_ids], skip_special_tokens=True)
                    for row in result.new_ids]
    return result
