"""Per-sequence log-probs of a micro-batch of pairs: one policy or reference forward, any layout.

Chosen and rejected sequences go through the model in one concatenated forward: either padded
(`PreferenceBatch`, rows 0..B-1 chosen, B..2B-1 rejected) or packed into rows without padding
(`PackedBatch`). Both give per-sequence results in the same (2B,) order, so training, reference
scoring and evaluation share this one path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dpo_cluster.batch.collate import PreferenceBatch
from dpo_cluster.batch.packing import PackedBatch
from dpo_cluster.logprobs import (
    build_shifted_labels,
    compute_mean_logit_sums,
    compute_mean_logits,
    compute_sequence_logps,
    compute_token_logps,
)

MicroBatch = PreferenceBatch | PackedBatch
"""A micro-batch of B pairs as 2B padded rows or as packed rows; see `sequence_logps`."""


def sequence_logps(
    forward: Callable[..., object], batch: MicroBatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over the chosen+rejected sequences -> (summed completion log-probs (2B,), summed
    mean logits (2B,), completion token counts (2B,)); log-probs carry the forward's grad.

    Padded: rows (2B, T) with an attention mask. Packed: rows (R, L) with position ids (see
    `PackedBatch.model_inputs`); per-token values (R, L) are unpacked to (2B, T) before the sums,
    so both layouts return the same values in the same order.
    """
    if isinstance(batch, PackedBatch):
        return _packed_sequence_logps(forward, batch)
    outputs = forward(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logits = outputs.logits  # type: ignore[attr-defined]
    labels, label_mask = build_shifted_labels(batch.input_ids, batch.completion_mask)
    logps = compute_sequence_logps(logits, labels, label_mask)
    logit_sums = compute_mean_logit_sums(logits, label_mask)
    return logps, logit_sums, label_mask.sum(dim=1)


def _packed_sequence_logps(
    forward: Callable[..., object], batch: PackedBatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    outputs = forward(**batch.model_inputs())
    logits = outputs.logits  # type: ignore[attr-defined]  # (R, L, V)
    labels, label_mask = batch.shifted_labels()
    token_logps = compute_token_logps(logits, labels, label_mask)  # (R, L)
    mean_logits = compute_mean_logits(logits, label_mask)  # (R, L)
    return (
        batch.unpack(token_logps).sum(dim=1),
        batch.unpack(mean_logits).sum(dim=1),
        batch.unpack(label_mask).sum(dim=1),
    )
