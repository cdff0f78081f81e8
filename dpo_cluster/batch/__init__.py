"""Batches of tokenized pairs for a model forward: padded or packed, and their per-sequence log-probs.

Shared by training, reference scoring and evaluation, so all three score a pair the same way.
"""
