"""Reference-free preference losses: CPO, SimPO and ORPO, pure functions over per-pair log-probs.

These need no reference model: `PreferenceLogps.ref_*` may be None. Each function returns per-pair
losses (B,), like `functions`; their names and arithmetic are TRL 1.16's (`trl.experimental.cpo.
CPOTrainer` with loss_type "sigmoid" and "simpo", `trl.experimental.orpo.ORPOTrainer`), so a recipe
moves between the two unchanged. The NLL term of CPO and ORPO is `sft_loss`'s token mean over the
batch's chosen tokens, broadcast to (B,), which is TRL's cross-entropy over the chosen labels
(ORPO's covers the chosen prompts too, as TRL's does: `compute_orpo_nll`).

Notation, per pair: s_c, s_r = summed completion log-probs log pi(y|x) of chosen and rejected;
a_c = s_c / |y_c|, a_r = s_r / |y_r| their per-token averages; sigma = logistic sigmoid.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dpo_cluster.losses.functions import PreferenceLogps, require_lengths, sft_loss

# The loss types whose scores are per-token averages a = s / |y| (TRL: average_log_prob=True); the
# others score summed log-probs. Rewards and the logged `logps/*` are of these scores, as in TRL.
LENGTH_AVERAGED_LOSS_TYPES: frozenset[str] = frozenset({"simpo", "orpo"})


def compute_average_logps(batch: PreferenceLogps) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token average policy log-probs `batch -> (a_c (B,), a_r (B,))`, lengths clamped to >= 1."""
    chosen_lengths, rejected_lengths = require_lengths(batch, "length-averaged")
    chosen = batch.policy_chosen_logps / chosen_lengths.to(batch.policy_chosen_logps.dtype).clamp(min=1.0)
    rejected = batch.policy_rejected_logps / rejected_lengths.to(batch.policy_rejected_logps.dtype).clamp(
        min=1.0
    )
    return chosen, rejected


def compute_policy_scores(batch: PreferenceLogps, loss_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-pair scores a reference-free `loss_type` works with -> (chosen (B,), rejected (B,)):
    averages for simpo and orpo, sums for cpo. Their beta multiples are the implicit rewards."""
    if loss_type in LENGTH_AVERAGED_LOSS_TYPES:
        return compute_average_logps(batch)
    return batch.policy_chosen_logps, batch.policy_rejected_logps


def _smoothed_logistic(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def cpo_loss(
    batch: PreferenceLogps, *, beta: float, label_smoothing: float = 0.0, cpo_alpha: float = 1.0
) -> torch.Tensor:
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization", eq. 3 + the NLL of eq. 6): `batch -> (B,)`.

    DPO with the reference dropped (a uniform reference, the beta -> 0 view of the paper), plus
    behaviour cloning of the chosen answers, weighted by alpha = `cpo_alpha`:
        loss = -(1 - eps) log sigma(beta (s_c - s_r)) - eps log sigma(-beta (s_c - s_r)) + alpha * NLL,
    NLL the token mean over the batch's chosen tokens (broadcast; see `sft_loss`), eps =
    `label_smoothing`. Needs lengths when alpha > 0.
    """
    logits = beta * (batch.policy_chosen_logps - batch.policy_rejected_logps)
    losses = _smoothed_logistic(logits, label_smoothing)
    if cpo_alpha != 0:  # TRL skips the NLL (and logs 0) at alpha = 0
        losses = losses + cpo_alpha * sft_loss(batch)
    return losses


def simpo_loss(
    batch: PreferenceLogps, *, beta: float, simpo_gamma: float = 0.5, label_smoothing: float = 0.0
) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6): `batch -> (B,)`, needs lengths.

    The average log-likelihood is the reward, and the chosen must beat the rejected by a margin
    gamma = `simpo_gamma` (in reward units):
        loss = -(1 - eps) log sigma(beta (a_c - a_r) - gamma) - eps log sigma(-(beta (a_c - a_r) - gamma)).
    Written as TRL does, beta * ((a_c - a_r) - gamma / beta). No NLL term: TRL's CPO-SimPO
    (`cpo_alpha` > 0) is `[simpo, sft]` here, with the sft weight as alpha.
    """
    chosen, rejected = compute_average_logps(batch)
    logits = (chosen - rejected) - simpo_gamma / beta
    return _smoothed_logistic(beta * logits, label_smoothing)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, `(B,) -> (B,)`, stable on both sides of -ln 2 (Maechler 2012):
    log(-expm1(x)) near 0, where 1 - exp(x) cancels; log1p(-exp(x)) below, where expm1 would."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def compute_log_odds(batch: PreferenceLogps) -> torch.Tensor:
    """ORPO's log odds ratio `batch -> (B,)` (Hong et al. 2024, eqs. 4 and 7):
        log odds(y) = log(P / (1 - P)) with P = exp(a), so
        log_odds = (a_c - a_r) - (log(1 - exp(a_c)) - log(1 - exp(a_r))),
    computed in float32 as TRL does."""
    chosen, rejected = compute_average_logps(batch)
    chosen, rejected = chosen.float(), rejected.float()
    return (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))


def compute_orpo_nll(batch: PreferenceLogps) -> torch.Tensor:
    """ORPO's NLL `batch -> ()`: the token mean over the batch's chosen sequences, their prompt
    tokens included when `chosen_prompt_logps` is given (TRL computes it so, after the authors'
    code; the paper's eq. 2 conditions on the prompt), else over the chosen answers alone."""
    chosen_lengths, _ = require_lengths(batch, "orpo")
    logps, tokens = batch.policy_chosen_logps.sum(), chosen_lengths.sum()
    if batch.chosen_prompt_logps is not None and batch.chosen_prompt_lengths is not None:
        logps = logps + batch.chosen_prompt_logps.sum()
        tokens = tokens + batch.chosen_prompt_lengths.sum()
    return -logps / tokens.clamp(min=1).to(logps.dtype)


def orpo_loss(batch: PreferenceLogps, *, beta: float) -> torch.Tensor:
    """ORPO (Hong et al. 2024, eq. 6): `batch -> (B,)`, needs lengths; beta is the paper's lambda.

        loss = NLL - lambda * log sigma(log_odds),
    NLL from `compute_orpo_nll` (broadcast, as `sft_loss`), log_odds from `compute_log_odds`.
    TRL's ORPOConfig calls lambda `beta` too.
    """
    ratio = F.logsigmoid(compute_log_odds(batch))
    nll = compute_orpo_nll(batch).expand(batch.batch_size)
    return nll - beta * ratio.to(batch.policy_chosen_logps.dtype)


REFERENCE_FREE_LOSS_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "cpo": cpo_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}
"""Reference-free loss type name -> per-pair loss function. They combine only with `sft`."""
