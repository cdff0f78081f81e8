"""Tests for dpo_cluster.losses: hand-computed values, the first-step ln 2 property, and parity with
TRL 1.16's `DPOTrainer._compute_loss` (loss, logged metrics and gradients) for every loss type.

The TRL tier builds a tiny random Qwen2 policy and a differently seeded reference, a word-level
tokenizer and a six-pair dataset, all locally; each case constructs a real `DPOTrainer` from a real
`DPOConfig` and compares it with the production forward (`dpo_cluster.train.forward.
compute_micro_batch`, with the loss options of a `TrainConfig`) on the same pairs, padded and packed.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import re
from typing import Any

import pytest
import torch

from dpo_cluster.batch.collate import ID_COLUMNS, REF_COLUMNS, collate_pairs
from dpo_cluster.batch.logps import MicroBatch, sequence_logps
from dpo_cluster.batch.packing import pack_pairs, packing_route
from dpo_cluster.config import TrainConfig
from dpo_cluster.losses import (
    F_DIVERGENCE_LOSS_TYPES,
    LOSS_FUNCTIONS,
    PreferenceLogps,
    compute_dpo_loss,
    compute_f_divergence_scores,
    compute_rewards,
)
from dpo_cluster.tiny import build_tiny_qwen2_config
from dpo_cluster.train.forward import (
    LossSettings,
    MicroBatchResult,
    build_loss_settings,
    compute_micro_batch,
    sums_to_metrics,
)

# transformers deprecation notices about `gradient_checkpointing` come from inside TRL/Trainer.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

TRL_LOSS_TYPES = [
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]


@torch.no_grad()
def preference_metrics(
    batch: PreferenceLogps,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    chosen_logit_sums: torch.Tensor | None = None,
    rejected_logit_sums: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """TRL's DPO metrics of one batch, written out as TRL logs them: rewards (B,) -> {name: 0-dim}.

    rewards/chosen, rewards/rejected: mean implicit rewards; rewards/accuracies: fraction of pairs
    with chosen_reward > rejected_reward (strict, so ties count as 0); rewards/margins: mean of
    chosen - rejected; logps/chosen, logps/rejected: mean summed policy log-probs; with logit sums
    (B,) and lengths, logits/chosen, logits/rejected: the vocabulary-mean logit averaged over all
    completion tokens of the batch (token-weighted; 0 for a batch without tokens). The oracle that
    `dpo_cluster.train.forward.sums_to_metrics` is checked against.
    """
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": batch.policy_chosen_logps.detach().mean(),
        "logps/rejected": batch.policy_rejected_logps.detach().mean(),
    }
    for side, sums, lengths in (
        ("chosen", chosen_logit_sums, batch.chosen_lengths),
        ("rejected", rejected_logit_sums, batch.rejected_lengths),
    ):
        if sums is None:
            continue
        assert lengths is not None, f"logits/{side} needs {side}_lengths"
        tokens = lengths.sum()
        metrics[f"logits/{side}"] = torch.where(
            tokens > 0, sums.sum() / tokens.clamp(min=1), torch.zeros((), device=sums.device)
        )
    return {name: value.detach() for name, value in metrics.items()}


# --------------------------------------------------------------------------------------------------
# Hand-computed values
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def two_pairs() -> PreferenceLogps:
    """Two pairs, beta = 0.1 throughout.

    pair 1: pc = -1, pr = -3, rc = -2, rr = -2  ->  r_c = +1, r_r = -1, Delta = +2, beta*Delta = +0.2
    pair 2: pc = -2, pr = -2, rc = -1, rr = -3  ->  r_c = -1, r_r = +1, Delta = -2, beta*Delta = -0.2
    completion lengths: pair 1 chosen 2, rejected 4; pair 2 chosen 1, rejected 2.
    """
    return PreferenceLogps(
        policy_chosen_logps=torch.tensor([-1.0, -2.0]),
        policy_rejected_logps=torch.tensor([-3.0, -2.0]),
        ref_chosen_logps=torch.tensor([-2.0, -1.0]),
        ref_rejected_logps=torch.tensor([-2.0, -3.0]),
        chosen_lengths=torch.tensor([2, 1]),
        rejected_lengths=torch.tensor([4, 2]),
    )


def _assert_values(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), atol=1e-6, rtol=0)


def test_sigmoid_hand_computed(two_pairs: PreferenceLogps) -> None:
    """logits = beta*((pc-rc)-(pr-rr)) = 0.1*((-1-(-2))-(-3-(-2))) = 0.2 and, for pair 2, -0.2.

    loss = -ln sigma(0.2) = ln(1 + e^-0.2) = 0.598138869...
           -ln sigma(-0.2) = ln(1 + e^0.2) = 0.798138869...   (the two differ by exactly 0.2)
    """
    _assert_values(LOSS_FUNCTIONS["sigmoid"](two_pairs, beta=0.1), [0.5981388694, 0.7981388694])


def test_hinge_hand_computed(two_pairs: PreferenceLogps) -> None:
    """loss = max(0, 1 - beta*Delta): max(0, 1 - 0.2) = 0.8 and max(0, 1 + 0.2) = 1.2."""
    _assert_values(LOSS_FUNCTIONS["hinge"](two_pairs, beta=0.1), [0.8, 1.2])


def test_ipo_hand_computed(two_pairs: PreferenceLogps) -> None:
    """loss = (r_c/|y_c| - r_r/|y_r| - 1/(2*beta))^2 with 1/(2*0.1) = 5.

    pair 1: 1/2 - (-1)/4 = 0.75;  (0.75 - 5)^2 = (-4.25)^2 = 18.0625
    pair 2: -1/1 - 1/2 = -1.5;    (-1.5 - 5)^2 = (-6.5)^2  = 42.25
    """
    _assert_values(LOSS_FUNCTIONS["ipo"](two_pairs, beta=0.1), [18.0625, 42.25])


def test_robust_hand_computed(two_pairs: PreferenceLogps) -> None:
    """eps = 0.1: loss = (-(1-eps) ln sigma(z) + eps ln sigma(-z)) / (1 - 2 eps), z = beta*Delta.

    -ln sigma(0.2) = 0.598138869, -ln sigma(-0.2) = 0.798138869
    pair 1 (z = 0.2):  (0.9 * 0.598138869 - 0.1 * 0.798138869) / 0.8 = 0.458511096 / 0.8 = 0.573138869
    pair 2 (z = -0.2): (0.9 * 0.798138869 - 0.1 * 0.598138869) / 0.8 = 0.658511096 / 0.8 = 0.823138869
    """
    _assert_values(
        LOSS_FUNCTIONS["robust"](two_pairs, beta=0.1, label_smoothing=0.1), [0.5731388694, 0.8231388694]
    )
    # eps = 0 is plain DPO.
    torch.testing.assert_close(
        LOSS_FUNCTIONS["robust"](two_pairs, beta=0.1), LOSS_FUNCTIONS["sigmoid"](two_pairs, beta=0.1)
    )


def test_bco_pair_hand_computed(two_pairs: PreferenceLogps) -> None:
    """loss = -ln sigma(beta r_c) - ln sigma(-beta r_r).

    pair 1: r_c = 1, r_r = -1: -2 ln sigma(0.1)  = 2 * 0.644396660 = 1.288793320
    pair 2: r_c = -1, r_r = 1: -2 ln sigma(-0.1) = 2 * 0.744396660 = 1.488793320
    """
    _assert_values(LOSS_FUNCTIONS["bco_pair"](two_pairs, beta=0.1), [1.2887933201, 1.4887933201])


def test_sppo_hard_hand_computed(two_pairs: PreferenceLogps) -> None:
    """loss = (r_c - 1/(2 beta))^2 + (r_r + 1/(2 beta))^2 with 1/(2*0.1) = 5.

    pair 1: (1 - 5)^2 + (-1 + 5)^2 = 16 + 16 = 32;  pair 2: (-1 - 5)^2 + (1 + 5)^2 = 36 + 36 = 72
    """
    _assert_values(LOSS_FUNCTIONS["sppo_hard"](two_pairs, beta=0.1), [32.0, 72.0])


def test_apo_zero_hand_computed(two_pairs: PreferenceLogps) -> None:
    """loss = 1 - sigma(beta r_c) + sigma(beta r_r).

    pair 1: 1 - sigma(0.1) + sigma(-0.1) = 1 - 0.524979187 + 0.475020813 = 0.950041625
    pair 2: 1 - sigma(-0.1) + sigma(0.1) = 1 - 0.475020813 + 0.524979187 = 1.049958375
    """
    _assert_values(LOSS_FUNCTIONS["apo_zero"](two_pairs, beta=0.1), [0.9500416250, 1.0499583750])


def test_sft_is_token_mean_broadcast(two_pairs: PreferenceLogps) -> None:
    """loss = -(sum of chosen logps) / (chosen tokens) = -(-1 + -2) / (2 + 1) = 1.0 for every entry."""
    _assert_values(LOSS_FUNCTIONS["sft"](two_pairs), [1.0, 1.0])


def test_rewards_and_metrics_hand_computed(two_pairs: PreferenceLogps) -> None:
    """rewards = beta*(policy - ref): chosen [0.1, -0.1], rejected [-0.1, 0.1].

    accuracies = mean([0.1 > -0.1, -0.1 > 0.1]) = 0.5; margins = mean([0.2, -0.2]) = 0
    logps/chosen = mean(-1, -2) = -1.5; logps/rejected = mean(-3, -2) = -2.5
    logits/chosen = (3 + 1) / (2 + 1) = 4/3 (token-weighted); logits/rejected = (0 + 6) / (4 + 2) = 1
    """
    loss, chosen_rewards, rejected_rewards = compute_dpo_loss(two_pairs, loss_types=["sigmoid"], beta=0.1)
    _assert_values(chosen_rewards, [0.1, -0.1])
    _assert_values(rejected_rewards, [-0.1, 0.1])
    _assert_values(loss, [0.5981388694, 0.7981388694])
    metrics = preference_metrics(
        two_pairs,
        chosen_rewards,
        rejected_rewards,
        chosen_logit_sums=torch.tensor([3.0, 1.0]),
        rejected_logit_sums=torch.tensor([0.0, 6.0]),
    )
    expected = {
        "rewards/chosen": 0.0,
        "rewards/rejected": 0.0,
        "rewards/accuracies": 0.5,
        "rewards/margins": 0.0,
        "logps/chosen": -1.5,
        "logps/rejected": -2.5,
        "logits/chosen": 4 / 3,
        "logits/rejected": 1.0,
    }
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert metrics[name].item() == pytest.approx(value, abs=1e-6), name


def test_weighted_combination(two_pairs: PreferenceLogps) -> None:
    """loss = 1.0 * sigmoid + 0.5 * sft = [0.598138869 + 0.5, 0.798138869 + 0.5]."""
    loss, _, _ = compute_dpo_loss(two_pairs, loss_types=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.1)
    _assert_values(loss, [1.0981388694, 1.2981388694])


def test_pair_weights(two_pairs: PreferenceLogps) -> None:
    """Weights [1, 2] scale each pair: sigmoid + sft = [1 * (0.598138869 + 1), 2 * (0.798138869 + 1)]."""
    loss, _, _ = compute_dpo_loss(
        two_pairs, loss_types=["sigmoid", "sft"], beta=0.1, pair_weights=torch.tensor([1.0, 2.0])
    )
    _assert_values(loss, [1.5981388694, 3.5962777388])


# --------------------------------------------------------------------------------------------------
# First step: policy == reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_step_sigmoid_is_ln2(seed: int) -> None:
    """With policy == reference every log-ratio is 0, so loss = -ln sigma(0) = ln 2 for any logps."""
    generator = torch.Generator().manual_seed(seed)
    chosen = -500 * torch.rand(8, generator=generator)
    rejected = -500 * torch.rand(8, generator=generator)
    batch = PreferenceLogps(chosen, rejected, chosen.clone(), rejected.clone())
    for beta in (0.01, 0.1, 1.0, 10.0):
        loss, chosen_rewards, rejected_rewards = compute_dpo_loss(batch, loss_types=["sigmoid"], beta=beta)
        torch.testing.assert_close(loss, torch.full((8,), math.log(2)), atol=1e-7, rtol=0)
        assert torch.all(chosen_rewards == 0) and torch.all(rejected_rewards == 0)
        metrics = preference_metrics(batch, chosen_rewards, rejected_rewards)
        # TRL counts a pair as correct only when chosen_reward > rejected_reward, so ties score 0.
        assert metrics["rewards/accuracies"].item() == 0.0
        assert metrics["rewards/margins"].item() == 0.0


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def test_loss_functions_names() -> None:
    assert list(LOSS_FUNCTIONS) == TRL_LOSS_TYPES
    # Every loss that takes an f-divergence is allowed one; sft is allowed because it ignores it.
    takes_f_divergence = {
        name for name, fn in LOSS_FUNCTIONS.items() if "f_divergence_type" in inspect.signature(fn).parameters
    }
    assert takes_f_divergence | {"sft"} == F_DIVERGENCE_LOSS_TYPES


def test_compute_dpo_loss_validation(two_pairs: PreferenceLogps) -> None:
    with pytest.raises(ValueError, match="unknown loss type"):
        compute_dpo_loss(two_pairs, loss_types=["dpo"], beta=0.1)
    with pytest.raises(ValueError, match="at least one"):
        compute_dpo_loss(two_pairs, loss_types=[], beta=0.1)
    with pytest.raises(ValueError, match="loss_weights"):
        compute_dpo_loss(two_pairs, loss_types=["sigmoid", "sft"], loss_weights=[1.0], beta=0.1)
    with pytest.raises(ValueError, match="no f-divergence form"):
        compute_dpo_loss(
            two_pairs, loss_types=["sigmoid", "bco_pair"], beta=0.1, f_divergence_type="forward_kl"
        )
    with pytest.raises(ValueError, match="f_divergence_type"):
        compute_dpo_loss(two_pairs, loss_types=["sigmoid"], beta=0.1, f_divergence_type="kl")
    with pytest.raises(ValueError, match="sort across the batch"):
        compute_dpo_loss(two_pairs, loss_types=["aot"], beta=0.1, pair_weights=torch.ones(2))
    with pytest.raises(ValueError, match="label_smoothing"):
        compute_dpo_loss(two_pairs, loss_types=["exo_pair"], beta=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        compute_dpo_loss(two_pairs, loss_types=["robust"], beta=0.1, label_smoothing=0.5)
    no_lengths = PreferenceLogps(
        two_pairs.policy_chosen_logps,
        two_pairs.policy_rejected_logps,
        two_pairs.ref_chosen_logps,
        two_pairs.ref_rejected_logps,
    )
    for name in ("ipo", "sigmoid_norm", "sft"):
        with pytest.raises(ValueError, match="lengths"):
            compute_dpo_loss(no_lengths, loss_types=[name], beta=0.1)
    with pytest.raises(ValueError, match=r"must be \(B,\)"):
        PreferenceLogps(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))


def test_rewards_formula() -> None:
    """beta * (policy - ref) = 0.5 * (-3 - (-5)) = 1.0."""
    assert compute_rewards(torch.tensor([-3.0]), torch.tensor([-5.0]), 0.5).tolist() == [1.0]


def test_alpha_divergence_limit_is_reverse_kl() -> None:
    logratios = torch.tensor([-2.0, 0.0, 3.0])
    torch.testing.assert_close(
        compute_f_divergence_scores(
            logratios, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0 - 1e-7
        ),
        logratios,
    )


# --------------------------------------------------------------------------------------------------
# Parity with TRL's DPOTrainer
# --------------------------------------------------------------------------------------------------

VOCAB_SIZE = 100


def build_tiny_policy(seed: int) -> Any:
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = build_tiny_qwen2_config(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=64,
        # A wide init so that logits (and policy/reference log-ratios) are far from uniform.
        initializer_range=0.3,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config)


@pytest.fixture(scope="module")
def word_tokenizer() -> Any:
    return build_word_tokenizer()


def build_word_tokenizer() -> Any:
    """A word-level tokenizer over "w0".."w59" (ids 3..62) with pad 0 and eos 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(60)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def pairs() -> Any:
    return build_pairs()


