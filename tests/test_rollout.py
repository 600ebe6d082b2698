"""The rollout engine on the tiny models (decoder-only, and encoder-decoder where the contract is the
same): every sample carries what tag and train need, consistent with a fresh forward pass; shared
prefill; bad input (long prompts, empty generations, out of memory)."""

from __future__ import annotations

import logging
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cosmocore.policy import causal

from cosmocore.bench import decode as decode_bench
from cosmocore.data.records import Task
from cosmocore.policy import sampling
from cosmocore.policy.interface import encode, score, score_for_update
from cosmocore.policy.models import load_policy
from cosmocore.policy.seq2seq import decoder_start, split
from cosmocore.rl import rollout as engine
from cosmocore.rl.rollout import RunIds, rollout
from cosmocore.sandbox.runner import ExecResult

IDS = RunIds(run="test", variant="cosmocore", seed=0, iteration=0)


def _task(i: int, prompt: str = "") -> Task:
    return Task(
        task_id=f"t/{i}", benchmark="humaneval",
        prompt=prompt or f"def f{i}(x):\n    \"\"\"Return x plus {i}.\"\"\"\n",
        instruction="", entry_point=f"f{i}", test=f"def check(candidate):\n    assert candidate(1) == {1 + i}\n",
        test_style="humaneval", canonical_solution=f"    return x + {i}\n",
    )


class FakeSandbox:
    """Records what it was asked to run and fails everything (no processes in unit tests)."""

    def __init__(self):
        self.requests = []

    def run(self, requests, progress=False):
        self.requests.extend(requests)
        return [ExecResult(r.task_id, "runtime_error", False, False, [], False, False, "ValueError", "",
                           "ValueError: boom", float("nan"), 0.0, 0.0) for r in requests]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, config):
    return load_policy(tiny_model_dir, config.model)


@pytest.fixture(scope="module", params=["tiny_model_dir", "tiny_t5_dir"], ids=["causal", "seq2seq"])
def any_policy(request, config):
    return load_policy(request.getfixturevalue(request.param), config.model)


def _fresh(model, prompt: list[int], completion: list[int], temperature: float):
    """Log-probs, mean entropy and pooled hidden state of one completion, and the last hidden state before
    it (the critic's state), from one unbatched forward pass straight through the model: prompt and
    completion, or for an encoder-decoder model the prompt's encoder part, then its decoder part and
    the completion."""
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            encoder, given = split(prompt, decoder_start(model))
            out = model(input_ids=torch.tensor([encoder]), decoder_input_ids=torch.tensor([given + completion]),
                        output_hidden_states=True)
            last, n = out.decoder_hidden_states[-1][0], len(given)
        else:
            out = model(input_ids=torch.tensor([prompt + completion]), output_hidden_states=True)
            last, n = out.hidden_states[-1][0], len(prompt)
    log_dist = F.log_softmax(out.logits[0, n - 1 : -1].float() / temperature, -1)
    logprobs = log_dist.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
    entropy = -(log_dist.exp() * log_dist).sum(-1).mean()
    return logprobs, entropy, last[n:].float().mean(0), last[n - 1]


def assert_like_fresh(model, prompt: list[int], ids: list[int], logprobs: list[float], mean_entropy: float,
                      hidden: list[float], temperature: float) -> None:
    """What the engine recorded for a completion is what a fresh forward pass says about it."""
    fresh_logprobs, entropy, fresh_hidden, _ = _fresh(model, prompt, ids, temperature)
    torch.testing.assert_close(torch.tensor(logprobs), fresh_logprobs, atol=1e-4, rtol=1e-4)
    assert math.isclose(mean_entropy, float(entropy), rel_tol=1e-4, abs_tol=1e-4)
    torch.testing.assert_close(torch.tensor(hidden), fresh_hidden, atol=1e-4, rtol=1e-4)


