"""Per-kind mixing (CodeRL+ variants): the alignment share of every minibatch, each kind served by the
variant's own rule, IS weights on one scale, routing of priorities, and exact persistence in one file."""

from __future__ import annotations

import doctest
import os
from pathlib import Path

import numpy as np
import pytest

from cosmocore.config import BufferConfig, load_params
from cosmocore.rl import mixing
from cosmocore.rl.buffer import BufferFileError, ReplayBuffer
from cosmocore.rl.mixing import KindMix, load_buffer, make_buffer, part_configs
from cosmocore.variants import ALIGNMENT_VARIANTS
from tests.test_buffer import assert_same_future

ROOT = Path(__file__).resolve().parents[1]
SHARE = 0.4
AFFECT = {"dream": (-0.9, 0.9), "regular": (0.6, 0.5), "pruned": (0.0, 0.1)}  # lands exactly in that gate


@pytest.fixture(scope="module")
def cfg() -> BufferConfig:
    return load_params(ROOT / "params.yaml").buffer


def fill(buffer, rows: list[tuple[str, str]], td=None) -> dict:
    """Add one entry per (kind, gate), with affect values that land in that gate."""
    valence, arousal = np.array([AFFECT[gate] for _, gate in rows]).reshape(-1, 2).T
    start = buffer.replay_stats()["total_added"]
    entries = [{"id": start + i, "kind": kind, "gate": gate} for i, (kind, gate) in enumerate(rows)]
    return buffer.add(entries, valence, arousal, np.zeros(len(rows)), td)


def rows(kind: str, *gates: str) -> list[tuple[str, str]]:
    return [(kind, gate) for gate in gates]


def test_doctest_examples():
    assert doctest.testmod(mixing).failed == 0


def test_only_the_coderl_plus_variants_mix_kinds(cfg):
    assert isinstance(make_buffer(cfg, "cosmocore", 0, SHARE), ReplayBuffer)
    for variant in ALIGNMENT_VARIANTS:
        buffer = make_buffer(cfg, variant, 0, SHARE)
        assert isinstance(buffer, KindMix) and buffer.variant == variant
        capacities = {kind: part.cfg.capacity for kind, part in buffer.parts.items()}
        assert capacities == {"alignment": round(SHARE * cfg.capacity), "code": cfg.capacity - round(SHARE * cfg.capacity)}


# ---- the share of every minibatch ----------------------------------------------------------------


@pytest.mark.parametrize("variant", ALIGNMENT_VARIANTS)
@pytest.mark.parametrize("batch_size", [10, 8, 7])
def test_every_minibatch_holds_the_configured_share(cfg, variant, batch_size):
    buffer = make_buffer(cfg, variant, 0, SHARE)
    fill(buffer, rows("code", *["dream"] * 6, *["regular"] * 30) + rows("alignment", *["dream"] * 4, *["regular"] * 20))
    wanted = int(np.floor(SHARE * batch_size + 0.5))
    for _ in range(50):
        batch = buffer.sample(batch_size, 0.5)
        kinds = [entry["kind"] for entry in batch.entries]
        assert len(batch) == batch_size == len(batch.is_weights) == len(batch.from_dream)
        assert kinds.count("alignment") == wanted  # exactly, in every minibatch
        alignment = np.array(kinds) == "alignment"
        assert np.all(batch.indices[alignment] >= buffer.parts["code"].cfg.capacity)  # slots of the whole
        assert np.all(batch.indices[~alignment] < buffer.parts["code"].cfg.capacity)


def test_too_few_alignment_entries_are_all_served_and_code_fills_the_rest(cfg):
    buffer = make_buffer(cfg, "cosmocore_coderl_plus", 0, SHARE)
    fill(buffer, rows("code", *["regular"] * 20) + rows("alignment", "regular", "dream"))
    kinds = [entry["kind"] for entry in buffer.sample(10, 0.5).entries]
    assert kinds.count("alignment") == 2 and kinds.count("code") == 8
    only_alignment = make_buffer(cfg, "cosmocore_coderl_plus", 0, SHARE)
    fill(only_alignment, rows("alignment", "regular", "regular"))
    assert [entry["kind"] for entry in only_alignment.sample(4, 0.5).entries] == ["alignment"] * 4
    with pytest.raises(ValueError, match="empty"):
        make_buffer(cfg, "coderl_plus", 0, SHARE).sample(4, 0.0)


def test_coderl_plus_serves_each_kind_in_order_and_keeps_only_the_latest_batch(cfg):
    buffer = make_buffer(cfg, "coderl_plus", 0, SHARE)
    fill(buffer, rows("code", *["regular"] * 4) + rows("alignment", *["regular"] * 4))
    fill(buffer, rows("code", *["regular"] * 6) + rows("alignment", *["dream"] * 4))  # ids 8..13 code, 14..17 alignment
    assert len(buffer) == 10
    batches = [buffer.sample(5, 0.5) for _ in range(2)]
    ids = [[entry["id"] for entry in batch.entries] for batch in batches]
    assert ids == [[8, 9, 10, 14, 15], [11, 12, 13, 16, 17]]  # 3 code and 2 alignment each, in order
    assert all(np.all(batch.is_weights == 1) and not batch.from_dream.any() for batch in batches)
    fill(buffer, rows("code", "regular", "regular"))  # an iteration without alignment answers
    assert len(buffer.parts["alignment"]) == 0 and len(buffer) == 2  # the stale answers are gone


