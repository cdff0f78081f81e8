"""One DPO micro-batch: policy and reference log-probs, the loss, and metric sums.

Chosen and rejected sequences go through the policy in one concatenated forward: either padded
(`PreferenceBatch`, rows 0..B-1 chosen, B..2B-1 rejected) or packed into rows without padding
(`dpo_cluster.train.packing.PackedBatch`). Both give per-sequence results in the same (2B,) order,
so the loss code is the same for both. Metrics are returned as per-pair *sums* plus counts, so the
loop can add them over micro-batches and all-reduce them over workers and still get exact batch
means; `padded_tokens` counts the pad entries the forward actually computed, for either layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dpo_cluster.logprobs import (
    build_shifted_labels,
    compute_mean_logit_sums,
    compute_mean_logits,
    compute_sequence_logps,
    compute_token_logps,
)
from dpo_cluster.losses import PreferenceLogps, compute_dpo_loss
from dpo_cluster.train.collate import PreferenceBatch
from dpo_cluster.train.packing import PackedBatch

MicroBatch = PreferenceBatch | PackedBatch
"""A micro-batch of B pairs as 2B padded rows or as packed rows; see `sequence_logps`."""

# Order of the entries of `MicroBatchResult.sums`; the loop all-reduces them as one tensor.
SUM_KEYS = (
    "pairs",
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "chosen_tokens",
    "rejected_tokens",
    "tokens",
    "padded_tokens",
    "micro_batches",
)


@dataclass
class LossSettings:
    loss_types: list[str]
    loss_weights: list[float] | None
    beta: float
    label_smoothing: float


@dataclass
class MicroBatchResult:
    loss: torch.Tensor  # scalar: mean over the micro-batch's pairs, with gradient
    sums: torch.Tensor  # (len(SUM_KEYS),) float64, detached


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


def compute_micro_batch(
    policy_forward: Callable[..., object],
    reference_logps: Callable[[MicroBatch], tuple[torch.Tensor, torch.Tensor]],
    batch: MicroBatch,
    settings: LossSettings,
) -> MicroBatchResult:
    """DPO loss and metric sums of one micro-batch (padded or packed)."""
    n = batch.num_pairs
    logps, logit_sums, lengths = sequence_logps(policy_forward, batch)
    ref_chosen, ref_rejected = reference_logps(batch)
    pair = PreferenceLogps(
        policy_chosen_logps=logps[:n],
        policy_rejected_logps=logps[n:],
        ref_chosen_logps=ref_chosen.to(logps.dtype),
        ref_rejected_logps=ref_rejected.to(logps.dtype),
        chosen_lengths=lengths[:n],
        rejected_lengths=lengths[n:],
    )
    losses, chosen_rewards, rejected_rewards = compute_dpo_loss(
        pair,
        loss_types=settings.loss_types,
        loss_weights=settings.loss_weights,
        beta=settings.beta,
        label_smoothing=settings.label_smoothing,
    )
    with torch.no_grad():
        total_tokens = batch.input_ids.numel()  # (2B, T) padded or (R, L) packed entries computed
        values = {
            "pairs": float(n),
            "loss": losses.detach().sum(),
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": pair.policy_chosen_logps.detach().sum(),
            "logps/rejected": pair.policy_rejected_logps.detach().sum(),
            "logits/chosen": logit_sums[:n].sum(),
            "logits/rejected": logit_sums[n:].sum(),
            "chosen_tokens": lengths[:n].sum(),
            "rejected_tokens": lengths[n:].sum(),
            "tokens": float(batch.num_tokens),
            "padded_tokens": float(total_tokens - batch.num_tokens),
            "micro_batches": 1.0,
        }
        sums = torch.tensor([float(values[k]) for k in SUM_KEYS], dtype=torch.float64)
    return MicroBatchResult(loss=losses.mean(), sums=sums)


def sums_to_metrics(sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Reduced sums -> TRL-named means (loss and rewards per pair, logits per token)."""
    s = dict(zip(SUM_KEYS, sums.tolist()))
    pairs = max(s["pairs"], 1.0)
    metrics = {
        "loss": s["loss"] / pairs,
        "rewards/chosen": s["rewards/chosen"] / pairs,
        "rewards/rejected": s["rewards/rejected"] / pairs,
        "rewards/accuracies": s["rewards/accuracies"] / pairs,
        "rewards/margins": s["rewards/margins"] / pairs,
        "logps/chosen": s["logps/chosen"] / pairs,
        "logps/rejected": s["logps/rejected"] / pairs,
        "logits/chosen": s["logits/chosen"] / max(s["chosen_tokens"], 1.0),
        "logits/rejected": s["logits/rejected"] / max(s["rejected_tokens"], 1.0),
        "padding_fraction": s["padded_tokens"] / max(s["padded_tokens"] + s["tokens"], 1.0),
    }
    return {f"{prefix}{k}": v for k, v in metrics.items()}