def test_rollout_records_match_a_fresh_forward_pass(any_policy, config):
    model, tokenizer = any_policy
    tasks = [_task(0), _task(1, "def long_name_function(values, threshold):\n    \"\"\"Filter values.\"\"\"\n"), _task(2)]
    cfg = config.rollout.model_copy(update={"max_new_tokens": 10, "batch_size": 5})
    sandbox = FakeSandbox()
    trajectories, stats = rollout(model, tokenizer, tasks, sandbox, cfg, config.reward, "completion", IDS,
                                  samples_per_task=3, temperature=0.7, seed=1)
    assert [(t.task_id, t.sample) for t in trajectories] == [(f"t/{i}", s) for i in range(3) for s in range(3)]
    assert stats["samples"] == 9 and stats["tokens"] == sum(len(t.completion_ids) for t in trajectories)
    for t in trajectories:
        assert 0 < len(t.completion_ids) <= 10
        assert len(t.behaviour_logprobs) == len(t.completion_ids)
        assert len(t.hidden) == model.config.hidden_size
        assert_like_fresh(model, t.prompt_ids, t.completion_ids, t.behaviour_logprobs, t.mean_entropy, t.hidden, 0.7)
    # the batched scorer the trainer uses agrees with what the rollout stored
    with torch.no_grad():
        scored = score(model, [t.prompt_ids for t in trajectories], [t.completion_ids for t in trajectories],
                       tokenizer.pad_token_id, temperature=0.7)
    for row, t in enumerate(trajectories):
        n = len(t.completion_ids)
        torch.testing.assert_close(scored.logprobs[row, :n], torch.tensor(t.behaviour_logprobs), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(scored.hidden[row], torch.tensor(t.hidden), atol=1e-4, rtol=1e-4)


def test_a_tasks_samples_share_one_prefill(tiny, config, monkeypatch):
    model, tokenizer = tiny
    widths = []
    original = model.forward

    def spy(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            widths.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    cfg = config.rollout.model_copy(update={"max_new_tokens": 6, "batch_size": 8})
    rollout(model, tokenizer, [_task(0), _task(1)], FakeSandbox(), cfg, config.reward, "completion", IDS, samples_per_task=4)
    assert widths == [2]  # two unique prompts prefilled for eight samples


def test_sampling_is_seeded(any_policy, config):
    model, tokenizer = any_policy
    cfg = config.rollout.model_copy(update={"max_new_tokens": 8})
    runs = [rollout(model, tokenizer, [_task(0)], FakeSandbox(), cfg, config.reward, "completion", IDS,
                    samples_per_task=3, seed=seed, with_scores=False)[0] for seed in (5, 5, 6)]
    assert [t.completion_ids for t in runs[0]] == [t.completion_ids for t in runs[1]] != [t.completion_ids for t in runs[2]]
    assert all(t.behaviour_logprobs == [] and math.isnan(t.mean_entropy) for t in runs[0])


def test_a_stop_rule_ends_rows_as_soon_as_it_holds(any_policy, config):
    model, tokenizer = any_policy
    prompts = [encode(model, tokenizer, "def f(x):\n")] * 3
    cfg = config.rollout.model_copy(update={"max_new_tokens": 12})
    seen = []

    def at_once(text: str) -> bool:
        seen.append(text)
        return True

    drawn = engine.sample(model, tokenizer, prompts, cfg, "completion", greedy=True, temperature=1.0, stop=at_once)
    assert len(seen) >= 3 and [len(s.ids) for s in drawn] == [1, 1, 1]


def test_decoding_runs_without_cudnn_attention(any_policy, config):
    """cuDNN's attention plans for every new sequence length, so the decode loops leave it out (3x the
    step time on an H100, see `sampling.DECODE_ATTENTION`), and only while they run."""
    model, tokenizer = any_policy
    enabled = []

    def never(text: str) -> bool:
        enabled.append(torch.backends.cuda.cudnn_sdp_enabled())
        return False

    cfg = config.rollout.model_copy(update={"max_new_tokens": 3})
    engine.sample(model, tokenizer, [encode(model, tokenizer, "def f(x):\n")], cfg, "completion", greedy=True,
                  temperature=1.0, stop=never)
    assert enabled and not any(enabled)
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_the_engine_calls_the_model_without_deprecated_arguments(any_policy, config, monkeypatch, caplog):
    """No deprecation warning from the decode loops or the scoring passes in a run's log: the KV cache goes
    in as `cache=` and comes back as `.cache`, the names the installed transformers asks for (its old name
    `past_key_values` raises a FutureWarning in a forward pass and logs a warning when read from an output)."""
    model, tokenizer = any_policy
    # transformers logs each deprecation once per process and not through the root logger: an earlier
    # test's call must not hide this one's, and caplog must see them
    monkeypatch.setattr(logging.Logger, "warning_once", logging.Logger.warning)
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    prompts = [encode(model, tokenizer, text) for text in ("def f(x):\n", "import os\n", "class A:\n")]
    # two rows at a time: a decoder-only policy's third prompt joins the running batch
    cfg = config.rollout.model_copy(update={"max_new_tokens": 4, "batch_size": 2})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        drawn = engine.sample(model, tokenizer, prompts, cfg, "completion", greedy=True, temperature=1.0, with_scores=True)
        score_for_update(model, prompts, [s.ids for s in drawn], tokenizer.pad_token_id, temperature=1.0)
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []
    assert [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()] == []


def test_long_prompts_are_truncated_or_skipped_and_counted(any_policy, config):
    model, tokenizer = any_policy
    long_task = _task(1, "def g(x):\n    \"\"\"" + "word " * 200 + "\"\"\"\n")
    for policy, expected in (("truncate", 2), ("skip", 1)):
        cfg = config.rollout.model_copy(update={"max_new_tokens": 4, "max_prompt_tokens": 64, "on_long_prompt": policy})
        trajectories, stats = rollout(model, tokenizer, [_task(0), long_task], FakeSandbox(), cfg, config.reward,
                                      "completion", IDS, samples_per_task=1)
        assert stats["prompts_too_long"] == 1 and len(trajectories) == expected
        assert all(len(t.prompt_ids) <= 64 for t in trajectories)


def test_empty_generation_is_no_code_not_a_crash(tiny, config, monkeypatch):
    model, tokenizer = tiny
    def nothing(model, tokenizer, groups, *args, **kwargs):  # every row ends at once with end-of-sequence
        for g, (_, rows) in enumerate(groups):
            for m in range(rows):
                yield g, m, sampling.Sampled([tokenizer.eos_token_id], [-0.1], [1.0], [0.0] * model.config.hidden_size)

    monkeypatch.setattr(causal, "stream", nothing)
    sandbox = FakeSandbox()
    trajectories, _ = rollout(model, tokenizer, [_task(0)], sandbox, config.rollout, config.reward, "chat", IDS, samples_per_task=2)
    assert [t.outcome for t in trajectories] == ["no_code", "no_code"]
    assert all(t.code == "" and t.reward == config.reward.no_code for t in trajectories)
    assert sandbox.requests == []  # nothing to execute


def test_out_of_memory_halves_the_batch(tiny, config, monkeypatch):
    model, tokenizer = tiny
    real = causal.stream
    capacities = []

    def flaky(model, tokenizer, groups, cfg, style, greedy, temperature, with_scores, capacity, stop):
        capacities.append(capacity)
        for n, item in enumerate(real(model, tokenizer, groups, cfg, style, greedy, temperature, with_scores, capacity, stop)):
            if capacity > 2 and n == 3:  # out of memory after some samples finished
                raise torch.OutOfMemoryError("simulated")
            yield item

    monkeypatch.setattr(causal, "stream", flaky)
    cfg = config.rollout.model_copy(update={"max_new_tokens": 4, "batch_size": 8})
    trajectories, _ = rollout(model, tokenizer, [_task(0), _task(1)], FakeSandbox(), cfg, config.reward, "completion", IDS,
                              samples_per_task=4)
    assert [(t.task_id, t.sample) for t in trajectories] == [(f"t/{i}", s) for i in range(2) for s in range(4)]
    assert capacities == [8, 4, 2]


def test_continuous_batching_refills_and_matches_a_fresh_forward(tiny, config):
    """More groups than fit at once: rows leave, new prompts of other lengths join the running cache."""
    model, tokenizer = tiny
    prompts = [tokenizer("def f(x):")["input_ids"], tokenizer("x = [1, 2, 3]\nfor item in x:\n    print(item)")["input_ids"],
               tokenizer("import os")["input_ids"], tokenizer("class A:\n    def method(self, value):")["input_ids"]] * 2
    cfg = config.rollout.model_copy(update={"max_new_tokens": 9, "batch_size": 3})
    torch.manual_seed(3)
    sampled = engine._sample(model, tokenizer, prompts, cfg, "completion", greedy=False, temperature=0.9, with_scores=True)
    assert len(sampled) == len(prompts)
    for prompt, s in zip(prompts, sampled):
        assert_like_fresh(model, prompt, s.ids, s.logprobs, s.mean_entropy, s.hidden, 0.9)
    greedy = engine._sample(model, tokenizer, prompts, cfg, "completion", greedy=True, temperature=1.0, with_scores=False)
    alone = [engine._sample(model, tokenizer, [p], cfg, "completion", greedy=True, temperature=1.0, with_scores=False)[0] for p in prompts[:4]]
    assert [s.ids for s in greedy[:4]] == [s.ids for s in alone] == [s.ids for s in greedy[4:]]


def test_nucleus_sampling_keeps_the_transformers_semantics(monkeypatch):
    from transformers.generation.logits_process import TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.cat([torch.randn(3, 400) * 4, torch.linspace(0, 1, 400)[None]])  # peaked rows and a nearly flat one
    log_dist = F.log_softmax(logits, -1)
    kept = TopPLogitsWarper(top_p=0.9)(None, logits.clone()) > -float("inf")
    for candidates in (8, 400):  # the flat row's nucleus is wider than 8 candidates: the full sort takes over
        monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", candidates)
        drawn = torch.zeros_like(kept)
        for _ in range(300):
            tokens = sampling.top_p_sample(log_dist, 0.9)
            drawn[torch.arange(4), tokens] = True
        assert not (drawn & ~kept).any()  # never outside the nucleus ...
        assert drawn[:3].sum() >= kept[:3].sum() * 0.5  # ... and spread over it


def test_the_decode_bench_times_steps_of_the_engines_own_pass(tiny):
    model, _ = tiny
    for kernels in ("decode", "all"):
        seconds, cache_length = decode_bench.step_seconds(model, rows=3, prompt=20, steps=4, kernels=kernels)
        assert seconds > 0 and cache_length == 20 + decode_bench.WARMUP_STEPS + 4


def test_auto_batch_is_16_rows_on_a_cpu_and_what_gpu_memory_holds_up_to_128(tiny, config):
    model, _ = tiny
    cfg = config.rollout.model_copy(update={"batch_size": "auto"})
    assert engine.engine_rows(cfg, model) == engine.CPU_ROWS == 16
    assert engine.engine_rows(cfg.model_copy(update={"batch_size": 40}), model) == 40
    gib = 2**30
    # SmolLM2-135M in bf16: 30 layers, 3 KV heads of 64, keys and values: 23,040 bytes a token; 768 + 160
    # tokens, doubled for the cache's growth: 42.8 MB a row
    smol = SimpleNamespace(num_attention_heads=9, num_key_value_heads=3, hidden_size=576, num_hidden_layers=30)
    row = engine.kv_cache_bytes(smol, 768 + 160, 2)
    assert row == 2 * 23_040 * 928
    assert engine.gpu_rows(78 * gib, row) == engine.GPU_ROWS == 128
    assert engine.gpu_rows(1 * gib, row) == 12  # half of 1 GiB holds 12 such rows
    assert engine.gpu_rows(10**6, row) == 1  # never zero: the out-of-memory fallback has the last word
    # a 7B Llama (32 layers, 32 heads of 128, no grouped KV) after its 13 GiB of weights on an 80 GiB GPU
    llama7b = SimpleNamespace(num_attention_heads=32, hidden_size=4096, num_hidden_layers=32)
    assert engine.gpu_rows(66 * gib, engine.kv_cache_bytes(llama7b, 928, 2)) == 36
    # an encoder-decoder caches the prompt twice more (cross-attention); T5 names its head size d_kv
    t5 = SimpleNamespace(num_attention_heads=8, d_kv=64, hidden_size=512, num_hidden_layers=6, is_encoder_decoder=True)
    assert engine.kv_cache_bytes(t5, 100, 4) == 2 * 2 * (2 * 6 * 8 * 64 * 4) * 100
