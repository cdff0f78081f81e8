"""One preference micro-batch: policy and reference log-probs, the loss, and metric sums.

Metrics come back as per-pair *sums* plus counts rather than means, so the loop can add them over
micro-batches and all-reduce them over workers and still get exact batch means, whatever the
micro-batch sizes; `padded_tokens` counts the pad entries the forward computed, for either layout.
A reference-free loss (cpo, simpo, orpo) asks for no reference log-probs at all. Metrics only some
objectives have (`nll_loss`, `log_odds_ratio`, `log_odds_chosen`) are logged where their count is
non-zero. Unpaired (KTO) micro-batches have their own forward (`forward_unpaired`) and metrics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dpo_cluster.batch.logps import MicroBatch, SequenceScores, compute_sequence_scores
from dpo_cluster.batch.unpaired import UnpairedBatch
from dpo_cluster.losses import (
    PreferenceLogps,
    compute_dpo_loss,
    compute_log_odds,
    compute_orpo_nll,
    compute_reported_logps,
)
from dpo_cluster.train.forward_unpaired import compute_unpaired_micro_batch, unpaired_metrics
from dpo_cluster.train.loss_settings import (
    SUM_KEYS,
    LossSettings,
    MicroBatchResult,
    build_loss_settings,
)

__all__ = [
    "SUM_KEYS",
    "LossSettings",
    "MicroBatchResult",
    "build_loss_settings",
    "compute_micro_batch",
    "sums_to_metrics",
]


def _pair_logps(
    scores: SequenceScores,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    settings: LossSettings,
) -> PreferenceLogps:
    """(2B,) policy scores and (B,) reference log-probs (None: reference-free) -> the loss inputs
    of the B pairs."""
    n = scores.logps.shape[0] // 2
    dtype = scores.logps.dtype
    return PreferenceLogps(
        policy_chosen_logps=scores.logps[:n],
        policy_rejected_logps=scores.logps[n:],
        ref_chosen_logps=None if ref_chosen is None else ref_chosen.to(dtype),
        ref_rejected_logps=None if ref_rejected is None else ref_rejected.to(dtype),
        chosen_lengths=scores.lengths[:n],
        rejected_lengths=scores.lengths[n:],
        # sft's NLL is over the plain token log-probs, as in TRL, when LD-DPO weights the others.
        policy_chosen_unweighted_logps=None if settings.ld_alpha is None else scores.plain_logps[:n],
        chosen_prompt_logps=None if scores.prompt_logps is None else scores.prompt_logps[:n],
        chosen_prompt_lengths=None if scores.prompt_lengths is None else scores.prompt_lengths[:n],
    )


def compute_micro_batch(
    policy_forward: Callable[..., object],
    reference_logps: Callable[[MicroBatch], tuple[torch.Tensor, torch.Tensor]],
    batch: MicroBatch | UnpairedBatch,
    settings: LossSettings,
) -> MicroBatchResult:
    """Preference loss and metric sums of one micro-batch (padded or packed).

    `reference_logps(batch)` gives the (B,) chosen and rejected reference log-probs, LD-DPO weighted
    when `settings.ld_alpha` is set (`sequence_logps(..., ld_alpha=...)`); it is not called for a
    reference-free loss. The policy's forward also yields the WPO pair weights
    exp(log w_c + log w_r) when `settings.use_weighting` is set. An `UnpairedBatch` (KTO) goes to
    `forward_unpaired`.
    """
    if isinstance(batch, UnpairedBatch):
        return compute_unpaired_micro_batch(policy_forward, reference_logps, batch, settings)
    n = batch.num_pairs
    scores = compute_sequence_scores(
        policy_forward,
        batch,
        ld_alpha=settings.ld_alpha,
        wpo_weights=settings.use_weighting,
        chunk_size=settings.logps_chunk_size,
        prompt_logps="orpo" in settings.loss_types,  # ORPO's NLL covers the chosen prompts too
    )
    references = (None, None) if settings.reference_free else reference_logps(batch)
    pair = _pair_logps(scores, *references, settings)
    pair_weights = None
    if scores.wpo_log_weights is not None:
        pair_weights = torch.exp(scores.wpo_log_weights[:n] + scores.wpo_log_weights[n:])
    losses, chosen_rewards, rejected_rewards = compute_dpo_loss(
        pair,
        loss_types=settings.loss_types,
        loss_weights=settings.loss_weights,
        beta=settings.beta,
        label_smoothing=settings.label_smoothing,
        discopop_tau=settings.discopop_tau,
        f_divergence_type=settings.f_divergence_type,
        f_alpha_divergence_coef=settings.f_alpha_divergence_coef,
        simpo_gamma=settings.simpo_gamma,
        cpo_alpha=settings.cpo_alpha,
        pair_weights=pair_weights,
    )
    with torch.no_grad():
        total_tokens = batch.input_ids.numel()  # (2B, T) padded or (R, L) packed entries computed
        chosen_logps, rejected_logps = compute_reported_logps(pair, settings.loss_types)
        values = {
            "pairs": float(n),
            "loss": losses.detach().sum(),
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": chosen_logps.detach().sum(),
            "logps/rejected": rejected_logps.detach().sum(),
            "logits/chosen": scores.logit_sums[:n].sum(),
            "logits/rejected": scores.logit_sums[n:].sum(),
            "chosen_tokens": scores.lengths[:n].sum(),
            "rejected_tokens": scores.lengths[n:].sum(),
            "tokens": float(batch.num_tokens),
            "padded_tokens": float(total_tokens - batch.num_tokens),
            "micro_batches": 1.0,
        } | _objective_sums(pair, scores, settings)
        sums = torch.tensor([float(values.get(k, 0.0)) for k in SUM_KEYS], dtype=torch.float64)
    return MicroBatchResult(loss=losses.mean(), sums=sums)


def _objective_sums(
    pair: PreferenceLogps, scores: SequenceScores, settings: LossSettings
) -> dict[str, torch.Tensor | float]:
    """The sums of the metrics only some objectives have: the NLL of the chosen tokens (sft, cpo,
    orpo) and ORPO's log odds (TRL's `nll_loss`, `log_odds_ratio`, `log_odds_chosen`)."""
    values: dict[str, torch.Tensor | float] = {}
    n = pair.batch_size
    if "orpo" in settings.loss_types:
        tokens = scores.lengths[:n].sum() + (
            0 if pair.chosen_prompt_lengths is None else pair.chosen_prompt_lengths.sum()
        )
        values["nll_loss"] = compute_orpo_nll(pair) * tokens
        values["nll_tokens"] = tokens
    elif settings.has_nll:
        values["nll_loss"] = -scores.plain_logps[:n].sum()
        values["nll_tokens"] = scores.lengths[:n].sum()
    if "orpo" in settings.loss_types:
        log_odds = compute_log_odds(pair)
        values["log_odds_ratio"] = torch.nn.functional.logsigmoid(log_odds).sum()
        values["log_odds_chosen"] = log_odds.sum()
        values["odds_pairs"] = float(n)
    return values


def sums_to_metrics(sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Reduced sums -> TRL-named means (loss and rewards per pair, logits per token)."""
    s = dict(zip(SUM_KEYS, sums.tolist()))
    if s["kl_batches"] > 0:
        return {f"{prefix}{k}": v for k, v in unpaired_metrics(s).items()}
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
    if s["nll_tokens"] > 0:
        # Token mean over every chosen token of the window: TRL's per-batch cross-entropy.
        metrics["nll_loss"] = s["nll_loss"] / s["nll_tokens"]
    if s["odds_pairs"] > 0:
        metrics["log_odds_ratio"] = s["log_odds_ratio"] / s["odds_pairs"]
        metrics["log_odds_chosen"] = s["log_odds_chosen"] / s["odds_pairs"]
    return {f"{prefix}{k}": v for k, v in metrics.items()}
