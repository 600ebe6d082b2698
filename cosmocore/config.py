"""The typed configuration: `params.yaml` is read once, here, and nowhere else.

`resolve_params` merges the selected profile over the base sections and validates the result;
`write_sections` writes one JSON file per section (the DVC graph's first stage), so a stage depends
only on the sections it reads and a change re-runs exactly what it affects. Stages load their
sections back with `load_section`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from cosmocore.errors import CosmoCoreError
from cosmocore.variants import VARIANTS

DASK_ADDRESS_ENV = "COSMOCORE_DASK_ADDRESS"  # overrides sandbox.dask_address (`sandbox.runner.Sandbox`)
LABELS_FOLDER = "labels"  # human affect labels live here (`affect.labels_csv`); the train stage depends on it

VariantName = Literal[VARIANTS]  # everything that differs between variants: `variants.REGISTRY`

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Positive = Annotated[float, Field(gt=0.0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class ConfigError(CosmoCoreError, ValueError):
    """A bad `params.yaml`: the message names the key and says what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class StudyConfig(Section):
    variants: list[VariantName] = Field(min_length=1)
    seeds: list[NonNegativeInt] = Field(min_length=1)


Benchmark = Literal["humaneval", "bigcodebench"]


class DataConfig(Section):
    humaneval: bool
    bigcodebench: bool
    # Cross-benchmark: the benchmarks whose training split is trained on, and those whose held-out split
    # is evaluated on (empty: every enabled benchmark).
    train_benchmarks: list[Benchmark]
    eval_benchmarks: list[Benchmark]
    bigcodebench_path: str
    bigcodebench_hub_id: str
    bigcodebench_hub_split: str
    bigcodebench_allowed_libs: list[str]
    allow_missing_bigcodebench: bool
    eval_fraction: Annotated[float, Field(gt=0.0, lt=1.0)]
    split_seed: NonNegativeInt
    max_train_tasks: NonNegativeInt
    max_eval_tasks: NonNegativeInt
    max_invalid_fraction: Fraction

    @field_validator("train_benchmarks", "eval_benchmarks")
    @classmethod
    def _chosen_are_enabled(cls, value: list[str], info: ValidationInfo) -> list[str]:
        disabled = [name for name in value if info.data.get(name) is False]
        if disabled:
            raise ValueError(f"chooses {disabled[0]}, which 'data.{disabled[0]}: false' disables: enable it, "
                             "or leave it out of the list")
        return value


class SandboxConfig(Section):
    isolation: Literal["auto", "bwrap", "unshare", "none"]
    workers: NonNegativeInt
    cpu_seconds: Positive
    wall_seconds: Positive
    memory_mb: PositiveInt
    max_processes: PositiveInt
    max_open_files: Annotated[int, Field(ge=16)]
    max_output_bytes: PositiveInt
    max_file_mb: PositiveInt
    stderr_chars: PositiveInt
    tmpfs_mb: PositiveInt
    preload_modules: list[str]
    hide_paths: list[str]
    dask_address: str  # DASK_ADDRESS_ENV, when set (even to ""), overrides it


class ModelConfig(Section):
    source: str = Field(min_length=1)
    device: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"]
    prompt_style: Literal["auto", "chat", "completion"]
    tiny_arch: Literal["llama", "t5"]
    tiny_layers: PositiveInt
    tiny_hidden: Annotated[int, Field(ge=16)]
    threads: NonNegativeInt

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value


class RolloutConfig(Section):
    samples_per_task: PositiveInt
    max_new_tokens: PositiveInt
    temperature: Positive
    top_p: Annotated[float, Field(gt=0.0, le=1.0)]
    batch_size: int | Literal["auto"]
    max_prompt_tokens: PositiveInt
    on_long_prompt: Literal["truncate", "skip"]

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value: object) -> object:
        if value != "auto" and not (type(value) is int and value > 0):
            raise ValueError("must be auto or a positive number of rows")
        return value


RewardValue = Annotated[float, Field(ge=-1.0, le=1.0)]


class RewardConfig(Section):
    passed: RewardValue
    wrong_answer: RewardValue
    use_test_share: bool
    syntax_error: RewardValue
    runtime_error: RewardValue
    timeout: RewardValue
    memory_limit: RewardValue
    no_code: RewardValue
    sandbox_violation: RewardValue
    hallucination_penalty: Annotated[float, Field(ge=-2.0, le=0.0)]


class AffectConfig(Section):
    hidden_units: PositiveInt
    epochs: PositiveInt
    batch_size: PositiveInt
    lr: Positive
    weight_decay: Annotated[float, Field(ge=0.0)]
    holdout_fraction: Annotated[float, Field(ge=0.0, lt=1.0)]
    valence_scale: Positive
    running_mean_decay: Fraction
    labels_csv: str

    @field_validator("labels_csv")
    @classmethod
    def _labels_under_labels_folder(cls, value: str) -> str:
        # the train stage depends on the labels/ folder: a file elsewhere would change unseen by DVC
        if value and Path(value).parts[0] != LABELS_FOLDER:
            raise ValueError(f"put the labels file under {LABELS_FOLDER}/ (the train stage's DVC dependency), "
                             f"e.g. {LABELS_FOLDER}/{Path(value).name}")
        return value


