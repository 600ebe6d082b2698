"""CodeRL+ execution-semantics alignment: questions about what a rollout's program computes, answered and rewarded by its real trace."""
