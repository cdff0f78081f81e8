"""The Ray Train driver: prepare the data with Ray Data, then `TorchTrainer` runs `train_loop` on
every worker with DeepSpeed. Workers read the prepared rows by position from their row layout
(each its own rows, in one seeded global order, so any worker count sees the same global batches),
and with `reference.mode: precompute` the reference log-probs by position from the reference
stage's fragments, scored before training or beside it. No split passes through the driver or
the object store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_cluster.config import Config
from dpo_cluster.data.process import SPLITS
from dpo_cluster.modeling import download_hub_models
from dpo_cluster.plots import CURVES_FILE, plot_training_curves
from dpo_cluster.train.checkpoint import SUMMARY_FILE
from dpo_cluster.train.context import WorkerContext
from dpo_cluster.train.indexed_source import IndexedPairSource
from dpo_cluster.train.loop import FINAL_DIR, train_loop
from dpo_cluster.train.metrics_log import METRICS_FILE

if TYPE_CHECKING:
    from dpo_cluster.reference.precompute import ReferenceStage

WORKERS_FILE = "workers.json"

logger = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    final_dir: Path
    metrics: dict[str, Any]  # final/metrics_summary.json: the last training and evaluation metrics
    checkpoint_dir: Path | None


def _worker_entry(loop_config: dict[str, Any]) -> None:
    """Every Ray Train worker: record where it runs, build its `WorkerContext`, run `train_loop`."""
    import ray.train

    config: Config = loop_config["config"]
    context = ray.train.get_context()
    _record_placement(Path(config.output_dir), context)
    # files: split -> where its rows (and reference values) are read from
    ctx = _build_worker_context(config, context, loop_config["files"])
    train_loop(config, ctx)


def _build_worker_context(config: Config, context: Any, files: dict[str, SplitFiles]) -> WorkerContext:
    """This worker's `WorkerContext` from Ray Train's context (`ray.train.get_context()`)."""
    import torch

    local_rank = context.get_local_rank()
    source = partial(_pair_source, config, files)
    train = source("train", shuffle=config.train.shuffle)
    assert train is not None  # a run has training pairs (prepare checks)
    return WorkerContext(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        local_rank=local_rank,
        device=torch.device(f"cuda:{local_rank}" if config.scaling.use_gpu else "cpu"),
        train=train,
        eval=source("eval", shuffle=False),
        report=_report,
        resume_checkpoint=partial(_resume_checkpoint, config),
        best_checkpoint=partial(_best_checkpoint, config.train.best_metric, config.train.best_mode),
        scratch_dir=Path(tempfile.mkdtemp(prefix="dpo-worker-")),
    )


@dataclass(frozen=True)
class SplitFiles:
    """Where a worker reads one split: the prepared split directory (its row layout) and, with
    precomputed reference log-probs, their fragment directory (and the stage's status file while
    it scores beside training)."""

    split_dir: str
    num_rows: int
    reference_dir: str | None = None
    reference_status: str | None = None


def _pair_source(
    config: Config, files: dict[str, SplitFiles], split: str, shuffle: bool
) -> IndexedPairSource | None:
    """A split's pairs by position (each worker reads its own), with its reference values where
    they were precomputed; None for an empty split."""
    where = files.get(split)
    if where is None or where.num_rows == 0:
        return None
    reference_dir = Path(where.reference_dir) if where.reference_dir else None
    status = Path(where.reference_status) if where.reference_status else None
    return IndexedPairSource(Path(where.split_dir), config.train.seed, shuffle, reference_dir, status)


@contextlib.contextmanager
def _resume_checkpoint(config: Config) -> Iterator[Path | None]:
    """The latest reported checkpoint after a failure restarted the workers, else
    `train.resume_from`; read in place (`as_directory`) where storage is a filesystem."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield Path(config.train.resume_from) if config.train.resume_from else None
        return
    with checkpoint.as_directory() as directory:
        yield Path(directory)


def _report(metrics: dict[str, Any], directory: Path | None, name: str | None) -> None:
    """`ray.train.report`, with this worker's checkpoint files in `directory` when there are some."""
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory is not None else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)


@contextlib.contextmanager
def _best_checkpoint(metric: str, mode: str) -> Iterator[Path | None]:
    """The reported checkpoint with the best `metric` (`mode`: min | max), None where none has it;
    read in place (`as_directory`) where storage is a filesystem, not copied to every worker."""
    import ray.train

    scored = [
        (rc.metrics[metric], rc.checkpoint)
        for rc in ray.train.get_all_reported_checkpoints()
        if rc.metrics.get(metric) is not None
    ]
    if not scored:
        yield None
        return
    pick = min if mode == "min" else max
    with pick(scored, key=lambda item: item[0])[1].as_directory() as directory:
        yield Path(directory)


def _record_placement(output_dir: Path, context: Any) -> None:
    """Rank 0 writes where every worker runs (`workers.json`): the first thing to check when a
    multi-node run is slow or hangs. A collective, so every worker calls it."""
    import socket

    import ray
    import torch.distributed as dist

    mine = {
        "world_rank": context.get_world_rank(),
        "local_rank": context.get_local_rank(),
        "node_rank": context.get_node_rank(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
    }
    everyone: list[Any] = [None] * context.get_world_size()
    dist.all_gather_object(everyone, mine)
    if context.get_world_rank() == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / WORKERS_FILE).write_text(json.dumps(everyone, indent=2) + "\n")


