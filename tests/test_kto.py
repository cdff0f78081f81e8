"""Tests for KTO over unpaired data: the loss against hand-computed values, the first step (policy ==
reference: every example's loss is 1 - sigma(0) = 0.5), the examples and KL pairs a micro-batch
makes, the unpaired row formats, the config rules, and parity with TRL 1.16's `trl.KTOTrainer`
(`trl.trainer.kto_trainer`; `trl.experimental.kto` only re-exports it) through the production
forward: tokenization, loss, metrics and gradients on the same rows, padded and packed.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch

from dpo_cluster.batch.collate import collate_sequences
from dpo_cluster.batch.logps import MicroBatch, sequence_logps
from dpo_cluster.batch.packing import pack_sequences
from dpo_cluster.batch.unpaired import UnpairedBatch, build_examples, build_unpaired_batch
from dpo_cluster.config import ConfigError, TrainConfig, load_config
from dpo_cluster.config.specs import FormatSpec, TokenizeSpec
from dpo_cluster.data.formats import detect_format, normalize_row
from dpo_cluster.data.records import DropRow
from dpo_cluster.data.tokenize import PairTokenizer
from dpo_cluster.losses import UnpairedLogps, clamp_kl, estimate_kl, kto_loss
from dpo_cluster.train.forward import build_loss_settings, compute_micro_batch, sums_to_metrics
from tests.test_losses import build_pairs, build_tiny_policy, build_word_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _assert_values(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------


def test_kto_hand_computed() -> None:
    """Three examples, beta = 1, undesirable_weight = 2.

    r = policy - ref = [-1 + 2, -4 + 3, -2 + 2.5] = [1, -1, 0.5], labels [desirable, undesirable x2]
    KL pairs: mean([-5 + 5.3, -6 + 6.3, -7 + 7.3]) = 0.3 = z0
    desirable:   1 - sigma(1 * (1 - 0.3))      = 1 - sigma(0.7)  = 1 - 0.668187772 = 0.331812228
    undesirable: 2 * (1 - sigma(0.3 - (-1)))   = 2 * (1 - sigma(1.3))  = 2 * 0.214165017 = 0.428330034
                 2 * (1 - sigma(0.3 - 0.5))    = 2 * (1 - sigma(-0.2)) = 2 * 0.549833997 = 1.099667995
    batch loss = mean = 0.619936752; rewards = beta * r = [1, -1, 0.5]
    """
    batch = UnpairedLogps(
        policy_logps=torch.tensor([-1.0, -4.0, -2.0]),
        ref_logps=torch.tensor([-2.0, -3.0, -2.5]),
        labels=torch.tensor([True, False, False]),
    )
    kl = clamp_kl(estimate_kl(torch.tensor([-5.0, -6.0, -7.0]), torch.tensor([-5.3, -6.3, -7.3])))
    assert kl.item() == pytest.approx(0.3, abs=1e-6)
    losses, rewards = kto_loss(batch, beta=1.0, kl=kl, undesirable_weight=2.0)
    _assert_values(losses, [0.3318122278, 0.4283300339, 1.0996679946])
    assert losses.mean().item() == pytest.approx(0.6199367521, abs=1e-6)
    _assert_values(rewards, [1.0, -1.0, 0.5])


def test_negative_kl_estimate_is_clamped() -> None:
    """KL pairs mean -0.2 -> z0 = 0: 1 - sigma(1) = 0.268941421; 2 (1 - sigma(1)) = 0.537882843;
    2 (1 - sigma(-0.5)) = 1.244918662."""
    batch = UnpairedLogps(torch.tensor([-1.0, -4.0, -2.0]), torch.tensor([-2.0, -3.0, -2.5]),
                          torch.tensor([True, False, False]))  # fmt: skip
    kl = clamp_kl(estimate_kl(torch.tensor([-1.2, -1.2]), torch.tensor([-1.0, -1.0])))
    assert kl.item() == 0.0
    losses, _ = kto_loss(batch, beta=1.0, kl=kl, undesirable_weight=2.0)
    _assert_values(losses, [0.2689414214, 0.5378828427, 1.2449186624])


@pytest.mark.parametrize(
    ("desirable_weight", "expected"), [(1.0, 0.5), (1.33, (1.33 * 2 * 0.5 + 4 * 0.5) / 6)]
)
def test_first_step_policy_equals_reference(desirable_weight: float, expected: float) -> None:
    """policy == reference: r = 0 and z0 = 0, so every example's loss is w * (1 - sigma(0)) = w / 2;
    with 2 desirable and 4 undesirable examples and lambda_D = 1.33: (1.33 * 2 * 0.5 + 4 * 0.5) / 6
    = 0.555, and 0.5 for equal weights whatever the labels (KTO's ln 2)."""
    logps = -50 * torch.rand(6, generator=torch.Generator().manual_seed(0))
    batch = UnpairedLogps(logps, logps.clone(), torch.tensor([True, True, False, False, False, False]))
    kl = clamp_kl(estimate_kl(logps.flip(0), logps.flip(0).clone()))
    losses, rewards = kto_loss(batch, beta=0.1, kl=kl, desirable_weight=desirable_weight)
    assert losses.mean().item() == pytest.approx(expected, abs=1e-7)
    assert torch.all(rewards == 0)


# --------------------------------------------------------------------------------------------------
# Examples and KL pairs of a micro-batch
# --------------------------------------------------------------------------------------------------


def test_examples_and_kl_rotation() -> None:
    """Rows: a pair (p1: c1 / r1), a desirable row (p2: c2) and an undesirable one (p3: r3).
    Examples: every chosen side first, then every rejected side: (p1 c1 +) (p2 c2 +) (p1 r1 -) (p3 r3 -);
    KL completions rotate by one: r3, c1, c2, r1 (cut to max_length - prompt = 4 - 1 = 3 tokens)."""
    rows = {
        "prompt_ids": [[1], [2], [3]],
        "chosen_ids": [[10, 11], [20], []],
        "rejected_ids": [[12, 13, 14, 15], [], [30]],
    }
    columns, labels = build_examples(rows, max_length=4)
    assert labels == [True, True, False, False]
    assert columns["prompt_ids"] == [[1], [2], [1], [3]]
    assert columns["completion_ids"] == [[10, 11], [20], [12, 13, 14, 15], [30]]
    assert columns["kl_completion_ids"] == [[30], [10, 11], [20], [12, 13, 14]]
    batch = build_unpaired_batch(rows, 4, lambda p, c: collate_sequences(p, c, 0))
    assert batch.num_examples == 4 and batch.num_pairs == 3
    assert batch.examples.input_ids.tolist() == [[1, 10, 11, 0, 0], [2, 20, 0, 0, 0], [1, 12, 13, 14, 15],
                                                 [3, 30, 0, 0, 0]]  # fmt: skip
    assert batch.kl.input_ids.tolist() == [[1, 30, 0, 0], [2, 10, 11, 0], [1, 20, 0, 0], [3, 12, 13, 14]]
    assert batch.num_tokens == 12 + 11 and batch.num_entries == 20 + 16
    with pytest.raises(ValueError, match="at least two examples"):
        build_examples({"prompt_ids": [[1]], "chosen_ids": [[2]], "rejected_ids": [[]]}, max_length=4)
    with pytest.raises(ValueError, match="neither"):
        build_examples({"prompt_ids": [[1], [2]], "chosen_ids": [[2], []], "rejected_ids": [[3], []]}, 4)


# --------------------------------------------------------------------------------------------------
# Row formats
# --------------------------------------------------------------------------------------------------


def test_unpaired_formats_are_detected_and_read() -> None:
    spec = FormatSpec()
    standard = [
        {"prompt": "Q?", "completion": " A.", "label": True},
        {"prompt": "Q2", "completion": " B", "label": False},
    ]
    assert detect_format(standard, spec, "s") == "unpaired"
    chat = [{"prompt": [{"role": "user", "content": "Q?"}], "completion": [{"role": "assistant", "content": "A"}],
             "label": False}]  # fmt: skip
    assert detect_format(chat, spec, "s") == "unpaired_conversational"
    pair = normalize_row(standard[1], "unpaired", spec)
    assert (pair.prompt, pair.chosen, pair.rejected, pair.label) == ("Q2", " B", " B", False)
    assert normalize_row({"q": "Q", "good": 1, "text": "A"}, "unpaired",
                         FormatSpec(columns={"prompt": "q", "label": "good", "completion": "text"})).label  # fmt: skip
    chat_pair = normalize_row(chat[0], "unpaired_conversational", spec)
    assert chat_pair.conversational and chat_pair.label is False
    for row, reason in [
        ({"prompt": "Q", "completion": "A"}, "missing_field"),
        ({"prompt": "Q", "completion": "A", "label": "yes"}, "wrong_type"),
        ({"prompt": "Q", "completion": "  ", "label": True}, "empty_chosen"),
        ({"prompt": " ", "completion": "A", "label": False}, "empty_prompt"),
    ]:
        with pytest.raises(DropRow) as drop:
            normalize_row(row, "unpaired", spec)
        assert drop.value.reason == reason, row
    # An empty undesirable completion is kept (as an empty rejected answer is).
    assert normalize_row({"prompt": "Q", "completion": "", "label": False}, "unpaired", spec).label is False


def test_unpaired_rows_tokenize_to_one_side() -> None:
    tokenizer = build_word_tokenizer()
    spec = FormatSpec()
    rows = [
        {"prompt": "w1 w2", "completion": " w3 w4", "label": True},
        {"prompt": "w5", "completion": " w6", "label": False},
    ]
    good, bad = PairTokenizer(tokenizer, TokenizeSpec(max_length=64)).tokenize(
        [normalize_row(row, "unpaired", spec) for row in rows]
    )
    assert (good.prompt_ids, good.chosen_ids, good.rejected_ids) == ([4, 5], [6, 7, 1], [])
    assert (bad.prompt_ids, bad.chosen_ids, bad.rejected_ids) == ([8], [], [9, 1])


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.loss_type=[kto,sigmoid]"], "kto trains on unpaired examples and combines with no other"),
        (["reference.mode=precompute"], "reference.mode: precompute cannot serve train.loss_type kto"),
        (["reference.mode=none"], "train.loss_type kto, which needs a reference"),
        (["train.micro_batch_size=1"], "train.micro_batch_size: kto needs >= 2"),
        (["train.undesirable_weight=0"], "train.undesirable_weight: must be > 0"),
        (["train.use_weighting=true"], "train.use_weighting: not supported with train.loss_type kto"),
        (["train.max_tokens_per_micro_batch=4096"], "train.max_tokens_per_micro_batch: not supported"),
    ],
)
def test_kto_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(
            None,
            ["output_dir=o", "model.name_or_path=m", "data.train=t", "train.loss_type=[kto]", *overrides],
        )
    assert message in str(e.value)


