import copy
import re

import pytest
import yaml

from cosmocore.config import (
    SECTIONS,
    ConfigError,
    TrainConfig,
    load_config,
    load_params,
    load_section,
    resolve_params,
    write_sections,
)
from tests.conftest import REPO

RAW = yaml.safe_load((REPO / "params.yaml").read_text())


def mutated(change):
    raw = copy.deepcopy(RAW)
    change(raw)
    return raw


def test_every_profile_resolves():
    for name in RAW["profiles"]:
        config = resolve_params(mutated(lambda raw: raw.__setitem__("profile", name)))
        assert config.profile == name


def test_smoke_profile_overrides_only_what_it_changes():
    smoke = resolve_params(mutated(lambda raw: raw.__setitem__("profile", "smoke")))
    default = resolve_params(RAW)
    assert smoke.model.source == "tiny" and default.model.source == "embedded"
    assert smoke.buffer == default.buffer  # untouched sections are the base values


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda raw: raw["train"].__setitem__("lr", -0.1), "train.lr"),
        (lambda raw: raw["buffer"].__setitem__("dream_arousal", 1.5), "buffer.dream_arousal"),
        (lambda raw: raw["train"].__setitem__("iterations", "two"), "train.iterations"),
        (lambda raw: raw["train"].__setitem__("learning_rate", 0.1), "train.learning_rate"),
        (lambda raw: raw.__setitem__("trainer", {}), "trainer"),
        (lambda raw: raw["profiles"]["smoke"]["train"].__setitem__("itrations", 1), "profiles.smoke.train.itrations"),
        (lambda raw: raw["study"].__setitem__("variants", ["cosmo"]), "study.variants"),
        (lambda raw: raw.__setitem__("profile", "nightly"), "profile"),
        (lambda raw: raw["model"].__setitem__("device", "gpu"), "model.device"),
        (lambda raw: raw["rollout"].__setitem__("batch_size", "max"), "rollout.batch_size"),
        (lambda raw: raw["rollout"].__setitem__("batch_size", 0), "rollout.batch_size"),
    ],
)
def test_bad_params_fail_naming_the_key(change, key):
    with pytest.raises(ConfigError) as error:
        resolve_params(mutated(change))
    assert f"'{key}" in str(error.value)


def test_missing_params_file_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="run from the repository root"):
        load_params(tmp_path / "params.yaml")


def test_sections_round_trip_and_are_stable(tmp_path, config):
    paths = write_sections(config, tmp_path)
    assert {p.stem for p in paths} == {"profile", *SECTIONS}
    mtimes = [p.stat().st_mtime_ns for p in paths]
    write_sections(config, tmp_path)  # unchanged content: files untouched, so DVC sees no change
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    assert load_section(tmp_path, TrainConfig) == config.train
    assert load_config(tmp_path) == config


def test_overrides_lie_over_the_selected_profile_and_are_validated():
    params = REPO / "params.yaml"
    cfg = load_params(params, profile="smoke", overrides=["train.lr=0.5", "train.lora=false", "study.variants=[grpo,nsr]"])
    assert cfg.profile == "smoke" and cfg.train.lr == 0.5 and cfg.train.lora is False and cfg.study.variants == ["grpo", "nsr"]
    assert cfg.model.source == "tiny"  # the rest of the profile stands
    for bad, named in (("train.lr=fast", "train.lr"), ("train.lrr=1", "train.lrr"), ("trainlr=1", "section.key=value"),
                       ("study.variants=[dreamy]", "study.variants")):
        with pytest.raises(ConfigError, match=re.escape(named)):
            load_params(params, overrides=[bad])


def test_an_exponent_without_a_dot_is_a_number(tmp_path):
    """`1e-5` as an override, and as DVC's `-S` writes a small float into params.yaml (YAML 1.1 reads a string)."""
    assert load_params(REPO / "params.yaml", "smoke", ["train.lr=1e-5"]).train.lr == 1e-5
    text = (REPO / "params.yaml").read_text().replace("lr: 0.00002", "lr: 2e-05")
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(tmp_path / "params.yaml", "bench_cpu").train.lr == 2e-5
