"""KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization") over
unpaired examples: pure tensor math, TRL 1.16's `KTOTrainer` arithmetic (loss_type "kto").

Each example is one completion with a label, desirable or undesirable; there is no pair. The
reference point is an estimate of KL(pi || pi_ref), taken from mismatched (prompt, completion)
pairs of the same batch (each prompt with the previous example's completion) and never
differentiated; the caller averages it over workers before `clamp_kl`, as TRL gathers it.

Notation, per example: r = log pi(y|x) - log pi_ref(y|x); z0 = the KL estimate; sigma = sigmoid.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class UnpairedLogps:
    """Per-example inputs of KTO; every tensor is (E,).

    policy_logps / ref_logps: summed completion log-probs log pi(y|x), log pi_ref(y|x) (the policy's
        with gradient).
    labels: bool, True for a desirable completion.
    """

    policy_logps: torch.Tensor
    ref_logps: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        size = self.policy_logps.shape
        if len(size) != 1:
            raise ValueError(f"policy_logps must be (E,), got shape {tuple(size)}")
        for item in fields(self):
            value = getattr(self, item.name)
            if value.shape != size:
                raise ValueError(f"{item.name} must be (E,) = {tuple(size)}, got shape {tuple(value.shape)}")
        if self.labels.dtype != torch.bool:
            raise ValueError(f"labels must be bool, got {self.labels.dtype}")

    @property
    def logratios(self) -> torch.Tensor:
        """r = log pi(y|x) - log pi_ref(y|x), (E,)."""
        return self.policy_logps - self.ref_logps


def estimate_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """The batch's KL estimate before clamping: `(E,), (E,) -> ()`, mean of log pi(y'|x) -
    log pi_ref(y'|x) over the mismatched pairs (x_i, y_{i-1}), detached (KTO eq. 8's z0 is a
    reference point, not a target)."""
    return (policy_kl_logps - ref_kl_logps).mean().detach()


def clamp_kl(kl: torch.Tensor) -> torch.Tensor:
    """z0 = max(0, KL estimate): the divergence is non-negative, a negative estimate is noise."""
    return kl.clamp(min=0)


def kto_loss(
    batch: UnpairedLogps,
    *,
    beta: float,
    kl: torch.Tensor,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (eq. 7 of the paper, as TRL computes it): `batch, kl () -> (losses (E,), rewards (E,))`.

        desirable:    loss = lambda_D * (1 - sigma(beta * (r - z0)))
        undesirable:  loss = lambda_U * (1 - sigma(beta * (z0 - r)))
    with lambda_D = `desirable_weight`, lambda_U = `undesirable_weight` and z0 = `kl` (clamped).
    The batch objective is the mean over all E examples. Rewards beta * r are detached, for metrics.
    """
    logratios = batch.logratios
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    losses = torch.where(batch.labels, desirable, undesirable)
    return losses, (beta * logratios).detach()
