"""Tests for TR-DPO's moving reference (`dpo_cluster.train.ref_sync`): the soft update against hand
values and against TRL 1.16's own `SyncRefModelCallback`, when it is due, the config rules, and
short runs in one process: with alpha 1 every step the reference is the policy, so every loss is
ln 2; a resumed run continues from the reference its checkpoint holds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dpo_cluster.config import ConfigError, TrainConfig, load_config
from dpo_cluster.data.pipeline import PreparedData
from dpo_cluster.train.local import run_local
from dpo_cluster.train.ref_sync import REFERENCE_FILE, sync_due, sync_reference
from tests.test_losses import build_tiny_policy
from tests.test_objectives_training import prepared  # noqa: F401  (module fixture)
from tests.test_train_local import metrics_rows, train_config


def test_soft_update_hand_computed() -> None:
    """alpha = 0.6: ref = 0.6 * policy + 0.4 * ref, e.g. 0.6 * 2 + 0.4 * 1 = 1.6 and
    0.6 * (-1) + 0.4 * 3 = 0.6; the policy is untouched."""
    policy, reference = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        policy.weight.copy_(torch.tensor([[2.0, -1.0]]))
        reference.weight.copy_(torch.tensor([[1.0, 3.0]]))
    sync_reference(policy, reference, 0.6)
    torch.testing.assert_close(reference.weight, torch.tensor([[1.6, 0.6]]), atol=1e-7, rtol=0)
    assert policy.weight.tolist() == [[2.0, -1.0]]


def test_soft_update_matches_trl_callback() -> None:
    from trl.trainer.callbacks import SyncRefModelCallback

    policy = build_tiny_policy(0)
    ours, theirs = build_tiny_policy(1), build_tiny_policy(1)
    for alpha in (0.6, 0.05, 1.0):
        sync_reference(policy, ours, alpha)
        SyncRefModelCallback._sync_target_model(policy, theirs, alpha)
        for (name, mine), trl_param in zip(ours.named_parameters(), theirs.parameters()):
            assert torch.equal(mine, trl_param), (alpha, name)


def test_soft_update_refuses_another_architecture() -> None:
    with pytest.raises(ValueError, match="parameters"):
        sync_reference(torch.nn.Linear(2, 1), torch.nn.Linear(2, 1, bias=False), 0.5)
    with pytest.raises(ValueError, match="does not match"):
        sync_reference(torch.nn.Linear(2, 1), torch.nn.Linear(3, 1), 0.5)


def test_sync_is_due_every_sync_steps() -> None:
    train = TrainConfig(sync_ref_model=True, ref_model_sync_steps=3)
    assert [step for step in range(1, 10) if sync_due(train, step)] == [3, 6, 9]
    assert not any(sync_due(TrainConfig(), step) for step in range(1, 1025))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["reference.mode=precompute"], "reference.mode precompute: its reference log-probs are scored once"),
        (["reference.mode=precomputed"], "reference.mode precomputed"),
        (["lora.enabled=true"], "reference.mode adapter_disabled"),
        (["lora.enabled=true", "reference.mode=model"], "not supported with lora.enabled"),
        (["train.loss_type=[simpo]"], "reference.mode none: the loss has no reference"),
        (["train.ref_model_mixup_alpha=0"], "train.ref_model_mixup_alpha: must be in (0, 1]"),
        (["train.ref_model_sync_steps=0"], "train.ref_model_sync_steps: must be >= 1"),
    ],
)
def test_sync_ref_model_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(
            None,
            ["output_dir=o", "model.name_or_path=m", "data.train=t", "train.sync_ref_model=true", *overrides],
        )
    assert message in str(e.value)


def test_sync_settings_without_sync_are_refused() -> None:
    with pytest.raises(
        ConfigError, match="train.ref_model_sync_steps: set, but train.sync_ref_model is false"
    ):
        load_config(
            None, ["output_dir=o", "model.name_or_path=m", "data.train=t", "train.ref_model_sync_steps=8"]
        )


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_reference_copied_every_step_keeps_the_loss_at_ln2(
    prepared: PreparedData,  # noqa: F811
    tmp_path: Path,
    zero_stage: int,
) -> None:
    """alpha = 1, every step: the reference is the policy at each forward, so every step is a first
    step (loss ln 2, rewards 0), while the policy does move (the NLL-free loss has a gradient).
    Under ZeRO-3 the update runs on gathered shards."""
    config = train_config(tmp_path, "train.sync_ref_model=true", "train.ref_model_mixup_alpha=1.0",
                          "train.ref_model_sync_steps=1", "train.max_steps=3",
                          f"deepspeed.zero_stage={zero_stage}")  # fmt: skip
    run_local(config, prepared.split_dir("train"))
    rows = [row for row in metrics_rows(tmp_path) if "loss" in row]
    assert len(rows) == 3
    for row in rows:
        assert row["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert row["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
        assert row["grad_norm"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_resume_continues_from_the_checkpointed_reference(
    prepared: PreparedData,  # noqa: F811
    tmp_path: Path,
    zero_stage: int,
) -> None:
    """Sync every step at alpha 0.5, a checkpoint at step 2: resumed from it, step 3's loss is the
    uninterrupted run's (a reference restarted from the initial weights would give another)."""
    sync = ("train.sync_ref_model=true", "train.ref_model_mixup_alpha=0.5", "train.ref_model_sync_steps=1",
            "train.max_steps=3", "train.save_strategy=steps", "train.save_steps=2",
            f"deepspeed.zero_stage={zero_stage}")  # fmt: skip
    run_local(train_config(tmp_path / "full", *sync), prepared.split_dir("train"))
    full = {row["step"]: row["loss"] for row in metrics_rows(tmp_path / "full") if "loss" in row}
    step2 = tmp_path / "full" / "checkpoints" / "step-0000002"
    assert (step2 / REFERENCE_FILE).is_file()
    run_local(
        train_config(tmp_path / "resumed", *sync, f"train.resume_from={step2}"), prepared.split_dir("train")
    )
    resumed = {row["step"]: row["loss"] for row in metrics_rows(tmp_path / "resumed") if "loss" in row}
    assert sorted(resumed) == [3]
    assert resumed[3] == pytest.approx(full[3], abs=1e-6)
    assert full[3] != pytest.approx(math.log(2), abs=1e-3)
