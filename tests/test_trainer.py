"""The nocturnal update's own forward pass, on both architectures."""

import pytest
import torch

from cosmocore.alignment import ANSWER_PREFIX
from cosmocore.models import load_policy
from cosmocore.policy import encode, score, score_for_update
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