def test_coderl_plus_serves_each_answer_once_when_too_few_were_built(cfg):
    buffer = make_buffer(cfg, "coderl_plus", 0, SHARE)
    fill(buffer, rows("code", *["regular"] * 28) + rows("alignment", *["regular"] * 5))  # 5 of 33, not 0.4
    served = [entry["id"] for _ in range(4) for entry in buffer.sample(8, 0.5).entries]
    assert len(served) == len(set(served)) == 32  # one pass: nothing twice, though the share falls short
    assert sum(i >= 28 for i in served) == 4  # one answer per minibatch of 8: the iteration's own 5 / 33


def test_cosmocore_coderl_plus_draws_each_kind_by_the_dream_mix(cfg):
    buffer = make_buffer(cfg, "cosmocore_coderl_plus", 0, SHARE)
    fill(buffer, rows("code", *["dream"] * 10, *["regular"] * 90) + rows("alignment", *["dream"] * 5, *["regular"] * 45))
    batches = [buffer.sample(10, 0.5) for _ in range(2000)]
    kinds = np.array([entry["kind"] for batch in batches for entry in batch.entries])
    from_dream = np.concatenate([batch.from_dream for batch in batches])
    for kind in ("code", "alignment"):  # 80 % of each kind's slots from its own Dream Queue
        assert abs(from_dream[kinds == kind].mean() - cfg.dream_fraction) < 0.03
    stats = buffer.replay_stats()
    assert stats["size"] == 150 and stats["dream_size"] == 15 and stats["alignment_share"] == pytest.approx(50 / 150)
    assert stats["dream_replay_rate"] == stats["code_dream_replay_rate"] > 1


# ---- IS weights -----------------------------------------------------------------------------------


def dream_mix_probability(gates: list[str], td: np.ndarray, cfg: BufferConfig) -> np.ndarray:
    """P(i) of one draw of the 80/20 mix, from the formula (as in test_buffer)."""
    valence, arousal = np.array([AFFECT[g] for g in gates]).T
    priority = (td + cfg.priority_lambda * np.abs(valence) * arousal + cfg.priority_epsilon) ** cfg.priority_alpha
    weight = np.where(np.array(gates) == "dream", priority, 0.0)
    return cfg.dream_fraction * weight / weight.sum() + (1 - cfg.dream_fraction) / len(gates)


def test_a_batch_reports_the_scale_of_its_weights(cfg):
    """`is_weights · max_weight = (N·P(i))^-β`, the unnormalised weight a mix of buffers needs."""
    buffer = ReplayBuffer(cfg, "cosmocore", seed=0)
    gates = ["dream"] * 4 + ["regular"] * 12
    td = np.random.default_rng(0).uniform(0, 2, len(gates))
    buffer.add([{"id": i} for i in range(len(gates))], *np.array([AFFECT[g] for g in gates]).T, np.zeros(len(gates)), td)
    probability = dream_mix_probability(gates, td, cfg)
    beta = cfg.beta_start + 0.3 * (1 - cfg.beta_start)
    batch = buffer.sample(64, 0.3)
    assert batch.is_weights * batch.max_weight == pytest.approx((len(gates) * probability[batch.indices]) ** -beta, rel=1e-9)


def test_is_weights_correct_each_kinds_rule_on_one_scale(cfg):
    """Target: share × uniform over alignment + (1 − share) × uniform over code, so an entry's weight is
    its own part's (N_k·P_k(i))^-β, normalised by the largest over both parts."""
    buffer = make_buffer(cfg, "cosmocore_coderl_plus", 0, SHARE)
    rng = np.random.default_rng(1)
    gates = {"code": ["dream"] * 5 + ["regular"] * 15, "alignment": ["regular"] * 10}  # no alignment Dream Queue
    td = {kind: rng.uniform(0, 2, len(g)) for kind, g in gates.items()}
    fill(buffer, rows("code", *gates["code"]) + rows("alignment", *gates["alignment"]), td=np.concatenate(list(td.values())))
    for progress in (0.0, 0.5, 1.0):
        beta = cfg.beta_start + progress * (1 - cfg.beta_start)
        raw = {"code": (20 * dream_mix_probability(gates["code"], td["code"], cfg)) ** -beta,
               "alignment": np.ones(10)}  # drawn uniformly: exactly its target
        top = max(weights.max() for weights in raw.values())
        batch = buffer.sample(10, progress)
        alignment = np.array([entry["kind"] == "alignment" for entry in batch.entries])
        start = buffer.parts["code"].cfg.capacity
        assert batch.is_weights[~alignment] == pytest.approx(raw["code"][batch.indices[~alignment]] / top, rel=1e-9)
        assert batch.is_weights[alignment] == pytest.approx(raw["alignment"][batch.indices[alignment] - start] / top)
        assert batch.is_weights.max() <= 1 and batch.max_weight == pytest.approx(top)


