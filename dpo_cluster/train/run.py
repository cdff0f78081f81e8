"""The Ray Train driver: prepare the data with Ray Data, then `TorchTrainer` runs `train_loop` on
every worker with DeepSpeed. Workers read the prepared (and, with `reference.mode: precompute`,
reference-scored) pairs from the object store, unsplit and in one fixed order, so no worker reads
or tokenizes raw data and any worker count sees the same global batches.
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
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from dpo_cluster.config import Config
from dpo_cluster.data.process import SPLITS
from dpo_cluster.modeling import download_hub_models
from dpo_cluster.plots import CURVES_FILE, plot_training_curves
from dpo_cluster.train.checkpoint import SUMMARY_FILE
from dpo_cluster.train.context import PairSource, RayShardPairSource, WorkerContext
from dpo_cluster.train.indexed_source import IndexedPairSource
from dpo_cluster.train.loop import FINAL_DIR, train_loop
from dpo_cluster.train.metrics_log import METRICS_FILE

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
    # Iterating the materialized splits logs a line per pass at INFO; keep warnings and errors.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = ray.train.get_context()
    _record_placement(Path(config.output_dir), context)
    # reference_log: a PairLog actor, or None; files: split -> where its rows are read from
    ctx = _build_worker_context(
        config, context, loop_config["counts"], loop_config["reference_log"], loop_config["files"]
    )
    train_loop(config, ctx)


def _build_worker_context(
    config: Config, context: Any, counts: dict[str, int], reference_log: Any, files: dict[str, SplitFiles]
) -> WorkerContext:
    """This worker's `WorkerContext` from Ray Train's context (`ray.train.get_context()`)."""
    import torch

    local_rank = context.get_local_rank()
    source = partial(_pair_source, config, counts, reference_log, files)
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
    """Where a worker reads one split: the prepared split directory (its row layout), and the
    cached reference split in the same order where reference log-probs were precomputed."""

    split_dir: str
    reference_dir: str | None = None


def _pair_source(
    config: Config,
    counts: dict[str, int],
    reference_log: Any,
    files: dict[str, SplitFiles],
    split: str,
    shuffle: bool,
) -> PairSource | None:
    """A split's pairs: its rows by position (each worker reads its own), the reference stage's log
    where it scores beside training, or a dataset shard where reference values live only in the
    object store (reference.cache off); None for an empty split."""
    import ray.train

    if counts.get(split, 0) == 0:
        return None
    seed = config.train.seed
    if reference_log is not None:  # the reference stage's log, scored beside training
        from dpo_cluster.reference.stream import LogPairSource

        return LogPairSource(reference_log, split, counts[split], seed, shuffle)
    if split in files:
        where = files[split]
        reference = Path(where.reference_dir) if where.reference_dir else None
        return IndexedPairSource(Path(where.split_dir), seed, shuffle, reference_dir=reference)
    return RayShardPairSource(ray.train.get_dataset_shard(split), counts[split], seed, shuffle)


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
    _configure_ray_data()
    stream, datasets, files = _training_data(config, prepared)
    result = _fit(_build_trainer(config, counts, datasets, files, stream), stream)
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


def _configure_ray_data() -> None:
    """Ray Data settings the training datasets are made with (a dataset keeps the context it was
    made with)."""
    import ray.data

    data_context = ray.data.DataContext.get_current()
    # A fixed order: runs repeat, and worker counts are interchangeable.
    data_context.execution_options.preserve_order = True
    # Workers iterate these every epoch and evaluation; per-iteration progress bars would flood the
    # log. The loop's own bar shows progress.
    data_context.enable_progress_bars = False


def _training_data(config: Config, prepared: Any) -> tuple[Any, dict[str, Any], dict[str, SplitFiles]]:
    """(the reference stage scoring beside training, or None; the trainer's datasets; the files
    workers read splits from). Workers read rows by position from files wherever the values are on
    disk, so no split passes through the driver or the object store."""
    if config.reference.resolved_mode(config.lora.enabled) != "precompute":
        return None, {}, _split_files(prepared, None)
    from dpo_cluster.reference.precompute import compute_reference_logps
    from dpo_cluster.reference.stream import start_streamed_reference

    # The reference actor pool scores beside training, the workers reading its log; or, where it
    # cannot overlap (or the cache has the values), it scores every pair now and its actors exit
    # before the workers start.
    stream, why_not = start_streamed_reference(config, prepared)
    if stream is not None:
        return stream, {}, {}
    logger.info("reference log-probs before training: %s", why_not)
    reference = compute_reference_logps(config, prepared)
    if reference.cache_dir is None:  # the values are only in the object store: read as datasets
        return None, reference.datasets, {}
    return None, {}, _split_files(prepared, reference)


def _split_files(prepared: Any, reference: Any) -> dict[str, SplitFiles]:
    files = {}
    for split in SPLITS:
        split_dir = prepared.split_dir(split)
        if split_dir is not None:
            reference_dir = reference.split_dir(split) if reference is not None else None
            files[split] = SplitFiles(str(split_dir), str(reference_dir) if reference_dir else None)
    return files


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


def _build_trainer(
    config: Config,
    counts: dict[str, int],
    datasets: dict[str, Any],
    files: dict[str, SplitFiles],
    stream: Any,
) -> Any:
    """The `TorchTrainer` running `_worker_entry` on `scaling.num_workers` workers."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    train, scaling, output_dir = config.train, config.scaling, Path(config.output_dir)
    return TorchTrainer(
        _worker_entry,
        train_loop_config={
            "config": config,
            "counts": counts,
            "reference_log": stream.log if stream else None,
            "files": files,
        },
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
        datasets=datasets,
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[],
            execution_options=ray.data.ExecutionOptions(preserve_order=True),
        ),
    )


def _fit(trainer: Any, stream: Any) -> Any:
    """`trainer.fit()`; the reference stage beside training is stopped when training fails and
    closed when it succeeds."""
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
    return result
