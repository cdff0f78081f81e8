"""The loop's per-pair metric sums, reduced, equal the TRL-checked `preference_metrics` means."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_cluster.batch.collate import PreferenceBatch, collate_pairs
from dpo_cluster.batch.logps import sequence_logps
from dpo_cluster.losses import PreferenceLogps, compute_dpo_loss, preference_metrics
from dpo_cluster.modeling import resolve_name_or_path
from dpo_cluster.train.forward import LossSettings, compute_micro_batch, sums_to_metrics


def test_reduced_sums_equal_preference_metrics() -> None:
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(resolve_name_or_path("builtin:tiny"))
    reference = AutoModelForCausalLM.from_pretrained(resolve_name_or_path("builtin:tiny"))
    with torch.no_grad():  # make policy and reference differ, so rewards are not all zero
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = collate_pairs(
        {
            "prompt_ids": [[5, 6, 7], [8, 9], [10, 11, 12, 13]],
            "chosen_ids": [[20, 21, 0], [22, 0], [23, 24, 25, 0]],
            "rejected_ids": [[30, 0], [31, 32, 33, 0], [34, 0]],
        },
        pad_token_id=1,
    )
    settings = LossSettings(["sigmoid"], None, beta=0.1, label_smoothing=0.0)

    def reference_logps(b: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logps, _, _ = sequence_logps(reference, b)
        return logps[:3], logps[3:]

    result = compute_micro_batch(policy, reference_logps, batch, settings)
    got = sums_to_metrics(result.sums)

    logps, logit_sums, lengths = sequence_logps(policy, batch)
    ref_c, ref_r = reference_logps(batch)
    pair = PreferenceLogps(
        logps[:3], logps[3:], ref_c, ref_r, chosen_lengths=lengths[:3], rejected_lengths=lengths[3:]
    )
    losses, rc, rr = compute_dpo_loss(pair, loss_types=["sigmoid"], beta=0.1)
    want = preference_metrics(
        pair, rc, rr, chosen_logit_sums=logit_sums[:3], rejected_logit_sums=logit_sums[3:]
    )
    assert got["loss"] == pytest.approx(losses.mean().item(), abs=1e-6)
    assert result.loss.item() == pytest.approx(losses.mean().item(), abs=1e-6)
    for name, value in want.items():
        assert got[name] == pytest.approx(value.item(), abs=1e-5), name
    assert got["rewards/margins"] != 0.0
