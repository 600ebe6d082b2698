"""The rollout engine: sample programs for tasks, execute them in the sandbox while generation goes on,
and return one `Trajectory` per sample with everything tag, gate and train need.

The decode loop belongs to the policy's architecture (`policy.stream`): continuous batching for
decoder-only models (`cosmocore.policy.causal`, where the speed comes from), batches grouped by prompt for
encoder-decoder ones (`cosmocore.policy.seq2seq`). Around it, whatever the architecture:
- a task's k samples share one prompt, which is encoded (prefilled) once;
- the behaviour log-probs, entropy and pooled hidden state come from the decode loop itself, equal to
  what `policy.score` computes: no second scoring pass;
- `rollout.batch_size: auto` sizes the batch to the device (`engine_rows`);
- on an out-of-memory error the batch is halved and the unfinished samples start again;
- execution of finished samples runs on a thread while the next ones are generated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm import tqdm

from cosmocore.config import RewardConfig, RolloutConfig
from cosmocore.data.records import Task, Trajectory
from cosmocore.policy import interface as policy
from cosmocore.policy.family import is_encoder_decoder
from cosmocore.policy.prompts import build_prompt, error_feedback, extract_code, program_for
from cosmocore.policy.sampling import Sampled
from cosmocore.rl.rewards import reward_for
from cosmocore.sandbox.runner import ExecRequest, ExecResult, Sandbox

log = logging.getLogger(__name__)

# `rollout.batch_size: auto`. On a CPU a decoding step's cost grows with its rows, so more rows buy
# little. On a GPU a small model's step costs its kernel launches, nearly the same for 16 rows as for
# 256 (SmolLM2-135M on one H100: 22.7 ms for 16 rows, 28.8 ms for 128; `cosmocore bench decode`), and
# the ablation profile's training took 243 s at 128 rows against 380 s at 64 (README, "On one GPU").
CPU_ROWS = 16
GPU_ROWS = 128
GPU_MEMORY_SHARE = 0.5  # of the GPU memory free when sampling starts, at most, for the rows' KV caches


@dataclass(frozen=True)
class RunIds:
    run: str
    variant: str
    seed: int
    iteration: int


def engine_rows(cfg: RolloutConfig, model) -> int:
    """How many rows decode together: `rollout.batch_size`, or for `auto` `CPU_ROWS` on a CPU and
    `gpu_rows` on a GPU."""
    if cfg.batch_size != "auto":
        return cfg.batch_size
    weight = next(model.parameters())
    if weight.device.type != "cuda":
        return CPU_ROWS
    free, _ = torch.cuda.mem_get_info(weight.device)
    return gpu_rows(free, kv_cache_bytes(model.config, cfg.max_prompt_tokens + cfg.max_new_tokens, weight.element_size()))


def gpu_rows(free_bytes: int, row_bytes: int) -> int:
    """`GPU_ROWS`, or fewer where `GPU_MEMORY_SHARE` of the free memory holds fewer rows' KV caches (a
    large model gets fewer rows instead of running out of memory)."""
    return max(1, min(GPU_ROWS, int(free_bytes * GPU_MEMORY_SHARE // row_bytes)))


def kv_cache_bytes(config, tokens: int, element_size: int) -> int:
    """Bytes of one row's KV cache at `tokens` tokens, counted twice: the engine's cache grows by
    doubling. An encoder-decoder's cross-attention holds a second cache, of the prompt."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    caches = 2 if is_encoder_decoder(config) else 1
    per_token = caches * 2 * config.num_hidden_layers * kv_heads * head_dim * element_size  # keys and values, every layer
    return 2 * per_token * tokens


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
    capacity = capacity or engine_rows(cfg, model)
    pending = dict(items)
    while pending:
        groups, keys = _groups(list(pending.items()), capacity)
        try:
            for group, member, sampled in policy.stream(model, tokenizer, groups, cfg, style, greedy, temperature, with_scores,
                                                         capacity, stop):
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
            with_scores: bool, capacity: int | None = None, stop: Callable[[str], bool] | None = None,
            desc: str | None = None) -> list[Sampled]:
    """One `Sampled` per prompt, in order (identical prompts are prefilled once); a progress bar when `desc`."""
    stream = _sample_stream(model, tokenizer, list(enumerate(prompts)), cfg, style, greedy, temperature, with_scores, capacity, stop)
    done = dict(tqdm(stream, total=len(prompts), desc=desc, unit="sample", leave=False, disable=desc is None))
    return [done[i] for i in range(len(prompts))]


