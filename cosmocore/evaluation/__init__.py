"""Held-out evaluation, self-repair, the metrics the project is judged by and the ablation report."""
