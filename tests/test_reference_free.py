"""Tests for the reference-free losses (CPO, SimPO, ORPO): hand-computed values, the config rules of
`reference.mode: none`, and parity with TRL 1.16's own trainers (`trl.experimental.cpo.CPOTrainer`
for CPO and SimPO, `trl.experimental.orpo.ORPOTrainer`) through the production forward.

The TRL tier reuses the tiny Qwen2 policy, word tokenizer and six pairs of `test_losses`: each case
builds the real trainer, takes its own tokenized and collated batch, and compares TRL's
`get_batch_loss_metrics` (loss, logged metrics, gradients) with `compute_micro_batch` on the same
token ids, padded and packed.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from dpo_cluster.batch.collate import collate_pairs
from dpo_cluster.batch.logps import MicroBatch
from dpo_cluster.batch.packing import pack_pairs
from dpo_cluster.config import ConfigError, TrainConfig, load_config
from dpo_cluster.losses import (
    REFERENCE_FREE_LOSS_FUNCTIONS,
    PreferenceLogps,
    compute_dpo_loss,
    compute_log_odds,
)
from dpo_cluster.train.forward import build_loss_settings, compute_micro_batch, sums_to_metrics
from tests.test_losses import build_pairs, build_tiny_policy, build_word_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture
def two_pairs() -> PreferenceLogps:
    """Policy log-probs only (no reference), beta as each test says.

    pair 1: s_c = -1 over 2 tokens (a_c = -0.5), s_r = -3 over 4 tokens (a_r = -0.75)
    pair 2: s_c = -2 over 1 token  (a_c = -2),   s_r = -2 over 2 tokens (a_r = -1)
    NLL of the chosen tokens: -(-1 - 2) / (2 + 1) = 1.0
    """
    return PreferenceLogps(
        policy_chosen_logps=torch.tensor([-1.0, -2.0]),
        policy_rejected_logps=torch.tensor([-3.0, -2.0]),
        ref_chosen_logps=None,
        ref_rejected_logps=None,
        chosen_lengths=torch.tensor([2, 1]),
        rejected_lengths=torch.tensor([4, 2]),
    )


def _assert_values(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), atol=1e-6, rtol=0)


def test_cpo_hand_computed(two_pairs: PreferenceLogps) -> None:
    """beta = 0.1, cpo_alpha = 1: logits = beta (s_c - s_r) = 0.1 * 2 = 0.2 and 0.1 * 0 = 0.

    loss = -ln sigma(0.2) + 1.0 = 0.598138869 + 1 = 1.598138869
           -ln sigma(0)   + 1.0 = 0.693147181 + 1 = 1.693147181
    rewards = beta * s: chosen [-0.1, -0.2], rejected [-0.3, -0.2]
    """
    loss, chosen_rewards, rejected_rewards = compute_dpo_loss(two_pairs, loss_types=["cpo"], beta=0.1)
    _assert_values(loss, [1.5981388694, 1.6931471806])
    _assert_values(chosen_rewards, [-0.1, -0.2])
    _assert_values(rejected_rewards, [-0.3, -0.2])
    # cpo_alpha = 0 drops the NLL: plain CPO eq. 3.
    _assert_values(
        REFERENCE_FREE_LOSS_FUNCTIONS["cpo"](two_pairs, beta=0.1, cpo_alpha=0.0), [0.5981388694, math.log(2)]
    )


def test_simpo_hand_computed(two_pairs: PreferenceLogps) -> None:
    """beta = 2, gamma = 0.5: a_c - a_r = -0.5 + 0.75 = 0.25 and -2 + 1 = -1.

    z = beta (a_c - a_r) - gamma = 0.5 - 0.5 = 0 and -2 - 0.5 = -2.5
    loss = -ln sigma(0) = ln 2 = 0.693147181;  -ln sigma(-2.5) = ln(1 + e^2.5) = 2.578889734
    rewards = beta * a: chosen [-1, -4], rejected [-1.5, -2]
    """
    loss, chosen_rewards, rejected_rewards = compute_dpo_loss(
        two_pairs, loss_types=["simpo"], beta=2.0, simpo_gamma=0.5
    )
    _assert_values(loss, [0.6931471806, 2.5788897343])
    _assert_values(chosen_rewards, [-1.0, -4.0])
    _assert_values(rejected_rewards, [-1.5, -2.0])
    # CPO-SimPO: + 0.5 x NLL (1.0) on every pair.
    loss, _, _ = compute_dpo_loss(
        two_pairs, loss_types=["simpo", "sft"], loss_weights=[1.0, 0.5], beta=2.0, simpo_gamma=0.5
    )
    _assert_values(loss, [1.1931471806, 3.0788897343])


def test_orpo_hand_computed(two_pairs: PreferenceLogps) -> None:
    """beta (lambda) = 0.1; log(1 - e^a) of a_c = -0.5, -2 and a_r = -0.75, -1:
    ln(1 - e^-0.5) = -0.932752130, ln(1 - e^-2) = -0.145413458,
    ln(1 - e^-0.75) = -0.639353465, ln(1 - e^-1) = -0.458675145.

    log_odds = (a_c - a_r) - (ln(1 - e^a_c) - ln(1 - e^a_r))
      pair 1: 0.25 - (-0.932752130 + 0.639353465) = 0.25 + 0.293398665 = 0.543398665
      pair 2: -1 - (-0.145413458 + 0.458675145) = -1 - 0.313261688 = -1.313261688
    log sigma(log_odds) = -0.457912733 and -1.551444714
    loss = NLL - 0.1 * log sigma(log_odds) = 1.045791273 and 1.155144471
    """
    _assert_values(compute_log_odds(two_pairs), [0.5433986645, -1.3132616875])
    loss, chosen_rewards, _ = compute_dpo_loss(two_pairs, loss_types=["orpo"], beta=0.1)
    _assert_values(loss, [1.0457912733, 1.1551444714])
    _assert_values(chosen_rewards, [-0.05, -0.2])


def test_equal_averages_give_the_margin_loss() -> None:
    """When chosen and rejected have the same per-token average log-prob (e.g. a model that does not
    yet tell them apart), SimPO's loss is -ln sigma(-gamma) = ln(1 + e^gamma): ln(1 + e^0.5) =
    0.974076984 at gamma = 0.5, whatever beta; CPO's preference term is ln 2 at equal sums."""
    logps = torch.tensor([-4.0, -9.0, -1.5])
    lengths = torch.tensor([4, 9, 3])
    batch = PreferenceLogps(logps, logps.clone(), None, None, lengths, lengths.clone())
    for beta in (0.5, 2.0, 10.0):
        loss, _, _ = compute_dpo_loss(batch, loss_types=["simpo"], beta=beta, simpo_gamma=0.5)
        _assert_values(loss, [0.9740769842] * 3)
        loss, _, _ = compute_dpo_loss(batch, loss_types=["cpo"], beta=beta, cpo_alpha=0.0)
        _assert_values(loss, [math.log(2)] * 3)


