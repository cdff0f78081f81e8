"""One DPO micro-batch: policy and reference log-probs, the loss, and metric sums.

Chosen and rejected sequences go through the policy in one concatenated forward: either padded
(`PreferenceBatch`, rows 0..B-1 chosen, B..2B-1 rejected) or packed into rows without padding
(`dpo_cluster.batch.packing.PackedBatch`). Both give per-sequence results in the same (2B,) order,
so the loss code is the same for both. Metrics are returned as per-pair *sums* plus counts, so the
loop can add them over micro-batches and all-reduce them over workers and still get exact batch
means; `padded_tokens` counts the pad entries the forward actually computed, for either layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dpo_cluster.batch.logps import MicroBatch, sequence_logps
from dpo_cluster.config import TrainConfig
from dpo_cluster.losses import PreferenceLogps, compute_dpo_loss

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


def build_loss_settings(train: TrainConfig) -> LossSettings:
    """The loss options of the `train` config section, as the forward takes them."""
    return LossSettings(train.loss_type, train.loss_weights, train.beta, train.label_smoothing)


@dataclass
class MicroBatchResult:
    loss: torch.Tensor  # scalar: mean over the micro-batch's pairs, with gradient
    sums: torch.Tensor  # (len(SUM_KEYS),) float64, detached


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
