"""Per-sequence log-probs of a micro-batch of pairs: one policy or reference forward, any layout.

Padded (`PreferenceBatch`) and packed (`PackedBatch`) micro-batches both come back as per-sequence
values in the same (2B,) order, chosen half first, so training, reference scoring and evaluation
share this one path and score a pair the same way whatever its layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dpo_cluster.batch.collate import PreferenceBatch
from dpo_cluster.batch.hidden_logps import find_output_head, forward_hidden, head_row_values
from dpo_cluster.batch.packing import PackedBatch
from dpo_cluster.logprobs import (
    build_shifted_labels,
    compute_ld_sequence_logps,
    compute_mean_logits,
    compute_token_logps,
    compute_wpo_token_logps,
    scatter_rows,
    selected_rows,
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
    prompt_logps / prompt_lengths: summed log-probs (with gradient) and counts of the prompt tokens
        of every sequence (its first token has no prediction); None unless asked for (ORPO's NLL).
    """

    logps: torch.Tensor
    plain_logps: torch.Tensor
    logit_sums: torch.Tensor
    lengths: torch.Tensor
    wpo_log_weights: torch.Tensor | None = None
    prompt_logps: torch.Tensor | None = None
    prompt_lengths: torch.Tensor | None = None


@dataclass
class _TokenValues:
    """Per-token values of one forward on the padded (2B, T) layout: label log-probs (with grad),
    vocabulary-mean logits, WPO aligned log-probs (or None), and the scored-token mask."""

    logps: torch.Tensor
    mean_logits: torch.Tensor
    wpo_logps: torch.Tensor | None
    mask: torch.Tensor


def _model_inputs(
    batch: MicroBatch,
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """-> forward kwargs, labels (N, L), label mask (N, L), and the map of per-token values (N, L)
    to the padded (2B, T) layout: the identity for padded rows, `unpack` for packed ones."""
    if isinstance(batch, PackedBatch):
        labels, label_mask = batch.shifted_labels()
        return batch.model_inputs(), labels, label_mask, batch.unpack
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False}
    labels, label_mask = build_shifted_labels(batch.input_ids, batch.completion_mask)
    return inputs, labels, label_mask, lambda values: values


def _values_from_logits(forward: Callable[..., Any], batch: MicroBatch, wpo_weights: bool) -> _TokenValues:
    """Today's path: the model's full (N, L, V) logits, read in fp32 chunks (`dpo_cluster.logprobs`)."""
    inputs, labels, label_mask, to_sequences = _model_inputs(batch)
    logits = forward(**inputs).logits
    wpo = to_sequences(compute_wpo_token_logps(logits, labels, label_mask)) if wpo_weights else None
    return _TokenValues(
        to_sequences(compute_token_logps(logits, labels, label_mask)),
        to_sequences(compute_mean_logits(logits, label_mask)),
        wpo,
        to_sequences(label_mask),
    )


def _values_from_hidden(
    forward: Callable[..., Any], batch: MicroBatch, wpo_weights: bool, chunk_size: int, model: object
) -> _TokenValues:
    """Only completion positions meet the output head, `chunk_size` at a time (`hidden_logps`)."""
    inputs, labels, label_mask, to_sequences = _model_inputs(batch)
    head = find_output_head(model)
    hidden = forward_hidden(forward, head, inputs)  # (N, L, H)
    rows = selected_rows(label_mask, label_mask.numel(), hidden.device)
    values = head_row_values(
        head,
        hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows),
        labels.reshape(-1).long().index_select(0, rows),
        chunk_size=chunk_size,
        with_wpo=wpo_weights,
    )

    def place(row_values: torch.Tensor) -> torch.Tensor:
        return to_sequences(scatter_rows(row_values, rows, label_mask.shape))

    wpo = place(values.wpo_logps) if values.wpo_logps is not None else None
    return _TokenValues(place(values.logps), place(values.mean_logits), wpo, to_sequences(label_mask))


