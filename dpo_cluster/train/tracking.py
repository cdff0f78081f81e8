"""Experiment tracking on the main worker: the rows of metrics.jsonl, the config and final/'s
location, sent to MLflow and Weights & Biases (`tracking.mlflow`, `tracking.wandb`).

`MetricsLog` drives it: `start_trackers` when it opens, `log` per row, `finish` once final/ is
written, `fail` when the run stops early. Every tracker gets the row's metrics under their
metrics.jsonl names at the row's `step` (`monotonic_time`, a clock reading, and `step` itself, the
axis, are left out), and the config as flattened dotted keys (`train.beta`). final/ is recorded by
reference, its weights are not uploaded: MLflow gets a `final_dir` tag and a small `final.json`
artifact (location, file list, the run's summary), W&B a `model` artifact whose entries are
`file://` references into final/ (paths only, no checksums read from the weights).

A resumed run (a checkpoint at step > 0) continues the tracking runs recorded in
`output_dir/tracking.json` where the store is the same, so its curves go on in one run; a fresh
run (step 0) starts new ones.

The clients are used directly rather than through Ray's `setup_mlflow` / `setup_wandb`: those
always start a new MLflow run (no run id to continue), re-log every parameter (MLflow refuses a
changed value on a continued run), and their rank-0 rule reads Ray Train's v1 session, which Ray
Train v2 workers (and the plain-process loop) do not have; the caller's `is_main` decides here.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_cluster.config.tracking import missing_client_message, mlflow_tracking_uri

if TYPE_CHECKING:
    from dpo_cluster.config import Config

logger = logging.getLogger(__name__)

# Under output_dir: which tracking runs this run logs to, so that a resumed run continues them.
TRACKING_FILE = "tracking.json"
# The name of final/'s pointer among the MLflow run's artifacts, and of its location tag.
FINAL_POINTER = "final.json"
FINAL_TAG = "final_dir"
# metrics.jsonl keys that are not metrics: the step (the trackers' own axis) and the clock stamp.
NOT_METRICS = ("step", "monotonic_time")


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {dotted key: value}: `{"train": {"beta": 0.1}}` -> `{"train.beta": 0.1}`.
    Lists and empty mappings stay values (a list of sources is one parameter)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat |= flatten_config(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def param_text(value: Any, limit: int) -> str:
    """A parameter's value as text, YAML-like (`true`, `null`, `[a, b]` as JSON), cut to `limit`
    characters (MLflow's longest parameter value) with a trailing `...`."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def param_key(key: str) -> str:
    """A dotted config key as an MLflow parameter name: a character MLflow refuses in one (a key
    of a user mapping such as data.constants may hold any) becomes `_`; at most 250 characters."""
    return re.sub(r"[^\w.\- :]", "_", key)[:250]


def tracked_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of a metrics.jsonl row that trackers get: its numbers but `step` and the clock."""
    return {
        key: float(value)
        for key, value in row.items()
        if key not in NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def final_pointer(final_dir: Path) -> dict[str, Any]:
    """What is recorded about final/ instead of its weights: where it is, what kind, its files and
    sizes, and the run's summary (steps, precision, last metrics) from its metrics_summary.json."""
    from dpo_cluster.train.checkpoint import SUMMARY_FILE

    final_dir = final_dir.resolve()
    files = sorted(p for p in final_dir.rglob("*") if p.is_file()) if final_dir.is_dir() else []
    summary = final_dir / SUMMARY_FILE
    return {
        "path": str(final_dir),
        "uri": final_dir.as_uri(),
        "kind": "adapter" if (final_dir / "adapter_config.json").is_file() else "model",
        "files": {str(p.relative_to(final_dir)): p.stat().st_size for p in files},
        "summary": json.loads(summary.read_text()) if summary.is_file() else None,
    }


class MlflowTracker:
    """One MLflow run, through `MlflowClient` (no process-global active run)."""

    def __init__(self, config: Config, previous: Mapping[str, Any] | None, initial_step: int) -> None:
        try:
            from mlflow import MlflowClient
        except ImportError as e:
            raise ImportError(missing_client_message("mlflow", "tracking.mlflow.enabled", "mlflow")) from e
        settings = config.tracking.mlflow
        self.tracking_uri = mlflow_tracking_uri(settings, config.output_dir)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.experiment_id = self._experiment(settings.experiment)
        self.run_id = self._continued_run(previous) if initial_step > 0 else None
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "resumed_at_step", str(initial_step))
            return
        run = self.client.create_run(
            self.experiment_id,
            run_name=settings.run_name or Path(config.output_dir).name,
            tags={"output_dir": str(Path(config.output_dir).resolve()), **settings.tags},
        )
        self.run_id = run.info.run_id
        self._log_params(flatten_config(config.to_dict()))

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=self._local_artifact_root())
        except MlflowException:  # created by a concurrent run in the meantime
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _local_artifact_root(self) -> str | None:
        """With a SQLite store, artifacts beside its file (MLflow's default, ./mlruns, would be the
        Ray worker's working directory); a server decides for itself."""
        if not self.tracking_uri.startswith("sqlite:///"):
            return None
        return (Path(self.tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()

    def _continued_run(self, previous: Mapping[str, Any] | None) -> str | None:
        """The recorded run, if it is in this store and experiment and not deleted."""
        from mlflow.exceptions import MlflowException

        if not previous or previous.get("tracking_uri") != self.tracking_uri:
            return None
        try:
            run = self.client.get_run(previous["run_id"])
        except MlflowException:
            return None
        if run.info.experiment_id != self.experiment_id or run.info.lifecycle_stage != "active":
            return None
        return run.info.run_id

    def _log_params(self, flat: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        texts = {param_key(key): param_text(value, MAX_PARAM_VAL_LENGTH) for key, value in flat.items()}
        params = [Param(key, text) for key, text in texts.items()]
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    def record(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id}

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(key, value, stamp, step) for key, value in metrics.items()]
        )

    def finish(self, final_dir: Path) -> None:
        pointer = final_pointer(final_dir)
        self.client.set_tag(self.run_id, FINAL_TAG, pointer["path"])
        self.client.log_dict(self.run_id, pointer, FINAL_POINTER)
        self.client.set_terminated(self.run_id, status="FINISHED")

    def fail(self) -> None:
        self.client.set_terminated(self.run_id, status="FAILED")


class WandbTracker:
    """One W&B run (`wandb.init` with the run's own settings; no global `wandb.run` relied on)."""

    def __init__(self, config: Config, previous: Mapping[str, Any] | None, initial_step: int) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ImportError(missing_client_message("wandb", "tracking.wandb.enabled", "wandb")) from e
        settings = config.tracking.wandb
        directory = Path(settings.dir or config.output_dir).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        where = {"project": settings.project, "entity": settings.entity}
        continued = initial_step > 0 and previous is not None and {k: previous.get(k) for k in where} == where
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=settings.run_name or Path(config.output_dir).name,
            tags=settings.tags or None,
            mode=settings.mode,
            dir=str(directory),
            id=previous["run_id"] if continued and previous is not None else None,
            resume="allow" if continued else None,
            config=flatten_config(config.to_dict()),
            allow_val_change=True,  # a resumed run's config may differ (train.resume_from)
            # The training's own output is on the console and in its logs; W&B keeps the metrics.
            settings=wandb.Settings(console="off"),
        )
        self.where = where

    def record(self) -> dict[str, Any]:
        return {"run_id": self.run.id, **self.where}

    def log(self, metrics: dict[str, float], step: int) -> None:
        # W&B's own step is the training step, so its history rows are metrics.jsonl's. It accepts
        # only increasing steps: steps re-done after a resume that it already has are dropped.
        self.run.log(metrics, step=step)

    def finish(self, final_dir: Path) -> None:
        import wandb

        pointer = final_pointer(final_dir)
        artifact = wandb.Artifact(f"model-{self.run.id}", type="model", metadata=pointer)
        # checksum=False: an entry per file, identified by its path, without reading the weights.
        artifact.add_reference(pointer["uri"], name="final", checksum=False)
        self.run.log_artifact(artifact)
        self.run.summary[FINAL_TAG] = pointer["path"]
        self.run.finish()

    def fail(self) -> None:
        self.run.finish(exit_code=1)


