"""Trained policies as MLflow models: the train stage logs each run's policy with `log_policy` and registers
it as `cosmocore-<variant>`, one version per training run, so that MLflow alone can answer with it:

    policy = mlflow.pyfunc.load_model("models:/cosmocore-grpo/1")
    policy.predict(prompts)  # code prompts (a signature and docstring), or a DataFrame with a `prompt` column

returns one `Answer` per code prompt: the policy's greedy `completion`, and the `program` evaluation would run
for it (the prompt plus the answer's code, "" when the answer holds none), written by the evaluation's own
path (`cosmocore.rl.rollout.complete_prompts`). Over the REST API of `mlflow models serve` each is an object
with those two fields.

The model is this file, logged as code (MLflow's "models from code": nothing pickled), with the base model
folder (only its config and tokenizer for a full fine-tune, which carries its own weights), the trained policy
folder and the model and rollout configs as artifacts. The `cosmocore` package goes along with it (`code_paths`)
rather than being required where the model is served: a registered version then answers with the prompt
building, decode loop and code extraction it was trained and evaluated with, whatever cosmocore is installed
there, and the serving environment needs only the pinned third-party packages of its requirements.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import pydantic
from mlflow.pyfunc import PythonModel

import cosmocore
from cosmocore.config import ModelConfig, RolloutConfig
from cosmocore.policy.models import load_policy
from cosmocore.policy.prompts import resolve_style
from cosmocore.rl.rollout import complete_prompts

if TYPE_CHECKING:
    from flows.tracking import Tracker

# The third-party packages that loading and running a policy imports (cosmocore.policy.models, cosmocore.rl.rollout
# and what they import), pinned to the versions it was logged with.
SERVING_PACKAGES = ("torch", "transformers", "peft", "pydantic", "pandas", "pyyaml", "pyflakes", "tqdm")
EXAMPLE = ['def add(a, b):\n    """Return a + b."""\n']


class Answer(pydantic.BaseModel):
    completion: str  # the policy's greedy answer, decoded
    program: str  # what evaluation would run: the prompt plus the answer's code, "" when there is none


class Policy(PythonModel):
    """A trained policy over the project's own loader, on this machine's GPU when it has one."""

    def load_context(self, context) -> None:
        cfg = ModelConfig.model_validate_json(Path(context.artifacts["model_config"]).read_text())
        self.rollout = RolloutConfig.model_validate_json(Path(context.artifacts["rollout_config"]).read_text())
        self.model, self.tokenizer = load_policy(context.artifacts["base"], cfg.model_copy(update={"device": "auto"}),
                                                 trained=context.artifacts["policy"])
        self.style = resolve_style(cfg.prompt_style, self.tokenizer)

    def predict(self, context, model_input: list[str], params=None) -> list[Answer]:
        answers = complete_prompts(self.model, self.tokenizer, model_input, self.rollout, self.style)
        return [Answer(completion=completion, program=program) for completion, program in answers]


mlflow.models.set_model(Policy())


def log_policy(tracker: Tracker, variant: str, model_dir: Path, policy_dir: Path, config_dir: Path) -> str:
    """Log the policy trained in `policy_dir` over the base model in `model_dir` as a model of the tracker's run,
    registered as `cosmocore-<variant>`; returns the version's `models:/` URI."""
    with tempfile.TemporaryDirectory() as scratch:
        base = model_dir
        if not (policy_dir / "adapter_config.json").is_file():  # a full fine-tune: the base's weights are not used
            base = Path(scratch) / "base"
            shutil.copytree(model_dir, base, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
        model = tracker.client.create_logged_model(tracker.experiment_id, name="policy", source_run_id=tracker.run_id,
                                                   tags={"variant": variant})
        info = mlflow.models.Model.log(
            artifact_path=None, name="policy", flavor=mlflow.pyfunc, run_id=tracker.run_id, model_id=model.model_id,
            python_model=Path(__file__), code_paths=[str(Path(cosmocore.__file__).parent)],
            artifacts={"base": str(base), "policy": str(policy_dir), "model_config": str(config_dir / "model.json"),
                       "rollout_config": str(config_dir / "rollout.json")},
            input_example=EXAMPLE, registered_model_name=f"cosmocore-{variant}",
            pip_requirements=[f"{name}=={importlib.metadata.version(name)}" for name in SERVING_PACKAGES],
        )
    return f"models:/cosmocore-{variant}/{info.registered_model_version}"
