"""The rollout engine: sample programs for tasks, execute them in the sandbox while generation goes on,
and return one `Trajectory` per sample with everything tag, gate and train need.

Where the speed on a CPU comes from (measured with `python -m cosmocore.bench.rollout`):
- a task's k samples share one prompt: it is prefilled once and its KV cache is shared by index;
- continuous batching: up to `rollout.batch_size` rows decode together, a row leaves as soon as its
  program is complete, and the next task's prompt is prefilled and joins the running batch, so the
  batch stays full instead of draining (prompts join shortest first: little padding);
- the behaviour log-probs, entropy and pooled hidden state come from the decode loop's own logits and
  hidden states: no second scoring pass over prompt + completion;
- the KV cache appends into preallocated buffers instead of concatenating every step, and nucleus
  sampling looks at the most likely tokens first instead of sorting the vocabulary every step;
- execution of finished samples runs on a thread while the next ones are generated.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from cosmocore.config import RewardConfig, RolloutConfig
from cosmocore.prompts import (
    build_prompt,
    error_feedback,
    extract_code,
    is_complete,
    program_for,
)
from cosmocore.records import Task, Trajectory
from cosmocore.rewards import reward_for
from cosmocore.sandbox import ExecRequest, ExecResult, Sandbox

log = logging.getLogger("cosmocore.rollout")


@dataclass(frozen=True)
class RunIds:
    run: str
    variant: str
    seed: int
    iteration: int


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


def _eos_ids(model, tokenizer) -> set[int]:
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


NUCLEUS_CANDIDATES = 256  # top-p looks at the most likely tokens first, and sorts the vocabulary only when needed


def _top_p_sample(log_dist: torch.Tensor, top_p: float) -> torch.Tensor:
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


@dataclass
class _Row:
    group: int
    member: int  # which of the group's rows
    ids: list[int]
    logprobs: list[float]
    entropy: list[float]
    text: str = ""


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


def _stream(model, tokenizer, groups: list[tuple[list[int], int]], cfg: RolloutConfig, style: str, greedy: bool,
            temperature: float, with_scores: bool, capacity: int, stop: Callable[[str], bool] | None = None):
    """The decode loop, with continuous batching. `groups` are (prompt ids, rows): a task's k samples
    share one prompt, which is prefilled once and its KV cache shared by the k rows. Up to `capacity`
    rows decode together; a row leaves as soon as its program is complete (`prompts.is_complete`, or
    `stop(text)` when given), at end-of-sequence or at `max_new_tokens`, and the next group is prefilled and joins the running batch as soon as there is
    room for all its rows, so the batch stays full instead of draining. Groups join in the order given
    (sorted by prompt length, so padding stays small).

    The behaviour log-probs and entropies come from the loop's own logits, computed as `policy.score`
    computes them (log_softmax(logits / temperature)); the pooled hidden state is the mean of the last
    layer's hidden state at each completion token (the step that feeds the token in), so no second
    scoring pass is needed. Yields (group index, member, Sampled) as rows finish."""
    complete = stop or (lambda text: is_complete(text, style))
    device = next(model.parameters()).device
    pad_id, eos, pieces = tokenizer.pad_token_id, _eos_ids(model, tokenizer), _Pieces(tokenizer)
    reserve = cfg.max_new_tokens + 1
    queue = list(range(len(groups)))
    rows: list[_Row] = []
    cache = attention = next_pos = logits = hidden_sum = None
    with torch.no_grad():
        while queue or rows:
            admit, room = [], capacity - len(rows)
            while queue and (groups[queue[0]][1] <= room or not rows and not admit):
                room -= groups[queue[0]][1]
                admit.append(queue.pop(0))
            if admit:  # prefill the admitted prompts once each, then give every row its copy by index
                prompts = [groups[g][0] for g in admit]
                width = max(len(p) for p in prompts)
                input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
                new_attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
                positions = (new_attention.cumsum(1) - 1).clamp(min=0)
                new_cache = _new_cache(reserve)
                out = model(input_ids=input_ids, attention_mask=new_attention, position_ids=positions,
                            past_key_values=new_cache, use_cache=True, logits_to_keep=1)
                index = torch.tensor([i for i, g in enumerate(admit) for _ in range(groups[g][1])], device=device)
                new_cache.batch_select_indices(index)
                new_logits = out.logits[:, -1].float()[index]
                new_pos = positions[index, -1] + 1
                new_hidden = new_logits.new_zeros((len(index), model.config.hidden_size)) if with_scores else None
                if rows:
                    cache, attention = _merge_caches(cache, attention, new_cache, new_attention[index], reserve)
                    logits, next_pos = torch.cat([logits, new_logits]), torch.cat([next_pos, new_pos])
                    hidden_sum = torch.cat([hidden_sum, new_hidden]) if with_scores else None
                else:
                    cache, attention, logits, next_pos, hidden_sum = new_cache, new_attention[index], new_logits, new_pos, new_hidden
                rows += [_Row(g, m, [], [], []) for g in admit for m in range(groups[g][1])]
            log_dist = F.log_softmax(logits / temperature, dim=-1)  # as `policy.score` computes it
            tokens = log_dist.argmax(-1) if greedy else _top_p_sample(log_dist, cfg.top_p)
            if with_scores:
                step_lp = log_dist.gather(-1, tokens[:, None]).squeeze(-1).tolist()
                step_ent = (-(log_dist.exp() * log_dist).sum(-1)).tolist()
            done = []
            for pos, (row, token) in enumerate(zip(rows, tokens.tolist())):
                row.ids.append(token)
                if with_scores:
                    row.logprobs.append(step_lp[pos])
                    row.entropy.append(step_ent[pos])
                row.text += pieces(token)
                finished = token in eos or len(row.ids) >= cfg.max_new_tokens
                if not finished and complete(row.text):  # confirmed on the properly decoded row
                    finished = complete(tokenizer.decode(row.ids, skip_special_tokens=True))
                done.append(finished)
            if not with_scores and any(done):  # finished rows need no further step
                yield from ((r.group, r.member, Sampled(r.ids, [], [], [])) for r, d in zip(rows, done) if d)
                keep = [pos for pos, d in enumerate(done) if not d]
                rows, tokens, attention, next_pos, _ = _select(cache, keep, rows, tokens, attention, next_pos, None)
                done = [False] * len(rows)
                if not rows:
                    continue
            attention = torch.cat([attention, attention.new_ones((len(rows), 1))], dim=1)
            out = model(input_ids=tokens[:, None], attention_mask=attention, position_ids=next_pos[:, None],
                        past_key_values=cache, use_cache=True, logits_to_keep=1, output_hidden_states=with_scores)
            next_pos = next_pos + 1
            logits = out.logits[:, -1].float()
            if with_scores:  # the hidden state at each fed completion token, pooled by mean as `score` does
                hidden_sum = hidden_sum + out.hidden_states[-1][:, -1].float()
                if any(done):
                    for pos, (r, d) in enumerate(zip(rows, done)):
                        if d:
                            pooled = (hidden_sum[pos] / len(r.ids)).tolist()
                            yield r.group, r.member, Sampled(r.ids, r.logprobs, r.entropy, pooled)
                    keep = [pos for pos, d in enumerate(done) if not d]
                    rows, _, attention, next_pos, hidden_sum = _select(cache, keep, rows, None, attention, next_pos, hidden_sum)
                    logits = logits[keep]


def _select(cache, keep: list[int], rows, tokens, attention, next_pos, hidden_sum):
    index = torch.tensor(keep, device=attention.device, dtype=torch.long)
    if keep:
        cache.batch_select_indices(index)
    picked = [t[index] if t is not None else None for t in (tokens, attention, next_pos, hidden_sum)]
    return [rows[k] for k in keep], *picked


def _groups(items: list[tuple[object, list[int]]], capacity: int) -> tuple[list[tuple[list[int], int]], list[list[object]]]:
    """Items (key, prompt) with identical prompts become one group (split so that no group exceeds
    `capacity` rows), sorted by prompt length; returns the groups and each group's member keys."""
    members: dict[tuple[int, ...], list[object]] = {}
    for key, prompt in items:
        members.setdefault(tuple(prompt), []).append(key)
    groups, keys = [], []
    for prompt, group_keys in sorted(members.items(), key=lambda item: len(item[0])):
        for start in range(0, len(group_keys), capacity):
            chunk = group_keys[start : start + capacity]
            groups.append((list(prompt), len(chunk)))
            keys.append(chunk)
    return groups, keys