def sample(model, tokenizer, prompts: list[list[int]], cfg: RolloutConfig, style: str, greedy: bool, temperature: float,
           with_scores: bool = True, stop: Callable[[str], bool] | None = None) -> list[Sampled]:
    """`generate` that also returns, per completion, the behaviour log-probs, entropies and pooled hidden
    state from the decode loop itself (what `policy.score` would compute, without a second pass).
    `stop(text)` replaces the end-of-program rule for completions that are not programs."""
    return _sample(model, tokenizer, prompts, cfg, style, greedy, temperature, with_scores, stop=stop)


def generate(model, tokenizer, prompts: list[list[int]], cfg: RolloutConfig, style: str, greedy: bool, temperature: float,
             desc: str | None = None) -> list[list[int]]:
    """Sample one completion per prompt (token ids): up to `engine_rows` rows at a time, identical
    prompts prefilled once, each row stopping as soon as its program is complete."""
    return [s.ids for s in _sample(model, tokenizer, prompts, cfg, style, greedy, temperature, False, desc=desc)]


def _encode(model, tokenizer, tasks: list[Task], style: str, cfg: RolloutConfig) -> tuple[list[tuple[Task, list[int]]], int]:
    """Token ids of each task's prompt; over-long prompts are truncated (keeping the end) or skipped."""
    encoded, too_long = [], 0
    for task in tasks:
        ids = policy.encode(model, tokenizer, build_prompt(task, tokenizer, style))
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


def complete_prompts(model, tokenizer, prompts: list[str], cfg: RolloutConfig, style: str) -> list[tuple[str, str]]:
    """Greedy answers to code prompts (a function's signature and docstring) outside any task, as evaluation
    writes its greedy programs: per prompt, the decoded answer and the program `rollout` would execute, the
    prompt plus the answer's code ("" when it holds none). Over-long prompts are truncated, whatever
    `rollout.on_long_prompt` says, so that every prompt gets an answer."""
    tasks = [Task(task_id=f"prompt-{i}", benchmark="", prompt=prompt, instruction="", entry_point="", test="",
                  test_style="", canonical_solution="") for i, prompt in enumerate(prompts)]
    encoded, _ = _encode(model, tokenizer, tasks, style, cfg.model_copy(update={"on_long_prompt": "truncate"}))
    completions = generate(model, tokenizer, [ids for _, ids in encoded], cfg, style, greedy=True, temperature=cfg.temperature)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return [(text, program_for(task, extract_code(text, style), style)) for task, text in zip(tasks, texts)]


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
    encoded, too_long = _encode(model, tokenizer, tasks, style, cfg)
    items = [((i, s), prompt) for i, (task, prompt) in enumerate(encoded) for s in range(samples_per_task)]
    trajectories: list[Trajectory] = []
    pending: list[tuple[tuple, list, Future]] = []
    stats = {"tokens": 0, "samples": 0, "passed": 0, "prompts_too_long": too_long, "generate_s": 0.0}
    start = time.perf_counter()
    bar = tqdm(total=len(items), desc=desc, unit="sample", leave=False)
    rows = engine_rows(cfg, model)
    flush = max(1, rows // 2)  # finished samples handed to the sandbox together
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
        for key, sampled in _sample_stream(model, tokenizer, items, cfg, style, greedy, temperature, with_scores, rows):
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
