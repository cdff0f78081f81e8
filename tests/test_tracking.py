"""Experiment tracking: the `tracking` section's checks, and what MLflow (a local SQLite store) and
W&B (offline mode) hold after a run, read back through their own readers and compared with
metrics.jsonl: names, steps, values, the config as dotted parameters, final/'s location, a
resumed run continuing its tracking runs. No network: nothing here reaches a server.

Most tests drive `MetricsLog` directly (what the loop calls on the main worker); one runs the real
loop (`run_local`, builtin:tiny, three steps) with both trackers on.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dpo_cluster.config import Config, ConfigError, load_config, valid_keys
from dpo_cluster.data.samples import SAMPLE_FILE
from dpo_cluster.train.metrics_log import METRICS_FILE, MetricsLog
from dpo_cluster.train.tracking import (
    FINAL_POINTER,
    FINAL_TAG,
    TRACKING_FILE,
    flatten_config,
    param_key,
    param_text,
    tracked_metrics,
)

MLFLOW_ON = ["tracking.mlflow.enabled=true", "tracking.mlflow.experiment=dpo-test",
             "tracking.mlflow.tags={team: alignment}"]  # fmt: skip
WANDB_ON = ["tracking.wandb.enabled=true", "tracking.wandb.mode=offline", "tracking.wandb.project=dpo-test",
            "tracking.wandb.tags=[tiny]"]  # fmt: skip
# What W&B adds to every history row besides the logged metrics.
WANDB_OWN_KEYS = ("_runtime", "_step", "_timestamp")


@pytest.fixture(autouse=True)
def offline_trackers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """W&B offline with its settings, cache and data in the test's directory; no MLflow server."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def tracked_config(output_dir: Path, *overrides: str) -> Config:
    return load_config(
        None,
        [f"output_dir={output_dir}", "model.name_or_path=builtin:tiny", f"data.train={SAMPLE_FILE}",
         "train.max_steps=4", *overrides],
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The config section.


def test_tracking_is_off_by_default_and_its_keys_are_listed() -> None:
    config = Config()
    assert not config.tracking.mlflow.enabled and not config.tracking.wandb.enabled
    keys = valid_keys(Config)
    for key in ("tracking.mlflow.tracking_uri", "tracking.mlflow.experiment", "tracking.mlflow.run_name",
                "tracking.mlflow.tags", "tracking.wandb.project", "tracking.wandb.entity",
                "tracking.wandb.mode", "tracking.wandb.tags", "tracking.wandb.dir"):  # fmt: skip
        assert key in keys


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tracking.mlfow.enabled=true"], "unknown config key tracking.mlfow"),
        (["tracking.wandb.project=p"], "tracking.wandb.project: set, but tracking.wandb.enabled is false"),
        (["tracking.mlflow.experiment=e"], "tracking.mlflow.experiment: set, but tracking.mlflow.enabled"),
        (
            [*WANDB_ON, "tracking.wandb.mode=shared"],
            "tracking.wandb.mode: 'shared' is not one of: online, offline",
        ),
        ([*WANDB_ON, "tracking.wandb.project=a/b"], "tracking.wandb.project: 'a/b' must be a non-empty name"),
        ([*WANDB_ON, f"tracking.wandb.tags=[{'x' * 65}]"], "must have 1 to 64 characters"),
        ([*MLFLOW_ON, "tracking.mlflow.tracking_uri=runs/mlflow"], "is not a tracking URI"),
        ([*MLFLOW_ON, "tracking.mlflow.experiment=' '"], "tracking.mlflow.experiment: must not be empty"),
        ([*MLFLOW_ON, "tracking.mlflow.tags={a: [1]}"], "tracking.mlflow.tags.a: expected a string"),
        ([*MLFLOW_ON, "tracking.mlflow.tags={'a,b': c}"], "tag name 'a,b' must have 1 to 250 letters"),
    ],
)
def test_bad_tracking_settings_fail_at_load_naming_the_key(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("[", r"\[")):
        tracked_config(tmp_path, *overrides)


def test_relative_paths_become_absolute_for_the_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = tracked_config(tmp_path, *MLFLOW_ON, *WANDB_ON, "tracking.mlflow.tracking_uri=sqlite:///db/m.db",
                            "tracking.wandb.dir=wb").with_absolute_paths()  # fmt: skip
    assert config.tracking.mlflow.tracking_uri == f"sqlite:///{tmp_path}/db/m.db"
    assert config.tracking.wandb.dir == str(tmp_path / "wb")


