"""The nocturnal trainer learns: on a toy task with a verifiable reward, every variant raises the mean
reward of fresh samples by at least 0.2 within a fixed budget of updates, through the production code
path (`rollout.generate` → `policy.score` → `loop.tag` → `loop.gate` → `loop.nocturnal`, which calls
`Learner.update`), and the affect tagger's predicted valence tracks its targets on held-out samples.

The toy task: reward = share of the first `N_TOKENS` generated tokens that are the token " a" (in
[0, 1], checked by counting); four prompts are its four tasks. The tiny model is randomly initialised: its next-token distribution
is nearly uniform over 49,152 tokens, so any fixed token starts at ~2e-5 and sampling never finds the
reward. A short supervised warm start (like RL from a pretrained base) brings the target to a base rate
of about 10 %; from there only the reinforcement-learning updates raise it, and the test measures them.
Full fine-tuning, because the target's logit needs its (tied) embedding row to move, which LoRA on the
attention and MLP projections cannot reach.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch

from cosmocore.data.records import Trajectory
from cosmocore.policy.interface import score
from cosmocore.policy.models import load_policy
from cosmocore.rl.affect import AffectTagger, affect_targets, predict
from cosmocore.rl.buffer import ReplayBuffer
from cosmocore.rl.loop import LoopState, gate, nocturnal, tag
from cosmocore.rl.rollout import generate
from cosmocore.rl.trainer import build_learner

SEED = 0
N_TOKENS = 8
TEMPERATURE = 1.0
PROMPTS = ("def f(x):", "x = [1, 2, 3]", "# a comment", "import os\n")
SAMPLES_PER_PROMPT = 12  # 48 trajectories per iteration
EVAL_SAMPLES_PER_PROMPT = 32  # 128 fresh samples to measure the mean reward
ITERATIONS = 4
WARM_START_LR = 3e-3
WARM_START_PROB = 0.1  # p(target) right after the prompt
WARM_START_MAX_STEPS = 200
MIN_GAIN = 0.2
# Every variant whose rule can learn from rewards in [0, 1]; `nsr` only pushes down negative rewards,
# which this toy has none of (tests/test_learning_rules.py checks its rule).
VARIANTS = ("on_policy", "grpo", "difficulty", "success_replay", "uniform", "per", "cosmocore", "cosmocore_no_prune")


def toy_reward(completion: list[int], target: int) -> float:
    return sum(token == target for token in completion[:N_TOKENS]) / N_TOKENS


@pytest.fixture(scope="module")
def toy(config, tiny_model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as fast for a model this small, and reproducible; no oversubscribed shared cores
    try:
        yield make_toy(config, tiny_model_dir)
    finally:
        torch.set_num_threads(threads)


def make_toy(config, model_dir):
    cfg = config.model_copy(
        update={
            "rollout": config.rollout.model_copy(update={"max_new_tokens": N_TOKENS, "temperature": TEMPERATURE, "top_p": 1.0}),
            "train": config.train.model_copy(
                update={
                    "iterations": ITERATIONS,
                    "updates_per_iteration": 3,  # = samples / minibatch: on_policy gets the same budget
                    "minibatch_size": 16,
                    "lr": 3e-3,
                    "lora": False,
                    "kl_coef": 0.0,
                }
            ),
        }
    )
    model, tokenizer = load_policy(model_dir, cfg.model)
    target = tokenizer(" a", add_special_tokens=False)["input_ids"][0]
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    _warm_start(model, prompts, target)
    return cfg, model, tokenizer, prompts, target, mean_reward(model, tokenizer, prompts, cfg, target, seed=1000)


def _warm_start(model, prompts, target) -> None:
    """Supervised steps toward the target token until the policy gives it `WARM_START_PROB` right after
    each prompt (on average), so that sampling finds the reward at all but has room to improve."""
    torch.manual_seed(SEED)
    optimizer = torch.optim.Adam(model.parameters(), lr=WARM_START_LR)
    rows = [p + [target] * N_TOKENS for p in prompts]
    for _ in range(WARM_START_MAX_STEPS):
        model.train()
        loss, first = 0.0, []
        for prompt, row in zip(prompts, rows):
            logits = model(input_ids=torch.tensor([row])).logits[0, len(prompt) - 1 : -1]
            first.append(logits[0].softmax(-1)[target].item())
            loss = loss + torch.nn.functional.cross_entropy(logits, torch.tensor(row[len(prompt) :])) / len(rows)
        if np.mean(first) >= WARM_START_PROB:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert np.mean(first) >= WARM_START_PROB, f"warm start stalled at p(target) = {np.mean(first):.3f}"


def sample(model, tokenizer, prompts, cfg, target, per_prompt: int, seed: int, iteration: int = 0) -> list[Trajectory]:
    """Sample and score like `rollout.rollout`, with the toy reward in place of the sandbox."""
    jobs = [(k, prompt) for k, prompt in enumerate(prompts) for _ in range(per_prompt)]
    torch.manual_seed(seed)
    completions = generate(model, tokenizer, [p for _, p in jobs], cfg.rollout, "completion", greedy=False, temperature=TEMPERATURE)
    with torch.no_grad():
        scored = score(model, [p for _, p in jobs], completions, tokenizer.pad_token_id, TEMPERATURE)
    entropy = scored.mean_entropy()
    out = []
    for row, ((k, prompt), completion) in enumerate(zip(jobs, completions)):
        reward = toy_reward(completion, target)
        out.append(
            Trajectory(
                trajectory_id=f"toy/i{iteration}/t{k}/{row}", run="toy", variant="toy", seed=SEED, iteration=iteration,
                task_id=f"t{k}", sample=row, kind="code", prompt_ids=list(prompt), completion_ids=list(completion),
                behaviour_logprobs=scored.logprobs[row, : len(completion)].tolist(), mean_entropy=float(entropy[row]),
                hidden=scored.hidden[row].tolist(), text="", code="", outcome="passed" if reward == 1.0 else "wrong_answer",
                hallucinated=False, hallucination_evidence="", exception_type="", test_share=reward, reward=reward,
            )
        )
    return out


def mean_reward(model, tokenizer, prompts, cfg, target, seed: int) -> float:
    trajectories = sample(model, tokenizer, prompts, cfg, target, EVAL_SAMPLES_PER_PROMPT, seed)
    return float(np.mean([t.reward for t in trajectories]))


def train_variant(toy, variant: str) -> tuple[float, float, LoopState, dict]:
    cfg, base, tokenizer, prompts, target, before = toy
    model = copy.deepcopy(base)
    torch.manual_seed(SEED)
    learner = build_learner(model, cfg.train, tokenizer.pad_token_id, TEMPERATURE)
    buffer = ReplayBuffer(cfg.buffer, variant, SEED)
    state = LoopState()
    metrics, rollout_rewards, dream_served = {}, [], 0.0
    for i in range(cfg.train.iterations):
        trajectories = sample(learner.model, tokenizer, prompts, cfg, target, SAMPLES_PER_PROMPT, seed=SEED * 100 + i, iteration=i)
        rollout_rewards.append(round(float(np.mean([t.reward for t in trajectories])), 3))
        _, metrics = tag(trajectories, state, cfg.affect, SEED)
        metrics |= gate(buffer, trajectories, variant, state.expected)
        metrics |= nocturnal(learner, buffer, variant, cfg.train, i, state.expected)[0]
        dream_served = max(dream_served, metrics["batch_dream_share"])
        state.iteration = i + 1
    after = mean_reward(learner.model, tokenizer, prompts, cfg, target, seed=2000)
    metrics["optimizer_steps"] = learner.steps
    metrics["rollout_rewards"] = rollout_rewards
    metrics["max_batch_dream_share"] = dream_served
    return before, after, state, metrics


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_raises_the_toy_reward(toy, variant):
    start = time.perf_counter()
    before, after, _, metrics = train_variant(toy, variant)
    print(f"{variant}: reward {before:.3f} -> {after:.3f} (+{after - before:.3f}) in {metrics['optimizer_steps']} updates, "
          f"{time.perf_counter() - start:.1f}s; rollout rewards {metrics['rollout_rewards']}, "
          f"Dream Queue {metrics['buffer_dream_size']} entries, up to {metrics['max_batch_dream_share']:.0%} of a phase's draws")
    assert 0.02 <= before <= 1 - MIN_GAIN, f"the warm start left no room to learn: base reward {before:.3f}"
    assert metrics["optimizer_steps"] == ITERATIONS * toy[0].train.updates_per_iteration
    assert after - before >= MIN_GAIN, f"{variant}: mean reward {before:.3f} -> {after:.3f}, less than +{MIN_GAIN}"


def test_tagger_valence_tracks_its_targets_on_held_out_trajectories(toy):
    """Tag two iterations as the loop does, then predict the valence of fresh samples it never saw."""
    cfg, model, tokenizer, prompts, target, _ = toy
    state = LoopState()
    for i in range(2):
        trajectories = sample(model, tokenizer, prompts, cfg, target, SAMPLES_PER_PROMPT, seed=300 + i, iteration=i)
        _, metrics = tag(trajectories, state, cfg.affect, SEED)
        state.iteration = i + 1
    held_out = sample(model, tokenizer, prompts, cfg, target, EVAL_SAMPLES_PER_PROMPT, seed=400, iteration=2)
    valence_target, _ = affect_targets(
        np.array([t.reward for t in held_out]), [t.task_id for t in held_out], [t.outcome for t in held_out],
        np.array([np.mean(t.behaviour_logprobs) for t in held_out]), state.expected, state.outcome_counts, cfg.affect,
    )
    hidden = np.array([t.hidden for t in held_out], dtype=np.float32)
    tagger = AffectTagger(hidden.shape[1], cfg.affect.hidden_units)
    tagger.load_state_dict(state.tagger_state)
    valence, _ = predict(tagger, hidden)
    corr = float(np.corrcoef(valence, valence_target)[0, 1])
    print(f"tagger valence correlation: {metrics['tagger_valence_corr']:.3f} on the tag stage's hold-out, "
          f"{corr:.3f} on {len(held_out)} fresh trajectories")
    assert np.std(valence_target) > 0.05, "the held-out targets do not vary: the check would say nothing"
    assert metrics["tagger_valence_corr"] > 0
    assert corr > 0.3