def test_priorities_go_back_to_the_part_that_served_them(cfg):
    buffer = make_buffer(cfg, "cosmocore_coderl_plus", 0, SHARE)
    fill(buffer, rows("code", "dream", "dream", "regular") + rows("alignment", "dream", "dream", "regular"))
    start = buffer.parts["code"].cfg.capacity
    buffer.update_priorities(np.array([start + 1]), np.array([-80.0]))  # alignment slot 1: id 4
    served = []
    for _ in range(200):
        batch = buffer.sample(10, 0.5)
        served += [entry["id"] for entry, dream in zip(batch.entries, batch.from_dream) if dream]
    assert served.count(4) > 20 * max(1, served.count(3))  # its |TD| of 80 dominates its own Dream Queue
    assert 0.4 < served.count(0) / (served.count(0) + served.count(1)) < 0.6  # code slot 1 untouched
    with pytest.raises(IndexError):
        buffer.update_priorities(np.array([start + 5]), np.array([1.0]))  # an empty alignment slot


def test_add_routes_by_kind_and_counts_the_whole(cfg):
    buffer = make_buffer(cfg, "cosmocore_coderl_plus", 0, SHARE)
    added = fill(buffer, rows("code", "dream", "regular", "pruned") + rows("alignment", "dream", "pruned"))
    assert (added["dream"], added["regular"], added["pruned"], added["stored"]) == (2, 1, 2, 3)
    assert (added["code_dream"], added["alignment_dream"], added["alignment_dropped_pruned"]) == (1, 1, 1)
    assert added["dream_share"] == pytest.approx(2 / 5)
    assert sorted(entry["id"] for entry in buffer.entries()) == [0, 1, 3]
    with pytest.raises(ValueError, match="kind"):
        buffer.add([{"id": 9, "kind": "prose"}], [0.0], [0.5], [0.0])


def test_each_kind_evicts_within_its_own_share_of_the_capacity(cfg):
    buffer = make_buffer(cfg.model_copy(update={"capacity": 10}), "cosmocore_coderl_plus", 0, SHARE)
    fill(buffer, rows("code", *["regular"] * 8) + rows("alignment", *["regular"] * 6))
    assert {kind: len(part) for kind, part in buffer.parts.items()} == {"code": 6, "alignment": 4}
    assert buffer.replay_stats()["total_evicted"] == 4


# ---- persistence ----------------------------------------------------------------------------------


def busy_mix(cfg: BufferConfig) -> KindMix:
    buffer = make_buffer(cfg.model_copy(update={"capacity": 64}), "cosmocore_coderl_plus", 7, SHARE)
    rng = np.random.default_rng(0)
    for _ in range(4):
        kinds, gates = rng.choice(["code", "alignment"], 30), rng.choice(["dream", "regular", "pruned"], 30)
        fill(buffer, list(zip(kinds, gates)), td=rng.uniform(0, 1, 30))
        batch = buffer.sample(10, 0.3)
        buffer.update_priorities(batch.indices, rng.normal(size=10))
    buffer.tune_pruning(np.full(5, 0.1))
    return buffer


def test_save_load_round_trips_exactly(cfg, tmp_path):
    buffer = busy_mix(cfg)
    buffer.save(tmp_path / "buffer.pt")
    small = cfg.model_copy(update={"capacity": 64})
    loaded = load_buffer(tmp_path / "buffer.pt", small, "cosmocore_coderl_plus", SHARE)
    assert isinstance(loaded, KindMix) and loaded.prune_valence == buffer.prune_valence != cfg.prune_valence
    assert_same_future(buffer, loaded, [{"id": "new", "kind": "alignment"}, {"id": "new2", "kind": "code"}], batch_size=10)
    assert os.listdir(tmp_path) == ["buffer.pt"]  # one file (`write_atomically`, tested in test_buffer), no temp left


def test_load_refuses_another_share_or_a_single_buffer(cfg, tmp_path):
    small = cfg.model_copy(update={"capacity": 64})
    busy_mix(cfg).save(tmp_path / "mix.pt")
    with pytest.raises(BufferFileError, match="share"):
        KindMix.load(tmp_path / "mix.pt", small, 0.5)
    ReplayBuffer(small, "cosmocore", 0).save(tmp_path / "single.pt")
    with pytest.raises(BufferFileError, match="one buffer for all kinds"):
        load_buffer(tmp_path / "single.pt", small, "coderl_plus", SHARE)
    with pytest.raises(BufferFileError, match="not found"):
        load_buffer(tmp_path / "absent.pt", small, "cosmocore_coderl_plus", SHARE)
    assert part_configs(small, SHARE)["alignment"].capacity == 26
