"""Decoder-only policies (Llama, SmolLM2, ...): prompt encoding, the scoring passes and the rollout engine's
decode loop.

Where the decode loop's speed on a CPU comes from (measured with `python -m cosmocore.bench.rollout`):
- a task's k samples share one prompt: it is prefilled once and its KV cache is shared by index;
- continuous batching: up to `rollout.batch_size` rows decode together, a row leaves as soon as its
  program is complete, and the next task's prompt is prefilled and joins the running batch, so the
  batch stays full instead of draining (prompts join shortest first: little padding);
- the behaviour log-probs, entropy and pooled hidden state come from the decode loop's own logits and
  hidden states: no second scoring pass over prompt + completion;
- the KV cache appends into preallocated buffers instead of concatenating every step, and nucleus
  sampling looks at the most likely tokens first instead of sorting the vocabulary every step.

Layout of a scoring batch: prompts left-padded to a common length P, completions right-padded to C, so
every completion starts at column P and only the last C + 1 positions need logits (the vocabulary
projection is the largest tensor of the pass).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from cosmocore.config import RolloutConfig
from cosmocore.policy.sampling import NextTokens, Row, decoding, finish, select
from cosmocore.policy.scores import Scored, token_scores


def encode(model, tokenizer, text: str, answer_prefix: str = "") -> list[int]:
    """The prompt and the answer's start as one text: a decoder-only model continues what it is given."""
    return tokenizer(text + answer_prefix, add_special_tokens=False)["input_ids"]


def generate_inputs(model, prompt_ids: list[int]) -> dict:
    """`model.generate`'s inputs for one prompt (its output repeats them before the completion)."""
    return {"input_ids": torch.tensor([prompt_ids], device=next(model.parameters()).device)}


# ------------------------------------------------------------------------------------------ scoring
def collate(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, device) -> dict:
    prompt_len = max(len(p) for p in prompt_ids)
    completion_len = max(1, max(len(c) for c in completion_ids))
    rows, attention, completion_mask = [], [], []
    for prompt, completion in zip(prompt_ids, completion_ids):
        left = prompt_len - len(prompt)
        right = completion_len - len(completion)
        rows.append([pad_id] * left + list(prompt) + list(completion) + [pad_id] * right)
        attention.append([0] * left + [1] * (len(prompt) + len(completion)) + [0] * right)
        completion_mask.append([1.0] * len(completion) + [0.0] * right)
    input_ids = torch.tensor(rows, device=device)
    attention_mask = torch.tensor(attention, device=device)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "completion_mask": torch.tensor(completion_mask, device=device),
        "prompt_len": prompt_len,
        "completion_len": completion_len,
    }


def score(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, temperature: float = 1.0) -> Scored:
    """One forward pass over prompt + completion; logits only where a completion token is predicted."""
    batch = collate(prompt_ids, completion_ids, pad_id, next(model.parameters()).device)
    prompt_len = batch["prompt_len"]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        output_hidden_states=True,
        logits_to_keep=batch["completion_len"] + 1,
        use_cache=False,
    )
    # position t of the kept logits predicts completion token t
    return token_scores(out.logits[:, :-1], batch["input_ids"][:, prompt_len:], batch["completion_mask"],
                        out.hidden_states[-1][:, prompt_len:], temperature)


def score_for_update(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                     temperature: float) -> tuple[Scored, torch.Tensor]:
    """`score` with gradients through the completion only, plus the state: the last hidden state of the
    prompt's last token, before the policy acts. The prompt (all but its last token) is run once without
    gradients and its KV cache reused. Values are those of `score`; the gradient leaves out how the
    weights shape the prompt's keys and values, which spares the backward pass over prompts that are 3-6x
    longer than their completions (the usual truncation in RL for LMs on a CPU)."""
    batch = collate(prompts, completions, pad_id, next(model.parameters()).device)
    split = batch["prompt_len"] - 1
    ids, attention, positions = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    with torch.no_grad():
        prefix = model(input_ids=ids[:, :split], attention_mask=attention[:, :split], position_ids=positions[:, :split],
                       use_cache=True, logits_to_keep=1)
    out = model(input_ids=ids[:, split:], attention_mask=attention, position_ids=positions[:, split:],
                cache=prefix.cache, use_cache=True, output_hidden_states=True)
    last = out.hidden_states[-1]
    scored = token_scores(out.logits[:, :-1], ids[:, split + 1 :], batch["completion_mask"], last[:, 1:], temperature)
    return scored, last[:, 0].float()


