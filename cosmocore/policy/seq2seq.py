"""Encoder-decoder policies (T5, CodeT5, BART, ...): prompt encoding, the scoring passes and the decode
loop, with the functions and contracts of `cosmocore.policy.causal`.

A prompt's token ids hold all the policy is given without choosing it: the encoder's input, then the
decoder's start token and any answer prefix written for the model (a CodeRL+ answer opens with
`{"output": `). `split` finds the boundary at the last decoder start token (`encode` makes sure the
prefix holds none). The completion is what the decoder writes after them.

- Scoring is one teacher-forced pass. The pooled hidden state is defined as for decoder-only models:
  the mean of the decoder's last hidden state where each completion token is fed in. The critic's
  state is the decoder's last hidden state at its last given token (the start token, or the prefix's
  end): before the policy acts, as the prompt's last token is for a decoder-only model.
- Sampling has no continuous batching (a joining row's decoder cache would need padding that models with
  absolute positions, BART's, do not allow): each unique prompt is encoded once, and batches of up to
  `capacity` rows, grouped by prompt length, decode with their own KV cache until their last row ends;
  a row leaves the batch as soon as it is finished.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from cosmocore.config import RolloutConfig
from cosmocore.errors import ModelUnavailable
from cosmocore.policy.sampling import NextTokens, Row, decoding, finish, select
from cosmocore.policy.scores import Scored, token_scores


def decoder_start(model) -> int:
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        start = model.generation_config.decoder_start_token_id
    if start is None:
        raise ModelUnavailable("the encoder-decoder model names no decoder_start_token_id: add it to its config.json")
    return start


def encode(model, tokenizer, text: str, answer_prefix: str = "") -> list[int]:
    """The encoder reads the prompt with the tokenizer's special tokens, as these models were trained
    (T5 ends its input with </s>, CodeT5 wraps it in <s> ... </s>); the decoder is given its start token
    and the answer's prefix."""
    start = decoder_start(model)
    prefix = tokenizer(answer_prefix, add_special_tokens=False)["input_ids"] if answer_prefix else []
    if start in prefix:
        raise ValueError(f"the answer prefix {answer_prefix!r} holds the decoder start token {start}")
    return tokenizer(text)["input_ids"] + [start] + prefix


def split(prompt_ids: list[int], start: int) -> tuple[list[int], list[int]]:
    """(encoder input, the decoder's given tokens) of a prompt written by `encode`."""
    if start not in prompt_ids:
        raise ValueError(f"no decoder start token ({start}) in an encoder-decoder prompt: encode it with policy.encode")
    at = len(prompt_ids) - 1 - prompt_ids[::-1].index(start)
    return list(prompt_ids[:at]), list(prompt_ids[at:])


def generate_inputs(model, prompt_ids: list[int]) -> dict:
    """`model.generate`'s inputs for one prompt (its output repeats the decoder's given tokens first)."""
    encoder, given = split(list(prompt_ids), decoder_start(model))
    device = next(model.parameters()).device
    return {"input_ids": torch.tensor([encoder], device=device), "decoder_input_ids": torch.tensor([given], device=device)}


def _pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


# ------------------------------------------------------------------------------------------ scoring
def score_for_update(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                     temperature: float) -> tuple[Scored, torch.Tensor]:
    """One teacher-forced pass, encoder and decoder right-padded, and each row's completion gathered from
    the columns after its given tokens (how many differs: a program has the start token only, a CodeRL+
    answer its prefix too). Unlike the decoder-only pass, nothing runs without gradients: the encoder
    is half the model, and its weights (or adapters) would otherwise never learn."""
    device = next(model.parameters()).device
    start = decoder_start(model)
    parts = [split(list(p), start) for p in prompt_ids]
    encoder_ids, encoder_mask = _pad([encoder for encoder, _ in parts], pad_id, device)
    decoder_ids, decoder_mask = _pad([given + list(c) for (_, given), c in zip(parts, completion_ids)], pad_id, device)
    out = model(input_ids=encoder_ids, attention_mask=encoder_mask, decoder_input_ids=decoder_ids,
                decoder_attention_mask=decoder_mask, output_hidden_states=True, use_cache=False)
    given = torch.tensor([len(g) for _, g in parts], device=device)
    lengths = torch.tensor([len(c) for c in completion_ids], device=device)
    offsets = torch.arange(max(1, int(lengths.max())), device=device)
    fed = (given[:, None] + offsets).clamp(max=decoder_ids.shape[1] - 1)  # the column each completion token is fed in at
    mask = (offsets < lengths[:, None]).float()
    last = out.decoder_hidden_states[-1]
    logits = out.logits.gather(1, (fed - 1)[..., None].expand(-1, -1, out.logits.shape[-1]))  # one column earlier predicts it
    hidden = last.gather(1, fed[..., None].expand(-1, -1, last.shape[-1]))
    scored = token_scores(logits, decoder_ids.gather(1, fed), mask, hidden, temperature)
    return scored, last[torch.arange(len(parts), device=device), given - 1].float()


