"""Preference-optimisation losses over per-pair sequence log-probs: pure tensor math.

`functions` holds one function per TRL 1.16 loss type (per-pair losses, nothing reduced);
`combine` weighs several of them into the batch objective and computes the implicit rewards. The
training loop reduces over the batch and across workers, so the math stays testable on literals.
"""

from dpo_cluster.losses.combine import compute_dpo_loss, compute_rewards
from dpo_cluster.losses.functions import (
    BATCH_SORTED_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    LOSS_FUNCTIONS,
    PreferenceLogps,
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    compute_f_divergence_scores,
    discopop_loss,
    exo_pair_loss,
    hinge_loss,
    ipo_loss,
    nca_pair_loss,
    robust_loss,
    sft_loss,
    sigmoid_loss,
    sigmoid_norm_loss,
    sppo_hard_loss,
)

__all__ = [
    "BATCH_SORTED_LOSS_TYPES",
    "F_DIVERGENCE_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "LOSS_FUNCTIONS",
    "PreferenceLogps",
    "aot_loss",
    "aot_unpaired_loss",
    "apo_down_loss",
    "apo_zero_loss",
    "bco_pair_loss",
    "compute_dpo_loss",
    "compute_f_divergence_scores",
    "compute_rewards",
    "discopop_loss",
    "exo_pair_loss",
    "hinge_loss",
    "ipo_loss",
    "nca_pair_loss",
    "robust_loss",
    "sft_loss",
    "sigmoid_loss",
    "sigmoid_norm_loss",
    "sppo_hard_loss",
]
