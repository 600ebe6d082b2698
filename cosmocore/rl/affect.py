"""Affect: self-supervised valence and arousal targets from execution logs, and the tagger that learns them.

The paper trains its tagger on human-labelled episodes; here the targets come from the execution logs,
so no labels are needed (an optional CSV of human labels fine-tunes the tagger afterwards).

Targets, for sample i of task t with reward r_i, outcome class o_i and mean per-token log-prob ℓ_i:

    valence_i = clip(s · (r_i − E_t), −1, 1)                          (s = affect.valence_scale)
        E_t = the task's running mean reward from earlier iterations; for a task seen for the first
        time, the mean reward of this iteration's samples of t (a group baseline). Expectation-relative:
        a routine success is ≈ 0, a failure on a task the policy usually solves is strongly negative.
        Rewards differ by 0.5 between neighbouring outcome classes and a group baseline sits between
        them, so the raw difference rarely passes the paper's Dream Queue threshold (v < −0.5); s = 3
        (the default) makes a sample a third of a class below expectation reach it.

    arousal_i = 1 − (1 − rarity_i) · (1 − surprise_i)                 (a noisy OR: either makes it arousing)
        rarity_i   = 1 − n_t(o_i) / Σ_o n_t(o)   how unusual this outcome is for this task, with n_t the
                     decayed outcome counts of earlier iterations plus this iteration's counts
        surprise_i = how much the policy's own confidence contradicts the outcome: with c_i the
                     percentile, among this iteration's samples, of exp(ℓ_i) (the geometric-mean token
                     probability; 0 when no tokens), surprise_i = c_i when the outcome is worse than
                     expected (r_i < E_t: it was sure of something wrong) and 1 − c_i otherwise (it
                     hesitated over what turned out as expected or better). A percentile, not the
                     probability itself, because a model's absolute confidence says little (SmolLM2's
                     sits at 0.45-0.95 whatever it writes) and the paper's gates (a < 0.3, a > 0.7)
                     need the whole 0..1 range

Arousal is therefore not |valence|: two failures with the same valence differ in arousal when one
outcome is rare for the task or was written confidently. A routine success written confidently is
the only calm sample (the Prune Bin's target); a confident failure below expectation is the Dream
Queue's. The confident routine sample is also the low-entropy one, so the Prune Bin's entropy
exception (buffer.py) spares the hesitant samples the arousal already keeps out of it.
`update_task_stats` folds an iteration into E_t and n_t *after* its targets are computed.

The tagger is an MLP hidden → `hidden_units` → 2 on the policy's pooled hidden state: valence through
tanh (−1..1), arousal through a sigmoid (0..1).
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from cosmocore.config import AffectConfig
from cosmocore.errors import CosmoCoreError
from cosmocore.files import atomic_path

logger = logging.getLogger(__name__)

LABEL_COLUMNS = ("trajectory_id", "valence", "arousal")


# ---- targets --------------------------------------------------------------------------------------


def _task_means(rewards: np.ndarray, task_ids: list[str]) -> dict[str, float]:
    sums: dict[str, float] = defaultdict(float)
    counts: Counter[str] = Counter(task_ids)
    for reward, task in zip(rewards, task_ids):
        sums[task] += float(reward)
    return {task: sums[task] / counts[task] for task in counts}


def _check_lengths(rewards: np.ndarray, *columns) -> None:
    if any(len(column) != len(rewards) for column in columns):
        raise ValueError(f"affect: {len(rewards)} rewards but columns of lengths {[len(c) for c in columns]}")


def affect_targets(
    rewards: np.ndarray,
    task_ids: list[str],
    outcomes: list[str],
    mean_logprobs: np.ndarray,
    expected: dict[str, float],
    outcome_counts: dict[str, dict[str, float]],
    cfg: AffectConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Valence and arousal targets of one iteration's samples (formulas in the module docstring).

    >>> cfg = AffectConfig(hidden_units=8, epochs=1, batch_size=4, lr=1e-3, weight_decay=0.0, holdout_fraction=0.0,
    ...                    valence_scale=2.0, running_mean_decay=0.5, labels_csv="")
    >>> v, a = affect_targets(np.array([1.0, 0.0]), ["t", "t"], ["passed", "wrong_answer"],
    ...                       np.log([0.9, 0.6]), {"t": 0.9}, {"t": {"passed": 8.0}}, cfg)
    >>> v.round(2).tolist(), a.round(2).tolist()  # a confident routine success; a rare failure
    ([0.2, -1.0], [0.1, 0.9])
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    mean_logprobs = np.asarray(mean_logprobs, dtype=np.float64)
    _check_lengths(rewards, task_ids, outcomes, mean_logprobs)

    group_means = _task_means(rewards, task_ids)
    baseline = np.array([expected.get(task, group_means[task]) for task in task_ids])
    valence = np.clip(cfg.valence_scale * (rewards - baseline), -1.0, 1.0)

    counts = {task: Counter(outcome_counts.get(task, {})) for task in group_means}
    for task, outcome in zip(task_ids, outcomes):
        counts[task][outcome] += 1
    rarity = np.array([1.0 - counts[t][o] / sum(counts[t].values()) for t, o in zip(task_ids, outcomes)])
    confidence = _percentile(np.clip(np.nan_to_num(np.exp(mean_logprobs), nan=0.0), 0.0, 1.0))
    surprise = np.where(rewards < baseline, confidence, 1.0 - confidence)
    arousal = 1.0 - (1.0 - rarity) * (1.0 - surprise)
    return valence, arousal


def _percentile(values: np.ndarray) -> np.ndarray:
    """Each value's rank among `values` scaled to 0..1 (ties share their mean rank; one value: 0.5)."""
    if len(values) < 2:
        return np.full(len(values), 0.5)
    return (rankdata(values) - 1.0) / (len(values) - 1.0)