def build_pairs() -> Any:
    """Six prompt/chosen/rejected rows in the word tokenizer's words, as a `datasets.Dataset`."""
    from datasets import Dataset

    # Lengths vary on both sides (chosen longer, rejected longer, equal) so that padding, the
    # length-normalised losses, LD-DPO's shared/tail split and AOT's sorting all have work to do.
    return Dataset.from_dict(
        {
            "prompt": ["w1 w2 w3", "w4 w5", "w6", "w7 w8 w9 w10", "w30 w31", "w40"],
            "chosen": [" w11 w12", " w13", " w14 w15 w16 w17", " w18 w19", " w32 w33 w34", " w41 w42"],
            "rejected": [" w20", " w21 w22 w23", " w24 w25", " w26 w27 w28", " w35 w36 w37", " w43"],
        }
    )


def _build_trainer(tokenizer: Any, pairs: Any, tmp_path: Any, config: dict[str, Any]) -> Any:
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=len(pairs),
        **config,
    )
    trainer = DPOTrainer(
        model=build_tiny_policy(0),
        ref_model=build_tiny_policy(1),
        args=args,
        train_dataset=pairs,
        processing_class=tokenizer,
    )
    trainer.model.train()
    return trainer


def _collated_batch(trainer: Any) -> dict[str, torch.Tensor]:
    dataset = trainer.train_dataset
    return trainer.data_collator([dataset[i] for i in range(len(dataset))])


