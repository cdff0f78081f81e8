"""The per-type preference losses: one pure function per TRL `loss_type`, over per-pair log-probs.

Each function takes a `PreferenceLogps` (all (B,)) plus its hyperparameters as keyword arguments and
returns per-pair losses (B,); none reduces over the batch. Names and arithmetic are TRL 1.16's
`DPOTrainer`'s, so a recipe moves between the two unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

# Notation of the docstrings below, per pair:
#     r_c = log pi(y_c|x) - log pi_ref(y_c|x)     chosen log-ratio
#     r_r = log pi(y_r|x) - log pi_ref(y_r|x)     rejected log-ratio
#     Delta = r_c - r_r                           (or f'-scores of them under an f-divergence)
#     sigma = logistic sigmoid; beta = the DPO temperature; eps = `label_smoothing`;
#     |y| = number of completion tokens of y.

F_DIVERGENCE_TYPES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass(frozen=True)
class PreferenceLogps:
    """Per-example inputs of every loss; all tensors are (B,) and line up pair by pair.

    policy_chosen_logps / policy_rejected_logps: summed completion log-probs log pi(y|x) under the
        policy (with gradient). Under LD-DPO these are the length-desensitised sums
        (`dpo_cluster.logprobs.compute_ld_sequence_logps`).
    ref_chosen_logps / ref_rejected_logps: the same under the frozen reference model (no gradient);
        None for the reference-free losses (`dpo_cluster.losses.reference_free`), which never read them.
    chosen_lengths / rejected_lengths: number of scored completion tokens (the shifted completion
        mask summed per row). Needed by the length-normalised losses (ipo, sigmoid_norm), by sft and
        by the `logits/*` metrics; None otherwise. TRL counts the unshifted completion mask for ipo
        and sigmoid_norm, which is the same number whenever the prompt is non-empty.
    policy_chosen_unweighted_logps: plain summed chosen log-probs for the sft term when LD-DPO
        weighting makes `policy_chosen_logps` differ from the plain sum (TRL's sft term always uses
        the unweighted token log-probs). None means `policy_chosen_logps`.
    chosen_prompt_logps / chosen_prompt_lengths: summed policy log-probs and counts of the chosen
        sequences' prompt tokens, for ORPO's NLL, which covers the whole chosen sequence (TRL's,
        after the ORPO authors' code); None elsewhere.
    """

    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor | None
    ref_rejected_logps: torch.Tensor | None
    chosen_lengths: torch.Tensor | None = None
    rejected_lengths: torch.Tensor | None = None
    policy_chosen_unweighted_logps: torch.Tensor | None = None
    chosen_prompt_logps: torch.Tensor | None = None
    chosen_prompt_lengths: torch.Tensor | None = None

    def __post_init__(self) -> None:
        size = self.policy_chosen_logps.shape
        if len(size) != 1:
            raise ValueError(f"policy_chosen_logps must be (B,), got shape {tuple(size)}")
        for item in fields(self):
            value = getattr(self, item.name)
            if value is not None and value.shape != size:
                raise ValueError(f"{item.name} must be (B,) = {tuple(size)}, got shape {tuple(value.shape)}")

    @property
    def batch_size(self) -> int:
        return self.policy_chosen_logps.shape[0]

    @property
    def chosen_logratios(self) -> torch.Tensor:
        """r_c = log pi(y_c|x) - log pi_ref(y_c|x), (B,)."""
        return self.policy_chosen_logps - self._reference("ref_chosen_logps")

    @property
    def rejected_logratios(self) -> torch.Tensor:
        """r_r = log pi(y_r|x) - log pi_ref(y_r|x), (B,)."""
        return self.policy_rejected_logps - self._reference("ref_rejected_logps")

    def _reference(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"this loss needs reference log-probs, but PreferenceLogps.{name} is None")
        return value


def require_lengths(batch: PreferenceLogps, loss_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_lengths, rejected_lengths), or ValueError naming the loss that needs them."""
    if batch.chosen_lengths is None or batch.rejected_lengths is None:
        raise ValueError(
            f"the {loss_name!r} loss needs chosen_lengths and rejected_lengths in PreferenceLogps"
        )
    return batch.chosen_lengths, batch.rejected_lengths


def compute_f_divergence_scores(
    logratios: torch.Tensor,
    *,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> torch.Tensor:
    """f'-score of each log-ratio `logratios (B,) -> (B,)`, for f-DPO (Wang et al. 2023, "Beyond Reverse KL").

    f-DPO replaces the log-ratio log u (u = pi/pi_ref) in the DPO reward with f'(u) for the chosen
    f-divergence; constant offsets cancel in the chosen-minus-rejected difference. As in TRL:
        reverse_kl:        log u                                   (standard DPO)
        forward_kl:        1 - 1/u = 1 - exp(-log u)
        js_divergence:     log(2u / (1 + u)) = log 2 + log sigma(log u)
        alpha_divergence:  (u^(a-1) - 1) / (a - 1),  a = f_alpha_divergence_coef (a -> 1 gives log u)
    The alpha-divergence exponent is computed in fp32 and clamped (11 for fp16, 80 otherwise) so that
    exp stays representable after the cast back.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        alpha = f_alpha_divergence_coef
        if abs(alpha - 1.0) < 1e-6:  # the limit a -> 1 of (u^(a-1) - 1)/(a - 1) is log u
            return logratios
        exponent = (alpha - 1.0) * logratios
        clamp_max = 11.0 if exponent.dtype == torch.float16 else 80.0
        powered = torch.exp(torch.clamp(exponent.float(), max=clamp_max)) - 1.0
        return powered.to(exponent.dtype) * (1.0 / (alpha - 1.0))
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; expected one of {F_DIVERGENCE_TYPES}")


def _scores(
    batch: PreferenceLogps, f_divergence_type: str, f_alpha_divergence_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    kwargs = {"f_divergence_type": f_divergence_type, "f_alpha_divergence_coef": f_alpha_divergence_coef}
    return (
        compute_f_divergence_scores(batch.chosen_logratios, **kwargs),
        compute_f_divergence_scores(batch.rejected_logratios, **kwargs),
    )


def _score_margin(
    batch: PreferenceLogps, f_divergence_type: str, f_alpha_divergence_coef: float
) -> torch.Tensor:
    chosen_scores, rejected_scores = _scores(batch, f_divergence_type, f_alpha_divergence_coef)
    return chosen_scores - rejected_scores


def sigmoid_loss(
    batch: PreferenceLogps,
    *,
    beta: float,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): `batch -> (B,)`, loss = -log sigma(beta * Delta).

    TRL 1.16 has no label smoothing on this loss (conservative DPO is `robust`/`exo_pair`).
    """
    delta = _score_margin(batch, f_divergence_type, f_alpha_divergence_coef)
    return -F.logsigmoid(beta * delta)


def hinge_loss(
    batch: PreferenceLogps,
    *,
    beta: float,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> torch.Tensor:
    """SLiC hinge (Zhao et al. 2023, SLiC-HF, the rank-calibration loss): `batch -> (B,)`.

    loss = max(0, 1 - beta * Delta); beta plays the role of 1/margin.
    """
    delta = _score_margin(batch, f_divergence_type, f_alpha_divergence_coef)
    return torch.relu(1 - beta * delta)


def ipo_loss(
    batch: PreferenceLogps,
    *,
    beta: float,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17), length-normalised as in TRL: `batch -> (B,)`, needs lengths.

    loss = (r_c / |y_c| - r_r / |y_r| - 1 / (2 * beta))^2, with beta the regulariser tau of the paper.
    The per-token averaging keeps the squared target comparable across answer lengths; TRL adopted it
    with the paper's authors (lengths clamped to at least 1).
    """
    chosen_lengths, rejected_lengths = require_lengths(batch, "ipo")
    chosen_scores, rejected_scores = _scores(batch, f_divergence_type, f_alpha_divergence_coef)
    chosen_avg = chosen_scores / chosen_lengths.to(chosen_scores.dtype).clamp(min=1.0)
    rejected_avg = rejected_scores / rejected_lengths.to(rejected_scores.dtype).clamp(min=1.0)
    return (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2


def exo_pair_loss(
    batch: PreferenceLogps,
    *,
    beta: float,
    label_smoothing: float,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> torch.Tensor:
    """EXO-pref (Ji et al. 2024, eq. 16) for K = 2: `batch -> (B,)`, eps = label_smoothing in (0, 1).

    KL(q || p) between the policy's pair distribution q = softmax(beta * [r_c, r_r]) and the smoothed
    label distribution p = [1 - eps, eps]:
        loss = sigma(beta*Delta) * (log sigma(beta*Delta) - log(1 - eps))
             + sigma(-beta*Delta) * (log sigma(-beta*Delta) - log eps).
    The paper recommends eps = 1e-3; eps = 0 is undefined (log 0), as in TRL.
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(
            f"exo_pair needs 0 < label_smoothing < 1 (the paper uses 1e-3), got {label_smoothing}"
        )
    logits = beta * _score_margin(batch, f_divergence_type, f_alpha_divergence_coef)
    log_p_chosen = math.log1p(-label_smoothing)
    log_p_rejected = math.log(label_smoothing)
    return torch.sigmoid(logits) * (F.logsigmoid(logits) - log_p_chosen) + torch.sigmoid(-logits) * (
        F.logsigmoid(-logits) - log_p_rejected
    )


def nca_pair_loss(batch: PreferenceLogps, *, beta: float) -> torch.Tensor:
    """NCA for pairwise data (Chen et al. 2024, Noise Contrastive Alignment, K = 2): `batch -> (B,)`.

    With rewards s_c = beta * r_c, s_r = beta * r_r:
        loss = -log sigma(s_c) - 0.5 * log sigma(-s_c) - 0.5 * log sigma(-s_r).
    Optimises absolute likelihoods, not only the margin, so the chosen log-prob does not sink.
    """
    chosen_rewards = beta * batch.chosen_logratios
    rejected_rewards = beta * batch.rejected_logratios
    return (
        -F.logsigmoid(chosen_rewards)
        - 0.5 * F.logsigmoid(-chosen_rewards)
        - 0.5 * F.logsigmoid(-rejected_rewards)
    )


def robust_loss(
    batch: PreferenceLogps,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"): `batch -> (B,)`, eps = flip rate in [0, 0.5).

    The unbiased loss under labels flipped with probability eps:
        loss = (-(1 - eps) * log sigma(beta*Delta) + eps * log sigma(-beta*Delta)) / (1 - 2*eps).
    eps = 0 is plain DPO. TRL only warns outside [0, 0.5); here that is an error, since eps = 0.5
    divides by zero and eps > 0.5 flips the sign of the objective.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    logits = beta * _score_margin(batch, f_divergence_type, f_alpha_divergence_coef)
    clean = -(1 - label_smoothing) * F.logsigmoid(logits)
    flipped = -label_smoothing * F.logsigmoid(-logits)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def bco_pair_loss(batch: PreferenceLogps, *, beta: float) -> torch.Tensor:
    """BCO on pairs (Jung et al. 2024, with the reward shift delta = 0): `batch -> (B,)`.

    Binary classification of chosen (label 1) vs rejected (label 0) by the implicit reward:
        loss = -log sigma(beta * r_c) - log sigma(-beta * r_r).
    The paper subtracts a running mean of the rewards (delta) inside both sigmoids; TRL 1.16 does not
    keep that running mean for `bco_pair`, so this loss is stateless and neither does it here.
    """
    return -F.logsigmoid(beta * batch.chosen_logratios) - F.logsigmoid(-beta * batch.rejected_logratios)


def sppo_hard_loss(batch: PreferenceLogps, *, beta: float) -> torch.Tensor:
    """SPPO with hard preference probabilities (Wu et al. 2024, eq. 4.7 of Algorithm 1): `batch -> (B,)`.

    The paper regresses log(pi/pi_ref) onto eta * (P(y wins) - 1/2) with eta = 1/beta; with P = 1 for
    the chosen and P = 0 for the rejected answer:
        loss = (r_c - 1/(2*beta))^2 + (r_r + 1/(2*beta))^2.
    Note the raw log-ratios, not beta-scaled rewards.
    """
    half_eta = 0.5 / beta
    return (batch.chosen_logratios - half_eta) ** 2 + (batch.rejected_logratios + half_eta) ** 2


def _smoothed_logistic(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def aot_loss(batch: PreferenceLogps, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT, paired (Melnyk et al. 2024): `batch -> (B,)`; BATCH-LEVEL, entries are not per pair.

    Alignment via optimal transport makes the distribution of policy margins u = log pi(y_c) -
    log pi(y_r) dominate that of reference margins v = log pi_ref(y_c) - log pi_ref(y_r), in first
    order stochastic dominance: both are sorted across the batch and compared quantile by quantile,
        d_(i) = u_(i) - v_(i),  loss_i = -(1 - eps) log sigma(beta d_(i)) - eps log sigma(-beta d_(i)).
    Entry i belongs to the i-th quantile, not to pair i, so per-pair weighting does not apply and the
    batch (per worker) is the unit that is sorted.
    """
    logratios = batch.policy_chosen_logps - batch.policy_rejected_logps
    ref_logratios = batch.ref_chosen_logps - batch.ref_rejected_logps
    logratios_sorted, _ = torch.sort(logratios, dim=0)
    ref_logratios_sorted, _ = torch.sort(ref_logratios, dim=0)
    return _smoothed_logistic(beta * (logratios_sorted - ref_logratios_sorted), label_smoothing)


def aot_unpaired_loss(batch: PreferenceLogps, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT, unpaired (Melnyk et al. 2024): `batch -> (B,)`; BATCH-LEVEL, entries are not per pair.

    For unpaired data the chosen log-ratios r_c and rejected log-ratios r_r are sorted separately
    across the batch and compared quantile by quantile:
        d_(i) = r_c,(i) - r_r,(i),  loss_i = -(1 - eps) log sigma(beta d_(i)) - eps log sigma(-beta d_(i)).
    """
    chosen_sorted, _ = torch.sort(batch.chosen_logratios, dim=0)
    rejected_sorted, _ = torch.sort(batch.rejected_logratios, dim=0)
    return _smoothed_logistic(beta * (chosen_sorted - rejected_sorted), label_smoothing)


def apo_zero_loss(batch: PreferenceLogps, *, beta: float) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): `batch -> (B,)`.

    For chosen answers better than the model's own: push chosen likelihood up, rejected down,
        loss = (1 - sigma(beta * r_c)) + sigma(beta * r_r).
    """
    return (1 - torch.sigmoid(beta * batch.chosen_logratios)) + torch.sigmoid(beta * batch.rejected_logratios)


def apo_down_loss(batch: PreferenceLogps, *, beta: float) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): `batch -> (B,)`.

    For chosen answers worse than the model's own: push both down, the rejected more,
        loss = sigma(beta * r_c) + (1 - sigma(beta * (r_c - r_r))).
    """
    chosen_logratios = batch.chosen_logratios
    return torch.sigmoid(beta * chosen_logratios) + (
        1 - torch.sigmoid(beta * (chosen_logratios - batch.rejected_logratios))
    )


def discopop_loss(
    batch: PreferenceLogps,
    *,
    beta: float,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> torch.Tensor:
    """DiscoPOP, the log-ratio modulated loss (Chris Lu et al. 2024, eq. 5): `batch -> (B,)`.

    With z = beta * Delta and mixing weight m = sigma(z / tau):
        loss = (1 - m) * (-log sigma(z)) + m * exp(-z),
    a blend of the logistic (DPO) and exponential losses steered by the margin; tau = 0.05 in the paper.
    """
    logits = beta * _score_margin(batch, f_divergence_type, f_alpha_divergence_coef)
    modulation = torch.sigmoid(logits / discopop_tau)
    return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation


def sft_loss(batch: PreferenceLogps) -> torch.Tensor:
    """Negative log-likelihood of the chosen answers: `batch -> (B,)`; BATCH-LEVEL, all entries equal.

    loss = -(sum_i log pi(y_c,i | x_i)) / (sum_i |y_c,i|), the per-token mean over every chosen
    token of the batch (not a mean of per-pair means), broadcast to (B,) as TRL does so that it
    combines with the per-pair losses; its batch mean is the token mean. Paired with `sigmoid` it is
    RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"). Uses
    `policy_chosen_unweighted_logps` when set (LD-DPO). The token count is clamped to at least 1
    (TRL would return NaN for a batch without chosen tokens).
    """
    chosen_lengths, _ = require_lengths(batch, "sft")
    logps = batch.policy_chosen_logps
    if batch.policy_chosen_unweighted_logps is not None:
        logps = batch.policy_chosen_unweighted_logps
    token_mean_nll = -logps.sum() / chosen_lengths.sum().clamp(min=1).to(logps.dtype)
    return token_mean_nll.expand(batch.batch_size)


def sigmoid_norm_loss(
    batch: PreferenceLogps,
    *,
    beta: float,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> torch.Tensor:
    """Length-normalised DPO: `batch -> (B,)`, needs lengths.

    DPO (Rafailov et al. 2023, eq. 7) on per-token average log-ratios, which removes the reward's
    bias towards longer answers (the same normalisation as SimPO's average log-likelihood reward,
    Meng et al. 2024, here kept relative to the reference):
        loss = -log sigma(beta * (r_c / |y_c| - r_r / |y_r|)),  lengths clamped to at least 1.
    """
    chosen_lengths, rejected_lengths = require_lengths(batch, "sigmoid_norm")
    chosen_scores, rejected_scores = _scores(batch, f_divergence_type, f_alpha_divergence_coef)
    chosen_avg = chosen_scores / chosen_lengths.to(chosen_scores.dtype).clamp(min=1.0)
    rejected_avg = rejected_scores / rejected_lengths.to(rejected_scores.dtype).clamp(min=1.0)
    return -F.logsigmoid(beta * (chosen_avg - rejected_avg))


LOSS_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "robust": robust_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "sft": sft_loss,
    "sigmoid_norm": sigmoid_norm_loss,
}
"""Loss type name (TRL's `DPOConfig.loss_type` values) -> per-example loss function. The valid names."""

# Losses that sort across the batch: their entries are quantiles, not pairs, so per-pair weights
# (WPO) would be misaligned. TRL refuses the combination too.
BATCH_SORTED_LOSS_TYPES: frozenset[str] = frozenset({"aot", "aot_unpaired"})


# Loss types allowed with a non-default `f_divergence_type` (TRL's list): those built on the margin
# Delta, where the f-DPO reparameterisation's beta * log Z(x) term cancels, plus sft, which has no
# log-ratio at all and is unaffected. The others (nca_pair, bco_pair, sppo_hard, apo_*, aot*) use
# single log-ratios, where the term would not cancel.
F_DIVERGENCE_LOSS_TYPES: frozenset[str] = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
