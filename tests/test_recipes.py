"""The youtube-titles recipe and its CPU smoke twin: both load strictly, the real one promises
what TRL's recipe does, and the smoke one only swaps what a CPU run without hubs must swap.

No training runs here (`dpo-cluster train --config configs/qwen2.5-0.5b-youtube-titles_smoke.yaml`
does that in about two minutes); `load_config` reads YAML and checks it, it never downloads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from dpo_cluster.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
REAL = "configs/qwen2.5-0.5b-youtube-titles.yaml"
SMOKE = "configs/qwen2.5-0.5b-youtube-titles_smoke.yaml"
# Data sources are leaves: a string (path shorthand) in one file may be a mapping in the other.
SOURCE_KEYS = {"data.train", "data.eval"}


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the configs' relative paths are relative to the repository root


def load(path: str) -> Config:
    return load_config(path)


def flat_keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in SOURCE_KEYS:
            keys |= flat_keys(value, f"{dotted}.")
        else:
            keys.add(dotted)
    return keys


def raw(path: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / path).read_text(encoding="utf-8"))


def test_real_recipe_loads_without_the_hub() -> None:
    config = load(REAL)
    assert config.model.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert config.data.train is not None and config.data.eval is not None
    assert (config.data.train.path, config.data.train.split) == ("shawhin/youtube-titles-dpo", "train")
    assert (config.data.eval.path, config.data.eval.split) == ("shawhin/youtube-titles-dpo", "valid")
    assert config.data.format == "conversational"


def test_real_recipe_has_the_promised_schedule() -> None:
    config = load(REAL)
    train = config.train
    assert train.num_epochs == 3
    assert train.micro_batch_size == 8 and train.gradient_accumulation_steps == 1
    assert train.max_steps is None
    assert (train.eval_strategy, train.save_strategy) == ("epoch", "epoch")
    assert (train.best_metric, train.best_mode, train.load_best_at_end) == ("eval_loss", "min", True)
    assert train.num_checkpoints_to_keep >= 3, "one checkpoint per epoch, all kept"
    assert config.deepspeed.precision == "bf16"
    assert (config.scaling.num_workers, config.scaling.use_gpu) == (2, True)


def test_real_recipe_header_has_launch_commands() -> None:
    text = (REPO / REAL).read_text(encoding="utf-8")
    assert f"dpo-cluster train --config {REAL}" in text
    assert "ray job submit --working-dir ." in text and f"python jobs/train.py --config {REAL}" in text


def test_smoke_recipe_runs_locally_on_cpu() -> None:
    config = load(SMOKE)
    assert config.model.name_or_path == "builtin:tiny"
    assert config.data.train is not None and config.data.train.path is not None
    assert (REPO / config.data.train.path).is_file(), config.data.train.path
    assert config.data.eval is None and 0 < config.data.eval_fraction < 1
    assert (config.scaling.num_workers, config.scaling.use_gpu) == (2, False)
    assert config.deepspeed.precision == "fp32"
    assert config.train.max_steps is not None and config.train.max_steps <= 10


def test_smoke_recipe_has_the_same_keys_and_schedule() -> None:
    real_keys, smoke_keys = flat_keys(raw(REAL)), flat_keys(raw(SMOKE))
    assert real_keys - smoke_keys == {"data.eval"}
    assert smoke_keys - real_keys == {"data.eval_fraction", "train.max_steps"}
    real, smoke = load(REAL), load(SMOKE)
    schedule = ["loss_type", "beta", "learning_rate", "micro_batch_size", "num_epochs"]
    schedule += ["eval_strategy", "save_strategy", "best_metric", "best_mode", "load_best_at_end"]
    for key in schedule:
        assert getattr(smoke.train, key) == getattr(real.train, key), f"train.{key} differs"
    assert smoke.data.format == real.data.format
    assert smoke.deepspeed.zero_stage == real.deepspeed.zero_stage