def _micro_batches(trainer: Any, inputs: dict[str, torch.Tensor]) -> dict[str, MicroBatch]:
    """TRL's tokenized rows as the production micro-batches: padded by `collate_pairs` (checked
    equal to TRL's collated tensors) and packed by `pack_pairs`."""
    dataset = trainer.train_dataset
    names = [*ID_COLUMNS, *(name for name in REF_COLUMNS if name in dataset.column_names)]
    columns = {name: dataset[name] for name in names}
    pad_token_id = trainer.processing_class.pad_token_id
    padded = collate_pairs(columns, pad_token_id)
    for name in ("input_ids", "attention_mask", "completion_mask", *names[3:]):
        assert torch.equal(getattr(padded, name), inputs[name]), name
    return {"padded": padded, "packed": pack_pairs(columns, pad_token_id)}


def _loss_settings(config: dict[str, Any]) -> LossSettings:
    """The TRL case's options as the `train` config section (same key names), checked as at load."""
    train_keys = {item.name for item in dataclasses.fields(TrainConfig)}
    options = {key: value for key, value in config.items() if key != "precompute_ref_log_probs"}
    assert set(options) <= train_keys, sorted(set(options) - train_keys)
    train = TrainConfig(**options)
    train.check(num_workers=1)
    return build_loss_settings(train)


