"""Per-token divergences between the student's and the teacher's next-token distributions.

All take logits of shape [N, V] (one row per response token) and return [N] losses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")


def _log_probs(student: torch.Tensor, teacher: torch.Tensor, top_k: int | None):
    if top_k:
        # Restrict both distributions to the teacher's top-k tokens, renormalized.
        index = teacher.topk(top_k, dim=-1).indices
        student, teacher = student.gather(-1, index), teacher.gather(-1, index)
    return F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1)


def per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "reverse_kl",
              beta: float = 0.5, top_k: int | None = None) -> torch.Tensor:
    """KL(student||teacher) (reverse, mode-seeking), KL(teacher||student) (forward), or the
    generalized JSD_beta = beta KL(t||m) + (1-beta) KL(s||m) with m = beta t + (1-beta) s."""
    log_s, log_t = _log_probs(student_logits, teacher_logits.detach(), top_k)
    return _between(log_s, log_t, kind, beta)


def per_token_top(student_logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor,
                  kind: str = "forward_kl", beta: float = 0.5) -> torch.Tensor:
    """The same divergences against a teacher kept as its top-k ([N, k] token ids and their
    full-vocabulary log-probs). Forward KL is taken over k + 1 outcomes, the k tokens and
    "any other token" (the tail), with the student's full-vocabulary probabilities: >= 0, 0
    when the two agree, and exact as the teacher's tail mass goes to 0. The others
    renormalize both distributions over the k."""
    log_t = top_logprobs.float()
    full = F.log_softmax(student_logits.float(), -1).gather(-1, top_ids)
    if kind == "forward_kl":
        tail_t = (1 - log_t.exp().sum(-1)).clamp(min=1e-8)
        tail_s = (1 - full.exp().sum(-1)).clamp(min=1e-8)
        return (log_t.exp() * (log_t - full)).sum(-1) + tail_t * (tail_t.log() - tail_s.log())
    return _between(F.log_softmax(full, -1), F.log_softmax(log_t, -1), kind, beta)


def _between(log_s: torch.Tensor, log_t: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    if kind == "reverse_kl":
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    if kind == "forward_kl":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError("jsd needs 0 < beta < 1")
        log_m = torch.logsumexp(
            torch.stack([log_t + math.log(beta), log_s + math.log(1 - beta)]), dim=0)
        kl_t = (log_t.exp() * (log_t - log_m)).sum(-1)
        kl_s = (log_s.exp() * (log_s - log_m)).sum(-1)
        return beta * kl_t + (1 - beta) * kl_s
    raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")
