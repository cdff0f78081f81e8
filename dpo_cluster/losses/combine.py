"""The preference objective of a batch: weighted loss types, optional per-pair weights, implicit rewards.

Kept apart from the per-type functions so that adding a loss type touches one table and one
function, while the rules on how types combine (TRL's list-valued `loss_type`) live in one place.
The DPO family (`functions`) needs reference log-probs; a reference-free type (`reference_free`:
cpo, simpo, orpo) stands alone or with `sft`, and its rewards are beta times the policy's own scores.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import torch

from dpo_cluster.losses.functions import (
    BATCH_SORTED_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    LOSS_FUNCTIONS,
    PreferenceLogps,
)
from dpo_cluster.losses.reference_free import REFERENCE_FREE_LOSS_FUNCTIONS, compute_policy_scores

PAIRED_LOSS_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    **LOSS_FUNCTIONS,
    **REFERENCE_FREE_LOSS_FUNCTIONS,
}
"""Every loss type over pairs: the DPO family, then the reference-free ones."""


def compute_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """Implicit DPO reward `policy_logps (B,), ref_logps (B,) -> (B,)`: beta * (log pi(y|x) - log pi_ref(y|x)).

    Rafailov et al. 2023, eq. 5 / section 5: the reward the policy implicitly optimises, up to the
    prompt-only term beta * log Z(x), which cancels between chosen and rejected.
    """
    return beta * (policy_logps - ref_logps)


@functools.cache
def _keyword_names(fn: Callable[..., torch.Tensor]) -> frozenset[str]:
    return frozenset(
        name for name, param in inspect.signature(fn).parameters.items() if param.kind is param.KEYWORD_ONLY
    )


def _check_combination(
    loss_types: Sequence[str],
    weights: Sequence[float],
    f_divergence_type: str,
    pair_weights: torch.Tensor | None,
    batch_size: int,
) -> None:
    """Raise ValueError for a combination `compute_dpo_loss` (and TRL) refuses."""
    if not loss_types:
        raise ValueError("loss_types must name at least one loss type")
    unknown = [name for name in loss_types if name not in PAIRED_LOSS_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown loss type(s) {unknown}; valid: {sorted(PAIRED_LOSS_FUNCTIONS)}")
    free = [name for name in loss_types if name in REFERENCE_FREE_LOSS_FUNCTIONS]
    others = [name for name in loss_types if name not in REFERENCE_FREE_LOSS_FUNCTIONS and name != "sft"]
    if free and (len(free) > 1 or others):
        raise ValueError(
            f"the reference-free loss type {free[0]!r} combines only with 'sft' (its rewards are the "
            f"policy's own scores, not log-ratios); got {list(loss_types)}"
        )
    if len(weights) != len(loss_types):
        raise ValueError(f"got {len(weights)} loss_weights for {len(loss_types)} loss_types; they must match")
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(
            f"unknown f_divergence_type {f_divergence_type!r}; expected one of {F_DIVERGENCE_TYPES}"
        )
    unsupported = sorted(set(loss_types) - F_DIVERGENCE_LOSS_TYPES)
    if f_divergence_type != "reverse_kl" and unsupported:
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} applies only to {sorted(F_DIVERGENCE_LOSS_TYPES)}; "
            f"{unsupported} have no f-divergence form"
        )
    if pair_weights is None:
        return
    if free:
        raise ValueError(f"pair_weights cannot be used with the reference-free loss type {free[0]!r}")
    sorted_types = sorted(BATCH_SORTED_LOSS_TYPES.intersection(loss_types))
    if sorted_types:
        raise ValueError(f"pair_weights cannot be used with {sorted_types}: they sort across the batch")
    if pair_weights.shape != (batch_size,):
        raise ValueError(f"pair_weights must be (B,) = ({batch_size},), got {tuple(pair_weights.shape)}")


def compute_dpo_loss(
    batch: PreferenceLogps,
    *,
    loss_types: Sequence[str],
    loss_weights: Sequence[float] | None = None,
    beta: float,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    pair_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted sum of loss types: `batch -> (loss (B,), chosen_rewards (B,), rejected_rewards (B,))`.

    loss_i = sum_k w_k * pair_weight_i * loss_k,i, with w = `loss_weights` (default all 1.0), so the
    batch mean is TRL's `sum_k w_k * mean_i(pair_weight_i * loss_k,i)` for a list-valued `loss_type`.
    `pair_weights` (B,) are optional per-pair weights, e.g. WPO's exp(log w_c + log w_r); they are
    refused with the batch-sorted aot losses. Each loss function receives only the hyperparameters
    it declares, so e.g. `label_smoothing` does not touch `sigmoid` (as in TRL); a non-default
    `f_divergence_type` is an error for loss types without an f-divergence form (TRL's rule). Pair
    weights with `sft` scale the broadcast token-mean NLL per pair (TRL 1.16 fails on that
    combination: it scales the broadcast tensor in place). Rewards are `compute_rewards` of the
    (possibly LD-weighted) log-probs, detached, for metrics; with a reference-free type, beta times
    its policy scores (`compute_reported_logps`), as TRL's CPOTrainer and ORPOTrainer log them.
    """
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    _check_combination(loss_types, weights, f_divergence_type, pair_weights, batch.batch_size)
    hyperparameters = {
        "beta": beta,
        "label_smoothing": label_smoothing,
        "discopop_tau": discopop_tau,
        "f_divergence_type": f_divergence_type,
        "f_alpha_divergence_coef": f_alpha_divergence_coef,
        "simpo_gamma": simpo_gamma,
        "cpo_alpha": cpo_alpha,
    }
    loss = torch.zeros_like(batch.policy_chosen_logps)
    for name, weight in zip(loss_types, weights):
        fn = PAIRED_LOSS_FUNCTIONS[name]
        accepted = _keyword_names(fn)
        per_pair = fn(batch, **{key: value for key, value in hyperparameters.items() if key in accepted})
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
        loss = loss + weight * per_pair

    if is_reference_free(loss_types):
        chosen_scores, rejected_scores = compute_reported_logps(batch, loss_types)
        return loss, beta * chosen_scores.detach(), beta * rejected_scores.detach()
    chosen_rewards = compute_rewards(batch.policy_chosen_logps, batch.ref_chosen_logps, beta).detach()
    rejected_rewards = compute_rewards(batch.policy_rejected_logps, batch.ref_rejected_logps, beta).detach()
    return loss, chosen_rewards, rejected_rewards


def is_reference_free(loss_types: Sequence[str]) -> bool:
    """Whether the objective is reference-free (holds cpo, simpo or orpo, which combine only with sft)."""
    return any(name in REFERENCE_FREE_LOSS_FUNCTIONS for name in loss_types)


def compute_reported_logps(
    batch: PreferenceLogps, loss_types: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-pair log-probs logged as `logps/chosen` and `logps/rejected` -> ((B,), (B,)): the
    summed log-probs, or with simpo or orpo their per-token averages (the scores those losses and
    TRL's metrics use)."""
    for name in loss_types:
        if name in REFERENCE_FREE_LOSS_FUNCTIONS:
            return compute_policy_scores(batch, name)
    return batch.policy_chosen_logps, batch.policy_rejected_logps