def run_training(config: Config) -> TrainingResult:
    """Prepare (or reuse) the data, train on the Ray cluster, return where final/ is.

    Checkpoints go under `scaling.storage_path` (default output_dir/ray_results), keeping
    `train.num_checkpoints_to_keep`, ranked by `train.best_metric` when there is eval data; with
    `train.max_failures > 0` a failed worker group restarts from the latest one. Rank 0 writes
    metrics.jsonl, TensorBoard files, workers.json and final/ into output_dir (on several nodes,
    storage every node reaches, like storage_path); training_curves.png is drawn here after.
    """
    from dpo_cluster.data.pipeline import prepare

    config = config.with_absolute_paths()  # workers run in their own working directory
    download_hub_models(config)  # once here, not once per worker inside a collective's timeout
    prepared = prepare(config)  # also joins or starts the Ray cluster
    counts = {split: stats["rows_kept"] for split, stats in prepared.report["splits"].items()}
    stage, files = _training_data(config, prepared, counts)
    result = _fit(_build_trainer(config, counts, files), stage)
    output_dir = Path(config.output_dir)
    metrics_path = output_dir / METRICS_FILE
    if metrics_path.exists():
        plot_training_curves(metrics_path, output_dir / CURVES_FILE)
    checkpoint = result.checkpoint
    # Rank 0's summary rather than Ray's last report, which is the last checkpoint's.
    summary = output_dir / FINAL_DIR / SUMMARY_FILE
    return TrainingResult(
        final_dir=output_dir / FINAL_DIR,
        metrics=json.loads(summary.read_text()) if summary.is_file() else dict(result.metrics or {}),
        checkpoint_dir=Path(checkpoint.path) if checkpoint is not None else None,
    )


def _training_data(
    config: Config, prepared: Any, counts: dict[str, int]
) -> tuple[ReferenceStage | None, dict[str, SplitFiles]]:
    """(the reference stage, None without precompute; the files workers read each split from).

    With precompute the stage scores the pairs this run reads that the cache lacks, eval first,
    then train as training reads it: beside training where the cluster holds the actors beside the
    workers (who then wait for values not scored yet), else before the workers start."""
    files = {
        split: SplitFiles(str(prepared.split_dir(split)), counts[split])
        for split in SPLITS
        if counts.get(split, 0) and prepared.split_dir(split) is not None
    }
    if config.reference.resolved_mode(config.lora.enabled) != "precompute":
        return None, files
    from dpo_cluster.reference.precompute import build_reference_stage, overlap_problem
    from dpo_cluster.reference.schedule import scoring_order

    order = scoring_order(config, counts)
    stage = build_reference_stage(config, prepared, order)
    why_not = overlap_problem(config, stage.rows_to_score)
    logger.info(
        "reference log-probs: %d pairs the run reads, %d to score (%s)",
        sum(stage.needed.values()),
        stage.rows_to_score,
        "beside training" if why_not is None else f"before training: {why_not}",
    )
    stage.overlapped = why_not is None
    stage.start()
    if why_not is not None:
        try:
            stage.wait()
        except BaseException:
            stage.close()
            raise
    status = str(stage.status_file) if why_not is None else None
    for split, where in files.items():
        files[split] = replace(where, reference_dir=str(stage.plan.split_dir(split)), reference_status=status)
    return stage, files


def _worker_env(config: Config) -> dict[str, str]:
    """Environment variables of the workers: DeepSpeed's accelerator, tokenizers' thread pool, and
    the driver's offline and cache settings."""
    env = {
        "DS_ACCELERATOR": "cuda" if config.scaling.use_gpu else "cpu",
        # Each worker's tokenizer would start a Rust thread pool as wide as the node, beside the
        # other workers' (and warn, then turn it off, in any process forked after it ran). Off,
        # unless the driver chose otherwise.
        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false"),
    }
    for key in ("HF_HUB_OFFLINE", "DPO_CLUSTER_CACHE", "HF_HOME", "HF_HUB_CACHE"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def _build_trainer(config: Config, counts: dict[str, int], files: dict[str, SplitFiles]) -> Any:
    """The `TorchTrainer` running `_worker_entry` on `scaling.num_workers` workers."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    train, scaling, output_dir = config.train, config.scaling, Path(config.output_dir)
    return TorchTrainer(
        _worker_entry,
        train_loop_config={"config": config, "files": files},
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo", timeout_s=scaling.timeout_s),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=scaling.resources_per_worker or None,
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=output_dir.name,
            storage_path=scaling.storage_path or str(output_dir / "ray_results"),
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=train.num_checkpoints_to_keep,
                checkpoint_score_attribute=train.best_metric if counts.get("eval", 0) > 0 else None,
                checkpoint_score_order=train.best_mode,
            ),
            worker_runtime_env={"env_vars": _worker_env(config)},
        ),
    )


def _fit(trainer: Any, stage: ReferenceStage | None) -> Any:
    """`trainer.fit()`; the reference stage is stopped when training ends, whatever the outcome
    (what it scored stays in the cache), and its own error raised when it is why training failed."""
    # Ray Train installs its own Ctrl-C handler (abort the run) and leaves it in place: put the
    # caller's back, or a later Ctrl-C (stopping the demo's server, say) would go unheard.
    sigint = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    except BaseException:
        if stage is not None:
            stage.close()
            stage.wait()  # the stage's own error, when it is why training failed
        raise
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)
    if stage is not None:
        stage.close()  # the pairs training read were all scored; extra ones need not be
        if stage.error is not None:
            logger.warning("reference stage failed after training had its values: %s", stage.error)
    return result
