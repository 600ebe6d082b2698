"""One iteration of the CosmoCore loop: rollout → (CodeRL+ align →) tag → gate → nocturnal train.

Each step is a plain function over a `LoopState` (what must survive a restart besides the policy and
the buffer), so the Prefect training flow only chains them and checkpoints between iterations. Each
takes the run's `Processes` (`cosmocore.rl.distributed`, one process by default) and does its share of a
data-parallel run: afterwards every process holds the same trajectories, buffer and weights.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cosmocore.alignment.coderl import answer, build_alignment_tasks, pick_for_share
from cosmocore.config import AffectConfig, AlignmentConfig, Config, RewardConfig, RolloutConfig, TrainConfig
from cosmocore.data.records import Task, Trajectory, trajectories_to_frame
from cosmocore.data.validation import raise_for_failures, validate_trajectories
from cosmocore.rl.affect import AffectTagger, affect_targets, fine_tune_on_labels, predict, train_tagger, update_task_stats
from cosmocore.rl.buffer import ReplayBuffer
from cosmocore.rl.distributed import SINGLE, Processes
from cosmocore.rl.mixing import KindMix
from cosmocore.rl.rollout import RunIds, rollout
from cosmocore.rl.trainer import Learner
from cosmocore.sandbox.runner import Sandbox
from cosmocore.variants import REGISTRY

# What the trainer needs of a trajectory: the buffer holds these, not the whole record.
ENTRY_FIELDS = ("trajectory_id", "iteration", "task_id", "kind", "prompt_ids", "completion_ids", "behaviour_logprobs", "reward",
                "outcome")


@dataclass
class LoopState:
    iteration: int = 0  # the next iteration to run
    expected: dict = field(default_factory=dict)  # running mean reward per task
    outcome_counts: dict = field(default_factory=dict)  # decayed outcome counts per task
    tagger_state: dict | None = None
    history: list[dict] = field(default_factory=list)  # per-iteration metrics
    samples_log: list[dict] = field(default_factory=list)  # iteration, task, outcome, hallucinated: for TTC
    updates: list[dict] = field(default_factory=list)  # each optimizer update's diagnostics


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
    if cfg.labels_csv:  # human labels, which the paper trains its tagger on, refine the self-supervised fit
        hidden_by_id = dict(zip((t.trajectory_id for t in trajectories), hidden))
        labelled = fine_tune_on_labels(tagger, hidden_by_id, cfg.labels_csv, cfg, seed=seed + state.iteration)
        metrics |= {f"labels_{k}": v for k, v in labelled.items()}
    valence, arousal = predict(tagger, hidden)
    for t, vt, at, v, a in zip(trajectories, valence_t, arousal_t, valence, arousal):
        t.valence_target, t.arousal_target, t.valence, t.arousal = float(vt), float(at), float(v), float(a)
    state.expected, state.outcome_counts = update_task_stats(
        state.expected, state.outcome_counts, rewards, task_ids, outcomes, cfg.running_mean_decay
    )
    state.tagger_state = tagger.state_dict()
    return tagger, {f"tagger_{k}": v for k, v in metrics.items()}


def _groups(entries: list[dict]) -> dict[tuple, list[dict]]:
    """The entries of each (task, kind): one iteration's group of samples of a task."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for e in entries:
        groups[e["task_id"], e["kind"]].append(e)
    return groups


def set_baselines(entries: list[dict], rule: str, expected: dict[str, float] | None = None) -> None:
    """Write each entry's advantage baseline (`buffer.Serving.baseline`): `group`, the mean reward of the
    entries of the same task (and kind) among `entries`, one iteration's samples; `negative`,
    max(reward, 0); `expected`, the task's running mean reward in `expected` (0 for a task it lacks)."""
    if rule == "group":
        for group in _groups(entries).values():
            mean = float(np.mean([e["reward"] for e in group]))
            for e in group:
                e["baseline"] = mean
    elif rule == "negative":
        for e in entries:
            e["baseline"] = max(e["reward"], 0.0)
    elif rule == "expected":
        for e in entries:
            e["baseline"] = float((expected or {}).get(e["task_id"], 0.0))
    else:
        raise ValueError(f"unknown advantage baseline {rule!r}: expected, group or negative")