class BufferConfig(Section):
    capacity: PositiveInt
    dream_valence: Annotated[float, Field(ge=-1.0, le=1.0)]
    dream_arousal: Fraction
    prune_valence: Fraction
    prune_arousal: Fraction
    prune_entropy: Annotated[float, Field(ge=0.0)]
    priority_lambda: Annotated[float, Field(ge=0.0)]
    priority_epsilon: Positive
    priority_alpha: Annotated[float, Field(ge=0.0)]
    dream_fraction: Fraction
    beta_start: Fraction
    confidence_std: Annotated[float, Field(ge=0.0)]
    prune_step: Annotated[float, Field(ge=0.0)]
    prune_valence_max: Fraction
    success_replay_share: Annotated[float, Field(ge=0.0)]  # `success_replay`: kept successes added per minibatch, × B
    success_max_pass_rate: Fraction  # `success_replay`: a task is hard when at most this share of its samples passed


class TrainConfig(Section):
    iterations: PositiveInt
    updates_per_iteration: PositiveInt
    minibatch_size: PositiveInt
    grad_accumulation: PositiveInt
    lr: Positive
    value_lr: Positive
    clip_ratio: Annotated[float, Field(gt=0.0, lt=1.0)]
    entropy_coef: Annotated[float, Field(ge=0.0)]
    kl_coef: Annotated[float, Field(ge=0.0)]
    value_coef: Annotated[float, Field(ge=0.0)]
    # The critic V(s) replaces the task's running mean reward as the advantage baseline only once the
    # share of the reward's variance it explains (an average over its last updates) reaches this.
    critic_min_explained_variance: Annotated[float, Field(le=1.0)]
    max_grad_norm: Positive
    lora: bool
    lora_rank: PositiveInt
    lora_alpha: Positive
    lora_dropout: Annotated[float, Field(ge=0.0, lt=1.0)]
    keep_checkpoints: PositiveInt
    processes: PositiveInt  # data-parallel processes (`cosmocore.rl.distributed`): one per GPU, or CPU processes

    @property
    def updates_budget(self) -> int:
        """The most optimizer updates a run makes (on-policy variants may make fewer): the horizon of
        time to correction in updates, the same for every variant."""
        return self.iterations * self.updates_per_iteration


class EvalConfig(Section):
    samples_per_task: PositiveInt
    k: list[PositiveInt] = Field(min_length=1)
    temperature: Positive
    greedy: bool
    repair_rounds: NonNegativeInt  # self-repair: rounds of feeding the execution error back (0 = off)
    repair_k: list[PositiveInt]  # repair@k reported for each k (each at most repair_rounds)

    @model_validator(mode="after")
    def _repair_k(self) -> EvalConfig:
        too_many = [k for k in self.repair_k if k > self.repair_rounds]
        if too_many:
            raise ValueError(f"repair_k {too_many} exceeds repair_rounds ({self.repair_rounds})")
        return self


class AlignmentConfig(Section):
    """CodeRL+ execution-semantics alignment: tasks that ask the policy what its own code computes."""

    share: Fraction  # share of alignment samples among each iteration's samples, and in every nocturnal minibatch
    source: Literal["failed", "all"]  # which executed rollouts feed alignment tasks
    max_variables: NonNegativeInt  # final values of the last N locals the traced function assigned
    max_value_chars: Annotated[int, Field(ge=16)]  # a longer value is cut by the tracer, so it is not asked
    min_lines: NonNegativeInt  # executed line events of the traced call: fewer is too trivial ...
    max_lines: Annotated[int, Field(gt=0, lt=256)]  # ... more is too long to simulate (the tracer keeps 256)
    samples_per_task: PositiveInt  # answers sampled per alignment task
    max_new_tokens: PositiveInt  # a JSON answer is short
    eval_tasks: NonNegativeInt  # held-out tasks in the output-prediction (CRUXEval-O style) evaluation

    @model_validator(mode="after")
    def _line_band(self) -> AlignmentConfig:
        if self.min_lines > self.max_lines:
            raise ValueError(f"min_lines ({self.min_lines}) must not exceed max_lines ({self.max_lines})")
        return self


class TrackingConfig(Section):
    experiment: str = Field(min_length=1)
    tracking_uri: str
    log_models: bool


class Config(Section):
    """The whole resolved configuration, one attribute per `params.yaml` section."""

    profile: str
    study: StudyConfig
    data: DataConfig
    sandbox: SandboxConfig
    model: ModelConfig
    rollout: RolloutConfig
    reward: RewardConfig
    affect: AffectConfig
    buffer: BufferConfig
    train: TrainConfig
    eval: EvalConfig
    alignment: AlignmentConfig
    tracking: TrackingConfig


SECTIONS = tuple(name for name in Config.model_fields if name != "profile")


