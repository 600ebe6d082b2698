"""Encoder-decoder policies (the T5 family: CodeT5-small) on a tiny T5 loaded from a local folder: the
loader and prompts, batches whose rows stop at different steps, LoRA and full fine-tuning with their
checkpoints, and a rollout through the real sandbox that one training iteration, self-repair and the
rollout benchmark's baseline go on from. What the engine and the training pass share with decoder-only
models (records equal to a fresh forward pass, seeding, stop rules, long prompts, the training pass) is
tested on both in test_rollout.py, test_trainer.py and test_alignment_answers.py."""

from __future__ import annotations

import math

import pytest
import torch

from cosmocore.alignment.coderl import ANSWER_PREFIX
from cosmocore.bench.rollout import run_plain
from cosmocore.data.records import OUTCOMES
from cosmocore.evaluation.repair import repair
from cosmocore.policy.interface import encode, score
from cosmocore.policy.models import load_policy
from cosmocore.policy.prompts import resolve_style
from cosmocore.policy.seq2seq import decoder_start, split
from cosmocore.rl import rollout as engine
from cosmocore.rl.loop import LoopState, gate, nocturnal, tag
from cosmocore.rl.mixing import make_buffer
from cosmocore.rl.rollout import RunIds, rollout
from cosmocore.rl.trainer import build_learner, load_checkpoint, save_checkpoint, save_policy
from cosmocore.sandbox.runner import Sandbox
from tests.test_rollout import FakeSandbox, _task, assert_like_fresh

IDS = RunIds(run="test", variant="cosmocore", seed=0, iteration=0)


@pytest.fixture(scope="module")
def t5(tiny_t5_dir, config):
    return load_policy(tiny_t5_dir, config.model)


def test_the_loader_picks_the_seq2seq_class_and_completion_prompts(t5, config):
    from transformers import T5ForConditionalGeneration

    model, tokenizer = t5
    assert isinstance(model, T5ForConditionalGeneration) and model.config.num_layers == config.model.tiny_layers
    assert resolve_style(config.model.prompt_style, tokenizer) == "completion"  # no chat template, as CodeT5
    ids = encode(model, tokenizer, "def f(x):\n", answer_prefix=ANSWER_PREFIX)
    encoder, given = split(ids, decoder_start(model))
    assert tokenizer.decode(encoder) == "def f(x):\n"  # the prompt is the encoder's ...
    assert given[0] == decoder_start(model) and tokenizer.decode(given[1:]) == ANSWER_PREFIX  # ... an answer's start the decoder's


def test_rows_that_stop_early_leave_their_batch_and_the_rest_still_match(t5, config):
    """Rows end at different steps (a stop rule on their text) in batches of prompts of several lengths;
    greedy decoding gives each prompt the same completion in a batch as alone."""
    model, tokenizer = t5
    prompts = [encode(model, tokenizer, text) for text in ("def f(x):", "x = [1, 2, 3]\nfor item in x:\n    print(item)",
                                                           "import os", "class A:\n    def method(self, value):")] * 2
    cfg = config.rollout.model_copy(update={"max_new_tokens": 12, "batch_size": 3})
    drawn = {}
    for with_scores in (True, False):
        torch.manual_seed(3)
        drawn[with_scores] = engine.sample(model, tokenizer, prompts, cfg, "completion", greedy=False, temperature=0.9,
                                           with_scores=with_scores, stop=lambda text: len(text) >= 12)
    sampled = drawn[True]
    assert len({len(s.ids) for s in sampled}) > 1  # they did stop at different lengths ...
    assert [s.ids for s in drawn[False]] == [s.ids for s in sampled]  # ... the same without scores
    for prompt, s in zip(prompts, sampled):
        assert len(tokenizer.decode(s.ids[:-1], skip_special_tokens=True)) < 12 or len(s.ids) == 12  # stopped as soon as it held
        assert_like_fresh(model, prompt, s.ids, s.logprobs, s.mean_entropy, s.hidden, 0.9)
    greedy = engine.generate(model, tokenizer, prompts, cfg, "completion", greedy=True, temperature=1.0)
    alone = [engine.generate(model, tokenizer, [p], cfg, "completion", greedy=True, temperature=1.0)[0] for p in prompts[:4]]
    assert greedy[:4] == alone == greedy[4:]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_one_update_changes_the_policy_and_its_checkpoint_round_trips(lora, tiny_t5_dir, config, tmp_path):
    model, tokenizer = load_policy(tiny_t5_dir, config.model)
    cfg = config.train.model_copy(update={"lora": lora, "lr": 1e-2, "kl_coef": 0.01})
    learner = build_learner(model, cfg, tokenizer.pad_token_id, 1.0, seed=0)
    if lora:  # T5's projections in self- and cross-attention and the feed-forward
        targeted = {name.rsplit(".", 1)[-1] for name, module in learner.model.named_modules() if hasattr(module, "lora_A")}
        assert targeted == {"q", "k", "v", "o", "wi", "wo"}
    rollout_cfg = config.rollout.model_copy(update={"max_new_tokens": 6})
    sampled, _ = rollout(learner.model, tokenizer, [_task(0), _task(1)], FakeSandbox(), rollout_cfg, config.reward, "completion",
                         IDS, samples_per_task=2, temperature=1.0, seed=0)
    entries = [{"prompt_ids": t.prompt_ids, "completion_ids": t.completion_ids, "behaviour_logprobs": t.behaviour_logprobs,
                "reward": reward, "baseline": 0.0} for t, reward in zip(sampled, (1.0, -1.0, 0.5, -0.5))]
    before = {name: p.detach().clone() for name, p in learner.model.named_parameters() if p.requires_grad}
    stats, td = learner.update(entries, [1.0] * len(entries))
    # the trained pass is the behaviour policy's own before the step (T5's dropout is off for training)
    assert stats["kl_behaviour"] < 1e-8 and stats["clip_fraction"] == 0.0 and math.isfinite(stats["loss"]) and len(td) == 4
    moved = {name for name, p in learner.model.named_parameters() if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0}
    assert any("encoder." in name for name in moved) and any("decoder." in name for name in moved)
    assert any(not torch.equal(p, before[name]) for name, p in learner.model.named_parameters() if name in moved)

    save_checkpoint(learner, tmp_path / "iter_0", {"loop": {"iteration": 1}})
    fresh_model, _ = load_policy(tiny_t5_dir, config.model)
    fresh = build_learner(fresh_model, cfg, tokenizer.pad_token_id, 1.0, seed=1)
    assert load_checkpoint(fresh, tmp_path / "iter_0") == {"loop": {"iteration": 1}} and fresh.steps == 1
    restored = fresh.model.state_dict()
    for name, value in learner.model.state_dict().items():
        torch.testing.assert_close(restored[name], value, rtol=0, atol=0)

    save_policy(learner, tmp_path / "policy")  # what evaluation loads, through the one loader
    evaluated, _ = load_policy(tiny_t5_dir, config.model, trained=tmp_path / "policy")
    prompts, completions = [e["prompt_ids"] for e in entries], [e["completion_ids"] for e in entries]
    with torch.no_grad():
        expected = score(learner.model.eval(), prompts, completions, tokenizer.pad_token_id).logprobs
        torch.testing.assert_close(score(evaluated, prompts, completions, tokenizer.pad_token_id).logprobs, expected)


