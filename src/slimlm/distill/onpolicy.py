"""On-policy distillation (GKD, Agarwal et al. 2024): the student writes the continuations, the teacher grades them.

Fixed text teaches the teacher's distribution on text the student would not produce, so its own errors lead
it off that distribution at generation time. A share of the steps (``--on-policy F``, GKD's lambda) replace each
sequence's second part by the student's sample and minimise the divergence to the live teacher's logits there.

Determinism: which steps are on-policy and every sampled token's uniform come from generators seeded by (seed,
step) for the whole global batch (inverse-CDF sampling), so --resume samples the same tokens, whatever the split
over processes or gradient-accumulation micro-batches.
"""

from __future__ import annotations

import torch

_STEP_STREAM = 1  # which steps are on-policy
_TOKEN_STREAM = 2  # the sampled tokens' uniforms


def _generator(seed: int, step: int, stream: int) -> torch.Generator:
    """Independent of the data-order generator (seed * 1_000_003 + epoch) by the stream offset."""
    return torch.Generator().manual_seed(stream * 2**40 + seed * 1_000_003 + step)


def is_on_policy_step(seed: int, step: int, fraction: float) -> bool:
    """Whether optimizer step ``step`` samples from the student (probability ``fraction``, seeded)."""
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    return bool(torch.rand(1, generator=_generator(seed, step, _STEP_STREAM)) < fraction)


def step_uniforms(seed: int, step: int, batch: int, new_tokens: int) -> torch.Tensor:
    """[batch, new_tokens] uniforms for the whole global batch of ``step`` (each rank slices its rows)."""
    return torch.rand(batch, new_tokens, generator=_generator(seed, step, _TOKEN_STREAM), dtype=torch.float64)


def _pick(logits: torch.Tensor, u: torch.Tensor, temperature: float) -> torch.Tensor:
    """Inverse-CDF sampling of one token per row from last-position ``logits`` [B, V] with uniforms ``u`` [B]."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    cdf = probs.cumsum(-1)
    target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target).squeeze(-1).clamp_max(logits.shape[-1] - 1)


@torch.no_grad()
def sample_continuations(model: torch.nn.Module, prompts: torch.Tensor, uniforms: torch.Tensor,
                         temperature: float = 1.0) -> torch.Tensor:
    """``prompts`` [B, P] followed by ``uniforms.shape[1]`` sampled tokens each (no early stop): [B, P + n]."""
    from transformers import DynamicCache

    from slimlm.runtime.generate import cache_kwarg

    was_training = model.training
    model.eval()
    try:
        cache = {cache_kwarg(model): DynamicCache()}
        out = model(input_ids=prompts, use_cache=True, logits_to_keep=1, **cache)
        ids = [prompts]
        for t in range(uniforms.shape[1]):
            token = _pick(out.logits[:, -1], uniforms[:, t], temperature).unsqueeze(-1)
            ids.append(token)
            if t + 1 < uniforms.shape[1]:
                out = model(input_ids=token, use_cache=True, **cache)
    finally:
        model.train(was_training)
    return torch.cat(ids, dim=1)


def on_policy_labels(ids: torch.Tensor, prompt_len: int, eos_ids: set[int] | None = None) -> torch.Tensor:
    """Labels scoring only the sampled tokens; tokens after a sampled end-of-text are not scored."""
    labels = torch.full_like(ids, -100)
    labels[:, prompt_len - 1:-1] = ids[:, prompt_len:]
    if eos_ids:
        sampled = ids[:, prompt_len:]
        is_eos = torch.isin(sampled, torch.tensor(sorted(eos_ids), device=ids.device))
        after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
        labels[:, prompt_len - 1:-1][after] = -100
    return labels