class YamlLoader(yaml.SafeLoader):
    """The safe loader, also reading an exponent without a dot (`1e-5`, how DVC's `-S` writes small floats
    into params.yaml) as a number, where YAML 1.1 reads a string."""


YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                 list("-+.0123456789"))


def yaml_value(text: str) -> Any:
    """One value written in YAML, as params.yaml's are read."""
    return yaml.load(text, Loader=YamlLoader)
S = TypeVar("S", bound=Section)


def _merge(base: dict[str, Any], override: dict[str, Any], where: str) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if key not in base:
            raise ConfigError(f"params.yaml: unknown key '{where}{key}' (known: {', '.join(sorted(base))})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"params.yaml: '{where}{key}' must be a mapping")
            merged[key] = _merge(base[key], value, f"{where}{key}.")
        else:
            merged[key] = value
    return merged


def _explain(error: ValidationError, prefix: str = "") -> ConfigError:
    lines = []
    for item in error.errors():
        key = prefix + ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}': remove it or check its spelling")
        else:
            lines.append(f"'{key}': {item['msg']} (got {item.get('input')!r})")
    return ConfigError("params.yaml: " + "; ".join(lines))


def resolve_params(raw: dict[str, Any]) -> Config:
    """Merge `raw['profiles'][raw['profile']]` over the base sections and validate everything."""
    if not isinstance(raw, dict):
        raise ConfigError("params.yaml must be a mapping of sections")
    raw = dict(raw)
    profiles = raw.pop("profiles", {}) or {}
    profile = raw.get("profile", "default")
    if not isinstance(profile, str) or profile not in profiles:
        raise ConfigError(f"params.yaml: 'profile' is {profile!r}; choose one of: {', '.join(profiles)}")
    for name, override in profiles.items():
        if not isinstance(override, dict):
            raise ConfigError(f"params.yaml: 'profiles.{name}' must be a mapping (use {{}} for no overrides)")
    unknown = [key for key in raw if key != "profile" and key not in SECTIONS]
    if unknown:
        raise ConfigError(f"params.yaml: unknown key '{unknown[0]}' (sections: {', '.join(SECTIONS)})")
    for name, override in profiles.items():  # a typo in any profile fails now, not when it is selected
        _merge(raw, override, f"profiles.{name}.")
    merged = _merge(raw, profiles[profile], f"profiles.{profile}.")
    try:
        return Config.model_validate(merged)
    except ValidationError as error:
        raise _explain(error) from None


def override(raw: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """`raw` with `section.key=value` assignments (values in YAML: `train.lr=1e-5`, `train.lora=false`,
    `study.variants=[grpo,nsr]`) laid over the selected profile, so they win over it; validation then
    checks them like any other key."""
    raw = dict(raw)
    profile = raw.get("profile", "default")
    profiles = {name: dict(body or {}) for name, body in (raw.get("profiles") or {}).items()}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"override {assignment!r}: write section.key=value, e.g. train.lr=1e-5")
        section, name = parts
        try:
            value = yaml_value(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"override {assignment!r}: the value is not valid YAML ({error})") from None
        if section == "study":  # outside the profiles (DVC builds its matrix from it)
            raw[section] = {**raw.get(section, {}), name: value}
            continue
        if profile in profiles:
            body = profiles[profile]
            body[section] = {**(body.get(section) or {}), name: value}
    raw["profiles"] = profiles
    return raw


def load_params(path: str | os.PathLike = "params.yaml", profile: str | None = None, overrides: list[str] = ()) -> Config:
    """The validated config of `path`, with `profile` (when given) in place of the file's own choice and
    `overrides` (`section.key=value`, see `override`) over it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the repository root, or pass --params PATH")
    try:
        raw = yaml_value(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of sections")
    if profile is not None:
        raw["profile"] = profile
    return resolve_params(override(raw, list(overrides)))


def write_sections(config: Config, folder: str | os.PathLike) -> list[Path]:
    """One JSON file per section, written only when its content changed (keeps mtimes stable)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("profile", *SECTIONS):
        value = getattr(config, name)
        payload = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        path = folder / f"{name}.json"
        text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        written.append(path)
    return written


def load_section(folder: str | os.PathLike, section: type[S]) -> S:
    """Read one resolved section written by `write_sections`."""
    name = next(key for key, field in Config.model_fields.items() if field.annotation is section)
    path = Path(folder) / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: run `dvc repro config` (or `cosmocore config`) first")
    try:
        return section.model_validate_json(path.read_text(), strict=False)
    except ValidationError as error:
        detail = str(_explain(error, prefix=f"{name}.")).removeprefix("params.yaml: ")
        raise ConfigError(f"{path} does not match this version of CosmoCore ({detail}): "
                          "re-run `dvc repro config` (or `cosmocore config`)") from None


def load_config(folder: str | os.PathLike) -> Config:
    """All resolved sections at once (flows that need most of them)."""
    folder = Path(folder)
    values: dict[str, Any] = {"profile": json.loads((folder / "profile.json").read_text())}
    for name in SECTIONS:
        values[name] = load_section(folder, Config.model_fields[name].annotation)
    return Config.model_validate(values)