def score(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, temperature: float = 1.0) -> Scored:
    return score_for_update(model, prompt_ids, completion_ids, pad_id, temperature)[0]


# ------------------------------------------------------------------------------------------ sampling
def stream(model, tokenizer, groups: list[tuple[list[int], int]], cfg: RolloutConfig, style: str, greedy: bool,
           temperature: float, with_scores: bool, capacity: int, stop: Callable[[str], bool] | None = None):
    """The decode loop: groups (prompt ids, rows) in batches of up to `capacity` rows whose decoders are
    given as many tokens (padding goes on the encoder's side only), shortest prompts first. Yields
    (group index, member, Sampled) as rows finish."""
    next_tokens = NextTokens(model, tokenizer, cfg, style, greedy, temperature, with_scores, stop)
    start = decoder_start(model)
    parts = [split(list(prompt), start) for prompt, _ in groups]
    batch: list[int] = []
    for g in sorted(range(len(groups)), key=lambda g: (len(parts[g][1]), len(parts[g][0]))):
        if batch and (sum(groups[b][1] for b in batch) + groups[g][1] > capacity or len(parts[g][1]) != len(parts[batch[0]][1])):
            yield from _decode(model, groups, parts, batch, next_tokens, tokenizer.pad_token_id, with_scores)
            batch = []
        batch.append(g)
    if batch:
        yield from _decode(model, groups, parts, batch, next_tokens, tokenizer.pad_token_id, with_scores)


def _decode(model, groups, parts, batch: list[int], next_tokens: NextTokens, pad_id: int, with_scores: bool):
    """Decode one batch to its end: each prompt encoded once and its encoder states shared by its rows.
    The pooled hidden state is the mean of the decoder's last hidden state at each fed completion token,
    as `score` pools it."""
    device = next(model.parameters()).device
    encoder_ids, encoder_mask = _pad([parts[g][0] for g in batch], pad_id, device)
    index = torch.tensor([i for i, g in enumerate(batch) for _ in range(groups[g][1])], device=device)
    rows = [Row(g, m) for g in batch for m in range(groups[g][1])]
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    with decoding():
        encoded = model.get_encoder()(input_ids=encoder_ids, attention_mask=encoder_mask).last_hidden_state[index]
        mask = encoder_mask[index]

        def step(decoder_ids: torch.Tensor):
            return model(encoder_outputs=BaseModelOutput(last_hidden_state=encoded), attention_mask=mask,
                         decoder_input_ids=decoder_ids, cache=cache, use_cache=True, output_hidden_states=with_scores)

        logits = step(torch.tensor([parts[r.group][1] for r in rows], device=device)).logits[:, -1].float()
        hidden_sum = logits.new_zeros((len(rows), model.config.hidden_size)) if with_scores else None
        while True:
            tokens, done = next_tokens(rows, logits)
            if not with_scores:  # finished rows need no further step
                finished, keep = finish(rows, done, None)
                yield from finished
                if not keep:
                    return
                rows, tokens, encoded, mask = select(cache, keep, rows, tokens, encoded, mask)
            out = step(tokens[:, None])
            logits = out.logits[:, -1].float()
            if with_scores:
                hidden_sum = hidden_sum + out.decoder_hidden_states[-1][:, -1].float()
                finished, keep = finish(rows, done, hidden_sum)
                yield from finished
                if not keep:
                    return
                rows, logits, hidden_sum, encoded, mask = select(cache, keep, rows, logits, hidden_sum, encoded, mask)