def test_reference_free_combinations_refused(two_pairs: PreferenceLogps) -> None:
    with pytest.raises(ValueError, match="combines only with 'sft'"):
        compute_dpo_loss(two_pairs, loss_types=["simpo", "sigmoid"], beta=0.1)
    with pytest.raises(ValueError, match="combines only with 'sft'"):
        compute_dpo_loss(two_pairs, loss_types=["simpo", "cpo"], beta=0.1)
    with pytest.raises(ValueError, match="pair_weights"):
        compute_dpo_loss(two_pairs, loss_types=["cpo"], beta=0.1, pair_weights=torch.ones(2))
    with pytest.raises(ValueError, match="needs reference log-probs"):
        compute_dpo_loss(two_pairs, loss_types=["sigmoid"], beta=0.1)


# --------------------------------------------------------------------------------------------------
# Config: reference.mode none
# --------------------------------------------------------------------------------------------------


def _load(*overrides: str) -> Any:
    return load_config(None, ["output_dir=o", "model.name_or_path=m", "data.train=t", *overrides])


def test_reference_free_resolves_auto_to_none() -> None:
    assert _load("train.loss_type=[simpo]").reference_mode() == "none"
    assert _load("train.loss_type=[orpo]", "reference.mode=none").reference_mode() == "none"
    assert _load("train.loss_type=[cpo,sft]", "lora.enabled=true").reference_mode() == "none"
    assert _load().reference_mode() == "model"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["reference.mode=none"], "train.loss_type sigmoid, which needs a reference"),
        (["train.loss_type=[simpo]", "reference.mode=model"], "reference.mode: model"),
        (
            ["train.loss_type=[orpo]", "reference.mode=precompute"],
            "train.loss_type orpo, which needs no reference",
        ),
        (
            ["train.loss_type=[simpo,sigmoid]"],
            "train.loss_type: the reference-free simpo combines only with sft",
        ),
        (["train.loss_type=[cpo]", "train.use_weighting=true"], "train.use_weighting: not used"),
        (["train.simpo_gamma=-1", "train.loss_type=[simpo]"], "train.simpo_gamma: must be >= 0"),
        (["train.cpo_alpha=-1", "train.loss_type=[cpo]"], "train.cpo_alpha: must be >= 0"),
    ],
)
def test_reference_mode_none_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(*overrides)
    assert message in str(e.value)
    if "reference.mode" in " ".join(overrides):
        assert "reference.mode" in str(e.value) and "train.loss_type" in str(e.value)


# --------------------------------------------------------------------------------------------------
# Parity with TRL's CPOTrainer and ORPOTrainer
# --------------------------------------------------------------------------------------------------