# ------------------------------------------------------------------------------------------ sampling
class _GrowLayer(DynamicLayer):
    """A KV-cache layer that appends into a preallocated buffer (grown by doubling) instead of
    concatenating: `DynamicLayer` copies the whole cache at every decoding step, which on a CPU costs
    about as much as the attention it feeds. Exposes views of the filled part as `keys`/`values`."""

    reserve = 0  # extra positions to allocate at the first update (set per decode)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._kbuf = self._vbuf = None
            self._len = 0
        n, t = self._len, key_states.shape[-2]
        if self._kbuf is None or n + t > self._kbuf.shape[-2]:
            capacity = max(n + t + self.reserve, 2 * (n + t)) if self._kbuf is not None else n + t + self.reserve
            shape = (*key_states.shape[:-2], capacity, key_states.shape[-1])
            kbuf = key_states.new_empty(shape)
            vbuf = value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1]))
            if n:
                kbuf[..., :n, :] = self._kbuf[..., :n, :]
                vbuf[..., :n, :] = self._vbuf[..., :n, :]
            self._kbuf, self._vbuf = kbuf, vbuf
        self._kbuf[..., n : n + t, :] = key_states
        self._vbuf[..., n : n + t, :] = value_states
        self._len = n + t
        self.keys, self.values = self._kbuf[..., : self._len, :], self._vbuf[..., : self._len, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized and self._len:
            self._kbuf, self._vbuf = self._kbuf[indices], self._vbuf[indices]
            self.keys, self.values = self._kbuf[..., : self._len, :], self._vbuf[..., : self._len, :]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized and self._len:
            index = torch.arange(self._kbuf.shape[0], device=self._kbuf.device).repeat_interleave(repeats)
            self.batch_select_indices(index)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the rollout cache is append-only")


def _new_cache(reserve: int) -> DynamicCache:
    cache = DynamicCache()
    layer = type("_Grow", (_GrowLayer,), {"reserve": reserve})
    cache.layer_class_to_replicate = layer
    return cache


def _merge_caches(cache, attention: torch.Tensor, new_cache, new_attention: torch.Tensor, reserve: int):
    """Append `new_cache`'s rows to `cache` (both left-padded): columns no running row uses any more are
    dropped, and the shorter side is padded on the left with zeros that the attention mask hides."""
    used = attention.any(0).nonzero()
    first = int(used[0]) if len(used) else attention.shape[1]
    attention = attention[:, first:]
    la, lb = attention.shape[1], new_attention.shape[1]
    width = max(la, lb)
    for old, new in zip(cache.layers, new_cache.layers):
        merged = []
        for a, b in ((old.keys, new.keys), (old.values, new.values)):
            a = a[..., first:, :]
            buf = a.new_zeros((a.shape[0] + b.shape[0], a.shape[1], width + reserve, a.shape[3]))
            buf[: a.shape[0], :, width - la : width] = a
            buf[a.shape[0] :, :, width - lb : width] = b
            merged.append(buf)
        old._kbuf, old._vbuf = merged
        old._len = width
        old.keys, old.values = old._kbuf[..., :width, :], old._vbuf[..., :width, :]
    return cache, torch.cat([_pad_left(attention, width - la), _pad_left(new_attention, width - lb)], dim=0)


def _pad_left(mask: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([mask.new_zeros((mask.shape[0], n)), mask], dim=1)


def prefill(model, prompts: list[list[int]], pad_id: int, reserve: int):
    """Run left-padded prompts into a fresh cache that has room for `reserve` more positions; returns the
    cache, the attention mask, the position ids and the logits after each prompt's last token."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    cache = _new_cache(reserve)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, cache=cache,
                use_cache=True, logits_to_keep=1)
    return cache, attention, positions, out.logits[:, -1]


def decode_step(model, tokens: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor, cache, hidden: bool):
    """Feed each row its next token at `positions`: returns the model's output (logits of the next one,
    and the hidden states when `hidden`) and the attention mask, one column longer."""
    attention = torch.cat([attention, attention.new_ones((len(tokens), 1))], dim=1)
    out = model(input_ids=tokens[:, None], attention_mask=attention, position_ids=positions[:, None],
                cache=cache, use_cache=True, logits_to_keep=1, output_hidden_states=hidden)
    return out, attention


def stream(model, tokenizer, groups: list[tuple[list[int], int]], cfg: RolloutConfig, style: str, greedy: bool,
           temperature: float, with_scores: bool, capacity: int, stop: Callable[[str], bool] | None = None):
    """The decode loop, with continuous batching. `groups` are (prompt ids, rows): a task's k samples
    share one prompt, which is prefilled once and its KV cache shared by the k rows. Up to `capacity`
    rows decode together; a row leaves as soon as it is finished (`sampling.NextTokens`), and the next
    group is prefilled and joins the running batch as soon as there is room for all its rows, so the
    batch stays full instead of draining. Groups join in the order given (sorted by prompt length, so
    padding stays small).

    The pooled hidden state is the mean of the last layer's hidden state at each completion token (the
    step that feeds the token in), as `score` pools it, so no second scoring pass is needed. Yields
    (group index, member, Sampled) as rows finish."""
    next_tokens = NextTokens(model, tokenizer, cfg, style, greedy, temperature, with_scores, stop)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    reserve = cfg.max_new_tokens + 1
    queue = list(range(len(groups)))
    rows: list[Row] = []
    cache = attention = next_pos = logits = hidden_sum = None
    with decoding():
        while queue or rows:
            admit, room = [], capacity - len(rows)
            while queue and (groups[queue[0]][1] <= room or not rows and not admit):
                room -= groups[queue[0]][1]
                admit.append(queue.pop(0))
            if admit:  # prefill the admitted prompts once each, then give every row its copy by index
                new_cache, new_attention, positions, last = prefill(model, [groups[g][0] for g in admit], pad_id, reserve)
                index = torch.tensor([i for i, g in enumerate(admit) for _ in range(groups[g][1])], device=device)
                new_cache.batch_select_indices(index)
                new_logits = last.float()[index]
                new_pos = positions[index, -1] + 1
                new_hidden = new_logits.new_zeros((len(index), model.config.hidden_size)) if with_scores else None
                if rows:
                    cache, attention = _merge_caches(cache, attention, new_cache, new_attention[index], reserve)
                    logits, next_pos = torch.cat([logits, new_logits]), torch.cat([next_pos, new_pos])
                    hidden_sum = torch.cat([hidden_sum, new_hidden]) if with_scores else None
                else:
                    cache, attention, logits, next_pos, hidden_sum = new_cache, new_attention[index], new_logits, new_pos, new_hidden
                rows += [Row(g, m) for g in admit for m in range(groups[g][1])]
            tokens, done = next_tokens(rows, logits)
            if not with_scores and any(done):  # finished rows need no further step
                finished, keep = finish(rows, done, None)
                yield from finished
                rows, tokens, attention, next_pos = select(cache, keep, rows, tokens, attention, next_pos)
                done = [False] * len(rows)
                if not rows:
                    continue
            out, attention = decode_step(model, tokens, attention, next_pos, cache, with_scores)
            next_pos = next_pos + 1
            logits = out.logits[:, -1].float()
            if with_scores:  # the hidden state at each fed completion token, pooled by mean as `score` does
                hidden_sum = hidden_sum + out.hidden_states[-1][:, -1].float()
                if any(done):
                    finished, keep = finish(rows, done, hidden_sum)
                    yield from finished
                    rows, attention, next_pos, hidden_sum, logits = select(cache, keep, rows, attention, next_pos, hidden_sum,
                                                                           logits)
