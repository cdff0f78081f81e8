"""One preference micro-batch: policy and reference log-probs, the loss, and metric sums.

Metrics come back as per-pair *sums* plus counts rather than means, so the loop can add them over
micro-batches and all-reduce them over workers and still get exact batch means, whatever the
micro-batch sizes; `padded_tokens` counts the pad entries the forward computed, for either layout.
A reference-free loss (cpo, simpo, orpo) asks for no reference log-probs at all. Metrics only some
objectives have (`nll_loss`, `log_odds_ratio`, `log_odds_chosen`) are logged where their count is
non-zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dpo_cluster.batch.logps import MicroBatch, SequenceScores, compute_sequence_scores
from dpo_cluster.config import TrainConfig
from dpo_cluster.losses import (
    PreferenceLogps,
    compute_dpo_loss,
    compute_log_odds,
    compute_orpo_nll,
    compute_reported_logps,
    is_reference_free,
)

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
    "nll_loss",  # summed NLL of the chosen tokens, where the objective has an NLL term
    "nll_tokens",  # their count (0 without an NLL term)
    "log_odds_ratio",  # orpo: summed log sigma(log_odds)
    "log_odds_chosen",  # orpo: summed log_odds
    "odds_pairs",  # orpo: pairs counted in the two above
)

# Loss types whose objective holds the NLL of the chosen answers (`nll_loss` is logged for them).
_NLL_LOSS_TYPES = ("sft", "cpo", "orpo")


@dataclass
class LossSettings:
    """The loss options of the `train` config section (TRL's `DPOConfig` names and meanings)."""

    loss_types: list[str]
    loss_weights: list[float] | None
    beta: float
    label_smoothing: float
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    use_weighting: bool = False  # WPO pair weights from the policy's own logits
    ld_alpha: float | None = None  # LD-DPO weight of the longer answer's tail; None = off
    logps_chunk_size: int = 0  # completion tokens per output-head call; 0 = from full logits
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    cpo_alpha: float = 1.0  # weight of CPO's NLL term

    @property
    def reference_free(self) -> bool:
        """No reference log-probs are read (cpo, simpo, orpo)."""
        return is_reference_free(self.loss_types)

    @property
    def has_nll(self) -> bool:
        return any(name in _NLL_LOSS_TYPES for name in self.loss_types) and not (
            self.loss_types == ["cpo"] and self.cpo_alpha == 0
        )


def build_loss_settings(train: TrainConfig) -> LossSettings:
    """The loss options of the `train` config section, as the forward takes them."""
    return LossSettings(
        loss_types=train.loss_type,
        loss_weights=train.loss_weights,
        beta=train.beta,
        label_smoothing=train.label_smoothing,
        f_divergence_type=train.f_divergence_type,
        f_alpha_divergence_coef=train.f_alpha_divergence_coef,
        discopop_tau=train.discopop_tau,
        use_weighting=train.use_weighting,
        ld_alpha=train.ld_alpha,
        logps_chunk_size=train.logps_chunk_size,
        simpo_gamma=train.simpo_gamma,
        cpo_alpha=train.cpo_alpha,
    )


@dataclass
class MicroBatchResult:
    loss: torch.Tensor  # scalar: mean over the micro-batch's pairs, with gradient
    sums: torch.Tensor  # (len(SUM_KEYS),) float64, detached


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
    batch: MicroBatch,
    settings: LossSettings,
) -> MicroBatchResult:
    """Preference loss and metric sums of one micro-batch (padded or packed).

    `reference_logps(batch)` gives the (B,) chosen and rejected reference log-probs, LD-DPO weighted
    when `settings.ld_alpha` is set (`sequence_logps(..., ld_alpha=...)`); it is not called for a
    reference-free loss. The policy's forward also yields the WPO pair weights
    exp(log w_c + log w_r) when `settings.use_weighting` is set.
    """
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
