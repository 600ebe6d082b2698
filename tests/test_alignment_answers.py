"""CodeRL+ answers sampled from a policy: the tiny decoder-only model, and the tiny T5."""

import pytest
import torch

from cosmocore.alignment import coderl as alignment


@pytest.mark.parametrize("model_dir", ["tiny_model_dir", "tiny_t5_dir"])
def test_answers_carry_the_behaviour_policys_scores(model_dir, config, request):
    """Alignment answers are trajectories like code rollouts: one log-prob per completion token, those a
    fresh scoring pass gives, after the answer's start that was written for the model."""
    from cosmocore.policy.models import load_policy
    from cosmocore.policy.interface import score
    from cosmocore.policy.prompts import resolve_style
    from cosmocore.rl.rollout import RunIds

    model, tokenizer = load_policy(request.getfixturevalue(model_dir), config.model)
    question = alignment.AlignmentTask("t/align/0", "t", "", "def f(x):\n    y = x + 1\n    return y\n", "f(1)", 2, {"y": 2},
                                       alignment.alignment_prompt("def f(x):\n    y = x + 1\n    return y\n", "f(1)", ["y"]))
    cfg = config.alignment.model_copy(update={"max_new_tokens": 8, "samples_per_task": 2})
    answers = alignment.answer(model, tokenizer, [question], config.rollout, cfg, resolve_style(config.model.prompt_style, tokenizer),
                               RunIds("r", "coderl_plus", 0, 0))
    assert [a.sample for a in answers] == [0, 1] and all(a.kind == "alignment" for a in answers)
    for a in answers:
        assert len(a.behaviour_logprobs) == len(a.completion_ids) > 0 and len(a.hidden) == model.config.hidden_size
        assert a.reward == question.reward(a.text) and a.task_id == "t#align"
        assert tokenizer.decode(a.prompt_ids).endswith(alignment.ANSWER_PREFIX)  # the answer's start, given
    with torch.no_grad():
        scored = score(model, [a.prompt_ids for a in answers], [a.completion_ids for a in answers], tokenizer.pad_token_id,
                       temperature=config.rollout.temperature)
    for row, a in enumerate(answers):
        n = len(a.completion_ids)
        torch.testing.assert_close(scored.logprobs[row, :n], torch.tensor(a.behaviour_logprobs), atol=1e-4, rtol=1e-4)
