"""The overlapped reference stage's parts on a real local Ray: the log of scored blocks that the
workers read while it fills (order, waiting, windowed shuffle, failures), and when a run overlaps.
Training through it equals the in-loop reference: tests/test_reference_logps.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from dpo_cluster.reference.cache import CachePlan
from dpo_cluster.reference.stream import LogPairSource, overlap_problem, start_pair_log
from tests.test_train_local import train_config

pytestmark = pytest.mark.slow


def block(start: int, rows: int) -> pa.Table:
    ids = list(range(start, start + rows))
    return pa.table(
        {"row_id": ids, "prompt_ids": [[i] for i in ids], "ref_chosen_logps": [float(-i) for i in ids]}
    )


def fill_later(log: Any, blocks: list[pa.Table], delay: float) -> threading.Thread:
    """Append `blocks` to the train split one by one, `delay` seconds apart, then finish it."""
    import ray

    refs = [ray.put(b) for b in blocks]

    def run() -> None:
        for ref in refs:
            time.sleep(delay)
            ray.get(log.append.remote("train", [ref]))
        ray.get(log.finish.remote("train"))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def row_ids(batches: list[dict[str, Any]]) -> list[int]:
    return [i for b in batches for i in b["row_id"]]


def test_workers_read_blocks_in_order_as_they_arrive(ray_local: None) -> None:
    log = start_pair_log(["train", "eval"])
    writer = fill_later(log, [block(0, 5), block(5, 5), block(10, 5)], delay=0.5)
    started = time.perf_counter()
    source = LogPairSource(log, "train", num_rows=15, seed=0, shuffle=False)
    batches = list(source.iter_batches(4, epoch=0))  # waits for blocks not appended yet
    writer.join()
    assert time.perf_counter() - started >= 1.4
    assert row_ids(batches) == list(range(12))  # full batches only, in order, across blocks
    assert batches[0] == {"row_id": [0, 1, 2, 3], "prompt_ids": [[0], [1], [2], [3]],
                          "ref_chosen_logps": [0.0, -1.0, -2.0, -3.0]}  # fmt: skip
    # A second reader, a second epoch: the same blocks again, nothing waits.
    assert row_ids(list(source.iter_batches(4, epoch=1))) == list(range(12))


def test_shuffle_is_windowed_seeded_and_loses_no_row(ray_local: None) -> None:
    log = start_pair_log(["train"])
    fill_later(log, [block(i, 10) for i in range(0, 40, 10)], delay=0).join()
    source = LogPairSource(log, "train", num_rows=40, seed=3, shuffle=True, shuffle_window=20)
    epoch0 = row_ids(list(source.iter_batches(5, epoch=0)))
    assert sorted(epoch0) == list(range(40))
    assert epoch0 != list(range(40))
    assert sorted(epoch0[:20]) == list(range(20))  # rows never leave their window
    assert epoch0 == row_ids(list(source.iter_batches(5, epoch=0)))  # same seed and epoch
    assert epoch0 != row_ids(list(source.iter_batches(5, epoch=1)))


def test_a_failed_stage_stops_waiting_workers_with_its_error(ray_local: None) -> None:
    import ray

    log = start_pair_log(["train"])
    ray.get(log.append.remote("train", [ray.put(block(0, 4))]))
    source = LogPairSource(log, "train", num_rows=8, seed=0, shuffle=False)
    batches = source.iter_batches(4, epoch=0)
    assert next(batches)["row_id"] == [0, 1, 2, 3]
    threading.Timer(0.5, lambda: ray.get(log.fail.remote("reference stage failed: out of memory"))).start()
    with pytest.raises(RuntimeError, match="reference stage failed: out of memory"):
        next(batches)  # was waiting for block 1


def test_overlap_only_where_the_actors_fit_beside_the_workers(tmp_path: Path, ray_local: None) -> None:
    import ray

    plan = CachePlan("k", {}, {"train": 10}, tmp_path, tmp_path / "k", problem="no cache for key k")
    cpus = ray.cluster_resources()["CPU"]
    workers = f"scaling.num_workers={int(cpus)}"  # every CPU of the cluster
    assert overlap_problem(train_config(tmp_path, workers, "reference.mode=precompute", "reference.num_cpus=0"),
                           plan) is None  # fmt: skip
    why = overlap_problem(train_config(tmp_path, workers, "reference.mode=precompute"), plan)
    assert why is not None and "cannot hold 1 reference actor(s) beside" in why
    assert f"CPU {cpus + 1:g} needed, {cpus:g} in the cluster" in why
    off = train_config(
        tmp_path, "reference.mode=precompute", "reference.overlap=false", "reference.num_cpus=0"
    )
    assert overlap_problem(off, plan) == "reference.overlap is false"
    cached = CachePlan("k", {}, {"train": 10}, tmp_path, tmp_path / "k", problem=None)
    on = train_config(tmp_path, "reference.mode=precompute", "reference.num_cpus=0")
    assert overlap_problem(on, cached) == f"the cache {tmp_path / 'k'} holds the values"


def test_a_reference_that_cannot_load_fails_the_run_instead_of_hanging(
    tmp_path: Path, ray_local: None
) -> None:
    """The actors cannot load the reference (its weights file is garbage): the workers, waiting
    for their first block, get the stage's error, and run_training raises it, naming the stage."""
    import shutil

    from dpo_cluster.modeling import resolve_name_or_path
    from dpo_cluster.train.run import run_training

    broken = tmp_path / "broken-reference"
    shutil.copytree(resolve_name_or_path("builtin:tiny"), broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    config = train_config(tmp_path / "out", "scaling.num_workers=2", "train.max_steps=2", "reference.mode=precompute",
                          "reference.num_cpus=0", f"reference.name_or_path={broken}")  # fmt: skip
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="reference stage failed"):
        run_training(config)
    assert time.perf_counter() - started < 300
    assert not list((tmp_path / "out" / "reference_logps").glob("[!.]*"))  # no cache installed
