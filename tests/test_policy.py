"""Rollouts store what the off-policy trainer needs, consistent with a fresh forward pass."""

import torch
import torch.nn.functional as F

from cosmocore.policy.interface import score
from cosmocore.policy.models import load_policy
from cosmocore.rl.rollout import generate


def test_stored_logprobs_equal_a_fresh_unpadded_forward(tiny_model_dir, config):
    model, tokenizer = load_policy(tiny_model_dir, config.model)
    prompts = [tokenizer("def add(a, b):")["input_ids"], tokenizer("x = [1, 2, 3]\nfor item in x:\n    print(item)")["input_ids"]]
    cfg = config.rollout.model_copy(update={"max_new_tokens": 12})
    torch.manual_seed(0)
    completions = generate(model, tokenizer, prompts, cfg, "completion", greedy=False, temperature=0.8)
    assert all(0 < len(c) <= 12 for c in completions)
    with torch.no_grad():
        batched = score(model, prompts, completions, tokenizer.pad_token_id, temperature=0.8)
    assert batched.hidden.shape == (2, model.config.hidden_size)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / 0.8
        fresh = F.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        n = len(completion)
        torch.testing.assert_close(batched.logprobs[row, :n], fresh, atol=1e-4, rtol=1e-4)
        assert batched.mask[row].sum() == n
        assert float(batched.mean_entropy()[row]) > 0


def test_greedy_generation_is_reproducible(tiny_model_dir, config):
    model, tokenizer = load_policy(tiny_model_dir, config.model)
    prompts = [tokenizer("def f(x):")["input_ids"]] * 2
    cfg = config.rollout.model_copy(update={"max_new_tokens": 8})
    first = generate(model, tokenizer, prompts, cfg, "completion", greedy=True, temperature=1.0)
    assert first == generate(model, tokenizer, prompts, cfg, "completion", greedy=True, temperature=1.0)
    assert first[0] == first[1]
