"""The nocturnal update's own forward pass, and its checkpoints."""

import torch

from cosmocore.models import load_policy
from cosmocore.policy import score, score_for_update


def test_the_training_pass_scores_exactly_like_the_rollout_pass(tiny_model_dir, config):
    """The trainer runs prompts without gradients and reuses their cache: same numbers as `score`."""
    model, tokenizer = load_policy(tiny_model_dir, config.model)
    prompts = [tokenizer("def add(a, b):")["input_ids"], tokenizer("import math\n\ndef area(r):\n    return")["input_ids"]]
    completions = [tokenizer("\n    return a + b")["input_ids"], tokenizer(" math.pi * r * r")["input_ids"]]
    with torch.no_grad():
        reference = score(model, prompts, completions, tokenizer.pad_token_id, temperature=0.8)
        fast, state = score_for_update(model, prompts, completions, tokenizer.pad_token_id, temperature=0.8)
    torch.testing.assert_close(fast.logprobs, reference.logprobs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.entropy, reference.entropy, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.hidden, reference.hidden, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the state is the prompt's last token, whatever follows it
        alone = model(input_ids=torch.tensor([prompts[0]]), output_hidden_states=True).hidden_states[-1][0, -1]
    torch.testing.assert_close(state[0], alone, atol=1e-4, rtol=1e-4)
