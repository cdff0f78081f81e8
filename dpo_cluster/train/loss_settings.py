"""What the forward of a micro-batch takes and gives back, shared by the pair and unpaired paths:
the loss options of the `train` section (`LossSettings`), and the metric sums' layout (`SUM_KEYS`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpo_cluster.config import TrainConfig
from dpo_cluster.losses import is_reference_free

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
    "count/chosen",  # kto: desirable examples ("pairs" counts every example)
    "count/rejected",  # kto: undesirable examples
    "kl",  # kto: summed per-micro-batch KL estimates (clamped, averaged over workers)
    "kl_batches",  # kto: micro-batches counted in "kl"
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
    desirable_weight: float = 1.0  # KTO's lambda_D
    undesirable_weight: float = 1.0  # KTO's lambda_U

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
        desirable_weight=train.desirable_weight,
        undesirable_weight=train.undesirable_weight,
    )


@dataclass
class MicroBatchResult:
    loss: torch.Tensor  # scalar: mean over the micro-batch's pairs (KTO: examples), with gradient
    sums: torch.Tensor  # (len(SUM_KEYS),) float64, detached
