"""`scoring_order` against what the training loop really reads: the loop's own step iterator
(`loop._step_batches` over `WorkerContext.my_steps`) and evaluation's micro-batches, run on every
rank over an `IndexedPairSource`, for worker counts, accumulation, epochs, shuffling, length
grouping and token budgets. The schedule holds every pair read, each once, in first-read order,
and no more than the grouping windows the run reaches."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dpo_cluster.batch.token_budget import TokenBudget
from dpo_cluster.config import Config, load_config
from dpo_cluster.reference.schedule import scoring_order
from dpo_cluster.train.context import WorkerContext
from dpo_cluster.train.indexed_source import IndexedPairSource
from dpo_cluster.train.loop import _step_batches

TRAIN_ROWS, EVAL_ROWS = 203, 37


def write_split(directory: Path, rows: int, seed: int) -> Path:
    """`rows` pairs with row ids "0".."rows-1" and lengths 1..40, as one Parquet file."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)

    def ids(n: int) -> list[list[int]]:
        return [list(range(1, k + 1)) for k in rng.integers(1, 40, n)]

    table = pa.table(
        {
            "row_id": [str(i) for i in range(rows)],
            "prompt_ids": ids(rows),
            "chosen_ids": ids(rows),
            "rejected_ids": ids(rows),
        }
    )
    pq.write_table(table, directory / "part-0.parquet")
    return directory


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("schedule")
    return {
        "train": write_split(root / "prepared" / "train", TRAIN_ROWS, 0),
        "eval": write_split(root / "prepared" / "eval", EVAL_ROWS, 1),
    }


def config_for(*overrides: str) -> Config:
    return load_config(None, ["output_dir=/tmp/x", "model.name_or_path=builtin:tiny", "data.train=a.jsonl",
                              "train.micro_batch_size=4", "train.eval_strategy=steps", "train.seed=5",
                              *overrides])  # fmt: skip


def read_by_the_loop(config: Config, splits: dict[str, Path]) -> tuple[list[set[int]], list[int]]:
    """(the train positions of each step over all ranks, the eval positions an evaluation reads),
    by running the loop's iterators on every rank."""
    train, world = config.train, config.scaling.num_workers
    budget = TokenBudget(train.max_tokens_per_micro_batch) if train.max_tokens_per_micro_batch else None
    window = train.length_group_window if train.group_by_length else None
    steps: list[set[int]] = []
    evals: set[int] = set()
    for rank in range(world):
        source = IndexedPairSource(splits["train"], train.seed, train.shuffle)
        eval_source = IndexedPairSource(splits["eval"], train.seed, False)
        ctx = WorkerContext(rank, world, 0, torch.device("cpu"), source, eval_source, lambda *a: None)
        setup = SimpleNamespace(
            config=config,
            steps=train.total_steps(source.num_rows, world),
            per_epoch=train.steps_per_epoch(source.num_rows, world),
            layout=SimpleNamespace(group_window=window, budget=budget),
        )
        for step, micro_batches in _step_batches(setup, ctx, 0):  # type: ignore[arg-type]
            while len(steps) < step:
                steps.append(set())
            steps[step - 1] |= {int(i) for batch in micro_batches for i in batch["row_id"]}
        # As `loop._evaluate` reads: as many eval micro-batches as every worker has.
        count = (eval_source.num_rows // train.micro_batch_size) // world
        batches = ctx.my_micro_batches(
            eval_source, train.micro_batch_size, 0, length_group_window=window, seed=train.seed
        )
        evals |= {int(i) for _, batch in itertools.islice(batches, count) for i in batch["row_id"]}
    return steps, sorted(evals)


@pytest.mark.parametrize(
    "overrides",
    [
        ["scaling.num_workers=1", "train.max_steps=7"],
        ["scaling.num_workers=2", "train.gradient_accumulation_steps=2", "train.max_steps=5"],
        ["scaling.num_workers=3", "train.max_steps=40"],  # past the first epoch: later epochs add the tails
        ["scaling.num_workers=2", "train.num_epochs=2"],
        ["scaling.num_workers=2", "train.max_steps=9", "train.shuffle=false"],
        ["scaling.num_workers=2", "train.max_steps=3", "train.max_tokens_per_micro_batch=2048"],
    ],
)
def test_the_schedule_is_what_the_loop_reads_in_first_read_order(
    splits: dict[str, Path], overrides: list[str]
) -> None:
    config = config_for(*overrides)
    order = scoring_order(config, {"train": TRAIN_ROWS, "eval": EVAL_ROWS})
    assert list(order) == ["eval", "train"]  # evaluation's pairs are scored first
    steps, evals = read_by_the_loop(config, splits)
    assert order["eval"].tolist() == evals
    train = order["train"].tolist()
    assert len(set(train)) == len(train)  # each pair once
    first_read: list[int] = []
    seen: set[int] = set()
    for positions in steps:
        new = positions - seen
        # Step by step: the pairs a step reads first come before those of any later step.
        assert set(train[len(first_read) : len(first_read) + len(new)]) == new
        first_read += sorted(new)
        seen |= new
    assert len(train) == len(first_read)  # nothing the run does not read
    if "train.max_steps=3" in overrides:
        assert len(train) == 3 * 4 * 2 < TRAIN_ROWS  # a short run scores its steps' pairs only


def test_grouping_adds_at_most_the_rest_of_the_last_window(splits: dict[str, Path]) -> None:
    """Length grouping re-cuts whole windows of micro-batches: the schedule takes the whole window
    the last step ends in (read or not), and nothing past it."""
    config = config_for("scaling.num_workers=2", "train.max_steps=3", "train.group_by_length=true",
                        "train.length_group_window=8")  # fmt: skip
    order = scoring_order(config, {"train": TRAIN_ROWS, "eval": EVAL_ROWS})
    steps, evals = read_by_the_loop(config, splits)
    read = set().union(*steps)
    assert read <= set(order["train"].tolist())
    assert len(order["train"]) == 8 * 4  # one window of 8 micro-batches holds the 3 x 2 read
    assert set(evals) <= set(order["eval"].tolist())


def test_no_evaluation_schedules_no_eval_pairs() -> None:
    config = config_for("scaling.num_workers=2", "train.max_steps=2", "train.eval_strategy=no")
    assert list(scoring_order(config, {"train": TRAIN_ROWS, "eval": EVAL_ROWS})) == ["train"]
    # Fewer eval pairs than one micro-batch per worker: the loop skips evaluation, nothing scored.
    few = scoring_order(config_for("scaling.num_workers=2", "train.max_steps=2"), {"train": 100, "eval": 7})
    assert "eval" not in few
