"""A trained policy logged as an MLflow model answers from MLflow alone as evaluation writes its programs."""

from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml

from cosmocore.policy.models import load_policy
from cosmocore.policy.prompts import resolve_style
from cosmocore.rl.rollout import complete_prompts
from cosmocore.rl.trainer import build_learner, save_policy
from flows.registry import log_policy
from flows.tracking import RUN_KEY, Tracker
from tests.test_trainer import learner_with_live_adapters

PROMPTS = ['def add(a, b):\n    """Return a + b."""\n', 'def is_even(n: int) -> bool:\n    """Whether n is even."""\n']


def _full_fine_tune(model_dir, config):
    model, tokenizer = load_policy(model_dir, config.model)
    learner = build_learner(model, config.train.model_copy(update={"lora": False}), tokenizer.pad_token_id, 0.8)
    with torch.no_grad():
        for weight in learner.model.parameters():
            weight.add_(0.01 * torch.randn_like(weight))
    return learner


@pytest.mark.parametrize("model_dir, lora", [("tiny_model_dir", True), ("tiny_t5_dir", False)],
                         ids=["causal-lora", "seq2seq-full"])
def test_a_registered_policy_answers_from_mlflow_alone(model_dir, lora, config, request, tmp_path, monkeypatch):
    model_dir = Path(request.getfixturevalue(model_dir))
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv(RUN_KEY, raising=False)
    rollout = config.rollout.model_copy(update={"max_new_tokens": 12})
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "model.json").write_text(config.model.model_dump_json())
    (config_dir / "rollout.json").write_text(rollout.model_dump_json())
    learner = learner_with_live_adapters(model_dir, config)[0] if lora else _full_fine_tune(model_dir, config)
    save_policy(learner, tmp_path / "policy")

    with Tracker(config_dir, config.tracking, "train", "smoke", tags={"variant": "grpo", "seed": 0}) as tracker:
        uri = log_policy(tracker, "grpo", model_dir, tmp_path / "policy", config_dir)
    assert uri == "models:/cosmocore-grpo/1"

    model, tokenizer = load_policy(model_dir, config.model, trained=tmp_path / "policy")
    expected = complete_prompts(model, tokenizer, PROMPTS, rollout, resolve_style(config.model.prompt_style, tokenizer))
    served = mlflow.pyfunc.load_model(uri)
    for answers in (served.predict(PROMPTS), served.predict(pd.DataFrame({"prompt": PROMPTS}))):
        assert [(a.completion, a.program) for a in answers] == expected
    assert all(completion for completion, _ in expected)
    saved = Path(mlflow.artifacts.download_artifacts(uri))
    assert (saved / "code" / "cosmocore" / "rl" / "rollout.py").is_file()  # the package goes along
    base = yaml.safe_load((saved / "MLmodel").read_text())["flavors"]["python_function"]["artifacts"]["base"]["path"]
    assert any((saved / base).glob("*.safetensors")) == lora  # a full fine-tune carries no base weights
