"""Tests for dpo_cluster.batch.token_budget: costs and cuts on literal lengths, every worker's share of
a step, the config rule, and a one-worker training run whose loss curve equals fixed micro-batches'
(the 2-worker ZeRO-3 run is in tests/test_train_ray.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dpo_cluster.batch.token_budget import TokenBudget, deal, micro_batch_cost
from dpo_cluster.config import ConfigError
from tests.test_packing import ListSource, config_with, run_config, skewed_split, train_rows, worker  # noqa: F401


def pairs_of(lengths: list[tuple[int, int, int]]) -> dict[str, Any]:
    """Pairs with (prompt, chosen, rejected) token counts; ids are the pair's number."""
    return {
        "row_id": np.arange(len(lengths)),
        "prompt_ids": [[i] * p for i, (p, _, _) in enumerate(lengths)],
        "chosen_ids": [[i] * c for i, (_, c, _) in enumerate(lengths)],
        "rejected_ids": [[i] * r for i, (_, _, r) in enumerate(lengths)],
    }


def test_micro_batch_cost_literal() -> None:
    lengths = [10, 3, 7, 2]  # chosen 10, 3; rejected 7, 2
    assert micro_batch_cost(lengths, "padded") == 4 * 10
    assert micro_batch_cost(lengths, "varlen") == 22
    # "mask": rows of the longest rounded up to 8 = 16 tokens: [10, 3, 2] and [7]; width 15.
    assert micro_batch_cost(lengths, "mask") == 2 * 15
    # Rows of 12 tokens: [10, 2], [7, 3]; width 12.
    assert micro_batch_cost(lengths, "mask", row_tokens=12) == 2 * 12
    assert micro_batch_cost([], "padded") == 0


def test_cut_takes_longest_first_within_the_budget_literal() -> None:
    """Padded lengths 12, 4, 30, 5, 6, 3 (prompt + longer answer). Budget 64 = 2B x longest:
    [30] alone (60; with 12: 4 x 30 = 120), then [12, 6] (48; + 5 -> 72), then [5, 4, 3] (60)."""
    pairs = pairs_of([(2, 10, 1), (1, 3, 2), (10, 20, 5), (2, 3, 3), (1, 5, 5), (1, 2, 1)])
    (mine,) = TokenBudget(64).cut(pairs, world_size=1)
    assert [rows.tolist() for rows in mine] == [[2], [0, 4], [3, 1, 5]]
    # Two workers: 3 micro-batches are not a multiple of 2, so the largest ([5, 4, 3]) is halved.
    first, second = TokenBudget(64).cut(pairs, world_size=2)
    assert [r.tolist() for r in first] == [[2], [3, 1]]
    assert [r.tolist() for r in second] == [[0, 4], [5]]


def test_a_pair_over_the_budget_goes_alone_and_every_pair_once() -> None:
    rng = np.random.default_rng(0)
    lengths = [tuple(int(x) for x in rng.integers(1, 60, size=3)) for _ in range(48)]
    pairs = pairs_of(lengths)  # type: ignore[arg-type]
    for budget in (40, 200, 1000, 10_000):
        for layout in ("padded", "mask", "varlen"):
            plan = TokenBudget(budget, layout).cut(pairs, world_size=3)  # type: ignore[arg-type]
            assert len({len(mine) for mine in plan}) == 1  # the same number of forwards per worker
            pieces = [rows for mine in plan for rows in mine]
            assert sorted(np.concatenate(pieces).tolist()) == list(range(48))
            for rows in pieces:
                sequences = [lengths[i][0] + lengths[i][1] for i in rows] + [
                    lengths[i][0] + lengths[i][2] for i in rows
                ]
                assert len(rows) == 1 or micro_batch_cost(sequences, layout) <= budget  # type: ignore[arg-type]


def test_deal_halves_the_largest_until_workers_get_equal_counts() -> None:
    assert deal([[0, 1, 2, 3], [4]], 4) == [[[0]], [[1]], [[2, 3]], [[4]]]
    assert deal([[0], [1], [2]], 1) == [[[0], [1], [2]]]
    with pytest.raises(ValueError, match="3 pairs cannot be dealt evenly to 2 workers"):
        deal([[0], [1], [2]], 2)


def test_every_worker_cuts_the_same_steps_and_takes_its_share() -> None:
    """4 micro-batches of 3 pairs, accumulation 2: 2 steps on 1 worker or 1 step on 2 workers,
    each step's pairs spread over its workers once, the same counts on each worker."""
    rng = np.random.default_rng(1)
    lengths = [tuple(int(x) for x in rng.integers(1, 40, size=3)) for _ in range(12)]
    pairs = pairs_of(lengths)  # type: ignore[arg-type]
    source = ListSource([{k: v[i : i + 3] for k, v in pairs.items()} for i in range(0, 12, 3)])
    budget = TokenBudget(150)
    for world, accumulation in ((1, 4), (2, 2), (4, 1)):
        shares = [
            list(worker(rank, world, source).my_steps(source, 3, accumulation, epoch=0, token_budget=budget))
            for rank in range(world)
        ]
        assert [len(steps) for steps in shares] == [1] * world  # 12 pairs = one step of 12
        counts = {len(steps[0]) for steps in shares}
        assert len(counts) == 1
        rows = sorted(int(r) for steps in shares for batch in steps[0] for r in batch["row_id"])
        assert rows == list(range(12))
    # Without a budget: accumulation micro-batches of 3 per worker per step, as before.
    fixed = list(worker(1, 2, source).my_steps(source, 3, 1, epoch=0))
    assert [[list(b["row_id"]) for b in step] for step in fixed] == [[[3, 4, 5]], [[9, 10, 11]]]


def test_config_budget_must_hold_a_pair_of_max_length() -> None:
    config = config_with("data.max_length=128", "train.max_tokens_per_micro_batch=256")
    assert config.train.max_tokens_per_micro_batch == 256
    with pytest.raises(ConfigError, match=r"train.max_tokens_per_micro_batch: 255 cannot hold one pair of "
                                          r"data.max_length=128 .* at least 256"):  # fmt: skip
        config_with("data.max_length=128", "train.max_tokens_per_micro_batch=255")


@pytest.mark.slow
def test_token_budget_run_has_the_fixed_loss_curve(skewed_split: Path, tmp_path: Path) -> None:  # noqa: F811
    """Same pairs per step, cut by tokens: the loss curve of fixed micro-batches (one worker),
    with a varying number of forwards per step."""
    from dpo_cluster.train.local import run_local

    runs = {}
    for name, overrides in (("fixed", ()), ("budget", ("train.max_tokens_per_micro_batch=400",))):
        run_local(run_config(tmp_path / name, *overrides), skewed_split)
        runs[name] = train_rows(tmp_path / name)
    fixed, budget = runs["fixed"], runs["budget"]
    assert len(fixed) == len(budget) == 5
    assert budget[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert [r["loss"] for r in budget] == pytest.approx([r["loss"] for r in fixed], abs=1e-4)
    assert [r["grad_norm"] for r in budget] == pytest.approx([r["grad_norm"] for r in fixed], rel=1e-3)
    assert {r["micro_batches_per_step"] for r in fixed} == {2.0}
    assert len({r["micro_batches_per_step"] for r in budget}) > 1
    assert sum(r["padding_fraction"] for r in budget) < sum(r["padding_fraction"] for r in fixed)
