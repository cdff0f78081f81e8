"""Short end-to-end runs of the objectives beyond DPO, in one process (world size 1, real DeepSpeed on
CPU) on the built-in tiny model: a reference-free one with `reference.mode: none`, where no
reference is loaded or scored and the method's own metrics land in metrics.jsonl; and KTO on
unpaired rows, detected, accounted and prepared by the Ray Data pipeline like pairs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from dpo_cluster.data.pipeline import PreparedData, prepare
from dpo_cluster.data.records import DataError
from dpo_cluster.data.samples import SAMPLE_FILE
from dpo_cluster.train import setup as train_setup
from dpo_cluster.train.local import run_local
from tests.test_train_local import metrics_rows, train_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> PreparedData:
    return prepare(train_config(tmp_path_factory.mktemp("prepared")))


def test_orpo_trains_without_a_reference(
    prepared: PreparedData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_reference(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("reference.mode none loaded a reference model")

    monkeypatch.setattr(train_setup, "load_reference", no_reference)
    config = train_config(tmp_path, "train.loss_type=[orpo]", "reference.mode=none", "train.max_steps=4",
                          "train.eval_strategy=steps", "train.eval_steps=4")  # fmt: skip
    assert config.reference_mode() == "none"
    run_local(config, prepared.split_dir("train"), prepared.split_dir("eval"))
    rows = metrics_rows(tmp_path)
    train_rows = [row for row in rows if "loss" in row]
    assert len(train_rows) == 4
    for row in train_rows:
        assert {"nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/margins"} <= set(row)
        # loss = NLL - beta x mean log sigma(log_odds) (the NLL a token mean, the other a pair mean)
        assert row["loss"] > row["nll_loss"] > 0
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert train_rows[-1]["nll_loss"] < train_rows[0]["nll_loss"]
    evals = [row for row in rows if "eval_loss" in row]
    assert len(evals) == 1 and {"eval_nll_loss", "eval_log_odds_ratio", "eval_log_odds_chosen"} <= set(
        evals[0]
    )
    assert not (tmp_path / "reference_logps").exists()


def _unpaired_file(path: Path) -> Path:
    """The sample pairs as TRL's unpaired rows (each pair split into a desirable and an undesirable
    completion, alternating so both kinds meet in every micro-batch), plus three defective rows."""
    rows = []
    for line in SAMPLE_FILE.read_text().splitlines()[:120]:
        pair = json.loads(line)
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    lines = [json.dumps(row) for row in rows]
    lines += [
        json.dumps({"prompt": rows[0]["prompt"], "completion": rows[0]["completion"], "label": "yes"}),
        json.dumps({"prompt": rows[0]["prompt"], "label": True}),
        "{not json",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_kto_trains_on_unpaired_rows(tmp_path: Path, ray_local: None) -> None:
    data = _unpaired_file(tmp_path / "unpaired.jsonl")
    config = train_config(tmp_path / "run", f"data.train={data}", "train.loss_type=[kto]", "train.max_steps=4", "train.micro_batch_size=8",
                          "train.eval_strategy=steps", "train.eval_steps=4")  # fmt: skip
    prepared = prepare(config)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["sources"]["train"]["format"] == "unpaired_conversational"
    for split in report["splits"].values():
        assert split["rows_in"] == split["rows_kept"] + sum(split["dropped"].values())
    dropped = {**report["splits"]["train"]["dropped"]}
    for reason, count in report["splits"]["eval"]["dropped"].items():
        dropped[reason] = dropped.get(reason, 0) + count
    assert dropped == {"wrong_type": 1, "missing_field": 1, "invalid_json": 1}
    assert report["splits"]["train"]["rows_in"] + report["splits"]["eval"]["rows_in"] == 243

    run_local(config, prepared.split_dir("train"), prepared.split_dir("eval"))
    rows = metrics_rows(tmp_path / "run")
    train_rows = [row for row in rows if "loss" in row]
    # Step 1: policy == reference, every example's loss is 1 - sigma(0).
    assert train_rows[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert train_rows[0]["kl"] == 0.0
    for row in train_rows:
        # (A step whose examples were all of one kind would log that kind's metrics alone, as TRL.)
        assert {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"} <= set(row)
        assert "rewards/accuracies" not in row and math.isfinite(row["loss"])
    assert train_rows[-1]["loss"] < 0.5
    assert train_rows[-1]["rewards/margins"] > 0
    evals = [row for row in rows if "eval_loss" in row]
    assert len(evals) == 1 and {"eval_kl", "eval_rewards/chosen"} <= set(evals[0])

    # The same rows cannot train a pair loss: prepare says why.
    with pytest.raises(DataError, match="format unpaired_conversational holds single labelled completions"):
        prepare(train_config(tmp_path / "dpo", f"data.train={data}"))
