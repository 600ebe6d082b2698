"""One iteration of the CosmoCore loop: rollout → (CodeRL+ align →) tag → gate → nocturnal train.

Each step is a plain function over a `LoopState` (what must survive a restart besides the policy and
the buffer), so the Prefect training flow only chains them and checkpoints between iterations. Each
takes the run's `Processes` (`cosmocore.distributed`, one process by default) and does its share of a
data-parallel run: afterwards every process holds the same trajectories, buffer and weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from cosmocore.affect import AffectTagger, affect_targets, predict, train_tagger, update_task_stats
from cosmocore.alignment import answer, build_alignment_tasks, pick_for_share
from cosmocore.buffer import SERVING, ReplayBuffer
from cosmocore.config import AffectConfig, AlignmentConfig, RewardConfig, RolloutConfig, TrainConfig
from cosmocore.distributed import SINGLE, Processes
from cosmocore.mixing import KindMix
from cosmocore.records import Task, Trajectory
from cosmocore.rollout import RunIds, rollout
from cosmocore.sandbox import Sandbox
from cosmocore.trainer import Learner

# What the trainer needs of a trajectory: the buffer holds these, not the whole record.
ENTRY_FIELDS = ("trajectory_id", "task_id", "kind", "prompt_ids", "completion_ids", "behaviour_logprobs", "reward", "outcome")


@dataclass
class LoopState:
    iteration: int = 0  # the next iteration to run
    expected: dict = field(default_factory=dict)  # running mean reward per task
    outcome_counts: dict = field(default_factory=dict)  # decayed outcome counts per task
    tagger_state: dict | None = None
    history: list[dict] = field(default_factory=list)  # per-iteration metrics
    samples_log: list[dict] = field(default_factory=list)  # iteration, task, outcome, hallucinated: for TTC


def rollout_metrics(trajectories: list[Trajectory]) -> dict:
    code = [t for t in trajectories if t.kind == "code"]
    n = max(1, len(code))
    return {
        "train_pass_rate": sum(t.outcome == "passed" for t in code) / n,
        "train_hallucination_rate": sum(t.hallucinated for t in code) / n,
        "train_reward": float(np.mean([t.reward for t in code])) if code else math.nan,
        "train_no_code_rate": sum(t.outcome == "no_code" for t in code) / n,
        "samples": len(trajectories),
    }


def sample_iteration(model, tokenizer, tasks: list[Task], sandbox: Sandbox, cfg: RolloutConfig, reward_cfg: RewardConfig,
                     style: str, ids: RunIds, processes: Processes = SINGLE) -> tuple[list[Trajectory], float]:
    """The iteration's rollouts: `cfg.samples_per_task` programs for every task, executed, in task order,
    and the sampling speed (tokens/s). With several processes each samples its own shard of the tasks
    with a seed of its own; every one gets all the rollouts, and the speed of all of them together."""
    mine, engine = rollout(model, tokenizer, processes.shard(tasks), sandbox, cfg, reward_cfg, style, ids,
                           samples_per_task=cfg.samples_per_task, seed=processes.seed(ids.seed * 10_000 + ids.iteration),
                           desc=f"rollout {ids.variant} s{ids.seed} i{ids.iteration}")
    order = {task.task_id: i for i, task in enumerate(tasks)}
    trajectories = sorted(processes.gather(mine), key=lambda t: (order[t.task_id], t.sample))
    return trajectories, sum(part["tokens_per_s"] for part in processes.gather([engine]))


def align(model, tokenizer, tasks: list[Task], trajectories: list[Trajectory], sandbox: Sandbox, cfg: AlignmentConfig,
          rollout_cfg: RolloutConfig, style: str, ids: RunIds, processes: Processes = SINGLE) -> tuple[list[Trajectory], dict]:
    """CodeRL+: questions about what this iteration's programs compute, answered by the policy, as many
    as make the answers `cfg.share` of the iteration's samples (fewer when fewer could be built).
    With several processes each traces the programs of its own shard of the tasks and answers its own
    shard of the questions; every process gets every answer."""
    seed = ids.seed * 10_000 + ids.iteration
    theirs = {t.task_id for t in tasks} - {t.task_id for t in processes.shard(tasks)}  # other processes' tasks
    own_programs = [t for t in trajectories if t.task_id not in theirs]  # a task's programs are deduplicated together
    built, stats = build_alignment_tasks(own_programs, {t.task_id: t for t in tasks}, sandbox, cfg, seed, style)
    built, stats = processes.gather(built), processes.sum(stats)
    chosen = pick_for_share(built, len(trajectories), cfg, seed)
    answers = processes.gather(answer(model, tokenizer, processes.shard(chosen), rollout_cfg, cfg, style, ids,
                                      seed=processes.seed(seed)))
    metrics = {f"align_{k}": v for k, v in stats.items()}
    metrics["align_reward"] = sum(t.reward for t in answers) / max(1, len(answers))
    metrics["iteration_alignment_share"] = len(answers) / max(1, len(answers) + len(trajectories))
    return answers, metrics


def tag(trajectories: list[Trajectory], state: LoopState, cfg: AffectConfig, seed: int,
        processes: Processes = SINGLE) -> tuple[AffectTagger | None, dict]:
    """Self-supervised affect: compute targets from execution, fit the tagger, write its predictions.
    With several processes only the main one does it (the others get no tagger and no metrics) and sends
    the tagged trajectories and the task statistics to the others: a tagger fitted on each could differ
    in its last bits, and the gates would then fill their buffers differently."""
    tagger, metrics = _fit_tagger(trajectories, state, cfg, seed) if processes.is_main else (None, {})
    trajectories[:], state.expected, state.outcome_counts, state.tagger_state = processes.broadcast(
        (trajectories, state.expected, state.outcome_counts, state.tagger_state))
    return tagger, metrics


def _fit_tagger(trajectories: list[Trajectory], state: LoopState, cfg: AffectConfig, seed: int) -> tuple[AffectTagger, dict]:
    rewards = np.array([t.reward for t in trajectories], dtype=np.float64)
    task_ids = [t.task_id for t in trajectories]
    outcomes = [t.outcome for t in trajectories]
    mean_logprobs = np.array([np.mean(t.behaviour_logprobs) if t.behaviour_logprobs else 0.0 for t in trajectories])
    valence_t, arousal_t = affect_targets(rewards, task_ids, outcomes, mean_logprobs, state.expected, state.outcome_counts, cfg)
    hidden = np.array([t.hidden for t in trajectories], dtype=np.float32)
    tagger = None
    if state.tagger_state is not None:
        tagger = AffectTagger(hidden.shape[1], cfg.hidden_units)
        tagger.load_state_dict(state.tagger_state)
    tagger, metrics = train_tagger(tagger, hidden, valence_t, arousal_t, cfg, seed=seed + state.iteration)
    valence, arousal = predict(tagger, hidden)
    for t, vt, at, v, a in zip(trajectories, valence_t, arousal_t, valence, arousal):
        t.valence_target, t.arousal_target, t.valence, t.arousal = float(vt), float(at), float(v), float(a)
    state.expected, state.outcome_counts = update_task_stats(
        state.expected, state.outcome_counts, rewards, task_ids, outcomes, cfg.running_mean_decay
    )
    state.tagger_state = tagger.state_dict()
    return tagger, {f"tagger_{k}": v for k, v in metrics.items()}


def gate(buffer: ReplayBuffer, trajectories: list[Trajectory]) -> dict:
    """Store the tagged trajectories. New entries get the largest |TD| seen so far (the usual PER rule:
    each is replayed at least once before its own TD error is known); the trainer writes theirs back."""
    entries = [{name: getattr(t, name) for name in ENTRY_FIELDS} for t in trajectories]
    stats = buffer.add(
        entries,
        np.array([t.valence for t in trajectories]),
        np.array([t.arousal for t in trajectories]),
        np.array([t.mean_entropy for t in trajectories]),
    )
    return {f"gate_{k}": v for k, v in stats.items() if isinstance(v, (int, float))}


def nocturnal(learner: Learner, buffer: ReplayBuffer | KindMix, variant: str, cfg: TrainConfig, iteration: int) -> dict:
    """The off-policy training phase: minibatches from the buffer, priorities updated with TD errors.
    A CodeRL+ buffer (`KindMix`) serves alignment entries at `alignment.share` of every minibatch."""
    updates = cfg.updates_per_iteration
    if SERVING[variant].sampling == "in_order":  # on-policy: each sample used once
        updates = min(updates, math.ceil(len(buffer) / cfg.minibatch_size))
    totals: dict[str, float] = {}
    served = {"alignment": 0, "total": 0, "dream": 0}
    values = []  # the critic's estimates on what it trained on: their spread tunes pruning
    for update in range(updates):
        progress = (iteration * cfg.updates_per_iteration + update) / (cfg.iterations * cfg.updates_per_iteration)
        batch = buffer.sample(cfg.minibatch_size, progress)
        stats, td = learner.update(batch.entries, batch.is_weights)
        buffer.update_priorities(batch.indices, td.numpy())
        values.append(np.array([e["reward"] for e in batch.entries]) - td.numpy())  # V = r − TD
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value / updates
        served["total"] += len(batch.entries)
        served["alignment"] += sum(e["kind"] == "alignment" for e in batch.entries)
        served["dream"] += int(np.sum(batch.from_dream))
    metrics = {f"train_{k}": v for k, v in totals.items()}
    metrics["updates"] = updates
    metrics["batch_dream_share"] = served["dream"] / max(1, served["total"])
    metrics["batch_alignment_share"] = served["alignment"] / max(1, served["total"])
    metrics.update({f"buffer_{k}": v for k, v in buffer.replay_stats().items() if isinstance(v, (int, float))})
    values = np.concatenate(values)
    metrics["value_std"] = float(np.std(values))
    metrics["tuned_prune_valence"] = buffer.tune_pruning(values)  # applies to the next iteration's gate
    return metrics