def with_prompts_scored(batch: MicroBatch) -> MicroBatch:
    """A copy of `batch` whose completion mask also covers every prompt token: `-> MicroBatch`,
    same layout; a forward over it scores every real token after each sequence's first."""
    if isinstance(batch, PackedBatch):
        mask = torch.zeros_like(batch.completion_mask)
        for row, start, length in zip(
            batch.seq_rows.tolist(), batch.seq_starts.tolist(), batch.seq_lengths.tolist()
        ):
            mask[row, start : start + length] = 1
        return dataclasses.replace(batch, completion_mask=mask)
    return dataclasses.replace(batch, completion_mask=batch.attention_mask.clone())


def compute_sequence_scores(
    forward: Callable[..., Any],
    batch: MicroBatch,
    *,
    ld_alpha: float | None = None,
    wpo_weights: bool = False,
    chunk_size: int = 0,
    model: object | None = None,
    prompt_logps: bool = False,
) -> SequenceScores:
    """One forward over the 2B chosen + rejected sequences -> `SequenceScores` ((2B,) each).

    Padded: rows (2B, T) with an attention mask. Packed: rows (R, L) with position ids (see
    `PackedBatch.model_inputs`). Per-token values are brought to the padded (2B, T) layout before
    the per-sequence sums, so both layouts give the same values in the same order. `ld_alpha`
    (LD-DPO): of pair i, completion tokens past min(|chosen_i|, |rejected_i|) count alpha times in
    `logps`. `wpo_weights`: also WPO's log-weights, from the same forward.
    `chunk_size` > 0 (`train.logps_chunk_size`): log-probs from the final hidden states, that many
    completion tokens per head call, no (N, L, V) logits (`hidden_logps`); `model` is the module
    holding the head (default: `forward` itself). 0: from the model's full logits.
    `prompt_logps`: the same forward also scores the prompt tokens (`SequenceScores.prompt_logps`);
    every completion value is the same as without it.
    """
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0: full logits), got {chunk_size}")
    scored = with_prompts_scored(batch) if prompt_logps else batch
    if chunk_size:
        values = _values_from_hidden(
            forward, scored, wpo_weights, chunk_size, forward if model is None else model
        )
    else:
        values = _values_from_logits(forward, scored, wpo_weights)
    prompt_sums = prompt_lengths = None
    if prompt_logps:
        _, _, completion_mask, to_sequences = _model_inputs(batch)
        completion_mask = to_sequences(completion_mask)
        prompt_mask = values.mask - completion_mask
        prompt_sums = (values.logps * prompt_mask).sum(dim=1)
        prompt_lengths = prompt_mask.sum(dim=1)
        values = _TokenValues(
            values.logps * completion_mask,
            values.mean_logits * completion_mask,
            None if values.wpo_logps is None else values.wpo_logps * completion_mask,
            completion_mask,
        )
    lengths = values.mask.sum(dim=1)
    plain_logps = values.logps.sum(dim=1)
    logps = plain_logps
    if ld_alpha is not None:
        chosen_tokens, rejected_tokens = values.logps.chunk(2)
        chosen_mask, rejected_mask = values.mask.chunk(2)
        logps = torch.cat(
            compute_ld_sequence_logps(
                chosen_tokens, rejected_tokens, chosen_mask, rejected_mask, alpha=ld_alpha
            )
        )
    wpo_log_weights = None
    if values.wpo_logps is not None:
        wpo_log_weights = values.wpo_logps.sum(dim=1) / lengths.clamp(min=1)  # WPO eq. 2: mean over tokens
    logit_sums = values.mean_logits.sum(dim=1)
    return SequenceScores(
        logps, plain_logps, logit_sums, lengths, wpo_log_weights, prompt_sums, prompt_lengths
    )


def sequence_logps(
    forward: Callable[..., Any],
    batch: MicroBatch,
    *,
    ld_alpha: float | None = None,
    chunk_size: int = 0,
    model: object | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over the chosen+rejected sequences -> (summed completion log-probs (2B,), summed
    mean logits (2B,), completion token counts (2B,)); log-probs carry the forward's grad.

    With `ld_alpha` the log-probs are LD-DPO weighted (see `compute_sequence_scores`), for policy
    and reference alike. Both layouts return the same values in the same order. `chunk_size` and
    `model`: as in `compute_sequence_scores`.
    """
    scores = compute_sequence_scores(forward, batch, ld_alpha=ld_alpha, chunk_size=chunk_size, model=model)
    return scores.logps, scores.logit_sums, scores.lengths