def test_gated_feed_forwards_get_their_adapters_too(config):
    from transformers import T5Config, T5ForConditionalGeneration

    gated = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                                                feed_forward_proj="gated-gelu", decoder_start_token_id=0))
    learner = build_learner(gated, config.train.model_copy(update={"lora": True}), 0, 1.0)
    targeted = {name.rsplit(".", 1)[-1] for name, module in learner.model.named_modules() if hasattr(module, "lora_A")}
    assert targeted == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}


@pytest.fixture(scope="module")
def sandbox(config):
    with Sandbox(config.sandbox.model_copy(update={"workers": 1, "preload_modules": []})) as pool:
        yield pool


def test_a_rollout_through_the_sandbox_feeds_training_repair_and_the_benchmark(tiny_t5_dir, config, sandbox):
    """The training flow's steps on the tiny T5: rollout (executed for real) → tag → gate → nocturnal
    update; then self-repair of the failures and the rollout benchmark's plain-`generate` baseline."""
    cfg = config.model_copy(update={
        "rollout": config.rollout.model_copy(update={"max_new_tokens": 8, "batch_size": 4}),
        "affect": config.affect.model_copy(update={"epochs": 5}),
        "train": config.train.model_copy(update={"iterations": 1, "updates_per_iteration": 2, "minibatch_size": 4}),
    })
    model, tokenizer = load_policy(tiny_t5_dir, cfg.model)
    style = resolve_style(cfg.model.prompt_style, tokenizer)
    tasks = [_task(0), _task(1)]
    learner = build_learner(model, cfg.train, tokenizer.pad_token_id, cfg.rollout.temperature)
    trajectories, stats = rollout(learner.model, tokenizer, tasks, sandbox, cfg.rollout, cfg.reward, style, IDS,
                                  samples_per_task=2, seed=0)
    assert len(trajectories) == stats["samples"] == 4 and all(t.outcome in OUTCOMES for t in trajectories)
    assert all(t.code or t.outcome == "no_code" for t in trajectories)

    buffer, state = make_buffer(cfg.buffer, "cosmocore", 0, cfg.alignment.share), LoopState()
    tag(trajectories, state, cfg.affect, seed=0)
    assert all(-1 <= t.valence <= 1 and 0 <= t.arousal <= 1 for t in trajectories)
    gate(buffer, trajectories, "cosmocore", state.expected)
    metrics, _ = nocturnal(learner, buffer, "cosmocore", cfg.train, 0, state.expected)
    assert learner.steps == metrics["updates"] == 2 and math.isfinite(metrics["train_loss"])

    failing = [t for t in trajectories if t.outcome != "passed"]
    fixed = repair(learner.model, tokenizer, {t.task_id: t for t in tasks}, trajectories, sandbox, cfg.rollout, style, rounds=1)
    assert fixed["metrics"]["repair_samples"] == len(failing)
    assert all(len(a["outcomes"]) == 1 and a["outcomes"][0] in OUTCOMES for a in fixed["attempts"])

    plain = run_plain(learner.model, tokenizer, tasks, cfg.rollout, style, samples=1, seed=0)
    assert plain["programs"] == 2 and 0 < plain["tokens"] <= 2 * cfg.rollout.max_new_tokens
