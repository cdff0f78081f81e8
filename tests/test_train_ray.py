"""DPO through Ray Train with 2 DeepSpeed workers on CPU (gloo): ZeRO-2 and ZeRO-3, equivalence
with one worker (shuffled: both read one global permutation), and recovery after a training
worker is killed. The ZeRO-2 run is the one a worker is killed in: its curve, resumed from the
latest checkpoint, is the one worker's curve step by step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from dpo_cluster.train.local import run_local
from dpo_cluster.train.run import run_training
from tests.test_train_local import metrics_rows, train_config

pytestmark = pytest.mark.slow

RAY_RUN = ("train.micro_batch_size=2", "scaling.num_workers=2", "train.max_steps=8",
           "train.eval_strategy=steps", "train.eval_steps=4", "train.save_strategy=steps", "train.save_steps=2")  # fmt: skip


def train_losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics_rows(output_dir) if "loss" in r}


def eval_losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in metrics_rows(output_dir) if "eval_loss" in r}


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> tuple[Path, list[int], Any]:
    """(output_dir, the killed worker's pid, the run's result): 8 steps on 2 ZeRO-2 workers, one
    of them SIGKILLed once step 3 is logged; the group restarts from the latest checkpoint."""
    out = tmp_path_factory.mktemp("zero2")
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_worker_after, args=(out, 3, done, killed))
    killer.start()
    try:
        result = run_training(train_config(out, *RAY_RUN, "train.max_failures=1"))
    finally:
        done.set()
        killer.join()
    return out, killed, result


@pytest.fixture(scope="module")
def one_worker_run(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Path:
    """The same global batches on one worker with micro batch 4, in this process (no Ray Train)."""
    from dpo_cluster.data.pipeline import prepare

    one_dir = tmp_path_factory.mktemp("one")
    config = train_config(one_dir, *RAY_RUN, "train.micro_batch_size=4", "scaling.num_workers=1")
    prepared = prepare(config)
    run_local(config, prepared.split_dir("train"), prepared.split_dir("eval"))
    return one_dir


def test_two_workers_train_and_match_one_worker(
    zero2_run: tuple[Path, list[int], Any], one_worker_run: Path
) -> None:
    from transformers import AutoModelForCausalLM

    run_dir = zero2_run[0]
    two = train_losses(run_dir)
    assert sorted(two) == list(range(1, 9))
    assert two[1] == pytest.approx(0.6931471805599453, abs=1e-6)
    rows = metrics_rows(run_dir)
    assert rows[-1]["eval_rewards/accuracies"] > 0.8 and rows[-1]["eval_loss"] < 0.6
    AutoModelForCausalLM.from_pretrained(run_dir / "final")
    curves = run_dir / "training_curves.png"
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and curves.stat().st_size > 20_000

    # The same global batches on one worker with micro batch 4 (no Ray): the same loss curve.
    one = train_losses(one_worker_run)
    for step in range(1, 9):
        assert two[step] == pytest.approx(one[step], abs=1e-4), step
    evals_two, evals_one = eval_losses(run_dir), eval_losses(one_worker_run)
    assert sorted(evals_two) == sorted(evals_one) and evals_one
    assert evals_two == pytest.approx(evals_one, abs=1e-4)


def test_zero3_shards_policy_and_reference_and_exports_full_weights(tmp_path: Path, ray_local: None) -> None:
    """ZeRO-3 with token-budget micro-batches: workers run a varying number of forwards per step
    (the same on both, or the parameter gathers would hang) and the loss curve is that of fixed
    micro-batches on one worker, log-probs from hidden states there and from full logits here."""
    from transformers import AutoModelForCausalLM

    from dpo_cluster.modeling import resolve_name_or_path

    out = tmp_path / "zero3"
    # No eval split: the run's final metrics are then the last step's training metrics.
    common = ("train.gradient_accumulation_steps=2", "train.shuffle=false", "train.max_steps=4",
              "data.eval_fraction=0")  # fmt: skip
    result = run_training(train_config(out, "deepspeed.zero_stage=3", "train.micro_batch_size=2",
                                       "scaling.num_workers=2", "train.max_tokens_per_micro_batch=400",
                                       *common))  # fmt: skip
    losses = train_losses(out)
    assert result.metrics["loss"] == losses[4] and result.metrics["steps"] == 4
    assert losses[1] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert losses[4] < losses[1]
    forwards = [r["micro_batches_per_step"] for r in metrics_rows(out) if "loss" in r]
    assert all(n % 2 == 0 for n in forwards) and set(forwards) != {4.0}, forwards
    one_dir = tmp_path / "one"
    # The same 8 pairs a step, scored from full logits: under ZeRO-3 the log-probs come from hidden
    # states (train.logps_chunk_size, the default) with the head's weight gathered from its shards.
    config = train_config(one_dir, "train.micro_batch_size=4", "train.logps_chunk_size=0", *common)
    from dpo_cluster.data.pipeline import prepare

    run_local(config, prepare(config).split_dir("train"))
    one = train_losses(one_dir)
    assert [losses[s] for s in range(1, 5)] == pytest.approx([one[s] for s in range(1, 5)], abs=1e-4)
    accuracies = [r["rewards/accuracies"] for r in metrics_rows(out) if "rewards/accuracies" in r]
    assert accuracies[0] == 0.0 and accuracies[-1] > 0.5
    tuned = AutoModelForCausalLM.from_pretrained(out / "final")
    base = AutoModelForCausalLM.from_pretrained(resolve_name_or_path("builtin:tiny"))
    # Every tensor was gathered from the shards: full shapes, and trained values.
    for (name, p_tuned), (_, p_base) in zip(tuned.named_parameters(), base.named_parameters()):
        assert p_tuned.shape == p_base.shape, name
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), base.parameters()))


def _kill_a_worker_after(output_dir: Path, step: int, done: threading.Event, killed: list[int]) -> None:
    """SIGKILL one Ray Train worker process once `step` is in metrics.jsonl (a real crash)."""
    metrics = output_dir / "metrics.jsonl"
    deadline = time.time() + 600
    while not done.is_set() and time.time() < deadline:
        if metrics.exists() and any(
            json.loads(line).get("step", 0) >= step for line in metrics.read_text().splitlines()
        ):
            ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
            pids = [int(line.split()[0]) for line in ps.splitlines() if "RayTrainWorker" in line]
            if pids:
                os.kill(max(pids), signal.SIGKILL)
                killed.append(max(pids))
                return
        time.sleep(0.1)


def test_killed_worker_resumes_from_checkpoint_and_matches(
    zero2_run: tuple[Path, list[int], Any], one_worker_run: Path
) -> None:
    out, killed, result = zero2_run
    assert killed, "no training worker was killed"
    faulty, clean = train_losses(out), train_losses(one_worker_run)
    assert sorted(faulty) == list(range(1, 9))
    assert faulty[8] == pytest.approx(clean[8], abs=1e-3)
    assert result.final_dir.is_dir()
