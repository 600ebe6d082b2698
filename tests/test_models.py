"""The model loader: each way of naming a policy, and a clear error for each way it can be missing."""

import pytest
import torch

from cosmocore.errors import ModelUnavailable
from cosmocore.policy.models import embedded_gguf, load_policy, materialise, pick_dtype


def test_the_embedded_gguf_ships_with_its_package():
    assert embedded_gguf().suffix == ".gguf"


def test_tiny_model_shares_the_embedded_tokenizer(tiny_model_dir, config):
    model, tokenizer = load_policy(tiny_model_dir, config.model)
    assert model.config.num_hidden_layers == config.model.tiny_layers
    assert tokenizer.chat_template and tokenizer.pad_token_id is not None
    assert tokenizer.padding_side == "left"


def test_a_local_folder_is_copied_as_the_base_policy(tiny_model_dir, config, tmp_path):
    out = materialise(config.model.model_copy(update={"source": str(tiny_model_dir)}), tmp_path / "base")
    model, _ = load_policy(out, config.model)
    assert model.config.hidden_size == config.model.tiny_hidden


NOT_A_MODEL = {  # what the folder holds: the error names it
    "nowhere": (None, "is not a folder"),
    "empty": ({}, r"holds no model \(config\.json missing\)"),
    "garbage": ({"config.json": "{ not json"}, r"config\.json is not valid JSON"),
    "a list": ({"config.json": "[1, 2]"}, r"config\.json names no model_type"),
    "no type": ({"config.json": "{}"}, r"config\.json names no model_type"),
}


def _not_a_model(tmp_path, case: str):
    files, _ = NOT_A_MODEL[case]
    folder = tmp_path / case
    if files is not None:
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("case", sorted(NOT_A_MODEL))
def test_a_folder_that_is_not_a_model_names_itself_and_what_a_model_folder_holds(config, tmp_path, case):
    """Given to `load_policy` or as `model.source`; `materialise` then writes nothing."""
    folder, expected = _not_a_model(tmp_path, case), NOT_A_MODEL[case][1]
    with pytest.raises(ModelUnavailable, match=expected + r".*`dvc repro model`.*a model folder holds config\.json") as caught:
        load_policy(folder, config.model)
    assert str(folder) in str(caught.value)
    cfg = config.model.model_copy(update={"source": str(folder)})
    with pytest.raises(ModelUnavailable, match=expected + r".*point model\.source at.*a model folder holds config\.json"):
        materialise(cfg, tmp_path / "base")
    assert not (tmp_path / "base").exists() and not list(tmp_path.glob(".base*"))


def test_a_model_folder_without_weights_says_what_to_do(config, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelUnavailable, match=r"(?s)not a readable causal or encoder-decoder LM.*delete it"):
        load_policy(tmp_path, config.model)


def test_cuda_requested_without_cuda_fails_clearly(config, tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error under test cannot happen here")
    with pytest.raises(ModelUnavailable, match="CUDA is not available"):
        load_policy(tiny_model_dir, config.model.model_copy(update={"device": "cuda"}))


def test_the_embedded_tokenizer_is_read_once_and_kept_the_same(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from cosmocore.policy.models import load_embedded_tokenizer, tokenizer_cache

    monkeypatch.setenv("COSMOCORE_CACHE", str(tmp_path))
    first = load_embedded_tokenizer()  # from the GGUF, then kept
    kept = list(tokenizer_cache().iterdir())
    assert len(kept) == 1 and kept[0].name.startswith(embedded_gguf().stem)
    again = load_embedded_tokenizer()  # from the kept folder
    gguf = embedded_gguf()
    reference = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "def add(a, b):\n    return a + b  # ünïcode, tabs\t and  spaces\n"
    messages = [{"role": "user", "content": text}]
    for tokenizer in (first, again):
        assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
        assert tokenizer.apply_chat_template(messages, tokenize=False) == reference.apply_chat_template(messages, tokenize=False)
        assert (tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)) == (reference.eos_token_id, reference.pad_token_id, len(reference))


def test_a_fully_fine_tuned_policy_loads_in_place_of_the_base(tiny_model_dir, config, tmp_path):
    """Evaluation loads what training saved: without LoRA that is the whole model, not an adapter."""
    from cosmocore.rl.trainer import build_learner, save_policy

    model, tokenizer = load_policy(tiny_model_dir, config.model)
    learner = build_learner(model, config.train.model_copy(update={"lora": False}), tokenizer.pad_token_id, 1.0)
    with torch.no_grad():
        learner.model.lm_head.weight.add_(0.5)  # tied to the embeddings: a change every forward pass sees
    save_policy(learner, tmp_path / "policy")
    trained, _ = load_policy(tiny_model_dir, config.model, trained=tmp_path / "policy")
    torch.testing.assert_close(trained.lm_head.weight, learner.model.lm_head.weight)


def test_a_lora_policy_loads_merged_and_scores_as_it_trained(tiny_model_dir, config, tmp_path):
    """Evaluation loads a LoRA policy with its adapters merged into the weights: the same function, fewer kernels."""
    from cosmocore.policy.interface import score
    from cosmocore.rl.trainer import save_policy
    from tests.test_trainer import learner_with_live_adapters

    learner, tokenizer = learner_with_live_adapters(tiny_model_dir, config)
    save_policy(learner, tmp_path / "policy")
    evaluated, _ = load_policy(tiny_model_dir, config.model, trained=tmp_path / "policy")
    assert not any("lora" in name for name, _ in evaluated.named_modules())
    prompts, completions = [[5, 6, 7, 8], [9, 10, 11]], [[12, 13], [14, 15, 16]]
    with torch.no_grad():
        expected = score(learner.model.eval(), prompts, completions, tokenizer.pad_token_id).logprobs
        base = score(load_policy(tiny_model_dir, config.model)[0], prompts, completions, tokenizer.pad_token_id).logprobs
        merged = score(evaluated, prompts, completions, tokenizer.pad_token_id).logprobs
    torch.testing.assert_close(merged, expected)
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapters mattered


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_dtype_is_bf16_where_the_gpu_has_it_and_never_fp16(config, monkeypatch, bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    auto = config.model.model_copy(update={"dtype": "auto"})
    assert pick_dtype(auto, torch.device("cuda")) == (torch.bfloat16 if bf16 else torch.float32)
    assert pick_dtype(auto, torch.device("cpu")) == torch.float32
    assert pick_dtype(auto.model_copy(update={"dtype": "float16"}), torch.device("cuda")) == torch.float16
