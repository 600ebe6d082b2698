"""The nocturnal update's own forward pass, on both architectures."""

import pytest
import torch

from cosmocore.alignment.coderl import ANSWER_PREFIX
from cosmocore.policy.interface import encode, score, score_for_update
from cosmocore.policy.models import load_policy
from tests.test_rollout import _fresh


@pytest.mark.parametrize("model_dir", ["tiny_model_dir", "tiny_t5_dir"], ids=["causal", "seq2seq"])
def test_the_training_pass_scores_exactly_like_the_rollout_pass(model_dir, config, request):
    """Same numbers as `score` and as each row alone, in a batch of prompts and completions of several
    lengths (one a CodeRL+ answer after its given start); the critic's state is the last hidden state
    before the completion (the prompt's last token; the decoder's last given token), whatever follows."""
    model, tokenizer = load_policy(request.getfixturevalue(model_dir), config.model)
    prompts = [encode(model, tokenizer, "def add(a, b):"), encode(model, tokenizer, "import math\n\ndef area(r):\n", ANSWER_PREFIX)]
    completions = [tokenizer("\n    return a + b")["input_ids"], tokenizer(" 3.14}")["input_ids"]]
    assert len(completions[0]) != len(completions[1])
    with torch.no_grad():
        reference = score(model, prompts, completions, tokenizer.pad_token_id, temperature=0.8)
        fast, state = score_for_update(model, prompts, completions, tokenizer.pad_token_id, temperature=0.8)
    for name in ("logprobs", "entropy", "mask", "hidden"):
        torch.testing.assert_close(getattr(fast, name), getattr(reference, name), atol=1e-4, rtol=1e-4)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        logprobs, _, hidden, before = _fresh(model, prompt, completion, 0.8)
        torch.testing.assert_close(reference.logprobs[row, : len(completion)], logprobs, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(reference.hidden[row], hidden, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(state[row], before, atol=1e-4, rtol=1e-4)


def learner_with_live_adapters(model_dir, config):
    """A LoRA learner on the model in `model_dir` whose adapters change the function (they start as the
    identity, B = 0), and its tokenizer."""
    from cosmocore.rl.trainer import build_learner

    model, tokenizer = load_policy(model_dir, config.model)
    learner = build_learner(model, config.train.model_copy(update={"lora": True}), tokenizer.pad_token_id, 0.8)
    with torch.no_grad():
        for name, weight in learner.model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0.0, 0.5)
    return learner, tokenizer


@pytest.mark.parametrize("model_dir", ["tiny_model_dir", "tiny_t5_dir"], ids=["causal", "seq2seq"])
def test_rollouts_sample_a_merged_copy_that_scores_like_the_learner(model_dir, config, request):
    """With LoRA, rollouts sample from a copy with the adapters merged in: the learner's function (the
    behaviour log-probs it records are the learner's), and the learner keeps its adapters untouched."""
    from cosmocore.rl.trainer import build_learner

    folder = request.getfixturevalue(model_dir)
    learner, tokenizer = learner_with_live_adapters(folder, config)
    before = {name: value.clone() for name, value in learner.model.state_dict().items()}
    sampler = learner.sampler()
    assert not any("lora" in name for name, _ in sampler.named_modules())
    after = learner.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(after[name], value) for name, value in before.items())
    prompts = [encode(sampler, tokenizer, "def add(a, b):"), encode(sampler, tokenizer, "import math\n\ndef area(r):\n")]
    completions = [tokenizer("\n    return a + b")["input_ids"], tokenizer("    return math.pi * r * r")["input_ids"]]
    with torch.no_grad():
        learned = score(learner.model.eval(), prompts, completions, tokenizer.pad_token_id, temperature=0.8).logprobs
        sampled = score(sampler, prompts, completions, tokenizer.pad_token_id, temperature=0.8).logprobs
        base = score(load_policy(folder, config.model)[0], prompts, completions, tokenizer.pad_token_id, temperature=0.8).logprobs
    torch.testing.assert_close(sampled, learned, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base, learned, atol=1e-3)  # the adapters mattered
    full = build_learner(load_policy(folder, config.model)[0], config.train.model_copy(update={"lora": False}), tokenizer.pad_token_id, 0.8)
    assert full.sampler() is full.model  # no adapters: nothing to merge, no copy
