"""One unpaired (KTO) micro-batch: log-probs of the examples and of their KL sequences, the loss,
and metric sums under TRL 1.16's KTOTrainer names.

The policy scores the E examples with gradient and their E KL sequences without (the estimate is
a reference point, never differentiated), as TRL does; the reference scores both. The KL estimate
is averaged over workers (TRL gathers it over processes), then clamped at 0. Metrics: `rewards/chosen`, `logps/chosen`, `logits/chosen` over the desirable
examples, the `rejected` ones over the undesirable, `rewards/margins` their difference, and `kl`;
DPO's `rewards/accuracies` has no meaning without pairs and is not logged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dpo_cluster.batch.logps import MicroBatch, compute_sequence_scores
from dpo_cluster.batch.unpaired import UnpairedBatch
from dpo_cluster.losses import UnpairedLogps, clamp_kl, estimate_kl, kto_loss
from dpo_cluster.train.loss_settings import SUM_KEYS, LossSettings, MicroBatchResult


def _mean_over_workers(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over the workers of the process group (itself without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    reduced = value.detach().clone()
    dist.all_reduce(reduced)
    return reduced / dist.get_world_size()


def compute_unpaired_micro_batch(
    policy_forward: Callable[..., object],
    reference_logps: Callable[[MicroBatch], tuple[torch.Tensor, torch.Tensor]],
    batch: UnpairedBatch,
    settings: LossSettings,
) -> MicroBatchResult:
    """KTO loss (mean over the E examples) and metric sums of one micro-batch.

    `reference_logps(b)` gives the reference's log-probs of a micro-batch's sequences in two halves
    (a pair batch's chosen and rejected); concatenated they are one value per sequence. A
    collective under several workers (the KL average): every worker calls it as often.
    """
    n = batch.num_examples
    chunk = settings.logps_chunk_size
    scores = compute_sequence_scores(policy_forward, batch.examples, chunk_size=chunk)
    with torch.no_grad():
        policy_kl_logps = compute_sequence_scores(policy_forward, batch.kl, chunk_size=chunk).logps
    dtype = scores.logps.dtype
    ref_logps = torch.cat(reference_logps(batch.examples)).to(dtype)
    ref_kl_logps = torch.cat(reference_logps(batch.kl)).to(dtype)
    labels = batch.labels
    examples = UnpairedLogps(scores.logps, ref_logps, labels)
    kl = clamp_kl(_mean_over_workers(estimate_kl(policy_kl_logps, ref_kl_logps)))
    losses, rewards = kto_loss(
        examples,
        beta=settings.beta,
        kl=kl,
        desirable_weight=settings.desirable_weight,
        undesirable_weight=settings.undesirable_weight,
    )
    with torch.no_grad():
        desirable, undesirable = labels, ~labels
        logps = scores.logps.detach()
        logit_sums, lengths = scores.logit_sums, scores.lengths
        values = {
            "pairs": float(n),
            "loss": losses.detach().sum(),
            "rewards/chosen": rewards[desirable].sum(),
            "rewards/rejected": rewards[undesirable].sum(),
            "logps/chosen": logps[desirable].sum(),
            "logps/rejected": logps[undesirable].sum(),
            "logits/chosen": logit_sums[desirable].sum(),
            "logits/rejected": logit_sums[undesirable].sum(),
            "chosen_tokens": lengths[desirable].sum(),
            "rejected_tokens": lengths[undesirable].sum(),
            "tokens": float(batch.num_tokens),
            "padded_tokens": float(batch.num_entries - batch.num_tokens),
            "micro_batches": 1.0,
            "count/chosen": desirable.sum(),
            "count/rejected": undesirable.sum(),
            "kl": kl,
            "kl_batches": 1.0,
        }
        sums = torch.tensor([float(values.get(k, 0.0)) for k in SUM_KEYS], dtype=torch.float64)
    return MicroBatchResult(loss=losses.mean(), sums=sums)


def unpaired_metrics(s: dict[str, float]) -> dict[str, float]:
    """Reduced KTO sums (by SUM_KEYS name) -> TRL's KTO metrics; the desirable or undesirable ones
    only where the window had such examples, as TRL logs them."""
    chosen, rejected = s["count/chosen"], s["count/rejected"]
    metrics = {
        "loss": s["loss"] / max(s["pairs"], 1.0),
        "kl": s["kl"] / s["kl_batches"],
        "padding_fraction": s["padded_tokens"] / max(s["padded_tokens"] + s["tokens"], 1.0),
    }
    for side, count in (("chosen", chosen), ("rejected", rejected)):
        if count > 0:
            metrics[f"rewards/{side}"] = s[f"rewards/{side}"] / count
            metrics[f"logps/{side}"] = s[f"logps/{side}"] / count
        if s[f"{side}_tokens"] > 0:
            metrics[f"logits/{side}"] = s[f"logits/{side}"] / s[f"{side}_tokens"]
    if chosen > 0 and rejected > 0:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics
