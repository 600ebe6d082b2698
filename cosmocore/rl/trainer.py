"""The nocturnal phase: an off-policy actor-critic update of the language model on replayed samples.

The whole update rule is `Learner.update`; everything else here is set-up and checkpointing.
Every variant (on-policy, GRPO, NSR, uniform, PER, CosmoCore, ...) goes through the same update: they
differ in which samples the buffer serves, with which importance-sampling weights, and in the baseline
each entry's advantage is taken against (`buffer.Serving.baseline`, written by `loop.set_baselines`).

The critic V(s) is fitted from the first update, but trusted as the baseline only once it explains
`train.critic_min_explained_variance` of the reward's variance: a zero-initialised value head makes
`reward − V(s)` the reward itself, negative for most samples of a weak policy, so every update would
push down nearly everything that was sampled (measured: train-task hallucination rose over training).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from cosmocore.config import TrainConfig
from cosmocore.files import atomic_path
from cosmocore.policy.family import auto_class
from cosmocore.policy.interface import score, score_for_update
from cosmocore.rl.distributed import SINGLE, Processes

log = logging.getLogger(__name__)

# The attention and MLP projections, by the names each architecture gives them: Llama-style decoders,
# and T5-style encoder-decoders (CodeT5: q, k, v, o in self- and cross-attention; wi, wo, or wi_0, wi_1,
# wo with a gated feed-forward). Only the names the model has are targeted.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "q", "k", "v", "o", "wi", "wo", "wi_0", "wi_1")


def _train_mode(model: nn.Module) -> None:
    """Train mode for LoRA's dropout (`train.lora_dropout`) alone. The model's own dropout (0.1 in T5 and
    CodeT5) stays off: the importance ratio compares this pass with the behaviour policy's, which sampled
    without it, and would otherwise differ from 1 before any step."""
    model.eval()
    for name, module in model.named_modules():
        if name.endswith("lora_dropout"):
            module.train()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sequence's real tokens: advantages are per sequence, ratios per token."""
    return (values * mask).sum(1) / mask.sum(1).clamp(min=1)


