"""The policy: loading a model, prompts, and the decode and scoring loops of each architecture."""
