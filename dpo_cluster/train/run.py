"""DPO on a Ray cluster: prepare the data with Ray Data, then Ray Train's `TorchTrainer` runs
`train_loop` on every worker with DeepSpeed.

- Data: the prepared splits are materialized in the object store (spilling to disk if large) and
  stream into every worker via `get_dataset_shard`, unsplit and in a fixed order; each worker keeps
  its own micro-batches (see `dpo_cluster.train.context`). No worker reads or tokenizes raw data.
  With `reference.mode: precompute` an actor pool of the reference adds the reference log-probs
  to every pair, beside training where the cluster has room (`dpo_cluster.data.reference_stream`:
  the workers then read the stage's log instead of the datasets) or before it
  (`dpo_cluster.data.reference_logps`), and the workers load no reference.
- Checkpoints: every worker reports its DeepSpeed shard files and Ray Train merges them into one
  checkpoint under `scaling.storage_path` (default `output_dir/ray_results`), keeping
  `train.num_checkpoints_to_keep`, ranked by `train.best_metric` when there is eval data.
- Failures: with `train.max_failures > 0` a failed worker group restarts from the latest
  checkpoint; `train.resume_from` continues a stopped run from a checkpoint directory.
- Outputs: rank 0 writes `metrics.jsonl`, TensorBoard files, `workers.json` (which node, node rank
  and local rank each worker ran on) and `final/` into `output_dir`, which
  on a multi-node cluster must be storage every node reaches (like `storage_path`); the driver
  then draws `training_curves.png` from metrics.jsonl.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_cluster.config import Config
from dpo_cluster.plots import CURVES_FILE, plot_training_curves
from dpo_cluster.train.context import PairSource, RayShardPairSource, WorkerContext
from dpo_cluster.train.loop import FINAL_DIR, train_loop
from dpo_cluster.train.metrics_log import METRICS_FILE

WORKERS_FILE = "workers.json"

logger = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    final_dir: Path
    metrics: dict[str, Any]
    checkpoint_dir: Path | None


def _worker_entry(loop_config: dict[str, Any]) -> None:
    import ray.train
    import torch

    config: Config = loop_config["config"]
    counts: dict[str, int] = loop_config["counts"]
    reference_log = loop_config["reference_log"]  # a PairLog actor, or None
    # Iterating the materialized splits logs a line per pass at INFO; keep warnings and errors.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = ray.train.get_context()
    local_rank = context.get_local_rank()
    use_gpu = config.scaling.use_gpu
    device = torch.device(f"cuda:{local_rank}" if use_gpu else "cpu")
    _record_placement(Path(config.output_dir), context)

    def source(split: str, shuffle: bool) -> PairSource | None:
        if counts.get(split, 0) == 0:
            return None
        if reference_log is not None:  # the reference stage's log, scored beside training
            from dpo_cluster.reference.stream import LogPairSource

            return LogPairSource(reference_log, split, counts[split], config.train.seed, shuffle)
        return RayShardPairSource(
            ray.train.get_dataset_shard(split), counts[split], config.train.seed, shuffle
        )

    resume: Path | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # restarted after a failure: continue from the latest checkpoint
        resume = Path(checkpoint.to_directory())
    elif config.train.resume_from:
        resume = Path(config.train.resume_from)

    def report(metrics: dict[str, Any], directory: Path | None, name: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory is not None else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)

    def best() -> Path | None:
        metric, mode = config.train.best_metric, config.train.best_mode
        scored = [
            (rc.metrics[metric], rc.checkpoint)
            for rc in ray.train.get_all_reported_checkpoints()
            if rc.metrics.get(metric) is not None
        ]
        if not scored:
            return None
        pick = min if mode == "min" else max
        return Path(pick(scored, key=lambda item: item[0])[1].to_directory())

    ctx = WorkerContext(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        local_rank=local_rank,
        device=device,
        train=source("train", shuffle=config.train.shuffle),  # type: ignore[arg-type]
        eval=source("eval", shuffle=False),
        report=report,
        resume_checkpoint=resume,
        best_checkpoint=best,
        scratch_dir=Path(tempfile.mkdtemp(prefix="dpo-worker-")),
    )
    train_loop(config, ctx)


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
    """Prepare (or reuse) the data, train on the Ray cluster, return where final/ is."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from dpo_cluster.data.pipeline import prepare

    config = config.with_absolute_paths()  # workers run in their own working directory
    prepared = prepare(config)  # also joins or starts the Ray cluster
    counts = {split: stats["rows_kept"] for split, stats in prepared.report["splits"].items()}
    # Materialized here, before the workers take their CPUs: iterating it then needs no Ray Data
    # tasks in the workers (which could starve waiting for CPUs the workers hold), and
    # preserve_order fixes the order, so runs repeat and worker counts are interchangeable.
    data_context = ray.data.DataContext.get_current()
    data_context.execution_options.preserve_order = True
    # Workers iterate these every epoch and evaluation; per-iteration progress bars would flood the
    # log (a dataset carries the context it was made with). The loop's own bar shows progress.
    data_context.enable_progress_bars = False
    stream = None
    if config.reference.resolved_mode(config.lora.enabled) == "precompute":
        from dpo_cluster.reference.precompute import compute_reference_logps
        from dpo_cluster.reference.stream import start_streamed_reference

        # The reference actor pool scores beside training, the workers reading its log; or, where
        # it cannot overlap (or the cache has the values), it scores every pair now and its actors
        # exit before the workers start: the trainer's datasets are then the stage's output.
        stream, why_not = start_streamed_reference(config, prepared)
        if stream is None:
            logger.info("reference log-probs before training: %s", why_not)
        datasets = {} if stream is not None else compute_reference_logps(config, prepared).datasets
    else:
        datasets = {split: ds.materialize() for split, ds in prepared.datasets().items()}
    has_eval = counts.get("eval", 0) > 0
    train = config.train
    output_dir = Path(config.output_dir)
    storage = config.scaling.storage_path or str(output_dir / "ray_results")
    env = {"DS_ACCELERATOR": "cuda" if config.scaling.use_gpu else "cpu"}
    for key in ("HF_HUB_OFFLINE", "DPO_CLUSTER_CACHE", "HF_HOME"):
        if key in os.environ:
            env[key] = os.environ[key]

    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={
            "config": config,
            "counts": counts,
            "reference_log": stream.log if stream else None,
        },
        torch_config=TorchConfig(backend="nccl" if config.scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.scaling.num_workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker=config.scaling.resources_per_worker or None,
            placement_strategy=config.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=output_dir.name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=train.num_checkpoints_to_keep,
                checkpoint_score_attribute=train.best_metric if has_eval else None,
                checkpoint_score_order=train.best_mode,
            ),
            worker_runtime_env={"env_vars": env},
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[],
            execution_options=ray.data.ExecutionOptions(preserve_order=True),
        ),
    )
    # Ray Train installs its own Ctrl-C handler (abort the run) and leaves it in place: put the
    # caller's back, or a later Ctrl-C (stopping the demo's server, say) would go unheard.
    sigint = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    except BaseException:
        if stream is not None:
            stream.abort()
            stream.close()  # the stage's own error, when it is why training failed
        raise
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)
    if stream is not None:
        stream.close()  # scored, cached and reported by now: the workers read every block
    metrics_path = output_dir / METRICS_FILE
    if metrics_path.exists():
        plot_training_curves(metrics_path, output_dir / CURVES_FILE)
    checkpoint = result.checkpoint
    return TrainingResult(
        final_dir=output_dir / FINAL_DIR,
        metrics=dict(result.metrics or {}),
        checkpoint_dir=Path(checkpoint.path) if checkpoint is not None else None,
    )
