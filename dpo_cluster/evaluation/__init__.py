"""Evaluation of a tuned model against its base: held-out reward accuracy and judged win rates."""