def update_task_stats(
    expected: dict[str, float],
    outcome_counts: dict[str, dict[str, float]],
    rewards: np.ndarray,
    task_ids: list[str],
    outcomes: list[str],
    decay: float,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Fold one iteration into the per-task history; pure (the inputs are not modified).

    expected[t] ← decay · expected[t] + (1 − decay) · (this iteration's mean reward of t), or that
    mean for a new task; outcome_counts[t][o] ← decay · outcome_counts[t][o] + (this iteration's count).
    Tasks absent from this iteration keep their history unchanged: no new evidence, nothing fades.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    _check_lengths(rewards, task_ids, outcomes)
    new_expected = dict(expected)
    for task, mean in _task_means(rewards, task_ids).items():
        new_expected[task] = decay * expected[task] + (1.0 - decay) * mean if task in expected else mean

    new_counts = {task: dict(counts) for task, counts in outcome_counts.items()}
    this_iteration: dict[str, Counter[str]] = defaultdict(Counter)
    for task, outcome in zip(task_ids, outcomes):
        this_iteration[task][outcome] += 1
    for task, counts in this_iteration.items():
        old = outcome_counts.get(task, {})
        new_counts[task] = {o: decay * old.get(o, 0.0) + counts.get(o, 0) for o in set(old) | set(counts)}
    return new_expected, new_counts


# ---- the tagger -----------------------------------------------------------------------------------


class AffectTagger(nn.Module):
    """hidden → hidden_units → 2; inputs standardised with statistics fixed at creation.

    LM hidden states have a few dimensions of very large magnitude; standardising keeps them from
    dominating. The statistics stay fixed when training continues, so earlier learning stays valid.
    """

    def __init__(self, input_size: int, hidden_units: int) -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(input_size))
        self.register_buffer("input_std", torch.ones(input_size))
        self.net = nn.Sequential(nn.Linear(input_size, hidden_units), nn.ReLU(), nn.Linear(hidden_units, 2))

    @property
    def input_size(self) -> int:
        return self.input_mean.numel()

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net((hidden - self.input_mean) / self.input_std)
        return torch.tanh(out[..., 0]), torch.sigmoid(out[..., 1])


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def predict(tagger: AffectTagger, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted (valence, arousal) for rows of pooled hidden states."""
    tagger.eval()
    with torch.no_grad():
        valence, arousal = tagger(torch.as_tensor(np.asarray(hidden), dtype=torch.float32))
    return valence.numpy().astype(np.float64), arousal.numpy().astype(np.float64)


def train_tagger(
    tagger: AffectTagger | None,
    hidden: np.ndarray,
    valence_t: np.ndarray,
    arousal_t: np.ndarray,
    cfg: AffectConfig,
    seed: int,
) -> tuple[AffectTagger, dict]:
    """Fit the tagger to (valence, arousal) targets by MSE on both heads with Adam.

    A `holdout_fraction` of the rows is held out and the returned metrics are measured on them:
    valence_mse, arousal_mse, valence_corr, arousal_corr (Pearson; NaN with fewer than 3 held-out rows
    or constant values), n_train, n_holdout, train_loss (last epoch). Pass the previous iteration's
    tagger to continue training it; `None` creates one. The global torch RNG is left untouched.
    """
    hidden = np.asarray(hidden, dtype=np.float32)
    targets = np.stack([np.asarray(valence_t, np.float32), np.asarray(arousal_t, np.float32)], axis=1)
    if hidden.ndim != 2 or len(hidden) != len(targets):
        raise ValueError(
            f"train_tagger: hidden must be (rows, features) with one row per target, "
            f"got {hidden.shape} for {len(targets)} targets"
        )
    if not np.isfinite(targets).all():
        raise ValueError("train_tagger: the targets contain NaN or inf; compute them with affect_targets first")
    if tagger is not None and tagger.input_size != hidden.shape[1]:
        raise ValueError(f"train_tagger: the tagger expects {tagger.input_size} features, hidden has {hidden.shape[1]}")

    order = np.random.default_rng(seed).permutation(len(hidden))
    n_holdout = min(int(cfg.holdout_fraction * len(hidden)), len(hidden) - 1)
    holdout, train = order[:n_holdout], order[n_holdout:]
    x, y = torch.from_numpy(hidden), torch.from_numpy(targets)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if tagger is None:
            tagger = AffectTagger(hidden.shape[1], cfg.hidden_units)
            tagger.input_mean.copy_(x[train].mean(0))
            tagger.input_std.copy_(x[train].std(0, correction=0).clamp_min(1e-6))
        optimizer = torch.optim.Adam(tagger.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        tagger.train()
        train_rows = torch.from_numpy(train)
        for _ in range(cfg.epochs):
            epoch_loss = 0.0
            for rows in train_rows[torch.randperm(len(train_rows))].split(cfg.batch_size):
                valence, arousal = tagger(x[rows])
                loss = nn.functional.mse_loss(valence, y[rows, 0]) + nn.functional.mse_loss(arousal, y[rows, 1])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                epoch_loss += loss.item() * len(rows)

    valence, arousal = predict(tagger, hidden[holdout])
    held = targets[holdout].astype(np.float64)
    nan = float("nan")
    metrics = {
        "valence_mse": float(np.mean((valence - held[:, 0]) ** 2)) if n_holdout else nan,
        "arousal_mse": float(np.mean((arousal - held[:, 1]) ** 2)) if n_holdout else nan,
        "valence_corr": _pearson(valence, held[:, 0]),
        "arousal_corr": _pearson(arousal, held[:, 1]),
        "n_train": len(train),
        "n_holdout": n_holdout,
        "train_loss": epoch_loss / len(train),
    }
    return tagger, metrics


# ---- human labels ---------------------------------------------------------------------------------


class LabelsError(CosmoCoreError, ValueError):
    """A labels CSV that cannot be used: the message names the file, row and column."""


def _read_labels(path: Path) -> dict[str, tuple[float, float]]:
    labels: dict[str, tuple[float, float]] = {}
    first_row: dict[str, int] = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in LABEL_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise LabelsError(
                f"{path}: missing column(s) {', '.join(missing)}; the header must name "
                f"{', '.join(LABEL_COLUMNS)} (found: {', '.join(reader.fieldnames or []) or 'nothing'})"
            )
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            trajectory_id = (row["trajectory_id"] or "").strip()
            if not trajectory_id:
                raise LabelsError(f"{path}:{line}: column 'trajectory_id' is empty")
            if trajectory_id in first_row:
                raise LabelsError(
                    f"{path}:{line}: trajectory_id {trajectory_id!r} is already labelled "
                    f"on line {first_row[trajectory_id]}"
                )
            values = []
            for column, low, high in (("valence", -1.0, 1.0), ("arousal", 0.0, 1.0)):
                raw = row[column]
                try:
                    value = float(raw)
                except (TypeError, ValueError):
                    raise LabelsError(f"{path}:{line}: column '{column}' is {raw!r}, not a number") from None
                if not low <= value <= high:
                    raise LabelsError(f"{path}:{line}: column '{column}' is {value}, outside [{low}, {high}]")
                values.append(value)
            first_row[trajectory_id] = line
            labels[trajectory_id] = (values[0], values[1])
    return labels


def fine_tune_on_labels(
    tagger: AffectTagger,
    hidden_by_id: dict[str, np.ndarray],
    labels_csv: str | os.PathLike,
    cfg: AffectConfig,
    seed: int,
) -> dict:
    """Fine-tune `tagger` in place on human labels (CSV columns trajectory_id, valence, arousal).

    Labelled ids with no hidden state in `hidden_by_id` (not in the buffer) are skipped, counted in
    `n_unknown` and logged. Returns `train_tagger`'s metrics plus n_labels, n_matched and n_unknown
    (no training, and no training metrics, when nothing matches).
    """
    path = Path(labels_csv)
    if not path.is_file():
        raise LabelsError(f"{path}: labels CSV not found; fix affect.labels_csv in params.yaml ('' skips it)")
    labels = _read_labels(path)
    matched = [trajectory_id for trajectory_id in labels if trajectory_id in hidden_by_id]
    unknown = [trajectory_id for trajectory_id in labels if trajectory_id not in hidden_by_id]
    if unknown:
        logger.warning("%s: %d of %d labelled trajectories are not in the buffer (e.g. %s)",
                       path, len(unknown), len(labels), ", ".join(unknown[:3]))
    counts = {"n_labels": len(labels), "n_matched": len(matched), "n_unknown": len(unknown)}
    if not matched:
        return counts
    hidden = np.stack([np.asarray(hidden_by_id[trajectory_id], dtype=np.float32) for trajectory_id in matched])
    valence, arousal = (np.array([labels[trajectory_id][k] for trajectory_id in matched]) for k in (0, 1))
    _, metrics = train_tagger(tagger, hidden, valence, arousal, cfg, seed)
    return {**metrics, **counts}


# ---- checkpoints ----------------------------------------------------------------------------------


def save_tagger(tagger: AffectTagger, path: str | os.PathLike) -> None:
    """Write the tagger (shape and weights) atomically, so a killed tag stage leaves the previous one."""
    hidden_units = tagger.net[0].out_features
    with atomic_path(path) as tmp:
        torch.save({"input_size": tagger.input_size, "hidden_units": hidden_units, "state": tagger.state_dict()}, tmp)


def load_tagger(path: str | os.PathLike) -> AffectTagger:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the tag stage first")
    saved = torch.load(path, weights_only=True)
    tagger = AffectTagger(saved["input_size"], saved["hidden_units"])
    tagger.load_state_dict(saved["state"])
    return tagger