def _sample_stream(model, tokenizer, items: list[tuple[object, list[int]]], cfg: RolloutConfig, style: str, greedy: bool,
                   temperature: float, with_scores: bool, capacity: int | None = None, stop: Callable[[str], bool] | None = None):
    """Yield (key, Sampled) for items (key, prompt ids) as they finish. On an out-of-memory error the
    batch capacity is halved and the unfinished items start again, instead of failing the run."""
    capacity = capacity or cfg.batch_size
    pending = dict(items)
    while pending:
        groups, keys = _groups(list(pending.items()), capacity)
        try:
            for group, member, sampled in _stream(model, tokenizer, groups, cfg, style, greedy, temperature, with_scores, capacity, stop):
                key = keys[group][member]
                del pending[key]
                yield key, sampled
        except torch.OutOfMemoryError:
            if capacity == 1:
                raise
            capacity //= 2
            log.warning("out of memory: batch capacity halved to %d rows", capacity)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _sample(model, tokenizer, prompts: list[list[int]], cfg: RolloutConfig, style: str, greedy: bool, temperature: float,
            with_scores: bool, capacity: int | None = None, stop: Callable[[str], bool] | None = None) -> list[Sampled]:
    """One `Sampled` per prompt, in order (identical prompts are prefilled once)."""
    done = dict(_sample_stream(model, tokenizer, list(enumerate(prompts)), cfg, style, greedy, temperature, with_scores, capacity, stop))
    return [done[i] for i in range(len(prompts))]


