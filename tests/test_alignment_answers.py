"""CodeRL+ answers sampled from a policy (the tiny model)."""

from cosmocore import alignment


def test_answers_carry_the_behaviour_policys_scores(tiny_model_dir, config):
    """Alignment answers are trajectories like code rollouts: one log-prob per completion token."""
    from cosmocore.models import load_policy
    from cosmocore.rollout import RunIds

    model, tokenizer = load_policy(tiny_model_dir, config.model)
    question = alignment.AlignmentTask("t/align/0", "t", "", "def f(x):\n    y = x + 1\n    return y\n", "f(1)", 2, {"y": 2},
                                       alignment.alignment_prompt("def f(x):\n    y = x + 1\n    return y\n", "f(1)", ["y"]))
    cfg = config.alignment.model_copy(update={"max_new_tokens": 8, "samples_per_task": 2})
    answers = alignment.answer(model, tokenizer, [question], config.rollout, cfg, "chat", RunIds("r", "coderl_plus", 0, 0))
    assert [a.sample for a in answers] == [0, 1] and all(a.kind == "alignment" for a in answers)
    for a in answers:
        assert len(a.behaviour_logprobs) == len(a.completion_ids) > 0 and len(a.hidden) == model.config.hidden_size
        assert a.reward == question.reward(a.text) and a.task_id == "t#align"
        assert tokenizer.decode(a.prompt_ids).endswith(alignment.ANSWER_PREFIX)  # the answer's start, given
