"""Data parallelism over several processes ("ranks"): one per GPU (NCCL), or several CPU processes (gloo),
through `accelerate`, with the same code either way.

What each step of an iteration does with N ranks:

- **rollout** (and CodeRL+ answers): each rank samples its own shard of the tasks, with a random stream
  of its own; the trajectories are gathered, so every rank holds the whole iteration.
- **tag**: the main process fits the tagger and sends the tagged trajectories to the others. Computing
  it once, rather than on every rank, means no floating-point nondeterminism can make ranks disagree.
- **gate**: every rank adds the same trajectories to the same buffer (plain numpy, no randomness), so
  every rank holds an identical buffer, random state included.
- **nocturnal train**: every rank draws the same minibatch (same buffer, same random state) and scores
  its own contiguous block of it; the gradients are summed over the ranks, so the optimizer step is the
  one a single process takes on the whole minibatch, and every rank takes it. The TD errors are gathered,
  so every rank writes the same priorities.
- **outputs**: only the main process writes checkpoints, rollouts, the policy, metrics and MLflow runs,
  and runs the Prefect flow; the others wait for it at a barrier. A resumed run loads the checkpoint the
  main process picked, on every rank.

With one process (the default) every operation here is the identity: no `accelerate` state, no process
group, nothing slower than a plain single-process run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from cosmocore.config import ModelConfig, SandboxConfig

T = TypeVar("T")


def launched_world_size() -> int:
    """How many processes a launcher (torchrun, `accelerate launch`) started this one among; 1 if none."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this is the main process (rank 0) of the run, read from the launcher's environment."""
    return int(os.environ.get("RANK", "0")) == 0


def uses_cpu(cfg: ModelConfig) -> bool:
    """Whether the ranks run on the CPU (gloo) rather than one GPU each (NCCL)."""
    return cfg.device == "cpu" or not torch.cuda.is_available()


@dataclass(frozen=True)
class Processes:
    """This process's place among the run's processes, and the collective operations between them.
    Build it with `start`; `SINGLE` is the one-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0  # this process's place among those on its machine
    local_world: int = 1  # processes on this machine, which share its cores
    accelerator: Any = None  # accelerate.Accelerator when world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- what each rank works on ----------------------------------------------------------------

    def seed(self, base: int) -> int:
        """A random stream of this rank's own; rank 0's is `base`, so one process samples as it always did."""
        return base + (self.rank << 32)

    def shard(self, items: list[T]) -> list[T]:
        """This rank's share of `items`: every `world`-th one, from its rank on (shares are balanced)."""
        return items[self.rank :: self.world]

    def block(self, n: int) -> range:
        """This rank's contiguous block of positions 0..n-1; the blocks in rank order cover them all."""
        return range(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    # ---- collective operations: every rank must call them, in the same order --------------------

    def gather(self, items: list[T]) -> list[T]:
        """Every rank's `items`, concatenated in rank order, on every rank."""
        if self.world == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def broadcast(self, value: T) -> T:
        """The main process's `value`, on every rank (what the others pass is ignored)."""
        if self.world == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Each key's sum over the ranks, added in rank order, so that every rank gets the same numbers."""
        if self.world == 1:
            return values
        gathered = self.gather([values])
        return {key: sum(part[key] for part in gathered) for key in values}

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Replace every rank's gradients by their sum over the ranks. A rank with no samples in this step
        contributes zeros; a parameter that no rank has a gradient for keeps none, as one process would."""
        if self.world == 1:
            return
        held = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float32, device=self.accelerator.device)
        trained = [p for p, count in zip(parameters, self.accelerator.reduce(held, "sum").tolist()) if count]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trained]
        for parameter, grad in zip(trained, self.accelerator.reduce(grads, "sum")):
            parameter.grad = grad

    def copy_from_main(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite `tensors` with the main process's (the start of training: every rank from the same weights)."""
        if self.world == 1:
            return
        from accelerate.utils import broadcast

        broadcast([tensor.data for tensor in tensors], from_process=0)

    def check_identical(self, tensors: list[torch.Tensor], what: str) -> None:
        """Raise if `tensors` (e.g. the trained weights) differ between the processes, which were meant to
        hold the same `what`: compares one float64 checksum per process."""
        if self.world == 1:
            return
        checksums = self.gather([float(sum(t.detach().double().sum() for t in tensors))])
        if len(set(checksums)) > 1:
            raise RuntimeError(f"the processes' {what} diverged (checksums by rank: {checksums}); this is a bug")

    def barrier(self) -> None:
        """Wait until every rank gets here (the others wait while the main process writes)."""
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    # ---- per-process settings -------------------------------------------------------------------

    def model_config(self, cfg: ModelConfig) -> ModelConfig:
        """`cfg` for this rank: the accelerator's device (its own GPU, or the CPU), and its share of the
        machine's cores when `model.threads` is 0 (all cores)."""
        if self.world == 1:
            return cfg
        device = self.accelerator.device
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // self.local_world)
        return cfg.model_copy(update={"device": "cpu" if device.type == "cpu" else str(device), "threads": threads})

    def sandbox_config(self, cfg: SandboxConfig) -> SandboxConfig:
        """`cfg` for this rank's sandbox: its share of the machine's cores when `sandbox.workers` is 0."""
        if self.world == 1 or cfg.workers:
            return cfg
        return cfg.model_copy(update={"workers": max(1, (os.cpu_count() or 1) // self.local_world)})


SINGLE = Processes()


def start(cfg: ModelConfig) -> Processes:
    """The run's processes as a launcher (torchrun, `accelerate launch`) set them up: the process group
    through `accelerate.Accelerator`, gloo on the CPU (`model.device: cpu`, or no GPU), NCCL between GPUs.
    `SINGLE`, without touching `accelerate`, when this process runs alone."""
    if launched_world_size() == 1:
        return SINGLE
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=uses_cpu(cfg))
    return Processes(rank=accelerator.process_index, world=accelerator.num_processes,
                     local_rank=accelerator.local_process_index,
                     local_world=int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)), accelerator=accelerator)
