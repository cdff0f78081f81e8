"""Tests for the production forward (dpo_cluster.train.forward, dpo_cluster.batch.logps): the loop's
per-pair metric sums, reduced, equal the TRL-checked metric means, and the LD-DPO and WPO options
give, on padded and on packed micro-batches, what the padded reference computation gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from dpo_cluster.batch.collate import PreferenceBatch, collate_pairs
from dpo_cluster.batch.logps import MicroBatch, compute_sequence_scores, sequence_logps
from dpo_cluster.batch.packing import pack_pairs, packing_route
from dpo_cluster.logprobs import build_shifted_labels, compute_ld_sequence_logps, compute_token_logps
from dpo_cluster.losses import PreferenceLogps, compute_dpo_loss
from dpo_cluster.train.forward import LossSettings, compute_micro_batch, sums_to_metrics
from tests.test_losses import preference_metrics

# Chosen longer, rejected longer, and equal: LD-DPO's shared/tail split has work on both sides.
PAIRS: dict[str, Any] = {
    "prompt_ids": [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]],
    "chosen_ids": [[20, 21, 0], [22, 0], [23, 24, 25, 26, 27, 0], [28, 29, 0]],
    "rejected_ids": [[30, 0], [31, 32, 33, 0], [34, 0], [35, 36, 0]],
}


@pytest.fixture(scope="module")
def policy(base_dir: Path) -> PreTrainedModel:
    """The tiny model with small noise, so that it differs from `reference` (rewards are not 0)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def reference(base_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)


def test_reduced_sums_equal_preference_metrics(policy: PreTrainedModel, reference: PreTrainedModel) -> None:
    batch = collate_pairs(PAIRS, pad_token_id=1)
    settings = LossSettings(["sigmoid"], None, beta=0.1, label_smoothing=0.0)
    n = batch.num_pairs

    def reference_logps(b: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logps, _, _ = sequence_logps(reference, b)
        return logps[:n], logps[n:]

    result = compute_micro_batch(policy, reference_logps, batch, settings)
    got = sums_to_metrics(result.sums)

    logps, logit_sums, lengths = sequence_logps(policy, batch)
    ref_c, ref_r = reference_logps(batch)
    pair = PreferenceLogps(
        logps[:n], logps[n:], ref_c, ref_r, chosen_lengths=lengths[:n], rejected_lengths=lengths[n:]
    )
    losses, rc, rr = compute_dpo_loss(pair, loss_types=["sigmoid"], beta=0.1)
    want = preference_metrics(
        pair, rc, rr, chosen_logit_sums=logit_sums[:n], rejected_logit_sums=logit_sums[n:]
    )
    assert got["loss"] == pytest.approx(losses.mean().item(), abs=1e-6)
    assert result.loss.item() == pytest.approx(losses.mean().item(), abs=1e-6)
    for name, value in want.items():
        assert got[name] == pytest.approx(value.item(), abs=1e-5), name
    assert got["rewards/margins"] != 0.0


def _micro_batch(layout: str) -> MicroBatch:
    return collate_pairs(PAIRS, 1) if layout == "padded" else pack_pairs(PAIRS, 1)


def _padded_reference(
    model: PreTrainedModel,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The padded computation, spelled out: logits (2B, T, V), labels, label mask and per-token
    log-probs (2B, T) of `PAIRS` as 2B padded rows."""
    batch = collate_pairs(PAIRS, 1)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    labels, label_mask = build_shifted_labels(batch.input_ids, batch.completion_mask)
    return logits, labels, label_mask, compute_token_logps(logits, labels, label_mask)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_ld_alpha_weights_the_longer_answers_tail(policy: PreTrainedModel, layout: str) -> None:
    """sequence_logps(ld_alpha=a) = compute_ld_sequence_logps of the padded per-token log-probs;
    a = 1 is the plain sum, and a = 0 drops the tail, so a shorter answer keeps its plain sum."""
    assert packing_route(policy)[0] == "mask"
    batch = _micro_batch(layout)
    with torch.no_grad():
        _, _, label_mask, token_logps = _padded_reference(policy)
        plain, _, lengths = sequence_logps(policy, batch)
        for alpha in (0.0, 0.3, 1.0):
            got, _, _ = sequence_logps(policy, batch, ld_alpha=alpha)
            want = torch.cat(
                compute_ld_sequence_logps(*token_logps.chunk(2), *label_mask.chunk(2), alpha=alpha)
            )
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6, msg=f"alpha={alpha}")
    torch.testing.assert_close(got, plain)  # alpha = 1, the last one
    shorter = lengths <= lengths.roll(lengths.shape[0] // 2)  # at most as long as its pair's other answer
    dropped, _, _ = sequence_logps(policy, batch, ld_alpha=0.0)
    torch.testing.assert_close(dropped[shorter], plain[shorter])
    assert torch.all(dropped[~shorter] > plain[~shorter])  # the tail's log-probs are negative


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_wpo_log_weights_from_the_same_forward(policy: PreTrainedModel, layout: str) -> None:
    """log w(y) = mean over completion tokens of log p(y_t) - log sum_v p_v^2 (WPO eq. 2), written
    with a full-vocabulary softmax over the padded logits."""
    with torch.no_grad():
        logits, labels, label_mask, token_logps = _padded_reference(policy)
        log_sum_sq = torch.log((torch.softmax(logits, dim=-1) ** 2).sum(-1))
        want = ((token_logps - log_sum_sq) * label_mask).sum(1) / label_mask.sum(1)
    scores = compute_sequence_scores(policy, _micro_batch(layout), wpo_weights=True)
    assert scores.wpo_log_weights is not None and not scores.wpo_log_weights.requires_grad
    torch.testing.assert_close(scores.wpo_log_weights, want, atol=1e-5, rtol=1e-6)
    assert scores.logps.requires_grad
    assert compute_sequence_scores(policy, _micro_batch(layout)).wpo_log_weights is None