@pytest.mark.parametrize("client", ["mlflow", "wandb"])
def test_a_missing_client_names_its_extra_at_load_and_at_run_start(
    client: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    import dpo_cluster.config.tracking as config_tracking

    on = MLFLOW_ON if client == "mlflow" else WANDB_ON
    config = tracked_config(tmp_path, *on)  # installed: loads
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        config_tracking.importlib.util,
        "find_spec",
        lambda name, *a: None if name == client else real_find_spec(name, *a),
    )
    extra = f"pip install 'dpo-cluster[{client}]'"
    with pytest.raises(
        ConfigError, match=rf"tracking\.{client}\.enabled: needs the {client} package.*{re.escape(extra)}"
    ):
        tracked_config(tmp_path, *on)
    monkeypatch.setitem(sys.modules, client, None)  # `import mlflow` now raises ImportError
    with pytest.raises(ImportError, match=re.escape(extra)):
        MetricsLog(tmp_path / "run", total_steps=4, initial_step=0, enabled=True, config=config)


def test_config_parameters_are_flattened_dotted_keys() -> None:
    flat = flatten_config(
        {"train": {"beta": 0.1, "loss_type": ["sigmoid"]}, "output_dir": "o", "serve": {"models": {}}}
    )
    assert flat == {"train.beta": 0.1, "train.loss_type": ["sigmoid"], "output_dir": "o", "serve.models": {}}
    assert param_key("data.constants.a/b(c)") == "data.constants.a_b_c_"
    assert param_key("scaling.resources_per_worker.accelerator_type:A100") == (
        "scaling.resources_per_worker.accelerator_type:A100"
    )
    assert [param_text(v, 10) for v in (True, None, 0.5, ["a", "b"], "x" * 20)] == [
        "true", "null", "0.5", '["a", "b"]', "xxxxxxx..."
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# MetricsLog -> trackers, read back.


# Training rows every step, an evaluation (eval_ keys) at steps 2 and 4, as the loop logs them.
def metric_rows(steps: range) -> list[dict[str, Any]]:
    rows = []
    for step in steps:
        row: dict[str, Any] = {"loss": 0.7 - 0.01 * step, "rewards/chosen": 0.1 * step, "rewards/accuracies": step / 8,
                               "grad_norm": 1.5 / step, "learning_rate": 1e-3, "tokens_per_second": 1000.0 + step}  # fmt: skip
        if step % 2 == 0:
            row |= {"eval_loss": 0.69 - 0.02 * step, "eval_rewards/margins": 0.05 * step, "eval_pairs": 8}
        rows.append(row | {"step": step, "epoch": step / 4})
    return rows


def write_final(output_dir: Path) -> Path:
    final = output_dir / "final"
    final.mkdir(parents=True, exist_ok=True)
    (final / "config.json").write_text("{}")
    (final / "model.safetensors").write_bytes(b"\0" * 64)
    (final / "metrics_summary.json").write_text(json.dumps({"steps": 4, "loss": 0.66}))
    return final


def log_steps(config: Config, steps: range, *, initial_step: int, finish: bool) -> None:
    """What the loop does on the main worker: open, a row per step, close, [final/ written, finish]."""
    output_dir = Path(config.output_dir)
    log = MetricsLog(output_dir, total_steps=config.train.max_steps, initial_step=initial_step, enabled=True,
                     config=config)  # fmt: skip
    try:
        for row in metric_rows(steps):
            log.advance()
            log.log(row)
    finally:
        log.close()
    if finish:
        log.finish(write_final(output_dir))


def jsonl_metrics(output_dir: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl as {step: the metrics a tracker gets}."""
    rows = [json.loads(line) for line in (output_dir / METRICS_FILE).read_text().splitlines()]
    return {row["step"]: tracked_metrics(row) for row in rows}


def mlflow_metrics(client: Any, run_id: str, names: set[str]) -> dict[int, dict[str, float]]:
    """The run's metric histories as {step: {name: value}}; a step logged twice keeps the later value."""
    by_step: dict[int, dict[str, float]] = {}
    for name in names:
        for point in sorted(client.get_metric_history(run_id, name), key=lambda m: m.timestamp):
            by_step.setdefault(point.step, {})[name] = point.value
    return by_step


def mlflow_run(output_dir: Path) -> tuple[Any, Any]:
    from mlflow import MlflowClient

    record = json.loads((output_dir / TRACKING_FILE).read_text())["mlflow"]
    client = MlflowClient(tracking_uri=record["tracking_uri"])
    return client, client.get_run(record["run_id"])


def test_mlflow_run_holds_metrics_jsonl_the_config_and_final(tmp_path: Path) -> None:
    config = tracked_config(tmp_path / "run", *MLFLOW_ON)
    log_steps(config, range(1, 5), initial_step=0, finish=True)

    client, run = mlflow_run(tmp_path / "run")
    # The default store: SQLite beside the run; artifacts beside it too.
    assert client.tracking_uri == f"sqlite:///{tmp_path}/run/mlflow.db"
    assert client.get_experiment(run.info.experiment_id).name == "dpo-test"
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    expected = jsonl_metrics(tmp_path / "run")
    names = {name for row in expected.values() for name in row}
    assert set(run.data.metrics) == names and "eval_loss" in names and "monotonic_time" not in names
    assert mlflow_metrics(client, run.info.run_id, names) == expected
    assert run.data.params == {
        param_key(k): param_text(v, 6000) for k, v in flatten_config(config.to_dict()).items()
    }
    assert run.data.params["train.beta"] == str(config.train.beta)
    assert run.data.tags["team"] == "alignment"
    final = tmp_path / "run" / "final"
    assert run.data.tags[FINAL_TAG] == str(final)
    pointer = client.download_artifacts(run.info.run_id, FINAL_POINTER, str(tmp_path))
    recorded = json.loads(Path(pointer).read_text())
    assert recorded["uri"] == final.as_uri() and recorded["kind"] == "model"
    assert recorded["files"] == {p.name: p.stat().st_size for p in final.iterdir()}
    assert recorded["files"]["model.safetensors"] == 64
    assert recorded["summary"] == {"steps": 4, "loss": 0.66}
    # A pointer, not the weights: the artifacts are final.json alone.
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == [FINAL_POINTER]


def test_a_resumed_run_continues_its_mlflow_run(tmp_path: Path) -> None:
    config = tracked_config(tmp_path / "run", *MLFLOW_ON)
    log_steps(config, range(1, 4), initial_step=0, finish=False)  # stops after step 3 of 4
    client, run = mlflow_run(tmp_path / "run")
    assert run.info.status == "FAILED"
    first_id = run.info.run_id

    # Resumed from the checkpoint of step 2: steps 3 and 4 again, into the same run.
    log_steps(config, range(3, 5), initial_step=2, finish=True)
    client, run = mlflow_run(tmp_path / "run")
    assert run.info.run_id == first_id and run.info.status == "FINISHED"
    assert run.data.tags["resumed_at_step"] == "2"
    expected = jsonl_metrics(tmp_path / "run")
    assert sorted(expected) == [1, 2, 3, 4]
    assert mlflow_metrics(client, first_id, set(run.data.metrics)) == expected
    assert [m.step for m in client.get_metric_history(first_id, "loss")].count(3) == 2  # both attempts

    # A fresh run (step 0) in the same directory is a new MLflow run.
    log_steps(config, range(1, 2), initial_step=0, finish=False)
    assert mlflow_run(tmp_path / "run")[1].info.run_id != first_id


def wandb_records(run_file: Path) -> list[dict[str, Any]]:
    """The records of an offline run's .wandb file, as W&B's own reader prints them
    (`wandb leet inspect --json`). wandb-core is called directly: the `wandb leet inspect PATH`
    wrapper of wandb 0.31 hands it both the file and its directory, which it refuses."""
    from wandb.util import get_core_path

    out = subprocess.run(
        [get_core_path(), "leet", "inspect", "-json", "-no-observability", "-run-file", str(run_file)],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def wandb_run_files(wandb_dir: Path, run_id: str) -> list[Path]:
    """The .wandb files of run `run_id` under `wandb_dir`, oldest first (one per resumption)."""
    return sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))


def wandb_history(records: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    history = {}
    for record in records:
        if record["type"] == "history":
            item = record["history"]["item"]
            history[record["history"]["step"]["num"]] = {
                k: v for k, v in item.items() if k not in WANDB_OWN_KEYS
            }
    return history


def of_type(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [record[kind] for record in records if record["type"] == kind]


def test_wandb_offline_run_holds_metrics_jsonl_the_config_and_final(tmp_path: Path) -> None:
    config = tracked_config(tmp_path / "run", *WANDB_ON)
    log_steps(config, range(1, 5), initial_step=0, finish=True)

    record = json.loads((tmp_path / "run" / TRACKING_FILE).read_text())["wandb"]
    assert record["project"] == "dpo-test"
    (run_file,) = wandb_run_files(tmp_path / "run", record["run_id"])  # dir null: under output_dir
    records = wandb_records(run_file)
    (run,) = of_type(records, "run")
    assert run["project"] == "dpo-test" and run["display_name"] == "run" and run["tags"] == ["tiny"]
    config_update = run["config"]["update"]
    flat = json.loads(json.dumps(flatten_config(config.to_dict())))
    assert {k: v for k, v in config_update.items() if k != "_wandb"} == flat
    assert wandb_history(records) == jsonl_metrics(tmp_path / "run")
    final = tmp_path / "run" / "final"
    (artifact,) = of_type(records, "artifact")
    assert artifact["name"] == f"model-{record['run_id']}" and artifact["type"] == "model"
    refs = {entry["path"]: entry["ref"] for entry in artifact["manifest"]["contents"]}
    assert refs == {f"final/{name}": (final / name).as_uri()
                    for name in ("config.json", "metrics_summary.json", "model.safetensors")}  # fmt: skip
    assert json.loads(artifact["metadata"])["path"] == str(final)
    (exit_record,) = of_type(records, "exit")
    assert exit_record.get("exit_code", 0) == 0


def test_a_resumed_run_continues_its_wandb_run(tmp_path: Path) -> None:
    config = tracked_config(tmp_path / "run", *WANDB_ON, f"tracking.wandb.dir={tmp_path / 'wb'}")
    log_steps(config, range(1, 4), initial_step=0, finish=False)
    run_id = json.loads((tmp_path / "run" / TRACKING_FILE).read_text())["wandb"]["run_id"]
    # W&B names an offline run's directory after the second it started in: resume in another one.
    time.sleep(1.0 - time.time() % 1.0 + 0.05)
    log_steps(config, range(3, 5), initial_step=2, finish=True)
    assert json.loads((tmp_path / "run" / TRACKING_FILE).read_text())["wandb"]["run_id"] == run_id

    first, second = (wandb_records(f) for f in wandb_run_files(tmp_path / "wb", run_id))
    assert of_type(first, "exit")[0]["exit_code"] == 1  # stopped before the last step
    assert of_type(second, "run")[0]["run_id"] == run_id
    expected = jsonl_metrics(tmp_path / "run")
    assert wandb_history(first) == {step: expected[step] for step in (1, 2, 3)}
    assert wandb_history(second) == {step: expected[step] for step in (3, 4)}


# ----------------------------------------------------------------------------------------------
# The real loop.


def write_pairs(split_dir: Path, count: int) -> Path:
    """`count` tokenized pairs of random token ids in the Parquet layout training reads."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    ids = pa.list_(pa.int32())

    def sequences(low: int, high: int) -> pa.Array:
        return pa.array(
            [rng.integers(10, 500, size=rng.integers(low, high)).tolist() for _ in range(count)], ids
        )

    split_dir.mkdir(parents=True)
    table = pa.table({"row_id": [f"pairs:{i}" for i in range(count)], "prompt_ids": sequences(4, 12),
                      "chosen_ids": sequences(3, 10), "rejected_ids": sequences(3, 10)})  # fmt: skip
    pq.write_table(table, split_dir / "part-0.parquet")
    return split_dir


@pytest.mark.slow
def test_a_training_run_logs_metrics_jsonl_to_both_trackers(tmp_path: Path, base_dir: Path) -> None:
    from dpo_cluster.train.local import run_local

    out = tmp_path / "run"
    config = tracked_config(out, *MLFLOW_ON, *WANDB_ON, f"model.name_or_path={base_dir}", "train.max_steps=3",
                            "train.micro_batch_size=2", "train.logging_steps=1", "train.eval_strategy=steps",
                            "train.eval_steps=2", "train.save_strategy=no", "data.max_length=32")  # fmt: skip
    run_local(config, write_pairs(tmp_path / "train", 8), write_pairs(tmp_path / "eval", 4))

    expected = jsonl_metrics(out)
    assert sorted(expected) == [1, 2, 3] and "eval_loss" in expected[2] and "loss" in expected[1]
    client, run = mlflow_run(out)
    assert run.info.status == "FINISHED" and run.data.tags[FINAL_TAG] == str(out / "final")
    assert mlflow_metrics(client, run.info.run_id, set(run.data.metrics)) == expected
    run_id = json.loads((out / TRACKING_FILE).read_text())["wandb"]["run_id"]
    (run_file,) = wandb_run_files(out, run_id)
    records = wandb_records(run_file)
    assert wandb_history(records) == expected
    (artifact,) = of_type(records, "artifact")
    assert {e["path"] for e in artifact["manifest"]["contents"]} >= {
        "final/config.json",
        "final/metrics_summary.json",
    }
