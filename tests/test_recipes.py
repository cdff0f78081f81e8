"""The recipes in configs/ and their CPU smoke twins: every file loads strictly, each real recipe
promises what its header says (model, dataset, data path, LoRA, ZeRO, precision), and each smoke
twin only swaps what a CPU run without hubs must swap, with bundled data that goes through the
recipe's own format path (checked on a real local Ray).

`load_config` reads YAML and checks it, it never downloads. Each smoke twin also trains here, as
`dpo-cluster train --config configs/<recipe>_smoke.yaml` would (the youtube-titles one through
`ray job submit` in tests/test_ray_job_e2e.py).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from dpo_cluster.config import Config, load_config
from dpo_cluster.data.pipeline import PreparedData

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


# ----------------------------------------------------------------------------------------------
# Every recipe


RECIPES = sorted(
    p.relative_to(REPO).as_posix()
    for p in (REPO / "configs").glob("*.yaml")
    if not p.stem.endswith("_smoke") and not p.stem.startswith("sample_")
)
SMOKES = [recipe.removesuffix(".yaml") + "_smoke.yaml" for recipe in RECIPES]
ALL_CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").glob("*.yaml"))
# Real recipes whose model is the user's own local directory: the strict loader requires it to
# exist, so they are loaded with model.name_or_path pointed at a stand-in directory.
LOCAL_MODEL_RECIPES = {"configs/llama2-7b-chinese-dpo.yaml": "/mnt/models/chinese-llama2-7b-sft"}
# Keys a smoke twin may add or lack: a held-out fraction instead of a hub eval split, a step cap.
SMOKE_ONLY_KEYS = {"data.eval_fraction", "train.max_steps"}
REAL_ONLY_KEYS = {"data.eval"}
# What must be the same in a recipe and its smoke twin: the data path and the schedule's shape.
SAME_DATA = ["format", "columns", "prompt_template", "constants", "system_prompt", "chat_template"]
SAME_DATA += ["truncation_mode", "prompt_overflow"]
SAME_TRAIN = ["loss_type", "beta", "learning_rate", "lr_scheduler", "warmup_ratio", "micro_batch_size"]
SAME_TRAIN += ["gradient_accumulation_steps", "num_epochs", "eval_strategy", "save_strategy"]
SAME_TRAIN += ["best_metric", "best_mode", "load_best_at_end"]


def load_any(path: str, tmp_path: Path) -> Config:
    """`load_config(path)`, with a stand-in directory for a recipe's local model placeholder."""
    if path in LOCAL_MODEL_RECIPES:
        stand_in = tmp_path / "sft-model"
        stand_in.mkdir(exist_ok=True)
        return load_config(path, [f"model.name_or_path={stand_in}"])
    return load_config(path)


def test_the_recipes_are_found() -> None:
    """The recipe list is globbed; make sure it holds the recipes this file promises."""
    assert set(RECIPES) >= {
        REAL,
        "configs/qwen2-7b-stack-exchange-lora.yaml",
        "configs/qwen2-7b-hh-rlhf-multiturn.yaml",
        "configs/gpt2-sql-create-context.yaml",
        "configs/llama2-7b-chinese-dpo.yaml",
    }


@pytest.mark.parametrize("path", ALL_CONFIGS)
def test_every_config_loads(path: str, tmp_path: Path) -> None:
    """Every file in configs/ passes the strict loader (types, choices, cross-field rules)."""
    config = load_any(path, tmp_path)
    assert config.output_dir and config.data.train is not None


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_has_a_smoke_twin(recipe: str) -> None:
    """Each recipe names its launch commands and its CPU rehearsal, and that file exists."""
    smoke = recipe.removesuffix(".yaml") + "_smoke.yaml"
    assert (REPO / smoke).is_file(), f"{recipe} has no CPU rehearsal {smoke}"
    text = (REPO / recipe).read_text(encoding="utf-8")
    assert f"dpo-cluster train --config {recipe}" in text
    assert f"python jobs/train.py --config {recipe}" in text
    assert f"The CPU rehearsal of this file is {smoke}." in text