# --------------------------------------------------------------------------------------------------
# Parity with TRL's KTOTrainer
# --------------------------------------------------------------------------------------------------


def _unpaired_rows() -> Any:
    """Five labelled completions, desirable first (the order our micro-batch gives them)."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": ["w1 w2 w3", "w4 w5", "w6", "w7 w8 w9 w10", "w30 w31"],
            "completion": [" w11 w12", " w13", " w14 w15 w16 w17", " w18 w19", " w32 w33 w34"],
            "label": [True, True, False, False, False],
        }
    )


def _trl_trainer(
    dataset: Any, tmp_path: Any, options: dict[str, Any], *, same_reference: bool = False
) -> Any:
    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=len(dataset) * (2 if "chosen" in dataset.column_names else 1),
        max_length=64,
        **options,
    )
    policy = build_tiny_policy(0)
    # Seed 4's reference puts the batch's KL estimate above 0 on both datasets, so the clamp does
    # not hide it.
    reference = copy.deepcopy(policy) if same_reference else build_tiny_policy(4)
    trainer = KTOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=dataset,
        processing_class=build_word_tokenizer(),
    )
    trainer.model.train()
    return trainer


def _our_rows(trainer: Any) -> dict[str, list[list[int]]]:
    """TRL's tokenized examples as prepared rows: the completion on its label's side."""
    data = trainer.train_dataset
    rows: dict[str, list[list[int]]] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for prompt, completion, label in zip(data["prompt_ids"], data["completion_ids"], data["label"]):
        rows["prompt_ids"].append(prompt)
        rows["chosen_ids"].append(completion if label else [])
        rows["rejected_ids"].append([] if label else completion)
    return rows


def _reference_logps(trainer: Any) -> Any:
    def reference_logps(b: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logps, _, _ = sequence_logps(trainer.ref_model, b, chunk_size=512)
        return logps[: b.num_pairs], logps[b.num_pairs :]

    return reference_logps


KTO_METRICS = ["kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
               "logits/chosen", "logits/rejected"]  # fmt: skip


def _check_against_trl(trainer: Any, rows: dict[str, Any], train: TrainConfig) -> dict[str, float]:
    data = trainer.train_dataset
    inputs = trainer.data_collator([data[i] for i in range(len(data))])
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    trl_loss.backward()
    trl_grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
    train.check(num_workers=1)
    settings = build_loss_settings(train)
    pad = trainer.processing_class.pad_token_id
    layouts = {
        "padded": lambda p, c: collate_sequences(p, c, pad),
        "packed": lambda p, c: pack_sequences(p, c, pad),
    }
    metrics: dict[str, float] = {}
    for layout, collate in layouts.items():
        batch = build_unpaired_batch(rows, 64, collate)
        assert isinstance(batch, UnpairedBatch)
        trainer.model.zero_grad(set_to_none=True)
        result = compute_micro_batch(trainer.model, _reference_logps(trainer), batch, settings)
        result.loss.backward()
        torch.testing.assert_close(result.loss.detach(), trl_loss.detach(), atol=1e-6, rtol=1e-5, msg=layout)
        metrics = sums_to_metrics(result.sums)
        assert "rewards/accuracies" not in metrics
        for name in KTO_METRICS:
            assert metrics[name] == pytest.approx(trl_metrics[name], abs=1e-5, rel=1e-5), (layout, name)
        for name, parameter in trainer.model.named_parameters():
            reference = trl_grads[name]
            scale = reference.abs().max().item()
            torch.testing.assert_close(
                parameter.grad, reference, atol=1e-6 + 1e-4 * scale, rtol=1e-4, msg=f"{layout}: {name}"
            )
    return metrics


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 0.8},
    ],
    ids=["defaults", "beta0.5-weighted"],
)
def test_matches_trl_on_unpaired_rows(tmp_path: Any, options: dict[str, Any]) -> None:
    trainer = _trl_trainer(_unpaired_rows(), tmp_path, options)
    rows = _our_rows(trainer)
    # Our tokenization of the raw rows gives TRL's ids.
    raw = _unpaired_rows()
    ours = PairTokenizer(trainer.processing_class, TokenizeSpec(max_length=64)).tokenize(
        [normalize_row(dict(row), "unpaired", FormatSpec()) for row in raw]
    )
    for mine, prompt, chosen, rejected in zip(
        ours, rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"]
    ):
        assert (mine.prompt_ids, mine.chosen_ids, mine.rejected_ids) == (prompt, chosen, rejected)
    metrics = _check_against_trl(trainer, rows, TrainConfig(loss_type=["kto"], **options))
    assert metrics["kl"] > 0.1


def test_matches_trl_on_pairs(tmp_path: Any) -> None:
    """TRL unpairs a paired dataset (every chosen desirable, every rejected undesirable, chosen
    first); our micro-batch of the same pair rows makes the same examples and KL pairs."""
    trainer = _trl_trainer(build_pairs(), tmp_path, {"beta": 0.2})
    data = trainer.train_dataset
    half = len(data) // 2
    assert data["label"] == [True] * half + [False] * half
    rows = {
        "prompt_ids": data["prompt_ids"][:half],
        "chosen_ids": data["completion_ids"][:half],
        "rejected_ids": data["completion_ids"][half:],
    }
    assert data["prompt_ids"][:half] == data["prompt_ids"][half:]
    metrics = _check_against_trl(trainer, rows, TrainConfig(loss_type=["kto"], beta=0.2))
    assert metrics["kl"] > 0.1


def test_first_step_matches_trl(tmp_path: Any) -> None:
    """Reference = a copy of the policy: TRL and we both give 0.5, kl 0 and zero rewards."""
    trainer = _trl_trainer(_unpaired_rows(), tmp_path, {}, same_reference=True)
    metrics = _check_against_trl(trainer, _our_rows(trainer), TrainConfig(loss_type=["kto"]))
    assert metrics["loss"] == pytest.approx(0.5, abs=1e-7)
    assert metrics["kl"] == 0.0 and metrics["rewards/chosen"] == 0.0 and metrics["rewards/rejected"] == 0.0


def test_trl_defaults_are_ours() -> None:
    from trl import KTOConfig

    trl = KTOConfig(output_dir="unused", use_cpu=True, report_to=[], bf16=False)
    ours = TrainConfig(loss_type=["kto"])
    for name in ("beta", "desirable_weight", "undesirable_weight"):
        assert getattr(ours, name) == getattr(trl, name), name
    assert dataclasses.fields(TrainConfig)


def _kl_worker(rank: int, init_file: str, results: Any) -> None:
    import torch.distributed as dist

    from dpo_cluster.train.forward_unpaired import _mean_over_workers

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # Worker 0's estimate is -0.5, worker 1's 0.9: TRL gathers them, averages (0.2), then clamps.
        estimate = estimate_kl(torch.tensor([-1.0, 0.0]) + 1.4 * rank, torch.zeros(2))
        results[rank] = clamp_kl(_mean_over_workers(estimate)).item()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_kl_estimate_is_averaged_over_workers_before_the_clamp(tmp_path: Any) -> None:
    """Two gloo workers with estimates -0.5 and 0.9: both use max(0, (-0.5 + 0.9) / 2) = 0.2 (a
    clamp per worker first would give 0 and 0.9)."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_kl_worker, args=(str(tmp_path / "init"), results), nprocs=2)
        assert dict(results) == {0: pytest.approx(0.2, abs=1e-6), 1: pytest.approx(0.2, abs=1e-6)}


def test_reward_accuracy_reads_pairs_only(tmp_path: Any) -> None:
    """`dpo-cluster eval`'s held-out reward accuracy ranks chosen against rejected: unpaired rows
    (one side empty) of a KTO eval split are left out, and a split of them alone is skipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpo_cluster.evaluation.reward_accuracy import read_eval_pairs

    rows = {
        "row_id": ["a.jsonl:1", "a.jsonl:2", "a.jsonl:3"],
        "prompt_ids": [[1], [2], [3]],
        "chosen_ids": [[4, 1], [], [5, 1]],
        "rejected_ids": [[1], [6, 1], []],
    }
    pq.write_table(pa.table(rows), tmp_path / "part-0.parquet")
    assert read_eval_pairs(tmp_path)["row_id"] == ["a.jsonl:1"]
