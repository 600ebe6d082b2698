"""What every decode loop does with one step's logits, whatever the model's architecture: pick each row's
next token (greedy, or nucleus sampling at a temperature), record what the behaviour policy said about
it, decide which rows are finished, and keep the rest. The decoder-only engine (`causal.stream`) and the
encoder-decoder one (`seq2seq.stream`) differ only in how they get the logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cosmocore.config import RolloutConfig
from cosmocore.policy.prompts import is_complete

NUCLEUS_CANDIDATES = 256  # top-p looks at the most likely tokens first, and sorts the vocabulary only when needed
# Attention kernels for the decode loops: all of PyTorch's but cuDNN's, which builds an execution plan
# for every new sequence length, and each decoding step makes the KV cache one longer. On an H100, a
# step of SmolLM2-135M at 16 rows took 85-95 ms with it and 26-32 ms without (the same shapes in eager
# attention: 34 ms).
DECODE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@contextmanager
def decoding():
    """The context a decode loop runs in: no gradients, and attention kernels that suit a cache that grows."""
    with torch.no_grad(), sdpa_kernel(DECODE_ATTENTION):
        yield


@dataclass
class Sampled:
    """One sampled completion with what the behaviour policy said about it (empty without scores)."""

    ids: list[int]
    logprobs: list[float]
    entropy: list[float]
    hidden: list[float]

    @property
    def mean_entropy(self) -> float:
        return sum(self.entropy) / len(self.entropy) if self.entropy else math.nan


@dataclass
class Row:
    """A completion being decoded: `member` of the `group` of rows that share one prompt."""

    group: int
    member: int
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    text: str = ""


def top_p_sample(log_dist: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus sampling from the temperature-scaled log-distribution, with the semantics of
    `transformers`' TopPLogitsWarper (keep the most likely tokens whose preceding mass is below `top_p`,
    at least one).

    Sorting the whole vocabulary every step (and drawing from all of it) costs more than the model's
    forward pass on a CPU, so the nucleus is looked for among the `NUCLEUS_CANDIDATES` most likely tokens
    (exact whenever it ends there, which it nearly always does); rows whose nucleus is wider fall back to
    the full sort."""
    if top_p >= 1.0:
        return torch.multinomial(log_dist.exp(), num_samples=1).squeeze(1)
    k = min(NUCLEUS_CANDIDATES, log_dist.shape[-1])
    values, index = log_dist.topk(k, dim=-1)  # descending
    probs = values.exp()
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
    keep = before < top_p
    keep[:, 0] = True
    choice = torch.multinomial(probs * keep, num_samples=1)
    tokens = index.gather(1, choice).squeeze(1)
    wide = keep[:, -1].nonzero().squeeze(1)  # the nucleus may go on past the candidates
    if len(wide):
        tokens[wide] = _top_p_full(log_dist[wide], top_p)
    return tokens


def _top_p_full(log_dist: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, sorted_index = torch.sort(log_dist, descending=False)
    cumulative = sorted_logits.exp().cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False  # keep at least the most likely token
    remove = remove_sorted.scatter(1, sorted_index, remove_sorted)
    return torch.multinomial(log_dist.masked_fill(remove, -float("inf")).softmax(dim=-1), num_samples=1).squeeze(1)


def eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class _Pieces:
    """Decoded text of single tokens, memoised: a row's running text is the sum of its pieces, so the
    stop check costs a dict lookup per token instead of decoding the whole row every step. The pieces
    only decide *when to look*; a stop is confirmed on the properly decoded row."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token: int) -> str:
        piece = self.cache.get(token)
        if piece is None:
            piece = self.cache[token] = self.tokenizer.decode([token], skip_special_tokens=True)
        return piece


class NextTokens:
    """One decoding step for a batch of rows: `next_tokens(rows, logits)` picks each row's token from
    log_softmax(logits / temperature) (greedy or nucleus), appends it to its row with its log-prob and
    the distribution's entropy (as `policy.score` computes them), and returns the tokens and which rows
    are finished: at end-of-sequence, at `max_new_tokens`, or once the row's text is complete
    (`prompts.is_complete`, or `stop(text)` when given)."""

    def __init__(self, model, tokenizer, cfg: RolloutConfig, style: str, greedy: bool, temperature: float,
                 with_scores: bool, stop: Callable[[str], bool] | None = None):
        self.tokenizer, self.cfg, self.greedy, self.temperature, self.with_scores = tokenizer, cfg, greedy, temperature, with_scores
        self.complete = stop or (lambda text: is_complete(text, style))
        self.eos, self.pieces = eos_ids(model, tokenizer), _Pieces(tokenizer)

    def __call__(self, rows: list[Row], logits: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        log_dist = F.log_softmax(logits / self.temperature, dim=-1)  # as `policy.score` computes it
        tokens = log_dist.argmax(-1) if self.greedy else top_p_sample(log_dist, self.cfg.top_p)
        if self.with_scores:
            step_lp = log_dist.gather(-1, tokens[:, None]).squeeze(-1).tolist()
            step_ent = (-(log_dist.exp() * log_dist).sum(-1)).tolist()
        done = []
        for pos, (row, token) in enumerate(zip(rows, tokens.tolist())):
            row.ids.append(token)
            if self.with_scores:
                row.logprobs.append(step_lp[pos])
                row.entropy.append(step_ent[pos])
            row.text += self.pieces(token)
            finished = token in self.eos or len(row.ids) >= self.cfg.max_new_tokens
            if not finished and self.complete(row.text):  # confirmed on the properly decoded row
                finished = self.complete(self.tokenizer.decode(row.ids, skip_special_tokens=True))
            done.append(finished)
        return tokens, done


def finish(rows: list[Row], done: list[bool], hidden_sum: torch.Tensor | None) -> tuple[list[tuple[int, int, Sampled]], list[int]]:
    """The finished rows as (group, member, Sampled), their pooled hidden state the mean of `hidden_sum`
    over their tokens (empty without scores), and the positions of the rows that go on."""
    finished = [(r.group, r.member, Sampled(r.ids, r.logprobs, r.entropy,
                                            (hidden_sum[pos] / len(r.ids)).tolist() if hidden_sum is not None else []))
                for pos, (r, d) in enumerate(zip(rows, done)) if d]
    return finished, [pos for pos, d in enumerate(done) if not d]


def select(cache, keep: list[int], rows: list[Row], *tensors: torch.Tensor):
    """Keep the rows at positions `keep` (those that go on): in the KV cache, the row list and each of
    `tensors` (one row per batch row)."""
    if len(keep) == len(rows):
        return rows, *tensors
    index = torch.tensor(keep, device=tensors[0].device, dtype=torch.long)
    cache.batch_select_indices(index)
    return [rows[k] for k in keep], *(t[index] for t in tensors)