def _our_step(trainer: Any, batch: MicroBatch, settings: LossSettings) -> MicroBatchResult:
    """The production forward on `trainer`'s policy, with its reference scored as the loop does:
    precomputed log-probs from the batch, else `sequence_logps` of the reference model."""

    def reference_logps(b: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if b.ref_chosen_logps is not None and b.ref_rejected_logps is not None:
            return b.ref_chosen_logps, b.ref_rejected_logps
        with torch.no_grad():
            logps, _, _ = sequence_logps(
                trainer.ref_model, b, ld_alpha=settings.ld_alpha, chunk_size=settings.logps_chunk_size
            )
        return logps[: b.num_pairs], logps[b.num_pairs :]

    return compute_micro_batch(trainer.model, reference_logps, batch, settings)


def _case(case_id: str, **config: Any) -> Any:
    return pytest.param(config, id=case_id)


TRL_CASES = [
    *[
        _case(name, loss_type=[name], **({"label_smoothing": 1e-3} if name == "exo_pair" else {}))
        for name in TRL_LOSS_TYPES
    ],
    *[
        _case(f"{name}-beta1", loss_type=[name], beta=1.0)
        for name in (
            "sigmoid",
            "hinge",
            "nca_pair",
            "bco_pair",
            "sppo_hard",
            "apo_zero",
            "apo_down",
            "sigmoid_norm",
        )
    ],
    _case("ipo-beta0.5", loss_type=["ipo"], beta=0.5),
    _case("robust-ls0.1", loss_type=["robust"], label_smoothing=0.1, beta=0.5),
    _case("exo_pair-ls0.1", loss_type=["exo_pair"], label_smoothing=0.1, beta=1.0),
    _case("aot-ls0.1", loss_type=["aot"], label_smoothing=0.1, beta=0.5),
    _case("aot_unpaired-ls0.2", loss_type=["aot_unpaired"], label_smoothing=0.2, beta=1.0),
    _case("discopop-tau0.5", loss_type=["discopop"], discopop_tau=0.5, beta=1.0),
    _case("rpo-sigmoid+sft", loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    _case("mpo-sigmoid+bco+sft", loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    _case("ipo+aot-unweighted", loss_type=["ipo", "aot"], label_smoothing=0.1),
    _case("wpo-sigmoid", loss_type=["sigmoid"], use_weighting=True),
    # (TRL 1.16 cannot combine use_weighting with "sft": it scales the broadcast sft tensor in place.)
    _case("wpo-ipo+bco_pair", loss_type=["ipo", "bco_pair"], loss_weights=[1.0, 0.5], use_weighting=True),
    _case("ld-sigmoid", loss_type=["sigmoid"], ld_alpha=0.5),
    _case("ld-ipo+sft", loss_type=["ipo", "sft"], loss_weights=[1.0, 0.3], ld_alpha=0.3),
    _case("fdpo-forward_kl-sigmoid", loss_type=["sigmoid"], f_divergence_type="forward_kl", beta=0.5),
    _case("fdpo-js-hinge", loss_type=["hinge"], f_divergence_type="js_divergence", beta=1.0),
    _case(
        "fdpo-alpha-ipo", loss_type=["ipo"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3
    ),
    _case(
        "fdpo-alpha-robust",
        loss_type=["robust"],
        label_smoothing=0.1,
        f_divergence_type="alpha_divergence",
        f_alpha_divergence_coef=0.7,
    ),
    _case(
        "fdpo-alpha1-sigmoid_norm",
        loss_type=["sigmoid_norm"],
        f_divergence_type="alpha_divergence",
        f_alpha_divergence_coef=1.0,
    ),
    _case("fdpo-js-discopop", loss_type=["discopop"], f_divergence_type="js_divergence", beta=1.0),
    _case(
        "fdpo-forward_kl-exo_pair+sft",
        loss_type=["exo_pair", "sft"],
        label_smoothing=0.05,
        f_divergence_type="forward_kl",
    ),
    _case("precomputed-ref-logps", loss_type=["sigmoid"], precompute_ref_log_probs=True),
]

METRIC_NAMES = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
]


@pytest.mark.parametrize("config", TRL_CASES)
def test_matches_trl(word_tokenizer: Any, pairs: Any, tmp_path: Any, config: dict[str, Any]) -> None:
    trainer = _build_trainer(word_tokenizer, pairs, tmp_path, config)
    inputs = _collated_batch(trainer)
    if config.get("precompute_ref_log_probs"):
        assert "ref_chosen_logps" in inputs  # TRL reads the reference from the batch, skipping its forward
    assert packing_route(trainer.model, trainer.ref_model)[0] == "mask"

    trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    trl_loss.backward()
    trl_grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}

    settings = _loss_settings(config)
    for layout, batch in _micro_batches(trainer, inputs).items():
        check_step_against_trl(trainer, batch, settings, trl_loss, trl_metrics, trl_grads, where=layout)


def check_step_against_trl(
    trainer: Any,
    batch: MicroBatch,
    settings: LossSettings,
    trl_loss: torch.Tensor,
    trl_metrics: dict[str, float],
    trl_grads: dict[str, torch.Tensor],
    *,
    where: str,
    metric_tolerance: float = 1e-5,
    grad_tolerance: float = 1e-4,
) -> None:
    """Our step on `trainer`'s policy gives TRL's loss, logged metrics and every gradient."""
    trainer.model.zero_grad(set_to_none=True)
    result = _our_step(trainer, batch, settings)
    result.loss.backward()
    torch.testing.assert_close(result.loss.detach(), trl_loss.detach(), atol=1e-5, rtol=1e-5, msg=where)
    metrics = sums_to_metrics(result.sums)
    for name in METRIC_NAMES:
        assert metrics[name] == pytest.approx(
            trl_metrics[name], abs=metric_tolerance, rel=metric_tolerance
        ), (where, name)
    for name, parameter in trainer.model.named_parameters():
        # An element that is a sum of large terms cancelling to a small value carries the rounding
        # of the terms (the two sides sum in different orders), so the tolerance scales with the
        # tensor's largest entry rather than with each element.
        reference = trl_grads[name]
        scale = reference.abs().max().item()
        torch.testing.assert_close(
            parameter.grad, reference, atol=1e-5 + grad_tolerance * scale, rtol=1e-4, msg=f"{where}: {name}"
        )


def test_first_step_ln2_matches_trl(word_tokenizer: Any, pairs: Any, tmp_path: Any) -> None:
    """Reference = a copy of the policy: TRL and we both give exactly ln 2, zero rewards, 0 accuracy."""
    from trl import DPOConfig, DPOTrainer

    policy = build_tiny_policy(0)
    args = DPOConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], bf16=False, gradient_checkpointing=False
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=copy.deepcopy(policy),
        args=args,
        train_dataset=pairs,
        processing_class=word_tokenizer,
    )
    trainer.model.train()
    inputs = _collated_batch(trainer)
    trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    assert trl_loss.item() == pytest.approx(math.log(2), abs=1e-7)
    for layout, batch in _micro_batches(trainer, inputs).items():
        result = _our_step(trainer, batch, _loss_settings({}))
        assert result.loss.item() == pytest.approx(math.log(2), abs=1e-7), layout
        metrics = sums_to_metrics(result.sums)
        for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert metrics[name] == 0.0, (layout, name)
            assert trainer._metrics["train"][name][-1] == 0.0


def test_loss_names_match_trl(word_tokenizer: Any, pairs: Any, tmp_path: Any) -> None:
    """TRL's own list of valid loss types (from its unknown-loss error) is exactly LOSS_FUNCTIONS."""
    trainer = _build_trainer(word_tokenizer, pairs, tmp_path, {"loss_type": ["no_such_loss"]})
    with pytest.raises(ValueError, match="Unknown loss type") as excinfo:
        trainer._compute_loss(trainer.model, _collated_batch(trainer), return_outputs=False)
    trl_names = re.findall(r"'([a-z_]+)'", str(excinfo.value).split("Should be one of")[1])
    assert sorted(trl_names) == sorted(LOSS_FUNCTIONS)
