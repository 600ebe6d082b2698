"""The RL loop: rollouts, rewards, affect tagging, the replay buffer and its gates, the nocturnal trainer, one iteration and a whole run."""