def sample(model, tokenizer, prompts: list[list[int]], cfg: RolloutConfig, style: str, greedy: bool, temperature: float,
           with_scores: bool = True, stop: Callable[[str], bool] | None = None) -> list[Sampled]:
    """`generate` that also returns, per completion, the behaviour log-probs, entropies and pooled hidden
    state from the decode loop itself (what `policy.score` would compute, without a second pass).
    `stop(text)` replaces the end-of-program rule for completions that are not programs."""
    return _sample(model, tokenizer, prompts, cfg, style, greedy, temperature, with_scores, stop=stop)


def generate(model, tokenizer, prompts: list[list[int]], cfg: RolloutConfig, style: str, greedy: bool, temperature: float) -> list[list[int]]:
    """Sample one completion per prompt (token ids): continuous batching of up to `cfg.batch_size` rows,
    identical prompts prefilled once, each row stopping as soon as its program is complete."""
    return [s.ids for s in _sample(model, tokenizer, prompts, cfg, style, greedy, temperature, False)]


def _encode(tasks: list[Task], tokenizer, style: str, cfg: RolloutConfig) -> tuple[list[tuple[Task, list[int]]], int]:
    """Token ids of each task's prompt; over-long prompts are truncated (keeping the end) or skipped."""
    encoded, too_long = [], 0
    for task in tasks:
        ids = tokenizer(build_prompt(task, tokenizer, style), add_special_tokens=False)["input_ids"]
        if len(ids) > cfg.max_prompt_tokens:
            too_long += 1
            if cfg.on_long_prompt == "skip":
                continue
            ids = ids[-cfg.max_prompt_tokens :]
        encoded.append((task, ids))
    if too_long:
        log.warning("%d prompt(s) longer than rollout.max_prompt_tokens=%d were %s", too_long, cfg.max_prompt_tokens,
                    "skipped" if cfg.on_long_prompt == "skip" else "truncated")
    return encoded, too_long