@pytest.mark.parametrize("recipe", RECIPES)
def test_smoke_twin_has_the_same_keys_and_data_path(recipe: str, tmp_path: Path) -> None:
    """A smoke twin sets the same keys and reads its data the same way; only sizes and places differ."""
    smoke = recipe.removesuffix(".yaml") + "_smoke.yaml"
    real_keys, smoke_keys = flat_keys(raw(recipe)), flat_keys(raw(smoke))
    assert real_keys - smoke_keys <= REAL_ONLY_KEYS, real_keys - smoke_keys
    assert smoke_keys - real_keys <= SMOKE_ONLY_KEYS, smoke_keys - real_keys
    real, twin = load_any(recipe, tmp_path), load(smoke)
    for key in SAME_DATA:
        assert getattr(twin.data, key) == getattr(real.data, key), f"data.{key} differs"
    for key in SAME_TRAIN:
        assert getattr(twin.train, key) == getattr(real.train, key), f"train.{key} differs"
    assert twin.lora == real.lora
    assert twin.reference == real.reference
    ds, real_ds = twin.deepspeed, real.deepspeed
    assert (ds.zero_stage, ds.offload_optimizer, ds.offload_params) == (
        real_ds.zero_stage,
        real_ds.offload_optimizer,
        real_ds.offload_params,
    )


@pytest.mark.parametrize("smoke", SMOKES)
def test_smoke_twin_runs_on_cpu_with_bundled_data(smoke: str) -> None:
    """A smoke twin needs no GPU and no hub: the tiny model, CPU workers, files bundled in the package."""
    config = load(smoke)
    assert config.model.name_or_path == "builtin:tiny"
    assert (config.scaling.num_workers, config.scaling.use_gpu) == (2, False)
    assert (config.deepspeed.precision, config.model.dtype) == ("fp32", "float32")
    assert config.train.max_steps is not None and config.train.max_steps <= 4
    assert config.data.tokenizer is None
    for source in (config.data.train, config.data.eval):
        if source is not None:
            assert source.path is not None and (REPO / source.path).is_file(), source.path
            assert source.path.startswith("dpo_cluster/data/sample/"), "bundled with the package"
            assert source.data_dir is None and source.subset is None
    assert config.data.eval is not None or 0 < config.data.eval_fraction < 1


# ----------------------------------------------------------------------------------------------
# What each real recipe promises