@dataclass
class Learner:
    model: nn.Module  # the policy (a peft model when LoRA is on)
    value_head: nn.Linear  # the critic: pooled hidden state → expected reward
    optimizer: torch.optim.Optimizer
    reference: nn.Module | None  # frozen policy for the KL penalty (None: LoRA's disabled adapter)
    cfg: TrainConfig
    pad_id: int
    temperature: float
    processes: Processes = SINGLE  # the data-parallel processes this learner trains with
    use_critic: bool = True  # whether V(s) may replace the entries' baselines once it explains enough
    steps: int = 0
    tokens: int = 0
    critic_explained_variance: float | None = None  # running mean over updates; None before the first

    CRITIC_EV_DECAY = 0.8  # weight of the running explained variance's past in each update

    @property
    def critic_trusted(self) -> bool:
        ev = self.critic_explained_variance
        return self.use_critic and ev is not None and ev >= self.cfg.critic_min_explained_variance

    def trained_parameters(self) -> list[torch.Tensor]:
        """What the optimizer trains: the policy's trainable weights (LoRA adapters, or all) and the value head."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def sampler(self) -> nn.Module:
        """The policy as rollouts sample it. With LoRA: a copy with the adapters merged into its weights,
        the same function without the adapters' extra kernels in every layer. On a GPU a small model's
        decoding step is bound by kernel launches: a SmolLM2-135M-shaped model's took 54-58 ms on one
        H100 with rank-8 adapters, 25-38 ms merged. Where the copy does not fit in memory, and without
        LoRA, the model itself."""
        if not self.cfg.lora:
            return self.model
        try:
            return copy.deepcopy(self.model).merge_and_unload().eval()
        except torch.OutOfMemoryError:
            log.warning("no memory for a merged copy of the policy: rollouts sample with its LoRA adapters unmerged (slower)")
            torch.cuda.empty_cache()
            return self.model

    def values(self, state: torch.Tensor) -> torch.Tensor:
        return self.value_head(state.detach().to(self.value_head.weight.dtype)).squeeze(-1)

    def _reference_logprobs(self, prompts, completions) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is not None:
                return score(self.reference, prompts, completions, self.pad_id, self.temperature).logprobs
            with self.model.disable_adapter():
                return score(self.model, prompts, completions, self.pad_id, self.temperature).logprobs

    def update(self, entries: list[dict], is_weights) -> tuple[dict, torch.Tensor]:
        """One optimizer step on a minibatch of trajectory records; returns stats and TD errors. With several
        processes each scores its own block of the minibatch and the gradients are summed over them: every
        process takes the step one process would take on the whole minibatch, and gets every TD error."""
        _train_mode(self.model)
        mine = self.processes.block(len(entries))
        micro = max(1, -(-len(mine) // self.cfg.grad_accumulation))
        weights_all = torch.as_tensor(is_weights, dtype=torch.float32)
        totals = dict.fromkeys(("loss", "policy_loss", "value_loss", "entropy", "kl", "kl_behaviour", "clip_fraction",
                                "value_mean", "advantage_mean", "advantage_positive_share", "advantage_zero_share"), 0.0)
        trusted = self.critic_trusted  # decided before this step's critic fit: fitted before it is trusted
        td_errors = []
        self.optimizer.zero_grad(set_to_none=True)
        for start in range(mine.start, mine.stop, micro):
            chunk = entries[start : min(start + micro, mine.stop)]
            device = next(self.model.parameters()).device
            prompts = [e["prompt_ids"] for e in chunk]
            completions = [e["completion_ids"] for e in chunk]
            weights = weights_all[start : start + len(chunk)].to(device)
            reward = torch.tensor([e["reward"] for e in chunk], dtype=torch.float32, device=device)

            # ---- the update rule -------------------------------------------------------------
            current, state = score_for_update(self.model, prompts, completions, self.pad_id, self.temperature)
            mask = current.mask
            behaviour = torch.zeros_like(current.logprobs)
            for row, e in enumerate(chunk):
                behaviour[row, : len(e["behaviour_logprobs"])] = torch.tensor(e["behaviour_logprobs"], device=device)
            value = self.values(state)  # V(s): the prompt's state, not the completion it is judged on
            baseline = value if trusted else torch.tensor([e["baseline"] for e in chunk], dtype=torch.float32, device=device)
            advantage = (reward - baseline).detach()  # advantage = reward − baseline
            ratio = torch.exp((current.logprobs - behaviour) * mask)  # π_θ / μ per token
            clipped = ratio.clamp(1 - self.cfg.clip_ratio, 1 + self.cfg.clip_ratio)
            surrogate = torch.min(ratio * advantage[:, None], clipped * advantage[:, None])
            policy_loss = -(weights * _masked_mean(surrogate, mask)).mean()
            value_loss = (weights * (value - reward) ** 2).mean()
            entropy = _masked_mean(current.entropy, mask)
            # Every per-sample term carries the replay IS weight, so the regularisers keep the same
            # strength relative to the policy term whatever the variant's weight scale.
            loss = policy_loss + self.cfg.value_coef * value_loss - self.cfg.entropy_coef * (weights * entropy).mean()
            kl = torch.zeros(len(chunk), device=device)
            if self.cfg.kl_coef > 0:
                log_ratio_ref = (self._reference_logprobs(prompts, completions) - current.logprobs) * mask
                kl = _masked_mean(torch.exp(log_ratio_ref) - log_ratio_ref - 1, mask)  # k3 estimator
                loss = loss + self.cfg.kl_coef * (weights * kl).mean()
            share = len(chunk) / len(entries)  # of the whole minibatch, whichever process scores the chunk
            (loss * share).backward()
            # -------------------------------------------------------------------------------------

            td_errors.append((reward - value).detach().cpu())  # one-step episodes: TD = r − V
            log_ratio = (current.logprobs - behaviour).detach() * mask  # how far the policy moved from μ: free
            for key, term in (("loss", loss), ("policy_loss", policy_loss), ("value_loss", value_loss), ("entropy", entropy),
                              ("kl", kl), ("kl_behaviour", _masked_mean(torch.exp(log_ratio) - log_ratio - 1, mask)),
                              ("clip_fraction", _masked_mean(((ratio - clipped).abs() > 1e-6).float(), mask)),
                              ("value_mean", value), ("advantage_mean", advantage),
                              ("advantage_positive_share", (advantage > 0).float()),
                              ("advantage_zero_share", (advantage == 0).float())):
                totals[key] += term.mean().item() * share
        self.processes.sum_gradients(self.trained_parameters())
        totals = self.processes.sum(totals)
        totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.trained_parameters(), self.cfg.max_grad_norm))
        self.optimizer.step()
        self.steps += 1
        self.tokens += sum(len(e["completion_ids"]) for e in entries)
        self.model.eval()
        td = torch.cat(self.processes.gather(td_errors))
        totals["explained_variance"] = self._fit_critic_trust([e["reward"] for e in entries], td)
        totals["critic_trusted"] = float(trusted)
        return totals, td

    def _fit_critic_trust(self, rewards: list[float], td: torch.Tensor) -> float:
        """The critic's explained variance on this minibatch, 1 − Var(r − V) / Var(r), measured before
        the step, folded into the running value that decides whether it is trusted (NaN, and nothing
        folded, when the rewards do not vary)."""
        spread = float(torch.tensor(rewards, dtype=torch.float64).var(unbiased=False))
        if spread < 1e-12:
            return float("nan")
        ev = 1.0 - float(td.double().var(unbiased=False)) / spread
        past = self.critic_explained_variance
        self.critic_explained_variance = ev if past is None else self.CRITIC_EV_DECAY * past + (1 - self.CRITIC_EV_DECAY) * ev
        return ev


def build_learner(model: nn.Module, cfg: TrainConfig, pad_id: int, temperature: float, seed: int = 0,
                  processes: Processes = SINGLE, use_critic: bool = True) -> Learner:
    """Wrap the policy for training: LoRA adapters through peft, or full fine-tuning. `seed` fixes the
    adapters' random initialisation, so the same seed gives the same run; with several processes every
    one starts from the main process's weights. `use_critic`: whether the critic may become the
    advantage baseline (the variants whose baseline is `expected`)."""
    torch.manual_seed(seed)
    reference = None
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        targets = [t for t in LORA_TARGETS if t in present] or "all-linear"
        model = get_peft_model(
            model,
            LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets),
        )
    elif cfg.kl_coef > 0:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    device = next(model.parameters()).device
    value_head = nn.Linear(model.config.hidden_size, 1).to(device)
    nn.init.zeros_(value_head.weight)
    nn.init.zeros_(value_head.bias)
    trainable = [p for p in model.parameters() if p.requires_grad]
    processes.copy_from_main([*trainable, *value_head.parameters()])
    optimizer = torch.optim.AdamW(
        [
            {"params": trainable, "lr": cfg.lr},
            {"params": list(value_head.parameters()), "lr": cfg.value_lr},
        ]
    )
    return Learner(model, value_head, optimizer, reference, cfg, pad_id, temperature, processes, use_critic)


def save_policy(learner: Learner, folder: str | os.PathLike) -> None:
    """The trained policy: a LoRA adapter (small) or the full model, plus the value head."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    learner.model.save_pretrained(folder)
    torch.save(learner.value_head.state_dict(), folder / "value_head.pt")
    (folder / "policy.json").write_text(json.dumps({"lora": learner.cfg.lora, "steps": learner.steps}))