def rollout(
    model,
    tokenizer,
    tasks: list[Task],
    sandbox: Sandbox,
    cfg: RolloutConfig,
    reward_cfg: RewardConfig,
    style: str,
    ids: RunIds,
    samples_per_task: int,
    greedy: bool = False,
    temperature: float | None = None,
    with_scores: bool = True,
    seed: int = 0,
    desc: str = "rollout",
) -> tuple[list[Trajectory], dict]:
    """Sample `samples_per_task` programs per task, execute them, and build trajectories.

    Returns the trajectories (task order, then sample order) and engine statistics.
    """
    temperature = cfg.temperature if temperature is None else temperature
    torch.manual_seed(seed)
    encoded, too_long = _encode(tasks, tokenizer, style, cfg)
    items = [((i, s), prompt) for i, (task, prompt) in enumerate(encoded) for s in range(samples_per_task)]
    trajectories: list[Trajectory] = []
    pending: list[tuple[tuple, list, Future]] = []
    stats = {"tokens": 0, "samples": 0, "passed": 0, "prompts_too_long": too_long, "generate_s": 0.0}
    start = time.perf_counter()
    bar = tqdm(total=len(items), desc=desc, unit="sample", leave=False)
    flush = max(1, cfg.batch_size // 2)  # finished samples handed to the sandbox together
    with ThreadPoolExecutor(max_workers=1) as executor:  # execution overlaps with generation

        def submit(ready: list) -> None:
            batch = [(encoded[i][0], encoded[i][1], s) for (i, s), _ in ready]
            sampled = [done for _, done in ready]
            texts = tokenizer.batch_decode([s.ids for s in sampled], skip_special_tokens=True)
            codes = [extract_code(text, style) for text in texts]
            requests = [ExecRequest(task.task_id, program_for(task, code, style), task.test, task.entry_point, task.test_style)
                        for (task, _, _), code in zip(batch, codes)]
            pending.append(((batch, sampled, texts, codes), requests, executor.submit(_execute, sandbox, requests)))

        ready: list = []
        t0 = time.perf_counter()
        for key, sampled in _sample_stream(model, tokenizer, items, cfg, style, greedy, temperature, with_scores):
            ready.append((key, sampled))
            stats["tokens"] += len(sampled.ids)
            if len(ready) >= flush:
                stats["generate_s"] += time.perf_counter() - t0
                submit(ready)
                ready = []
                _drain(pending, trajectories, reward_cfg, ids, stats, bar, block=False)
                bar.set_postfix(tok_s=f"{stats['tokens'] / (time.perf_counter() - start):.0f}",
                                pass_rate=f"{stats['passed'] / max(1, stats['samples']):.2f}")
                t0 = time.perf_counter()
        stats["generate_s"] += time.perf_counter() - t0
        if ready:
            submit(ready)
        stats["programs_s"] = time.perf_counter() - start  # every program sampled and extracted
        _drain(pending, trajectories, reward_cfg, ids, stats, bar, block=True)
    bar.close()
    stats["wall_s"] = time.perf_counter() - start
    stats["tokens_per_s"] = stats["tokens"] / max(stats["generate_s"], 1e-9)
    order = {task.task_id: i for i, task in enumerate(tasks)}
    trajectories.sort(key=lambda t: (order[t.task_id], t.sample))
    return trajectories, stats


def _execute(sandbox: Sandbox, requests: list[ExecRequest]) -> list[ExecResult | None]:
    """Run the requests that hold a program; the others are `no_code` samples and get None."""
    runnable = [i for i, request in enumerate(requests) if request.program]
    results: list[ExecResult | None] = [None] * len(requests)
    for i, result in zip(runnable, sandbox.run([requests[i] for i in runnable])):
        results[i] = result
    return results


def _drain(pending, trajectories, reward_cfg, ids: RunIds, stats, bar, block: bool) -> None:
    """Turn executed batches into trajectories (all of them when `block`, else those already done)."""
    while pending and (block or pending[0][2].done()):
        (batch, sampled, texts, codes), _, future = pending.pop(0)
        results: list[ExecResult | None] = future.result()
        for job, done, text, code, result in zip(batch, sampled, texts, codes, results):
            task, prompt, sample = job
            if result is None:
                outcome, hallucinated, evidence, exception = "no_code", False, "", ""
                share = float("nan")
            else:
                outcome, hallucinated = result.outcome, result.hallucinated
                evidence, exception, share = "; ".join(result.hallucination_evidence), result.exception_type, result.test_share
            trajectories.append(
                Trajectory(
                    trajectory_id=f"{ids.run}/i{ids.iteration}/{task.task_id}/{sample}",
                    run=ids.run,
                    variant=ids.variant,
                    seed=ids.seed,
                    iteration=ids.iteration,
                    task_id=task.task_id,
                    sample=sample,
                    kind="code",
                    prompt_ids=list(prompt),
                    completion_ids=list(done.ids),
                    behaviour_logprobs=done.logprobs,
                    mean_entropy=done.mean_entropy,
                    hidden=done.hidden,
                    text=text,
                    code=code,
                    outcome=outcome,
                    hallucinated=hallucinated,
                    hallucination_evidence=evidence,
                    exception_type=exception,
                    test_share=share,
                    reward=reward_for(outcome, hallucinated, share, reward_cfg),
                    extra={"static": bool(result and result.hallucination_static),
                           "runtime": bool(result and result.hallucination_runtime),
                           "failing_test": result.failing_test if result else "",
                           "error": "" if outcome == "passed" else error_feedback(
                               outcome, result.stderr if result else "", result.failing_test if result else "", exception)},
                )
            )
            stats["samples"] += 1
            stats["passed"] += outcome == "passed"
            bar.update(1)
