"""Two iterations of rollout → tag → gate → nocturnal train on the tiny model, through the loop's own
functions, run by one process (`run`, in the test's process) or by several:

    torchrun --standalone --nproc_per_node 2 tests/dist_scenario.py OUT MODEL_DIR

`test_distributed.py` compares what they end with. The rollouts are made up but deterministic: the same
(iteration, task, sample) gets the same prompt, completion and reward whichever process makes it, and
the process whose shard of the tasks it is in scores it under its current policy, one task per batch,
as `loop.sample_iteration` shards and gathers them. Everything after that is the training flow's code
path. Each process writes its initial and trained weights, their last gradients, its buffer, its loop state and the
phase metrics to OUT/rank<r>.pt and OUT/buffer<r>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from cosmocore.config import Config, load_params
from cosmocore.data.records import Trajectory
from cosmocore.policy.interface import score
from cosmocore.policy.models import load_policy
from cosmocore.rl.distributed import Processes, start
from cosmocore.rl.loop import LoopState, gate, nocturnal, tag
from cosmocore.rl.mixing import make_buffer
from cosmocore.rl.trainer import build_learner

REPO = Path(__file__).resolve().parent.parent
VARIANT, SEED = "cosmocore", 0
TASKS, SAMPLES, ITERATIONS = 4, 3, 2
REWARDS = {1.0: "passed", 0.0: "wrong_answer", -0.5: "runtime_error", -1.0: "no_code"}


def scenario_config() -> Config:
    """The default params with a small budget: minibatches of 5 (blocks of 2 and 3 on two processes),
    split again by gradient accumulation, the KL term on, and no gradient clipping, so that the last
    gradients show their scale (Adam's steps barely do)."""
    cfg = load_params(REPO / "params.yaml")
    return cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"device": "cpu", "threads": 1}),
        "affect": cfg.affect.model_copy(update={"epochs": 10}),
        "train": cfg.train.model_copy(update={"iterations": ITERATIONS, "updates_per_iteration": 2, "minibatch_size": 5,
                                              "grad_accumulation": 2, "kl_coef": 0.01, "lr": 0.01, "max_grad_norm": 1e6}),
    })


def made_up_rollouts(model, pad_id: int, iteration: int, processes: Processes, temperature: float) -> list[Trajectory]:
    mine = []
    for task in processes.shard(list(range(TASKS))):
        rng = np.random.default_rng([iteration, task])
        prompt = rng.integers(100, 5000, size=int(rng.integers(4, 9))).tolist()
        completions = [rng.integers(100, 5000, size=int(rng.integers(2, 6))).tolist() for _ in range(SAMPLES)]
        with torch.no_grad():
            scored = score(model, [prompt] * SAMPLES, completions, pad_id, temperature)
        for sample, completion in enumerate(completions):
            reward = float(rng.choice(list(REWARDS)))
            mine.append(Trajectory(
                trajectory_id=f"scenario/i{iteration}/t{task}/{sample}", run="scenario", variant=VARIANT, seed=SEED,
                iteration=iteration, task_id=f"t{task}", sample=sample, kind="code", prompt_ids=prompt,
                completion_ids=completion, behaviour_logprobs=scored.logprobs[sample, : len(completion)].tolist(),
                mean_entropy=float(scored.mean_entropy()[sample]), hidden=scored.hidden[sample].tolist(), text="", code="",
                outcome=REWARDS[reward], hallucinated=False, hallucination_evidence="", exception_type="",
                test_share=float("nan"), reward=reward,
            ))
    return sorted(processes.gather(mine), key=lambda t: (t.task_id, t.sample))


def run(out: Path, model_dir: Path) -> None:
    cfg = scenario_config()
    processes = start(cfg.model)
    model, tokenizer = load_policy(model_dir, processes.model_config(cfg.model))
    learner = build_learner(model, cfg.train, tokenizer.pad_token_id, cfg.rollout.temperature, seed=SEED, processes=processes)
    initial = [p.detach().clone() for p in learner.trained_parameters()]
    buffer, state, phases = make_buffer(cfg.buffer, VARIANT, SEED, cfg.alignment.share), LoopState(), []
    for i in range(ITERATIONS):
        trajectories = made_up_rollouts(learner.model, tokenizer.pad_token_id, i, processes, cfg.rollout.temperature)
        tag(trajectories, state, cfg.affect, SEED, processes)
        gate(buffer, trajectories, VARIANT, state.expected)
        phases.append(nocturnal(learner, buffer, VARIANT, cfg.train, i, state.expected)[0])
        state.iteration = i + 1
    out.mkdir(parents=True, exist_ok=True)
    parameters = learner.trained_parameters()
    torch.save({"initial": initial, "weights": [p.detach().clone() for p in parameters],
                "grads": [p.grad.clone() for p in parameters], "phases": phases, "expected": state.expected,
                "steps": learner.steps, "tokens": learner.tokens, "world": processes.world}, out / f"rank{processes.rank}.pt")
    buffer.save(out / f"buffer{processes.rank}.pt")


if __name__ == "__main__":
    run(Path(sys.argv[1]), Path(sys.argv[2]))
