"""The variant registry is the one place variants are defined: config validation, the buffer, the
CodeRL+ mixing, the trainer's critic and the report all read it."""

import pytest
from pydantic import ValidationError

from cosmocore.config import StudyConfig, load_params
from cosmocore.evaluation.report import CONTROLS, TREATMENT
from cosmocore.rl.mixing import KindMix, make_buffer
from cosmocore.variants import REGISTRY, VARIANTS
from tests.conftest import REPO


@pytest.fixture(scope="module")
def cfg():
    return load_params(REPO / "params.yaml")


@pytest.mark.parametrize("name", VARIANTS)
def test_every_registered_variant_is_accepted_and_builds_its_buffer(cfg, name):
    assert StudyConfig(**{**cfg.study.model_dump(), "variants": [name]}).variants == [name]
    buffer = make_buffer(cfg.buffer, name, 0, cfg.alignment.share)
    assert isinstance(buffer, KindMix) == REGISTRY[name].alignment


def test_an_unregistered_variant_is_refused_with_the_choices(cfg):
    with pytest.raises(ValidationError, match="cosmocore_no_prune"):
        StudyConfig(**{**cfg.study.model_dump(), "variants": ["ppo"]})


def test_the_report_compares_the_treatment_with_registered_controls():
    assert TREATMENT in REGISTRY and not REGISTRY[TREATMENT].control
    assert set(CONTROLS) - {"base"} == {name for name, variant in REGISTRY.items() if variant.control}


def test_only_the_running_mean_baseline_hands_over_to_a_critic():
    assert {name for name, variant in REGISTRY.items() if variant.use_critic} == {
        name for name, variant in REGISTRY.items() if variant.serving.baseline == "expected"}
    assert not REGISTRY["grpo"].use_critic and REGISTRY["cosmocore"].use_critic
