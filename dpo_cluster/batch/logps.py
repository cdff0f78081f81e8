"""Per-sequence log-probs of a micro-batch of pairs: one policy or reference forward, any layout.

Padded (`PreferenceBatch`) and packed (`PackedBatch`) micro-batches both come back as per-sequence
values in the same (2B,) order, chosen half first, so training, reference scoring and evaluation
share this one path and score a pair the same way whatever its layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dpo_cluster.batch.collate import PreferenceBatch
from dpo_cluster.batch.packing import PackedBatch
from dpo_cluster.logprobs import (
    build_shifted_labels,
    compute_ld_sequence_logps,
    compute_mean_logits,
    compute_token_logps,
    compute_wpo_token_logps,
)

MicroBatch = PreferenceBatch | PackedBatch
"""A micro-batch of B pairs as 2B padded rows or as packed rows; see `sequence_logps`."""


@dataclass
class SequenceScores:
    """What one forward gives per sequence; every tensor is (2B,), chosen half first.

    logps: summed completion log-probs, LD-DPO weighted when asked (`compute_ld_sequence_logps`);
        they carry the forward's gradient.
    plain_logps: the unweighted sums (the same tensor as `logps` without LD-DPO).
    logit_sums: summed vocabulary-mean logits over the completion, no gradient.
    lengths: completion token counts (the shifted completion mask per sequence).
    wpo_log_weights: WPO log-weights (mean aligned token log-prob, `compute_wpo_token_logps`), no
        gradient; None unless asked for.
    """

    logps: torch.Tensor
    plain_logps: torch.Tensor
    logit_sums: torch.Tensor
    lengths: torch.Tensor
    wpo_log_weights: torch.Tensor | None = None


def _forward_logits(
    forward: Callable[..., object], batch: MicroBatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """-> logits (N, L, V), labels (N, L), label mask (N, L), and the map of per-token values
    (N, L) to the padded (2B, T) layout: the identity for padded rows, `unpack` for packed ones."""
    if isinstance(batch, PackedBatch):
        outputs = forward(**batch.model_inputs())
        labels, label_mask = batch.shifted_labels()
        return outputs.logits, labels, label_mask, batch.unpack  # type: ignore[attr-defined]
    outputs = forward(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    labels, label_mask = build_shifted_labels(batch.input_ids, batch.completion_mask)
    return outputs.logits, labels, label_mask, lambda values: values  # type: ignore[attr-defined]


def compute_sequence_scores(
    forward: Callable[..., object],
    batch: MicroBatch,
    *,
    ld_alpha: float | None = None,
    wpo_weights: bool = False,
) -> SequenceScores:
    """One forward over the 2B chosen + rejected sequences -> `SequenceScores` ((2B,) each).

    Padded: rows (2B, T) with an attention mask. Packed: rows (R, L) with position ids (see
    `PackedBatch.model_inputs`). Per-token values are brought to the padded (2B, T) layout before
    the per-sequence sums, so both layouts give the same values in the same order. `ld_alpha`
    (LD-DPO): of pair i, completion tokens past min(|chosen_i|, |rejected_i|) count alpha times in
    `logps`. `wpo_weights`: also WPO's log-weights, from the same logits at completion positions
    only (chunked, no second forward and no (2B, T, V) fp32 copy).
    """
    logits, labels, label_mask, to_sequences = _forward_logits(forward, batch)
    token_logps = to_sequences(compute_token_logps(logits, labels, label_mask))  # (2B, T)
    mask = to_sequences(label_mask)  # (2B, T)
    lengths = mask.sum(dim=1)
    plain_logps = token_logps.sum(dim=1)
    logps = plain_logps
    if ld_alpha is not None:
        chosen_tokens, rejected_tokens = token_logps.chunk(2)
        chosen_mask, rejected_mask = mask.chunk(2)
        logps = torch.cat(
            compute_ld_sequence_logps(
                chosen_tokens, rejected_tokens, chosen_mask, rejected_mask, alpha=ld_alpha
            )
        )
    wpo_log_weights = None
    if wpo_weights:
        aligned = to_sequences(compute_wpo_token_logps(logits, labels, label_mask))
        wpo_log_weights = aligned.sum(dim=1) / lengths.clamp(min=1)  # WPO eq. 2: mean over tokens
    logit_sums = to_sequences(compute_mean_logits(logits, label_mask)).sum(dim=1)
    return SequenceScores(logps, plain_logps, logit_sums, lengths, wpo_log_weights)


def sequence_logps(
    forward: Callable[..., object], batch: MicroBatch, *, ld_alpha: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over the chosen+rejected sequences -> (summed completion log-probs (2B,), summed
    mean logits (2B,), completion token counts (2B,)); log-probs carry the forward's grad.

    With `ld_alpha` the log-probs are LD-DPO weighted (see `compute_sequence_scores`), for policy
    and reference alike. Both layouts return the same values in the same order.
    """
    scores = compute_sequence_scores(forward, batch, ld_alpha=ld_alpha)
    return scores.logps, scores.logit_sums, scores.lengths
