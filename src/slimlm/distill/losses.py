"""Distillation losses between teacher and student next-token distributions.

loss = alpha * CE(labels) + (1 - alpha) * T^2 * D(teacher || student), with D one of forward KL, reverse KL
or generalized JSD(beta) (TRL's GKD). The teacher comes either as full logits (live teacher) or as a
top-k cache (indices + full-vocabulary log-probs of those k tokens). With a cache, both distributions are
compared over k + 1 buckets: the teacher's top-k tokens one by one, and "everything else" (the teacher's
residual mass 1 - sum(top-k), against the mass the student puts outside those k tokens). Renormalising over
the top-k alone (the obvious alternative) leaves the student's mass outside the top-k unconstrained: on
SmolLM2 that pure-KD student reached test perplexity 99.9 against CE-only's 26.7 (BENCHMARKS.md). At
temperature T != 1 both bucket distributions are tempered as k + 1 categories (exact at T = 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _divergence(p_log: torch.Tensor, q_log: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Per-position D(p || q) from log-probs over the same support (last dim)."""
    p, q = p_log.exp(), q_log.exp()
    if kind == "forward_kl":
        return (p * (p_log - q_log)).sum(-1)
    if kind == "reverse_kl":
        return (q * (q_log - p_log)).sum(-1)
    if kind == "jsd":
        # Generalized JSD as in GKD: beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta p + (1 - beta) q.
        if beta <= 0.0:
            return (p * (p_log - q_log)).sum(-1)
        if beta >= 1.0:
            return (q * (q_log - p_log)).sum(-1)
        m_log = torch.logsumexp(torch.stack([p_log + torch.log(torch.tensor(beta)),
                                             q_log + torch.log(torch.tensor(1 - beta))]), dim=0)
        return beta * (p * (p_log - m_log)).sum(-1) + (1 - beta) * (q * (q_log - m_log)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; choose one of {DIVERGENCES}")


_TINY_LOG = -30.0  # log of the smallest residual mass kept (e^-30 ~ 1e-13): a residual of 0 stays finite


def topk_buckets(student_logprobs: torch.Tensor, idx: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probs over k + 1 buckets (the teacher's top-k tokens, then the rest).

    Both inputs are log-probs at temperature 1 over the full vocabulary (the student's [M, V], the teacher's
    cached [M, k]), so each residual is log(1 - sum(exp(top-k))): no vocabulary-sized copy is needed. Both
    bucket vectors are renormalised (fp16 cache rounding can push the teacher's sum a hair past 1).
    """
    def with_rest(top: torch.Tensor) -> torch.Tensor:
        mass = top.exp().sum(-1, keepdim=True)
        rest = torch.log1p(-mass.clamp(max=1.0 - 1e-7)).clamp(min=_TINY_LOG)
        return torch.cat([top, rest], dim=-1)

    p = with_rest(teacher_topk_logprobs)
    q = with_rest(student_logprobs.gather(-1, idx))
    return F.log_softmax(p / temperature, dim=-1), F.log_softmax(q / temperature, dim=-1)


def kd_loss(student_logits: torch.Tensor, labels: torch.Tensor, *, teacher_logits: torch.Tensor | None = None,
            teacher_topk_idx: torch.Tensor | None = None, teacher_topk_logprobs: torch.Tensor | None = None,
            alpha: float = 0.5, temperature: float = 1.0, divergence: str = "forward_kl", beta: float = 0.5,
            ) -> tuple[torch.Tensor, dict[str, float]]:
    """The combined loss over positions whose label is not -100; returns (loss, parts for logging).
    ``student_logits`` [B, L, V] predict ``labels`` [B, L] (already shifted by the caller)."""
    mask = labels != -100
    logits = student_logits[mask].float()
    if alpha >= 1.0:
        ce = F.cross_entropy(logits, labels[mask])
        return ce, {"ce": float(ce.detach()), "kd": 0.0}
    q_full = F.log_softmax(logits, dim=-1)  # one vocabulary-wide pass shared by CE and the divergence
    ce = -q_full.gather(-1, labels[mask].unsqueeze(-1)).mean() if alpha > 0 else logits.new_zeros(())
    if teacher_logits is not None:
        p_log = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)
        q_log = q_full if temperature == 1.0 else F.log_softmax(logits / temperature, dim=-1)
    else:
        p_log, q_log = topk_buckets(q_full, teacher_topk_idx[mask].long(), teacher_topk_logprobs[mask].float(),
                                    temperature)
    kd = _divergence(p_log, q_log, divergence, beta).mean()
    loss = alpha * ce + (1 - alpha) * temperature**2 * kd
    return loss, {"ce": float(ce.detach()), "kd": float(kd.detach())}
