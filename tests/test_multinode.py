"""Beyond one machine, simulated here: a Ray cluster of three `ray start` nodes on this machine (a
head and two worker nodes with their own CPUs), the smoke recipe submitted as a Ray job.

- SPREAD: the two training workers run on two different nodes (node ranks 0 and 1, local rank 0
  each); a custom `trainer` resource keeps them off the head, as GPUs would on a real cluster.
- Checkpoints go to a storage path every node reaches; the worker on the second node is killed
  mid-run, the group restarts, restores the latest checkpoint and finishes.
- The loss curve equals the one of the same steps on one node, in one process.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dpo_cluster.config import load_config
from dpo_cluster.data.pipeline import prepare
from dpo_cluster.train.local import run_local
from tests.ray_cluster import REPO, LocalRayCluster
from tests.test_train_local import metrics_rows

pytestmark = pytest.mark.slow

SMOKE = "configs/qwen2.5-0.5b-youtube-titles_smoke.yaml"
STEPS = 4
RUN = ["train.learning_rate=5e-4", f"train.max_steps={STEPS}", "train.save_strategy=steps", "train.save_steps=2",
       "train.eval_strategy=no", "train.load_best_at_end=false", "train.best_metric=loss",
       'scaling.resources_per_worker={"CPU": 1, "trainer": 1}']  # fmt: skip


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    cluster = LocalRayCluster()
    try:
        cluster.start_head(num_cpus=2)
        cluster.add_node("node-a", num_cpus=1, resources={"trainer": 1}, wait=False)
        cluster.add_node("node-b", num_cpus=1, resources={"trainer": 1})
        yield cluster
    finally:
        cluster.stop()


def train(cluster: LocalRayCluster, output_dir: Path, *overrides: str) -> None:
    job_id = cluster.submit(
        "python", "jobs/train.py", "--config", SMOKE, f"output_dir={output_dir}", *RUN, *overrides
    )
    status = cluster.wait_for_job(job_id)
    assert status == "SUCCEEDED", cluster.job_logs(job_id)[-5000:]


def losses(output_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metrics_rows(output_dir) if "loss" in row}


def kill_rank_1_after(output_dir: Path, step: int, done: threading.Event, killed: list[dict]) -> None:
    """SIGKILL the world-rank-1 worker (as workers.json names it) once `step` is logged."""
    workers, metrics = output_dir / "workers.json", output_dir / "metrics.jsonl"
    deadline = time.time() + 600
    while not done.is_set() and time.time() < deadline:
        if workers.exists() and metrics.exists() and max(losses(output_dir), default=0) >= step:
            victim = next(w for w in json.loads(workers.read_text()) if w["world_rank"] == 1)
            os.kill(victim["pid"], signal.SIGKILL)
            killed.append(victim)
            return
        time.sleep(0.1)


def test_spread_over_nodes_survives_a_lost_worker_and_matches_one_node(
    cluster: LocalRayCluster, tmp_path: Path, ray_local: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)  # the smoke recipe's data path is relative to the repository
    shared = tmp_path / "shared-storage"
    spread = tmp_path / "spread"
    done, killed = threading.Event(), []
    killer = threading.Thread(target=kill_rank_1_after, args=(spread, 2, done, killed))
    killer.start()
    try:
        train(cluster, spread, "scaling.placement_strategy=SPREAD", f"scaling.storage_path={shared}",
              "train.max_failures=1")  # fmt: skip
    finally:
        done.set()
        killer.join()
    assert killed, "the rank-1 worker was never killed"

    # Placement after the restart: two nodes, one worker each, neither on the head.
    workers = sorted(json.loads((spread / "workers.json").read_text()), key=lambda w: w["world_rank"])
    assert [w["node_rank"] for w in workers] == [0, 1]
    assert [w["local_rank"] for w in workers] == [0, 0]
    assert len({w["node_id"] for w in workers}) == 2
    assert killed[0]["pid"] not in {w["pid"] for w in workers}  # a new worker replaced the killed one

    # The checkpoints were written to (and restored from) the shared storage path.
    checkpoints = sorted(p.name for p in (shared / "spread").glob("step-*"))
    assert checkpoints and checkpoints[-1] == f"step-{STEPS:07d}", checkpoints

    # The same steps in one process on one node (one worker, the same global batch of 16 pairs).
    one_node = tmp_path / "one-node"
    config = load_config(
        SMOKE, [f"output_dir={one_node}", *RUN, "scaling.num_workers=1", "train.micro_batch_size=16"]
    )
    prepared = prepare(config)
    run_local(config, prepared.split_dir("train"), prepared.split_dir("eval"))

    across, single = losses(spread), losses(one_node)
    assert sorted(across) == sorted(single) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert across[step] == pytest.approx(single[step], abs=1e-4), step
    assert single[STEPS] < single[1]