Tracker = MlflowTracker | WandbTracker


def start_trackers(config: Config, initial_step: int) -> list[Tracker]:
    """The trackers `config.tracking` turns on, each a new run, or at `initial_step` > 0 the run
    recorded in output_dir/tracking.json when it is in the same store; records them there."""
    output_dir = Path(config.output_dir)
    record_file = output_dir / TRACKING_FILE
    previous = json.loads(record_file.read_text()) if initial_step > 0 and record_file.is_file() else {}
    trackers: list[Tracker] = []
    record: dict[str, Any] = {}
    try:
        if config.tracking.mlflow.enabled:
            trackers.append(MlflowTracker(config, previous.get("mlflow"), initial_step))
            record["mlflow"] = trackers[-1].record()
        if config.tracking.wandb.enabled:
            trackers.append(WandbTracker(config, previous.get("wandb"), initial_step))
            record["wandb"] = trackers[-1].record()
    except BaseException:
        for tracker in trackers:
            tracker.fail()
        raise
    if trackers:
        output_dir.mkdir(parents=True, exist_ok=True)
        record_file.write_text(json.dumps(record, indent=2) + "\n")
    return trackers


def call_each(trackers: list[Tracker], method: str, *args: Any) -> None:
    """`tracker.method(*args)` for each tracker, an error from one logged as a warning: a tracking
    server that stops answering must not stop a training run (metrics.jsonl has every row)."""
    for tracker in trackers:
        try:
            getattr(tracker, method)(*args)
        except Exception:
            logger.warning("%s.%s failed; training goes on", type(tracker).__name__, method, exc_info=True)