def test_stack_exchange_recipe(tmp_path: Path) -> None:
    """StackLLaMA-style data on Qwen2-7B: data/rl, the j/k columns, the Q/A template, LoRA, ZeRO-2."""
    config = load_any("configs/qwen2-7b-stack-exchange-lora.yaml", tmp_path)
    assert config.model.name_or_path in ("Qwen/Qwen2-7B-Instruct", "Qwen/Qwen2-7B")
    data = config.data
    assert data.train is not None and data.eval is not None
    assert (data.train.path, data.train.data_dir) == ("lvwerra/stack-exchange-paired", "data/rl")
    assert (data.eval.path, data.eval.data_dir) == ("lvwerra/stack-exchange-paired", "data/evaluation")
    assert data.format == "standard"
    assert data.columns == {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    assert data.prompt_template == "Question: {prompt}\n\nAnswer: "
    assert (data.max_length, data.max_prompt_length, data.truncation_mode) == (1024, 512, "keep_end")
    lora = config.lora
    assert (lora.enabled, lora.r, lora.alpha, lora.dropout) == (True, 16, 32, 0.05)
    assert lora.target_modules in (["all-linear"], ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert (config.deepspeed.zero_stage, config.deepspeed.precision) == (2, "bf16")
    assert (config.scaling.num_workers, config.scaling.use_gpu) == (8, True)


def test_hh_rlhf_multiturn_recipe(tmp_path: Path) -> None:
    """Whole hh-rlhf conversations with an implicit prompt, LoRA (adapter-off reference) under ZeRO-3."""
    config = load_any("configs/qwen2-7b-hh-rlhf-multiturn.yaml", tmp_path)
    data = config.data
    assert data.train is not None and data.eval is not None
    assert data.train.path == data.eval.path == "trl-internal-testing/hh-rlhf-helpful-base-trl-style"
    assert (data.train.split, data.eval.split) == ("train", "test")
    assert data.format in ("conversational_implicit", "auto")
    assert config.lora.enabled and config.reference.resolved_mode(True) == "adapter_disabled"
    assert (config.deepspeed.zero_stage, config.deepspeed.precision) == (3, "bf16")
    assert config.scaling.use_gpu


def test_sql_create_context_recipe(tmp_path: Path) -> None:
    """GPT-2 text-to-SQL: a templated prompt, the answer as chosen, an empty rejected, all weights trained."""
    config = load_any("configs/gpt2-sql-create-context.yaml", tmp_path)
    assert config.model.name_or_path == "gpt2"
    data = config.data
    assert data.train is not None and data.train.path == "b-mc2/sql-create-context"
    assert data.format == "standard"
    assert data.columns == {"chosen": "answer"}
    assert data.prompt_template is not None
    fields = {name for _, name, _, _ in string.Formatter().parse(data.prompt_template) if name}
    assert fields == {"context", "question"}, "the prompt is the schema and the question"
    assert data.constants == {"rejected": ""}
    assert not config.lora.enabled, "a full fine-tune"
    assert config.deepspeed.zero_stage in (0, 2)
    assert config.deepspeed.precision in ("fp32", "bf16")
    assert data.max_length <= 1024, "GPT-2's context window"


def test_chinese_llama2_recipe(tmp_path: Path) -> None:
    """A local SFT checkpoint and ShareGPT file (placeholders), full fine-tune with ZeRO-3 and CPU offload."""
    recipe = "configs/llama2-7b-chinese-dpo.yaml"
    assert raw(recipe)["model"]["name_or_path"] == LOCAL_MODEL_RECIPES[recipe]
    text = (REPO / recipe).read_text(encoding="utf-8")
    assert "your own supervised" in text and "placeholder" in text.lower()
    config = load_any(recipe, tmp_path)
    data = config.data
    assert data.train is not None and data.train.path is not None
    assert data.train.path.startswith("/") and data.train.path.endswith((".json", ".jsonl"))
    assert data.format == "sharegpt"
    assert not config.lora.enabled, "a full fine-tune"
    ds = config.deepspeed
    assert (ds.zero_stage, ds.offload_optimizer, ds.offload_params, ds.precision) == (3, "cpu", "cpu", "bf16")
    assert config.scaling.use_gpu


# ----------------------------------------------------------------------------------------------
# The bundled data goes through each recipe's real format path


def _prepared_rows(prepared: PreparedData) -> list[dict[str, Any]]:
    """Every kept row of the prepared splits, as parquet row dicts."""
    rows = []
    for split in ("train", "eval"):
        path = prepared.split_dir(split)
        if path is not None:
            for f in sorted(path.glob("*.parquet")):
                rows.extend(pq.read_table(f).to_pylist())
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("smoke", SMOKES)
def test_smoke_data_prepares_on_ray(smoke: str, tmp_path: Path, ray_local: None) -> None:
    """The bundled rows go through the recipe's format and tokenization on a real Ray; few are dropped."""
    from dpo_cluster.data.pipeline import prepare

    config = load_config(smoke, [f"output_dir={tmp_path / 'out'}"])
    prepared = prepare(config)
    report = prepared.report
    rows_in = sum(s["rows_in"] for s in report["splits"].values())
    rows_kept = sum(s["rows_kept"] for s in report["splits"].values())
    assert rows_in >= 40, "the bundled files have 40-80 rows"
    assert rows_kept >= 0.8 * rows_in, report
    assert report["splits"]["eval"]["rows_kept"] > 0, "the held-out fraction is not empty"
    assert report["sources"]["train"]["format"] == load(smoke).data.format
    if smoke == "configs/gpt2-sql-create-context_smoke.yaml":
        from transformers import AutoTokenizer

        from dpo_cluster.modeling import resolve_name_or_path

        eos = AutoTokenizer.from_pretrained(resolve_name_or_path("builtin:tiny")).eos_token_id
        rejected = [r["rejected_ids"] for r in _prepared_rows(prepared)]
        assert rejected and all(ids == [eos] for ids in rejected), "an empty rejected answer is the eos alone"


# ----------------------------------------------------------------------------------------------
# Every smoke twin trains


# The youtube-titles twin trains through `ray job submit` in tests/test_ray_job_e2e.py; the
# stack-exchange one (LoRA, ZeRO-2) shares its training path with tests/test_train_local.py's LoRA
# runs. These three each add one: ZeRO-0 with empty rejected answers, LoRA under ZeRO-3 with an
# implicit prompt, ZeRO-3 with CPU offload and the [INST] template.
TRAINED_HERE = [s for s in SMOKES if "youtube" not in s and "stack-exchange" not in s]


@pytest.mark.slow
@pytest.mark.parametrize("smoke", TRAINED_HERE)
def test_smoke_twin_trains(smoke: str, tmp_path: Path, ray_local: None) -> None:
    """The twin's whole path on Ray Train + DeepSpeed (its ZeRO stage, offload, LoRA, template):
    every step logged, ln 2 first (policy == reference), finite gradients, a final/ that loads."""
    import json
    import math

    from transformers import AutoModelForCausalLM

    from dpo_cluster.train.run import run_training

    config = load_config(smoke, [f"output_dir={tmp_path / 'run'}"])
    result = run_training(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, (config.train.max_steps or 0) + 1))
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] is not None and r["grad_norm"] > 0 for r in train)
    if config.lora.enabled and not config.lora.merge_on_save:
        from peft import AutoPeftModelForCausalLM

        AutoPeftModelForCausalLM.from_pretrained(result.final_dir)
    else:
        AutoModelForCausalLM.from_pretrained(result.final_dir)
