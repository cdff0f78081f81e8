"""Short end-to-end runs of the objectives beyond DPO, in one process (world size 1, real DeepSpeed on
CPU) on the built-in tiny model: a reference-free one with `reference.mode: none`, where no
reference is loaded or scored and the method's own metrics land in metrics.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dpo_cluster.data.pipeline import PreparedData, prepare
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
