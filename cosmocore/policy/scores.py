"""What scoring a completion yields (`Scored`), computed one way for every architecture (`token_scores`):
the per-token log-probs and entropies the trainer and the rollouts record, and the pooled hidden state
the affect tagger reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Scored:
    logprobs: torch.Tensor  # [B, C] log-prob of each completion token (0 where masked)
    entropy: torch.Tensor  # [B, C] entropy of each next-token distribution (0 where masked)
    mask: torch.Tensor  # [B, C] 1.0 for real completion tokens
    hidden: torch.Tensor  # [B, H] mean of the last hidden state over the completion's tokens

    def mean_entropy(self) -> torch.Tensor:
        return (self.entropy * self.mask).sum(1) / self.mask.sum(1).clamp(min=1)


def token_scores(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor,
                 temperature: float) -> Scored:
    """`Scored` from completion-aligned tensors: `logits` [B, C, V] the distribution each completion
    token was drawn from, `targets` [B, C] the tokens, `mask` [B, C], `hidden` [B, C, H] the last hidden
    state where each completion token is fed in (pooled by its mean)."""
    log_dist = F.log_softmax(logits.float() / temperature, dim=-1)
    logprobs = log_dist.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    entropy = -(log_dist.exp() * log_dist).sum(-1) * mask
    pooled = (hidden.float() * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    return Scored(logprobs=logprobs, entropy=entropy, mask=mask, hidden=pooled)
