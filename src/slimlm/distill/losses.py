"""Distillation losses between teacher and student next-token distributions.

loss = alpha * CE(labels) + (1 - alpha) * T^2 * D(teacher || student), with D one of forward KL, reverse KL
or generalized JSD(beta) (TRL's GKD). The teacher comes either as full logits (live teacher) or as a
top-k cache (indices + log-probs); with a cache, both distributions are renormalized over the teacher's
top-k support, which is what a top-k cache can represent (stated in the report).
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


def kd_loss(student_logits: torch.Tensor, labels: torch.Tensor, *, teacher_logits: torch.Tensor | None = None,
            teacher_topk_idx: torch.Tensor | None = None, teacher_topk_logprobs: torch.Tensor | None = None,
            alpha: float = 0.5, temperature: float = 1.0, divergence: str = "forward_kl", beta: float = 0.5,
            ) -> tuple[torch.Tensor, dict[str, float]]:
    """The combined loss over positions whose label is not -100; returns (loss, parts for logging).

    ``student_logits`` [B, L, V] predict ``labels`` [B, L] (already shifted by the caller).
    """
    mask = labels != -100
    ce = F.cross_entropy(student_logits[mask].float(), labels[mask]) if alpha > 0 else student_logits.new_zeros(())
    if alpha >= 1.0:
        return ce, {"ce": float(ce.detach()), "kd": 0.0}
    s = student_logits[mask].float() / temperature
    if teacher_logits is not None:
        p_log = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)
        q_log = F.log_softmax(s, dim=-1)
    else:
        idx = teacher_topk_idx[mask].long()
        # Teacher top-k log-probs were stored at temperature 1; re-temper and renormalize on the support.
        p_log = F.log_softmax(teacher_topk_logprobs[mask].float() / temperature, dim=-1)
        q_log = F.log_softmax(s.gather(-1, idx), dim=-1)
    kd = _divergence(p_log, q_log, divergence, beta).mean()
    loss = alpha * ce + (1 - alpha) * temperature**2 * kd
    return loss, {"ce": float(ce.detach()), "kd": float(kd.detach())}
