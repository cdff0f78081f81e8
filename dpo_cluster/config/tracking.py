"""The `tracking` section: experiment tracking of a training run in MLflow and Weights & Biases.

Both are off by default and optional extras (`pip install 'dpo-cluster[mlflow]'`,
`'dpo-cluster[wandb]'`). Turned on, the main worker logs what it writes to metrics.jsonl (same
names, same steps), the config as parameters (flattened dotted keys) and where final/ is
(`dpo_cluster.train.tracking`). Whether the client library is installed is checked here, at load
time, so a run that would fail on its first logged step fails before any Ray worker starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dpo_cluster.config.loader import ConfigError

# What a W&B project name may not contain (W&B refuses these), and its longest tag.
_WANDB_PROJECT_FORBIDDEN = re.compile(r"[/\\#?%:]")
_WANDB_MAX_TAG = 64
# What MLflow takes as a tag name (its validate_param_and_metric_name, MAX_ENTITY_KEY_LENGTH),
# checked here so that a run does not fail when it opens its MLflow run.
_MLFLOW_TAG_NAME = re.compile(r"[/\w.\- :]{1,250}")


@dataclass
class MlflowConfig:
    # Log the run to MLflow (needs the [mlflow] extra).
    enabled: bool = False
    # Where runs are stored: http(s)://HOST:PORT (a tracking server), databricks, or
    # sqlite:///PATH.db (a local database; a relative PATH is taken from the working directory at
    # load time). null = the MLFLOW_TRACKING_URI environment variable of the main worker, else
    # sqlite:///<output_dir>/mlflow.db. Credentials come from MLflow's own environment variables
    # (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD), which the workers must see.
    tracking_uri: str | None = None
    # Experiment name; created when missing.
    experiment: str = "dpo-cluster"
    # Run name. null = the name of output_dir.
    run_name: str | None = None
    # Tags set on the run: name -> value (names of 1 to 250 letters, digits, spaces or _ - . / :).
    tags: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        uri = self.tracking_uri
        if uri is not None and not (uri == "databricks" or "://" in uri or uri.startswith("databricks")):
            raise ConfigError(
                f"tracking.mlflow.tracking_uri: {uri!r} is not a tracking URI; use http(s)://HOST:PORT, "
                "databricks, or sqlite:///PATH.db (null: MLFLOW_TRACKING_URI, else output_dir/mlflow.db)"
            )
        if not self.experiment.strip():
            raise ConfigError("tracking.mlflow.experiment: must not be empty")
        if self.run_name is not None and not self.run_name.strip():
            raise ConfigError("tracking.mlflow.run_name: must not be empty (null: the name of output_dir)")
        for key in self.tags:
            if not _MLFLOW_TAG_NAME.fullmatch(key):
                raise ConfigError(
                    f"tracking.mlflow.tags: tag name {key!r} must have 1 to 250 letters, digits, spaces "
                    "or _ - . / :"
                )
        _require_client("mlflow", "tracking.mlflow.enabled", "mlflow")
        if (self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:").startswith("sqlite:"):
            # MLflow's SQL store (the default here) runs on SQLAlchemy and Alembic, which the
            # [mlflow] extra installs beside the MLflow client.
            for module in ("sqlalchemy", "alembic"):
                _require_client(module, "tracking.mlflow.tracking_uri (a sqlite store)", "mlflow")


@dataclass
class WandbConfig:
    # Log the run to Weights & Biases (needs the [wandb] extra).
    enabled: bool = False
    # W&B project (created when missing); none of / \ # ? % :
    project: str = "dpo-cluster"
    # W&B entity (user or team). null = the API key's default entity.
    entity: str | None = None
    # online (send as the run goes; needs WANDB_API_KEY, or `wandb login`, on the main worker) |
    # offline (write the run under dir only, uploaded later with `wandb sync DIR/wandb/offline-run-*`).
    mode: Literal["online", "offline"] = "online"
    # Run name. null = the name of output_dir.
    run_name: str | None = None
    # Tags of the run, each 1 to 64 characters.
    tags: list[str] = field(default_factory=list)
    # Directory wandb writes its files into (a wandb/ folder is made inside). null = output_dir.
    dir: str | None = None

    def check(self) -> None:
        if not self.project.strip() or _WANDB_PROJECT_FORBIDDEN.search(self.project):
            raise ConfigError(
                f"tracking.wandb.project: {self.project!r} must be a non-empty name without / \\ # ? % :"
            )
        if self.entity is not None and not self.entity.strip():
            raise ConfigError("tracking.wandb.entity: must not be empty (null: the API key's default entity)")
        if self.run_name is not None and not self.run_name.strip():
            raise ConfigError("tracking.wandb.run_name: must not be empty (null: the name of output_dir)")
        for tag in self.tags:
            if not 1 <= len(tag) <= _WANDB_MAX_TAG:
                raise ConfigError(f"tracking.wandb.tags: {tag!r} must have 1 to {_WANDB_MAX_TAG} characters")
        _require_client("wandb", "tracking.wandb.enabled", "wandb")


@dataclass
class TrackingConfig:
    """Experiment trackers the main worker logs to, beside metrics.jsonl and TensorBoard."""

    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def check(self) -> None:
        for name in ("mlflow", "wandb"):
            section = getattr(self, name)
            if section.enabled:
                section.check()
                continue
            defaults = type(section)()
            changed = [
                f.name
                for f in dataclasses.fields(section)
                if f.name != "enabled" and getattr(section, f.name) != getattr(defaults, f.name)
            ]
            if changed:
                raise ConfigError(
                    f"tracking.{name}.{changed[0]}: set, but tracking.{name}.enabled is false "
                    f"(enable it or remove the key)"
                )

    def with_absolute_paths(self) -> TrackingConfig:
        """A copy whose local paths (a sqlite store's file, the W&B directory) are absolute: Ray
        Train workers run in working directories of their own."""
        uri = self.mlflow.tracking_uri
        if uri is not None and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).expanduser().resolve())
        wandb_dir = str(Path(self.wandb.dir).expanduser().resolve()) if self.wandb.dir else None
        return dataclasses.replace(
            self,
            mlflow=dataclasses.replace(self.mlflow, tracking_uri=uri),
            wandb=dataclasses.replace(self.wandb, dir=wandb_dir),
        )


def mlflow_tracking_uri(config: MlflowConfig, output_dir: str | Path) -> str:
    """The tracking URI a run uses: tracking.mlflow.tracking_uri, else MLFLOW_TRACKING_URI, else
    a SQLite store beside the run (sqlite:///<output_dir>/mlflow.db)."""
    if config.tracking_uri:
        return config.tracking_uri
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if from_env:
        return from_env
    return "sqlite:///" + str(Path(output_dir).expanduser().resolve() / "mlflow.db")


def missing_client_message(module: str, key: str, extra: str) -> str:
    """What to say when `module` is not installed but `key` needs it: the extra that installs it."""
    return f"{key}: needs the {module} package, which is not installed: pip install 'dpo-cluster[{extra}]'"


def _require_client(module: str, key: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(missing_client_message(module, key, extra))