def save_checkpoint(learner: Learner, folder: str | os.PathLike, extra: dict, also=None) -> None:
    """Policy, value head, optimizer state and `extra` (plus whatever `also(tmp_folder)` writes, e.g.
    the buffer) go to a temporary folder that is renamed into place only when complete: a kill
    mid-save leaves no half-written checkpoint, and earlier checkpoints stay as they were."""
    with atomic_path(folder) as tmp:
        save_policy(learner, tmp)
        torch.save({"optimizer": learner.optimizer.state_dict(), "steps": learner.steps, "tokens": learner.tokens,
                    "critic_explained_variance": learner.critic_explained_variance, **extra},
                   tmp / "trainer_state.pt")
        if also is not None:
            also(tmp)


def load_checkpoint(learner: Learner, folder: str | os.PathLike) -> dict:
    """Restore a checkpoint written by `save_checkpoint` into a freshly built learner."""
    folder = Path(folder)
    if learner.cfg.lora:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(learner.model, load_file(folder / "adapter_model.safetensors"))
    else:
        loaded = auto_class(learner.model.config).from_pretrained(folder)
        learner.model.load_state_dict(loaded.state_dict())
    device = learner.value_head.weight.device  # this process's, whichever device saved the checkpoint
    learner.value_head.load_state_dict(torch.load(folder / "value_head.pt", map_location=device))
    state = torch.load(folder / "trainer_state.pt", weights_only=False, map_location=device)
    learner.optimizer.load_state_dict(state.pop("optimizer"))
    learner.steps, learner.tokens = state.pop("steps"), state.pop("tokens")
    learner.critic_explained_variance = state.pop("critic_explained_variance")
    return state
