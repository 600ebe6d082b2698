"""The advantage baselines of the update rule, on hand-built batches with the real reward signs (pass 1,
wrong answer 0, syntax error −0.5, hallucinated −1): GRPO's all-fail group gives no gradient, a Dream
Queue failure replayed under the task baseline keeps a non-zero advantage, NSR only pushes failures
down, the critic is trusted only once it explains the reward, and the policy the learner trains is
the policy that sampled (KL to the behaviour policy ~0 before the first update). Plus the learning
benchmark's paired bootstrap on synthetic data with a known difference."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from cosmocore.bench.learning import compare
from cosmocore.evaluation.report import resample_indices
from cosmocore.policy.interface import encode, score
from cosmocore.policy.models import load_policy
from cosmocore.rl.buffer import ReplayBuffer
from cosmocore.rl.loop import group_statistics, nocturnal, set_baselines
from cosmocore.rl.rollout import generate
from cosmocore.rl.trainer import build_learner

PASS, WRONG, SYNTAX, HALLUCINATED = 1.0, 0.0, -0.5, -1.0
TEMPERATURE = 0.8


def _learner(config, model_dir, lora: bool = False):
    model, tokenizer = load_policy(model_dir, config.model)
    cfg = config.train.model_copy(update={"lora": lora, "entropy_coef": 0.0, "kl_coef": 0.0})
    torch.manual_seed(0)
    learner = build_learner(model, cfg, tokenizer.pad_token_id, TEMPERATURE)
    learner.rollout_cfg = config.rollout.model_copy(update={"max_new_tokens": 8, "top_p": 1.0})
    return learner, tokenizer


def _entries(learner, tokenizer, rewards_by_task: dict[str, list[float]], sampler=None, iteration: int = 0) -> list[dict]:
    """Trajectory entries sampled from `sampler` (the learner's own policy by default), scored as the
    rollout scores them, with the given rewards."""
    sampler = sampler if sampler is not None else learner.model
    jobs = [(task, reward) for task, rewards in rewards_by_task.items() for reward in rewards]
    prompts = [encode(sampler, tokenizer, f"def {task}(x):") for task, _ in jobs]
    torch.manual_seed(1)
    completions = generate(sampler, tokenizer, prompts, learner.rollout_cfg, "completion", greedy=False, temperature=TEMPERATURE)
    with torch.no_grad():
        scored = score(sampler, prompts, completions, tokenizer.pad_token_id, TEMPERATURE)
    return [{"trajectory_id": f"{task}/{iteration}/{row}", "iteration": iteration, "task_id": task, "kind": "code", "prompt_ids": prompt, "completion_ids": completion,
             "behaviour_logprobs": scored.logprobs[row, : len(completion)].tolist(), "reward": reward,
             "outcome": "passed" if reward == PASS else "wrong_answer"}
            for row, ((task, reward), prompt, completion) in enumerate(zip(jobs, prompts, completions))]


def _policy_grad_norm(learner) -> float:
    return float(sum(p.grad.norm() ** 2 for p in learner.model.parameters() if p.grad is not None) ** 0.5)


def test_grpo_all_fail_group_gives_no_gradient_and_a_mixed_group_does(config, tiny_model_dir):
    learner, tokenizer = _learner(config, tiny_model_dir)
    all_fail = _entries(learner, tokenizer, {"f": [WRONG] * 4})
    set_baselines(all_fail, "group")
    assert [e["baseline"] for e in all_fail] == [WRONG] * 4
    stats, _ = learner.update(all_fail, np.ones(len(all_fail)))
    assert stats["advantage_zero_share"] == 1.0 and stats["policy_loss"] == 0.0
    assert _policy_grad_norm(learner) == 0.0  # the value head learns; the policy is left alone

    mixed = _entries(learner, tokenizer, {"g": [PASS, WRONG, SYNTAX, HALLUCINATED]})
    set_baselines(mixed, "group")
    assert [e["reward"] - e["baseline"] for e in mixed] == pytest.approx([1.125, 0.125, -0.375, -0.875])
    stats, _ = learner.update(mixed, np.ones(len(mixed)))
    assert stats["advantage_positive_share"] == 0.5 and _policy_grad_norm(learner) > 0


def test_a_replayed_dream_queue_failure_keeps_a_negative_advantage_under_the_task_baseline(config, tiny_model_dir):
    """A painful failure on a task the policy usually solves: the Dream Queue holds it, and each nocturnal
    phase judges it against what the policy now expects of the task, not against itself or a zero critic."""
    learner, tokenizer = _learner(config, tiny_model_dir)
    entries = _entries(learner, tokenizer, {"solved_usually": [HALLUCINATED, SYNTAX]})
    buffer = ReplayBuffer(config.buffer, "cosmocore", seed=0)
    stats = buffer.add(entries, valence=[-0.9, -0.8], arousal=[0.9, 0.95], entropy=[0.1, 0.1])
    assert stats["dream"] == 2
    train = config.train.model_copy(update={"updates_per_iteration": 2, "minibatch_size": 2})
    expected = {"solved_usually": 0.75}
    phase, per_update = nocturnal(learner, buffer, "cosmocore", train, 0, expected)
    assert all(e["baseline"] == 0.75 for e in buffer.entries())
    assert len(per_update) == 2 and [u["step"] for u in per_update] == [1, 2]
    assert all(u["advantage_mean"] < -1.0 and u["advantage_positive_share"] == 0.0 for u in per_update)
    assert phase["train_advantage_mean"] < -1.0 and not phase["train_critic_trusted"]


def test_nsr_only_pushes_failures_down():
    entries = [{"task_id": "t", "kind": "code", "reward": r} for r in (PASS, WRONG, SYNTAX, HALLUCINATED)]
    set_baselines(entries, "negative")
    assert [e["reward"] - e["baseline"] for e in entries] == [0.0, 0.0, SYNTAX, HALLUCINATED]


def test_the_critic_is_trusted_only_once_it_explains_the_reward(config, tiny_model_dir):
    learner, _ = _learner(config, tiny_model_dir)
    rewards = [PASS, WRONG, SYNTAX, HALLUCINATED]
    assert not learner.critic_trusted  # a fresh critic is never the baseline
    assert learner._fit_critic_trust(rewards, torch.tensor(rewards)) == 0.0  # V = 0 explains nothing
    assert not learner.critic_trusted
    for _ in range(10):  # V = r: explains everything, and the running value climbs past the threshold
        assert learner._fit_critic_trust(rewards, torch.zeros(4)) == 1.0
    assert learner.critic_explained_variance > config.train.critic_min_explained_variance and learner.critic_trusted
    assert math.isnan(learner._fit_critic_trust([WRONG] * 4, torch.zeros(4)))  # nothing to explain: nothing folded
    learner.use_critic = False  # GRPO and NSR never hand their baseline to the critic
    assert not learner.critic_trusted


def test_difficulty_draws_only_groups_whose_rewards_vary(config):
    """p(1−p) priority: a group that all failed alike is never drawn; a mixed one is, in proportion."""
    entries = [{"task_id": task, "kind": "code", "reward": r, "outcome": "passed" if r == PASS else "wrong_answer"}
               for task, rewards in (("flat", [WRONG] * 4), ("mixed", [PASS, WRONG, WRONG, WRONG]), ("rare", [PASS] + [WRONG] * 7))
               for r in rewards]
    variance, pass_rate = group_statistics(entries)
    assert variance.tolist() == [0.0] * 4 + [0.1875] * 4 + [pytest.approx(7 / 64)] * 8  # p(1−p)
    assert pass_rate.tolist() == [0.0] * 4 + [0.25] * 4 + [0.125] * 8
    buffer = ReplayBuffer(config.buffer, "difficulty", seed=0)
    buffer.add(entries, np.zeros(16), np.zeros(16), np.zeros(16), variance=variance)
    drawn = [buffer.entries()[i]["task_id"] for i in buffer.sample(4000, 0.0).indices]
    assert "flat" not in drawn
    share = drawn.count("mixed") / len(drawn)  # 4 × 0.1875 against 8 × 7/64
    assert share == pytest.approx(0.75 / (0.75 + 0.875), abs=0.03)
    buffer.add(entries[:4], np.zeros(4), np.zeros(4), np.zeros(4), variance=np.zeros(4))
    assert len(buffer) == 4  # on-policy: the next batch replaces it


def test_success_replay_keeps_hard_task_successes_and_replays_them_against_the_task_baseline(config, tiny_model_dir):
    learner, tokenizer = _learner(config, tiny_model_dir)
    first = _entries(learner, tokenizer, {"hard": [PASS, WRONG, WRONG, WRONG], "easy": [PASS, PASS, PASS, WRONG]})
    _, pass_rate = group_statistics(first)
    retain = np.array([e["outcome"] == "passed" for e in first]) & (pass_rate <= config.buffer.success_max_pass_rate)
    assert retain.tolist() == [True, False, False, False] + [False] * 4  # the success on the hard task only
    buffer = ReplayBuffer(config.buffer, "success_replay", seed=0)
    set_baselines(first, "group")
    buffer.add(first, np.zeros(8), np.zeros(8), np.zeros(8), retain=retain)
    second = _entries(learner, tokenizer, {"hard": [WRONG] * 4}, iteration=1)
    set_baselines(second, "group")
    buffer.add(second, np.zeros(4), np.zeros(4), np.zeros(4), retain=np.zeros(4, dtype=bool))
    assert len(buffer) == 5 and buffer.latest_size == 4  # the kept success and the latest batch

    train = config.train.model_copy(update={"updates_per_iteration": 8, "minibatch_size": 4})
    replay_share = config.buffer.success_replay_share  # extra rows per minibatch, × B
    phase, per_update = nocturnal(learner, buffer, "success_replay", train, 1, {"hard": 0.1, "easy": 0.7})
    assert len(per_update) == 1  # on-policy: the latest batch once, whatever the budget
    kept = [e for e in buffer.entries() if e["iteration"] == 0]
    assert len(kept) == 1 and kept[0]["baseline"] == 0.1  # judged against what is expected of the task now
    assert all(e["baseline"] == WRONG for e in buffer.entries() if e["iteration"] == 1)  # fresh: its group
    served = buffer.sample(4, 1.0)
    assert [buffer.entries()[i]["iteration"] for i in served.indices[:4]] == [1] * 4
    assert all(buffer.entries()[i]["iteration"] == 0 for i in served.indices[4:])
    assert len(served) in (4 + int(replay_share * 4), 4 + int(replay_share * 4) + 1)


@pytest.mark.parametrize("lora", [True, False], ids=["lora-merged-sampler", "full"])
def test_kl_to_the_behaviour_policy_is_zero_before_the_first_update(config, tiny_model_dir, lora):
    """Rollouts sample `learner.sampler()` (with LoRA, a merged copy); the first update must score the
    same function, or the importance ratio starts away from 1 and the clip bites before any learning."""
    learner, tokenizer = _learner(config, tiny_model_dir, lora=lora)
    with torch.no_grad():  # adapters that change the function, so merging has something to get wrong
        for name, weight in learner.model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0.0, 0.5)
    entries = _entries(learner, tokenizer, {"f": [PASS, WRONG, SYNTAX, HALLUCINATED]}, sampler=learner.sampler())
    set_baselines(entries, "group")
    stats, _ = learner.update(entries, np.ones(len(entries)))
    assert stats["kl_behaviour"] < 1e-5 and stats["clip_fraction"] == 0.0


def test_the_paired_bootstrap_recovers_a_known_difference():
    """400 tasks whose base hallucination rates vary widely; the arm removes 6 points from each task
    (sampled with 8 programs per task): the interval covers −0.06 and excludes 0; a copy of the base
    with fresh samples gets an interval around 0."""
    rng = np.random.default_rng(0)
    tasks = [f"t{i}" for i in range(400)]
    rate = rng.uniform(0.06, 0.4, len(tasks))

    def table(p: np.ndarray) -> pd.DataFrame:
        observed = rng.binomial(8, p) / 8
        columns = {"hallucination_rate": observed, "pass_at_1": observed, "no_code_rate": observed, "syntax_error_rate": observed}
        return pd.DataFrame(columns, index=tasks)

    tables = {"base": table(rate), "better": table(rate - 0.06), "same": table(rate)}
    draws = resample_indices(len(tasks))
    better = compare(tables, "better", "base", draws)["halluc"]
    low, high = better["ci"]
    assert low < -0.06 < high and high < 0 and better["diff"] == pytest.approx(-0.06, abs=0.02)
    low, high = compare(tables, "same", "base", draws)["halluc"]["ci"]
    assert low < 0 < high
