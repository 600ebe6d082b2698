"""The sum tree, the gates, the variants' serving rules, IS weights and atomic persistence."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from cosmocore.config import BufferConfig, load_params
from cosmocore.rl.buffer import GATES, BufferFileError, ReplayBuffer, SumTree, gate
from cosmocore.variants import REGISTRY

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg() -> BufferConfig:
    return load_params(ROOT / "params.yaml").buffer


def with_(cfg: BufferConfig, **changes) -> BufferConfig:
    return cfg.model_copy(update=changes)


def fill(buffer: ReplayBuffer, gates: list[str], td=None) -> dict:
    """Add one entry per requested gate, with affect values that land exactly there."""
    affect = {"dream": (-0.9, 0.9, 0.0), "regular": (0.6, 0.5, 0.0), "pruned": (0.0, 0.1, 0.0)}
    valence, arousal, entropy = np.array([affect[g] for g in gates]).T
    start = buffer.replay_stats()["total_added"]
    entries = [{"id": start + i, "gate": g} for i, g in enumerate(gates)]
    return buffer.add(entries, valence, arousal, entropy, td)


# ---- gates ----------------------------------------------------------------------------------------


def test_gate_boundaries_are_strict(cfg):
    up, down = np.nextafter(cfg.dream_arousal, 1.0), np.nextafter(cfg.dream_valence, -1.0)
    cases = [  # valence, arousal, expected
        (down, 0.9, "dream"),
        (cfg.dream_valence, 0.9, "regular"),  # v must be strictly below −0.5
        (-0.9, up, "dream"),
        (-0.9, cfg.dream_arousal, "regular"),  # a must be strictly above 0.7
        (np.nextafter(cfg.prune_valence, 0.0), 0.1, "pruned"),
        (-np.nextafter(cfg.prune_valence, 0.0), 0.1, "pruned"),
        (cfg.prune_valence, 0.1, "regular"),  # |v| must be strictly below 0.2
        (-cfg.prune_valence, 0.1, "regular"),
        (0.0, np.nextafter(cfg.prune_arousal, 0.0), "pruned"),
        (0.0, cfg.prune_arousal, "regular"),  # a must be strictly below 0.3
        (np.nan, np.nan, "regular"),  # untagged
    ]
    valence, arousal, expected = zip(*cases)
    assert gate(valence, arousal, cfg).tolist() == list(expected)


@pytest.mark.parametrize("variant", ["cosmocore", "cosmocore_no_prune"])
def test_entropy_exception_keeps_prune_bin_entries_of_an_unsure_policy(cfg, variant):
    buffer = ReplayBuffer(cfg, variant, seed=0)
    entropy = [cfg.prune_entropy, np.nextafter(cfg.prune_entropy, 1.0), 0.9, np.nan]  # equal to it saves nothing
    added = buffer.add([{"id": i} for i in range(4)], [0.0] * 4, [0.1] * 4, entropy)
    assert (added["pruned"], added["spared"]) == (4, 2)  # all four are in the Prune Bin, two spared
    deleted = 2 if variant == "cosmocore" else 0
    assert added["dropped_pruned"] == deleted
    assert sorted(e["id"] for e in buffer.entries()) == ([1, 2] if deleted else [0, 1, 2, 3])
    assert buffer.replay_stats()["dream_size"] == 0  # spared entries join the regular pool


def test_gate_uses_a_tuned_prune_band(cfg):
    assert gate([0.25], [0.1], cfg).tolist() == ["regular"]
    assert gate([0.25], [0.1], cfg, prune_valence=0.3).tolist() == ["pruned"]


# ---- sum tree -------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [13, 100_000])  # 13: a pure searchsorted; 100,000: jump then descend
@pytest.mark.parametrize("stratified", [True, False])
def test_sum_tree_samples_in_proportion_to_priority(capacity, stratified):
    # a fixed seed; over 200 seeds the p-values of plain draws were uniform (2 % below 0.01), as they should be
    rng = np.random.default_rng(1)
    tree = SumTree(capacity)  # not a power of two: the padding leaves must never be drawn
    priorities = rng.uniform(0.1, 5.0, capacity) * (rng.random(capacity) > 0.3)
    priorities[[2, 7]] = 0.0
    tree.update(np.arange(capacity), priorities)
    draws = np.concatenate([tree.sample(256, rng, stratified=stratified) for _ in range(400)])
    assert draws.max() < capacity and not np.any(priorities[draws] == 0)
    buckets = np.arange(capacity) * 11 // capacity  # at most 11 groups of leaves, so each expects many draws
    observed = np.bincount(buckets[draws], minlength=11)
    expected = np.bincount(buckets, weights=priorities, minlength=11) / priorities.sum() * len(draws)
    positive = expected > 0
    assert stats.chisquare(observed[positive], expected[positive]).pvalue > 0.01


@pytest.mark.parametrize("capacity, batch", [(1000, 64), (100_000, 16)])  # whole-level and gathered updates
def test_sum_tree_total_and_min_track_batched_updates(capacity, batch):
    rng = np.random.default_rng(1)
    tree, reference = SumTree(capacity), np.zeros(capacity)
    for _ in range(50):
        indices = rng.integers(0, capacity, batch)  # with repeats
        values = rng.choice([0.0, 0.5, 2.0, 7.0], batch)
        tree.update(indices, values)
        reference[indices] = tree[indices]  # a repeated index keeps one of its values, consistently
        assert set(np.unique(tree[indices])) <= {0.0, 0.5, 2.0, 7.0}
    assert tree.total == pytest.approx(reference.sum())
    assert tree.min == reference[reference > 0].min()
    reference_tree = SumTree(capacity)
    reference_tree.update(np.arange(capacity), reference)  # rebuilt in one go: every node identical
    assert np.array_equal(tree._sum, reference_tree._sum) and np.array_equal(tree._min, reference_tree._min)
    with pytest.raises(ValueError):
        SumTree(4).sample(1, rng)
    with pytest.raises(ValueError):
        tree.update([0], [np.nan])


# ---- serving: variants, mix, IS weights -----------------------------------------------------------


@pytest.mark.parametrize(
    "variant", ["cosmocore", "cosmocore_coderl_plus", "cosmocore_no_prune", "uniform", "per", "on_policy"]
)
def test_variants_store_what_they_should(cfg, variant):
    buffer = ReplayBuffer(cfg, variant, seed=0)
    added = fill(buffer, ["dream", "regular", "pruned", "pruned"])
    assert (added["dream"], added["regular"], added["pruned"]) == (1, 1, 2)  # verdicts, whatever the variant
    drops = variant in ("cosmocore", "cosmocore_coderl_plus")
    assert len(buffer) == (2 if drops else 4)
    assert added["dropped_pruned"] == (2 if drops else 0)
    assert buffer.replay_stats()["dream_size"] == (1 if REGISTRY[variant].serving.sampling == "dream_mix" else 0)


@pytest.mark.parametrize("variant", ["on_policy", "coderl_plus"])
def test_on_policy_serves_only_the_latest_batch_in_order(cfg, variant):
    buffer = ReplayBuffer(cfg, variant, seed=0)
    fill(buffer, ["regular"] * 5)
    fill(buffer, ["dream", "regular", "pruned"])
    assert len(buffer) == 3
    batches = [buffer.sample(2, progress=0.5) for _ in range(3)]
    ids = [entry["id"] for batch in batches for entry in batch.entries]
    assert ids == [5, 6, 7, 5, 6, 7]  # in order; a second pass only once all were served
    assert all(np.all(batch.is_weights == 1) and not batch.from_dream.any() for batch in batches)
    assert buffer.replay_stats()["in_order_passes"] == 2.0


def test_uniform_ignores_gates_and_priorities(cfg):
    buffer = ReplayBuffer(cfg, "uniform", seed=0)
    fill(buffer, ["dream"] * 10 + ["regular"] * 10, td=np.r_[np.full(10, 100.0), np.zeros(10)])
    draws = np.concatenate([buffer.sample(64, 0.0).indices for _ in range(200)])
    assert stats.chisquare(np.bincount(draws, minlength=20)).pvalue > 0.01
    assert np.all(buffer.sample(8, 0.0).is_weights == 1)


def test_per_samples_by_td_and_update_priorities_moves_it(cfg):
    buffer = ReplayBuffer(cfg, "per", seed=0)
    td = np.array([0.0, 1.0, 2.0, 4.0])
    fill(buffer, ["dream", "regular", "pruned", "regular"], td=td)  # gates play no part
    draws = np.concatenate([buffer.sample(64, 0.0).indices for _ in range(300)])
    expected = (td + cfg.priority_epsilon) / (td + cfg.priority_epsilon).sum() * len(draws)
    assert stats.chisquare(np.bincount(draws, minlength=4), expected).pvalue > 0.01
    buffer.update_priorities(np.array([0]), np.array([-50.0]))  # |TD|
    assert np.mean(buffer.sample(256, 0.0).indices == 0) > 0.8


@pytest.mark.parametrize("variant", ["per", "cosmocore"])
def test_is_weights_match_their_formula(cfg, variant):
    cfg = with_(cfg, priority_alpha=0.7)
    rng = np.random.default_rng(3)
    buffer = ReplayBuffer(cfg, variant, seed=0)
    gates = ["dream"] * 6 + ["regular"] * 14
    td = rng.uniform(0, 2, len(gates))
    fill(buffer, gates, td=td)
    valence, arousal = np.where(np.array(gates) == "dream", -0.9, 0.6), np.where(np.array(gates) == "dream", 0.9, 0.5)

    if variant == "per":
        weight = (td + cfg.priority_epsilon) ** cfg.priority_alpha
        probability = weight / weight.sum()
    else:
        priority = td + cfg.priority_lambda * np.abs(valence) * arousal + cfg.priority_epsilon
        weight = np.where(np.array(gates) == "dream", priority**cfg.priority_alpha, 0.0)
        f, n = cfg.dream_fraction, len(gates)
        probability = f * weight / weight.sum() + (1 - f) / n
    for progress in (0.0, 0.5, 1.0):
        beta = cfg.beta_start + progress * (1 - cfg.beta_start)
        batch = buffer.sample(32, progress)
        raw = (len(gates) * probability) ** -beta
        assert batch.is_weights == pytest.approx(raw[batch.indices] / raw.max(), rel=1e-9)


@pytest.mark.parametrize("batch_size", [8, 7, 256])
def test_dream_mix_holds_over_many_minibatches(cfg, batch_size):
    buffer = ReplayBuffer(cfg, "cosmocore", seed=0)
    fill(buffer, ["dream"] * 50 + ["regular"] * 450)
    batches = [buffer.sample(batch_size, 0.5) for _ in range(max(20_000 // batch_size, 100))]
    from_dream = np.concatenate([b.from_dream for b in batches])
    assert abs(from_dream.mean() - cfg.dream_fraction) < 0.02
    drawn_gate = np.array([entry["gate"] for b in batches for entry in b.entries])
    assert set(drawn_gate[from_dream]) == {"dream"}
    # the uniform part covers the whole buffer, Dream Queue included (10 % of it)
    assert abs(np.mean(drawn_gate[~from_dream] == "dream") - 0.1) < 0.03


def test_dream_mix_falls_back_to_uniform_without_a_dream_queue(cfg):
    buffer = ReplayBuffer(cfg, "cosmocore", seed=0)
    fill(buffer, ["regular"] * 10)
    batch = buffer.sample(64, 0.3)
    assert not batch.from_dream.any() and batch.is_weights.shape == (64,) and np.all(batch.is_weights == 1)


def test_replay_rate_is_measured_not_forced(cfg):
    buffer = ReplayBuffer(cfg, "cosmocore", seed=0)
    fill(buffer, ["dream"] * 20 + ["regular"] * 180)
    for _ in range(500):
        buffer.sample(32, 0.5)
    f, n, d = cfg.dream_fraction, 200, 20
    expected = (f / d + (1 - f) / n) / ((1 - f) / n)  # follows from the rule and the queue's size
    assert buffer.replay_stats()["dream_replay_rate"] == pytest.approx(expected, rel=0.1)


def test_unknown_variant_and_empty_buffer_fail_clearly(cfg):
    with pytest.raises(ValueError, match="choose one of"):
        ReplayBuffer(cfg, "ppo", seed=0)
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(cfg, "cosmocore", seed=0).sample(4, 0.0)


# ---- eviction and pruning intensity ---------------------------------------------------------------


def test_eviction_takes_oldest_regular_then_oldest_dream(cfg):
    buffer = ReplayBuffer(with_(cfg, capacity=5), "cosmocore", seed=0)
    fill(buffer, ["regular", "dream", "regular", "dream", "regular"])  # ids 0..4
    assert fill(buffer, ["dream", "dream"])["evicted"] == 2  # ids 5, 6 evict regular ids 0, 2

    def ids() -> list[int]:
        return sorted(entry["id"] for entry in buffer.entries())

    assert ids() == [1, 3, 4, 5, 6]
    fill(buffer, ["dream", "dream"])  # ids 7, 8 evict the last regular (4), then the oldest dream (1)
    assert ids() == [3, 5, 6, 7, 8]
    added = fill(buffer, ["regular"])  # a full Dream Queue: the newcomer is itself the oldest-ranked regular
    assert added["evicted"] == 1 and added["stored"] == 0 and ids() == [3, 5, 6, 7, 8]
    assert buffer.replay_stats()["total_evicted"] == 5


def test_tune_pruning_moves_the_band_both_ways(cfg):
    buffer = ReplayBuffer(cfg, "cosmocore", seed=0)
    confident, unsure = np.full(10, 0.5), np.linspace(-1, 1, 10)
    steps = [buffer.tune_pruning(confident) for _ in range(10)]
    assert steps[0] == pytest.approx(cfg.prune_valence + cfg.prune_step)
    assert max(steps) == steps[-1] == cfg.prune_valence_max  # capped
    assert buffer.add([{"id": -1}], [0.25], [0.1], [0.0])["pruned"] == 1  # the wider band is used
    back = [buffer.tune_pruning(unsure) for _ in range(10)]
    assert back[0] == pytest.approx(cfg.prune_valence_max - cfg.prune_step)
    assert back[-1] == cfg.prune_valence  # never below the configured band
    assert buffer.replay_stats()["prune_valence"] == cfg.prune_valence


# ---- persistence ----------------------------------------------------------------------------------


def busy_buffer(cfg: BufferConfig) -> ReplayBuffer:
    buffer = ReplayBuffer(with_(cfg, capacity=64), "cosmocore", seed=7)
    rng = np.random.default_rng(0)
    for _ in range(4):
        fill(buffer, list(rng.choice(GATES, 30)), td=rng.uniform(0, 1, 30))
        batch = buffer.sample(16, 0.3)
        buffer.update_priorities(batch.indices, rng.normal(size=16))
    buffer.tune_pruning(np.full(5, 0.1))
    return buffer


def assert_same_future(a, b, new: list[dict] | None = None, batch_size: int = 16) -> None:
    """Two buffers (a `ReplayBuffer` or a `mixing.KindMix`) that serve the same minibatches, weights and
    flags, take the same priority updates alike, and gate `new` entries alike from here on."""
    assert len(a) == len(b) and a.replay_stats() == pytest.approx(b.replay_stats(), nan_ok=True)
    for step in range(5):
        x, y = a.sample(batch_size, step / 5), b.sample(batch_size, step / 5)
        assert np.array_equal(x.indices, y.indices) and x.entries == y.entries
        assert np.array_equal(x.is_weights, y.is_weights) and np.array_equal(x.from_dream, y.from_dream)
        a.update_priorities(x.indices, np.arange(float(batch_size)))
        b.update_priorities(y.indices, np.arange(float(batch_size)))
    new = new or [{"id": "new"}]
    affect = ([-0.9] * len(new), [0.9] * len(new), [0.0] * len(new))
    assert a.add(new, *affect) == b.add(new, *affect)


def test_save_load_round_trips_exactly(cfg, tmp_path):
    buffer = busy_buffer(cfg)
    buffer.save(tmp_path / "buffer.pkl")
    loaded = ReplayBuffer.load(tmp_path / "buffer.pkl", with_(cfg, capacity=64))
    assert loaded.prune_valence == buffer.prune_valence
    assert_same_future(buffer, loaded)
    assert os.listdir(tmp_path) == ["buffer.pkl"]  # no temp file left behind


def test_failed_save_keeps_the_previous_file(cfg, tmp_path, monkeypatch):
    path = tmp_path / "buffer.pkl"
    buffer = busy_buffer(cfg)
    buffer.save(path)
    fill(buffer, ["dream"] * 5)

    def crash(*args):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        buffer.save(path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["buffer.pkl"]
    assert_same_future(ReplayBuffer.load(path, with_(cfg, capacity=64)), busy_buffer(cfg))


KILL_POINTS = {
    # half of the pickle written to the temp file, then killed
    "mid_write": "pickle.dump = lambda obj, handle, protocol=None: (handle.write(pickle.dumps(obj)[:200]), "
    "handle.flush(), os.kill(os.getpid(), signal.SIGKILL))",
    # the whole temp file written, killed before the rename
    "before_rename": "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)",
}


@pytest.mark.parametrize("kill_point", KILL_POINTS)
def test_save_killed_midway_leaves_a_loadable_buffer(cfg, tmp_path, kill_point):
    path = tmp_path / "buffer.pkl"
    busy_buffer(cfg).save(path)
    script = textwrap.dedent(f"""
        import os, pickle, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_buffer import busy_buffer, fill
        from cosmocore.config import load_params
        buffer = busy_buffer(load_params({str(ROOT / "params.yaml")!r}).buffer)
        fill(buffer, ["dream"] * 5)
        {KILL_POINTS[kill_point]}
        buffer.save({str(path)!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert any(name.endswith(".tmp") for name in os.listdir(tmp_path))  # it died with the new file unfinished
    assert_same_future(ReplayBuffer.load(path, with_(cfg, capacity=64)), busy_buffer(cfg))


def test_load_explains_missing_corrupt_and_mismatched_files(cfg, tmp_path):
    with pytest.raises(BufferFileError, match="not found"):
        ReplayBuffer.load(tmp_path / "absent.pkl", cfg)
    (tmp_path / "garbage.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(BufferFileError, match="corrupt"):
        ReplayBuffer.load(tmp_path / "garbage.pkl", cfg)
    busy_buffer(cfg).save(tmp_path / "good.pkl")
    data = (tmp_path / "good.pkl").read_bytes()
    (tmp_path / "torn.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(BufferFileError, match="corrupt"):
        ReplayBuffer.load(tmp_path / "torn.pkl", with_(cfg, capacity=64))
    with pytest.raises(BufferFileError, match="capacity"):
        ReplayBuffer.load(tmp_path / "good.pkl", cfg)
