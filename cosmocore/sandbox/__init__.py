"""Executing generated programs in isolation and judging them: outcome classes and hallucination evidence."""
