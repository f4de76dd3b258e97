"""Log-probabilities of chosen tokens from next-token logits, one sequence at a time.

The plain way (logits → float32 → / T → logsumexp, gather) makes two float32 copies of a (B, R, V) tensor and keeps
them for the backward pass: with SmolLM2's 49,152-token vocabulary that is 100 MB per copy for 8 replies of 64
tokens, and on a CPU those passes over memory cost as much as the LM head's matmul. Here the logits stay in the
compute dtype (bfloat16 under autocast); each sequence's slice is taken to float32 on its own, once forward and once
backward, and only the per-position log-normaliser is kept. The result is the same float32 arithmetic.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["token_kl", "token_logprobs", "token_logprobs_and_entropy"]


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
        # logits: (B, R, V) any float dtype; tokens: (B, R)
        logprobs = torch.empty(tokens.shape, dtype=torch.float32, device=logits.device)  # (B, R)
        normalizers = torch.empty(tokens.shape, dtype=torch.float32, device=logits.device)  # (B, R)
        for row in range(logits.shape[0]):
            x = _scaled(logits[row], temperature)  # (R, V) float32
            normalizers[row] = torch.logsumexp(x, dim=-1)
            logprobs[row] = x.gather(-1, tokens[row].unsqueeze(-1)).squeeze(-1) - normalizers[row]
        ctx.save_for_backward(logits, tokens, normalizers)
        ctx.temperature = temperature
        return logprobs

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # grad: (B, R)
        logits, tokens, normalizers = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)  # (B, R, V)
        for row in range(logits.shape[0]):
            # d log p(a) / d x = onehot(a) - softmax(x), then through x = logits / T.
            g = torch.exp(_scaled(logits[row], ctx.temperature) - normalizers[row].unsqueeze(-1))  # (R, V)
            g.mul_(-grad[row].unsqueeze(-1))
            g.scatter_add_(-1, tokens[row].unsqueeze(-1), grad[row].unsqueeze(-1))
            if ctx.temperature != 1.0:
                g.div_(ctx.temperature)
            grad_logits[row] = g
        return grad_logits, None, None


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """One sequence's logits / T in float32 (the caller's tensor itself when it is float32 and T is 1: read only)."""
    x = logits.float()  # (R, V)
    if temperature == 1.0:
        return x
    return x / temperature if x is logits else x.div_(temperature)


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(logits / T)`` at ``tokens``, (B, R) float32, differentiable in ``logits`` (B, R, V)."""
    return _TokenLogprobs.apply(logits, tokens, temperature)


@torch.no_grad()
def token_logprobs_and_entropy(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(logprobs, entropy)``, each (B, R) float32, without gradient: :func:`token_logprobs` and the entropy of
    ``softmax(logits / T)`` at each position, from one pass over each sequence's logits."""
    logprobs = torch.empty(tokens.shape, dtype=torch.float32, device=logits.device)  # (B, R)
    entropy = torch.empty(tokens.shape, dtype=torch.float32, device=logits.device)  # (B, R)
    for row in range(logits.shape[0]):
        x = _scaled(logits[row], temperature)  # (R, V)
        normalizer = torch.logsumexp(x, dim=-1)  # (R,)
        logprobs[row] = x.gather(-1, tokens[row].unsqueeze(-1)).squeeze(-1) - normalizer
        # H = log Z - Σ p·x, with p = exp(x - log Z)
        entropy[row] = normalizer - (torch.exp(x - normalizer.unsqueeze(-1)) * x).sum(-1)
    return logprobs, entropy


@torch.no_grad()
def token_kl(logits: Tensor, ref_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``KL(softmax(logits / T) || softmax(ref_logits / T))`` at each position, over the whole vocabulary, (B, R)
    float32.

    Summed over a sampled reply it estimates the reply-level KL without bias, as ``log π(a_t) - log π_ref(a_t)`` does,
    but without the sampling noise of the token itself: with 32 replies per iteration the sampled estimate swings
    by a factor of two from one iteration to the next, which the KL controller and the budget would chase."""
    kl = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)  # (B, R)
    for row in range(logits.shape[0]):
        policy = torch.log_softmax(_scaled(logits[row], temperature), dim=-1)  # (R, V)
        reference = torch.log_softmax(_scaled(ref_logits[row], temperature), dim=-1)  # (R, V)
        kl[row] = (policy.exp() * (policy - reference)).sum(-1)
    return kl