def group_statistics(entries: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Per entry, its group's reward variance (p(1−p) for pass/fail rewards: what `difficulty` draws
    by) and pass rate (what makes a task hard for `success_replay`)."""
    variance, pass_rate = np.zeros(len(entries)), np.zeros(len(entries))
    row = {id(e): i for i, e in enumerate(entries)}
    for group in _groups(entries).values():
        rows = [row[id(e)] for e in group]
        variance[rows] = np.var([e["reward"] for e in group])
        pass_rate[rows] = np.mean([e["outcome"] == "passed" for e in group])
    return variance, pass_rate


def gate(buffer: ReplayBuffer | KindMix, trajectories: list[Trajectory], variant: str, expected: dict[str, float]) -> dict:
    """Store the tagged trajectories, each with its advantage baseline. New entries get the largest |TD|
    seen so far (the usual PER rule: each is replayed at least once before its own TD error is known);
    the trainer writes theirs back."""
    entries = [{name: getattr(t, name) for name in ENTRY_FIELDS} for t in trajectories]
    set_baselines(entries, REGISTRY[variant].serving.baseline, expected)
    variance, pass_rate = group_statistics(entries)
    stats = buffer.add(
        entries,
        np.array([t.valence for t in trajectories]),
        np.array([t.arousal for t in trajectories]),
        np.array([t.mean_entropy for t in trajectories]),
        variance=variance,
        retain=np.array([e["outcome"] == "passed" for e in entries]) & (pass_rate <= buffer.cfg.success_max_pass_rate),
    )
    return {f"gate_{k}": v for k, v in stats.items() if isinstance(v, (int, float))}


def nocturnal(learner: Learner, buffer: ReplayBuffer | KindMix, variant: str, cfg: TrainConfig, iteration: int,
              expected: dict[str, float]) -> tuple[dict, list[dict]]:
    """The off-policy training phase: minibatches from the buffer, priorities updated with TD errors.
    A CodeRL+ buffer (`KindMix`) serves alignment entries at `alignment.share` of every minibatch.
    Replayed entries, those of earlier iterations (and every entry of an `expected`-baseline variant),
    are judged against what the policy now expects of their task (`expected`, the running mean reward
    after this iteration's tagging): the baseline that off-policy entries can use.

    Returns the phase's metrics (means over its updates) and each update's own, with `step` the
    learner's optimizer steps after it: a run that is getting worse shows why, update by update."""
    serving = REGISTRY[variant].serving
    replayed = [e for e in buffer.entries() if serving.baseline == "expected" or e["iteration"] < iteration]
    set_baselines(replayed, "expected", expected)
    updates = cfg.updates_per_iteration
    if serving.on_policy:  # each sample of the latest batch used once
        updates = min(updates, math.ceil(buffer.latest_size / cfg.minibatch_size))
    totals: dict[str, float] = {}
    served = {"alignment": 0, "total": 0, "dream": 0}
    values = []  # the critic's estimates on what it trained on: their spread tunes pruning
    per_update = []
    for update in range(updates):
        progress = (iteration * cfg.updates_per_iteration + update) / (cfg.iterations * cfg.updates_per_iteration)
        batch = buffer.sample(cfg.minibatch_size, progress)
        stats, td = learner.update(batch.entries, batch.is_weights)
        buffer.update_priorities(batch.indices, td.numpy())
        values.append(np.array([e["reward"] for e in batch.entries]) - td.numpy())  # V = r − TD
        per_update.append({"step": learner.steps, "iteration": iteration, **stats,
                           "dream_share": float(np.mean(batch.from_dream))})
        for key, value in stats.items():
            if key != "explained_variance":  # NaN where a minibatch's rewards did not vary: averaged below
                totals[key] = totals.get(key, 0.0) + value / updates
        served["total"] += len(batch.entries)
        served["alignment"] += sum(e["kind"] == "alignment" for e in batch.entries)
        served["dream"] += int(np.sum(batch.from_dream))
    metrics = {f"train_{k}": v for k, v in totals.items()}
    measured = [u["explained_variance"] for u in per_update if math.isfinite(u["explained_variance"])]
    metrics["train_explained_variance"] = float(np.mean(measured)) if measured else math.nan
    metrics["updates"] = updates
    metrics["batch_dream_share"] = served["dream"] / max(1, served["total"])
    metrics["batch_alignment_share"] = served["alignment"] / max(1, served["total"])
    metrics.update({f"buffer_{k}": v for k, v in buffer.replay_stats().items() if isinstance(v, (int, float))})
    values = np.concatenate(values)
    metrics["value_std"] = float(np.std(values))
    metrics["tuned_prune_valence"] = buffer.tune_pruning(values)  # applies to the next iteration's gate
    return metrics, per_update


Step = Callable[..., object]


def direct(function: Callable, *args):
    """Run a step as a plain call (the flow runs each as a Prefect task instead)."""
    return function(*args)


@dataclass
class Training:
    """One variant and seed in training: what an iteration reads and changes."""

    cfg: Config
    variant: str
    seed: int
    tasks: list[Task]
    tokenizer: object
    style: str
    sandbox: Sandbox
    learner: Learner
    buffer: ReplayBuffer | KindMix
    state: LoopState
    processes: Processes = SINGLE

    @property
    def key(self) -> str:
        return f"{self.variant}-s{self.seed}"


def tag_checked(trajectories: list[Trajectory], state: LoopState, cfg: AffectConfig, seed: int,
                processes: Processes = SINGLE) -> dict:
    """`tag`, then the tagged records' schema checked at the stage boundary (by the main process)."""
    _, metrics = tag(trajectories, state, cfg, seed, processes)
    if processes.is_main:  # the others received the same trajectories
        raise_for_failures(validate_trajectories(trajectories_to_frame(trajectories)), "tagged trajectories")
    return metrics


def run_iteration(run: Training, step: Step = direct) -> tuple[list[Trajectory], dict, list[dict]]:
    """One iteration: rollout (→ CodeRL+ align) → tag → gate → nocturnal train, each through `step`.

    Returns the iteration's trajectories, its metrics (also appended to `run.state.history`) and each
    optimizer update's own metrics; `run.state` moves on to the next iteration."""
    state, cfg, processes = run.state, run.cfg, run.processes
    i = state.iteration
    ids = RunIds(run=run.key, variant=run.variant, seed=run.seed, iteration=i)
    sampler = run.learner.sampler()
    trajectories, tokens_per_s = step(sample_iteration, sampler, run.tokenizer, run.tasks, run.sandbox, cfg.rollout,
                                      cfg.reward, run.style, ids, processes)
    metrics = {**rollout_metrics(trajectories), "rollout_tokens_per_s": tokens_per_s}
    if REGISTRY[run.variant].alignment:
        answers, align_metrics = step(align, sampler, run.tokenizer, run.tasks, trajectories, run.sandbox, cfg.alignment,
                                      cfg.rollout, run.style, ids, processes)
        trajectories, metrics = trajectories + answers, metrics | align_metrics
    del sampler  # its memory goes back before the nocturnal phase
    metrics |= step(tag_checked, trajectories, state, cfg.affect, run.seed, processes)
    metrics |= step(gate, run.buffer, trajectories, run.variant, state.expected)
    start, tokens_before = time.perf_counter(), run.learner.tokens
    phase, per_update = step(nocturnal, run.learner, run.buffer, run.variant, cfg.train, i, state.expected)
    elapsed = time.perf_counter() - start
    metrics |= phase | {"train_steps_per_s": phase["updates"] / elapsed,
                        "train_tokens_per_s": (run.learner.tokens - tokens_before) / elapsed}
    processes.check_identical(run.learner.trained_parameters(), "weights")
    metrics["iteration"], metrics["optimizer_steps"] = i, run.learner.steps
    state.history.append(metrics)
    state.samples_log += [{"iteration": i, "task_id": t.task_id, "outcome": t.outcome, "hallucinated": t.hallucinated,
                           "optimizer_steps": run.learner.steps} for t in trajectories if t.kind == "code"]
    state.updates += per_update
    state.iteration = i + 1
    return trajectories, metrics, per_update