def _trl_trainer(kind: str, tmp_path: Any, options: dict[str, Any]) -> Any:
    if kind == "orpo":
        from trl.experimental.orpo import ORPOConfig as Args
        from trl.experimental.orpo import ORPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Args
        from trl.experimental.cpo import CPOTrainer as Trainer
    pairs = build_pairs()
    args = Args(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        bf16=False,
        per_device_train_batch_size=len(pairs),
        max_length=64,
        **options,
    )
    trainer = Trainer(
        model=build_tiny_policy(0), args=args, train_dataset=pairs, processing_class=build_word_tokenizer()
    )
    trainer.model.train()
    return trainer


def _micro_batches(trainer: Any) -> dict[str, MicroBatch]:
    """TRL's tokenized rows (prompt labels -100) split back into prompt / chosen / rejected ids,
    as the production padded and packed micro-batches."""
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    columns: dict[str, list[list[int]]] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for row in rows:
        cut = sum(1 for label in row["chosen_labels"] if label == -100)
        assert row["rejected_input_ids"][:cut] == row["chosen_input_ids"][:cut]
        columns["prompt_ids"].append(row["chosen_input_ids"][:cut])
        columns["chosen_ids"].append(row["chosen_input_ids"][cut:])
        columns["rejected_ids"].append(row["rejected_input_ids"][cut:])
    pad = trainer.processing_class.pad_token_id
    return {"padded": collate_pairs(columns, pad), "packed": pack_pairs(columns, pad)}


# TRL option -> our train.* keys, per case.
PARITY_CASES = [
    pytest.param("cpo", {"loss_type": "sigmoid", "beta": 0.5}, {"loss_type": ["cpo"], "beta": 0.5}, id="cpo"),
    pytest.param(
        "cpo",
        {"loss_type": "sigmoid", "beta": 1.0, "cpo_alpha": 0.3, "label_smoothing": 0.1},
        {"loss_type": ["cpo"], "beta": 1.0, "cpo_alpha": 0.3, "label_smoothing": 0.1},
        id="cpo-alpha0.3-ls0.1",
    ),
    pytest.param(
        "cpo",
        {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5, "cpo_alpha": 0.0},
        {"loss_type": ["simpo"], "beta": 2.0, "simpo_gamma": 0.5},
        id="simpo",
    ),
    pytest.param(
        "cpo",
        {"loss_type": "simpo", "beta": 2.5, "simpo_gamma": 1.2, "cpo_alpha": 0.5, "label_smoothing": 0.2},
        {
            "loss_type": ["simpo", "sft"],
            "loss_weights": [1.0, 0.5],
            "beta": 2.5,
            "simpo_gamma": 1.2,
            "label_smoothing": 0.2,
        },  # fmt: skip
        id="cpo-simpo",
    ),
    pytest.param("orpo", {"beta": 0.1}, {"loss_type": ["orpo"], "beta": 0.1}, id="orpo"),
    pytest.param("orpo", {"beta": 1.0}, {"loss_type": ["orpo"], "beta": 1.0}, id="orpo-lambda1"),
]

# TRL's logits/* are the mean over the whole padded (B, T, V) logits tensor, prompt and pad
# positions included; ours stay DPOTrainer's (completion tokens only), so they are not compared.
PARITY_METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                  "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"]  # fmt: skip


@pytest.mark.parametrize(("kind", "trl_options", "train_options"), PARITY_CASES)
def test_matches_trl(
    tmp_path: Any, kind: str, trl_options: dict[str, Any], train_options: dict[str, Any]
) -> None:
    trainer = _trl_trainer(kind, tmp_path, trl_options)
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, trainer.data_collator(rows))
    trl_loss.backward()
    trl_grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}

    train = TrainConfig(**train_options)
    train.check(num_workers=1)
    settings = build_loss_settings(train)
    for layout, batch in _micro_batches(trainer).items():
        trainer.model.zero_grad(set_to_none=True)

        def no_reference(_: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
            raise AssertionError("a reference-free loss asked for reference log-probs")

        result = compute_micro_batch(trainer.model, no_reference, batch, settings)
        result.loss.backward()
        torch.testing.assert_close(result.loss.detach(), trl_loss.detach(), atol=1e-5, rtol=1e-5, msg=layout)
        metrics = sums_to_metrics(result.sums)
        compared = [name for name in PARITY_METRICS if name in trl_metrics]
        if trl_options.get("cpo_alpha") == 0.0:
            # TRL logs nll_loss = 0 when it skips the NLL; pure SimPO logs none here.
            compared.remove("nll_loss")
            assert "nll_loss" not in metrics
        assert len(compared) >= 6
        for name in compared:
            assert metrics[name] == pytest.approx(float(trl_metrics[name]), abs=1e-5, rel=1e-5), (
                layout,
                name,
            )
        for name, parameter in trainer.model.named_parameters():
            reference = trl_grads[name]
            scale = reference.abs().max().item()
            torch.testing.assert_close(
                parameter.grad, reference, atol=1e-5 + 1e-4 * scale, rtol=1e-4, msg=f"{layout}: {name}"
            )
