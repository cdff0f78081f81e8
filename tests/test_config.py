"""Config loading: strict keys, types, overrides, cross-field checks (no Ray needed)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dpo_cluster.config import (
    F_DIVERGENCE_TYPES,
    JUDGE_RULES,
    LOSS_TYPES,
    Config,
    ConfigError,
    ModelConfig,
    SourceConfig,
    apply_override,
    load_config,
    valid_keys,
)

MINIMAL = {"output_dir": "out", "model.name_or_path": "m", "data.train": "train.jsonl"}


def _overrides(extra: dict[str, str] | None = None) -> list[str]:
    items = {**MINIMAL, **(extra or {})}
    return [f"{k}={v}" for k, v in items.items()]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_yaml_with_every_section(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        output_dir: runs/a
        model: {name_or_path: Qwen/Qwen2-7B}
        data:
          train: {path: lvwerra/stack-exchange-paired, data_dir: data/rl, split: train}
          eval: {path: lvwerra/stack-exchange-paired, data_dir: data/evaluation, split: train}
          columns: {prompt: question, chosen: response_j, rejected: response_k}
          prompt_template: "Question: {prompt}\\n\\nAnswer: "
          max_length: 1024
          max_prompt_length: 512
          truncation_mode: keep_end
        train: {loss_type: sigmoid, beta: 0.1}
        scaling: {num_workers: 8, use_gpu: true}
        """,
    )
    config = load_config(path)
    assert config.data.train == SourceConfig(path="lvwerra/stack-exchange-paired", data_dir="data/rl")
    assert config.data.prompt_template == "Question: {prompt}\n\nAnswer: "
    assert config.train.loss_type == ["sigmoid"]  # a single string means a one-element list
    assert config.scaling.use_gpu is True and config.scaling.num_workers == 8


def test_architecture_keys_exist() -> None:
    keys = set(valid_keys(Config))
    for key in [
        "model.name_or_path", "data.train.path", "data.eval.path", "data.format", "data.max_length",
        "output_dir", "train.loss_type", "train.beta", "scaling.num_workers", "scaling.use_gpu",
    ]:  # fmt: skip
        assert key in keys


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, _overrides({"data.max_lenght": "10"}))
    message = str(e.value)
    assert "unknown config key data.max_lenght (did you mean data.max_length?)" in message
    assert "data.max_length" in message and "data.truncation_mode" in message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown config key outputdir \(did you mean output_dir\?\); valid keys: output_dir, model.name_or_path",
    ):
        load_config(write(tmp_path, "outputdir: x\n"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.max_length=long", "data.max_length: expected an integer, got 'long'"),
        ("data.max_length=1.5", "data.max_length: expected an integer"),
        ("data.cache=yes please", "data.cache: expected true or false"),
        ("data.truncation_mode=middle", "data.truncation_mode: 'middle' is not one of: keep_end, keep_start"),
        ("data.format=csv", "data.format: 'csv' is not one of: auto, standard"),
        ("data.columns=[a]", "data.columns: expected a mapping, got list"),
        ("train.beta=0", "train.beta: must be > 0, got 0.0"),
        ("scaling.num_workers=0", "scaling.num_workers: must be >= 1"),
        ("data.eval_fraction=1.0", "data.eval_fraction: must be in [0, 1)"),
        ("data.max_bad_fraction=2", "data.max_bad_fraction: must be in [0, 1]"),
        ("data.columns={answer: x}", "data (format settings): data.columns: unknown field 'answer'"),
        ("data.prompt_template={prompt", "data (format settings)"),
        ("data.max_prompt_length=2000", "data.max_prompt_length: must be in [1, data.max_length=1024)"),
        ("data.max_length=1", "data.max_length: must be >= 2"),
        ("data.chat_template=missing/template.jinja", "data (tokenization settings)"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [*_overrides(), override])
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("output_dir", "output_dir: required"),
        ("model.name_or_path", "model.name_or_path: required"),
        ("data.train", "data.train: required"),
    ],
)
def test_required_keys(drop: str, message: str) -> None:
    items = {k: v for k, v in MINIMAL.items() if k != drop}
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"{k}={v}" for k, v in items.items()])


def test_eval_source_and_fraction_are_exclusive() -> None:
    with pytest.raises(ConfigError, match="data.eval_fraction: must be 0 when data.eval is set"):
        load_config(None, _overrides({"data.eval": "e.jsonl", "data.eval_fraction": "0.1"}))


def test_source_needs_exactly_one_of_path_or_rows() -> None:
    with pytest.raises(
        ConfigError, match="data.train: set exactly one of data.train.path or data.train.rows"
    ):
        load_config(None, [*_overrides(), "data.train.rows=[{a: 1}]"])


def test_a_list_of_weighted_sources(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "output_dir: out\nmodel: {name_or_path: m}\ndata:\n  format: standard\n  train:\n"
        "    - a.jsonl\n"
        "    - {path: b.jsonl, weight: 0.25, format: conversational, columns: {prompt: question}}\n"
    )
    data = load_config(path).data
    assert data.sources("train") == [
        ("data.train[0]", SourceConfig(path="a.jsonl")),
        (
            "data.train[1]",
            SourceConfig(
                path="b.jsonl", weight=0.25, format="conversational", columns={"prompt": "question"}
            ),
        ),
    ]
    assert data.mixes() and not load_config(None, _overrides()).data.mixes()
    assert data.format_spec(data.sources("train")[1][1]).format == "conversational"
    assert data.format_spec(data.sources("train")[1][1]).columns == {"prompt": "question"}
    assert data.format_spec(data.sources("train")[0][1]).format == "standard"
    assert load_config(None, _overrides({"data.train": "[a.jsonl, b.jsonl]"})).data.sources("train")[1] == (
        "data.train[1]",
        SourceConfig(path="b.jsonl"),
    )
    assert load_config(None, _overrides({"data.train": "{path: a.jsonl, weight: 2}"})).data.mixes()


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ("[a.jsonl, {path: b.jsonl, weight: 0}]", "data.train[1].weight: must be > 0, got 0"),
        ("{path: a.jsonl, weight: -1}", "data.train.weight: must be > 0, got -1"),
        ("[a.jsonl, {path: b.jsonl, weight: .nan}]", "data.train[1].weight: must be > 0, got nan"),
        (
            "[a.jsonl, {path: b.jsonl, format: csv}]",
            "data.train[1].format: 'csv' is not one of: auto, standard",
        ),
        ("[a.jsonl, {path: b.jsonl, columns: {answer: x}}]", "data.train[1].columns: unknown field 'answer'"),
        (
            "[a.jsonl, {path: b.jsonl, wieght: 2}]",
            "unknown config key data.train[1].wieght (did you mean data.train[1].weight?)",
        ),
        (
            "[a.jsonl, {rows: [], path: b.jsonl}]",
            "data.train[1]: set exactly one of data.train[1].path or data.train[1].rows",
        ),
        ("[a.jsonl, a.jsonl]", "data.train[1]: the same rows as data.train[0]"),
        ("[]", "data.train: the list of sources is empty"),
    ],
)
def test_source_list_errors_name_the_item(train: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, _overrides({"data.train": train}))
    assert message in str(e.value)


def test_overrides_are_parsed_as_yaml_and_extend_shorthand() -> None:
    config = load_config(
        None,
        _overrides(
            {
                "data.train.split": "test",
                "train.loss_type": "[sigmoid, sft]",
                "data.max_prompt_length": "null",
            }
        ),
    )
    assert config.data.train == SourceConfig(path="train.jsonl", split="test")
    assert config.train.loss_type == ["sigmoid", "sft"]
    assert config.data.max_prompt_length is None


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_override({}, "data.max_length")
    with pytest.raises(ConfigError, match="output_dir is not a section"):
        apply_override({"output_dir": "x"}, "output_dir.a=1")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [\n"))
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_config(write(tmp_path, "- a\n"))


def test_null_for_a_required_value() -> None:
    with pytest.raises(ConfigError, match="data.max_length: must not be null"):
        load_config(None, [*_overrides(), "data.max_length=null"])


def test_exponent_floats_without_a_dot_are_numbers(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            "output_dir: o\nmodel: {name_or_path: m}\ndata: {train: t}\ntrain: {learning_rate: 5e-7}\n",
        )
    )
    assert config.train.learning_rate == 5e-7
    with pytest.raises(ConfigError, match="train.learning_rate: expected a number, got 'fast'"):
        load_config(None, [*_overrides(), "train.learning_rate=fast"])


def test_yaml_booleans_map_back_to_spelled_options(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            "output_dir: o\nmodel: {name_or_path: m}\ndata: {train: t}\ntrain: {eval_strategy: no}\n",
        )
    )
    assert config.train.eval_strategy == "no"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.loss_type=[sigmoid, dpop]"], "train.loss_type: unknown loss 'dpop'; valid: sigmoid, hinge"),
        (
            ["train.loss_type=[sigmoid, sft]", "train.loss_weights=[1.0]"],
            "train.loss_weights: 1 weights for 2",
        ),
        (["train.global_batch_size=10"], "train.global_batch_size: 10 != train.micro_batch_size (4)"),
        (["train.micro_batch_size=0"], "train.micro_batch_size: must be >= 1"),
        (["lora.r=8"], "lora.r: set, but lora.enabled is false"),
        (["lora.enabled=true", "lora.load_in_4bit=true"], "lora.load_in_4bit: QLoRA needs CUDA GPUs"),
        (["reference.mode=adapter_disabled"], "reference.mode: adapter_disabled needs lora.enabled: true"),
        (
            ["deepspeed.offload_params=cpu"],
            "deepspeed.offload_params: parameter offload needs deepspeed.zero_stage: 3",
        ),
        (["deepspeed.precision=fp16"], "deepspeed.precision: fp16 needs GPUs"),
        (
            ["model.name_or_path=/no/such/model"],
            "model.name_or_path: no such local model directory: /no/such/model",
        ),
        (["train.resume_from=/no/such/ckpt"], "train.resume_from: no such checkpoint directory"),
        (["train.label_smoothing=0.7"], "train.label_smoothing: must be in [0, 0.5)"),
    ],
)
def test_training_config_errors_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [*_overrides(), *overrides])
    assert message in str(e.value)


def test_global_batch_is_micro_times_accumulation_times_workers() -> None:
    config = load_config(
        None,
        [*_overrides(), "train.micro_batch_size=2", "train.gradient_accumulation_steps=3", "scaling.num_workers=4",
         "train.global_batch_size=24"],
    )  # fmt: skip
    assert config.train.pairs_per_step(config.scaling.num_workers) == 24


def test_with_absolute_paths_resolves_local_paths_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)
    config = load_config(None, ["output_dir=runs/a", "model.name_or_path=./models/base", "data.train=t",
                                "data.tokenizer=Qwen/Qwen2-7B", "scaling.storage_path=s3://bucket/ray"])  # fmt: skip
    absolute = config.with_absolute_paths()
    assert absolute.output_dir == str(tmp_path / "runs" / "a")
    assert absolute.model.name_or_path == str(tmp_path / "models" / "base")
    assert absolute.data.tokenizer == "Qwen/Qwen2-7B"  # a hub id stays a hub id
    assert absolute.scaling.storage_path == "s3://bucket/ray"
    assert config.output_dir == "runs/a"  # the original is unchanged


def test_model_gguf_file_joins_the_directory(tmp_path: Path) -> None:
    (tmp_path / "model.Q4_1.gguf").write_bytes(b"GGUF")
    base = ["output_dir=o", "data.train=t", f"model.name_or_path={tmp_path}"]
    config = load_config(None, [*base, "model.gguf_file=model.Q4_1.gguf"])
    # The pair is one .gguf path from here on, so every reader of model.name_or_path sees the file.
    assert (config.model.name_or_path, config.model.gguf_file) == (str(tmp_path / "model.Q4_1.gguf"), None)
    assert config.tokenizer_path() == config.serve_base() == config.model.name_or_path
    assert ModelConfig(**config.to_dict()["model"]) == config.model  # the folded form reads back as itself


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.name_or_path=.", "model.gguf_file=model.bin"], "model.gguf_file: must name a .gguf file"),
        (["model.gguf_file=model.gguf"], "model.gguf_file: needs model.name_or_path"),
        (
            ["model.name_or_path=/no/such/model.gguf"],
            "model.name_or_path: no such GGUF file: /no/such/model.gguf",
        ),
        (
            ["model.name_or_path=.", "model.gguf_file=absent.gguf"],
            "model.name_or_path: no such GGUF file: absent.gguf",
        ),
    ],
)
def test_gguf_config_errors_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["output_dir=o", "data.train=t", *overrides])
    assert message in str(e.value)


def test_loss_types_are_the_losses_implemented() -> None:
    from dpo_cluster.losses import LOSS_FUNCTIONS

    assert set(LOSS_TYPES) == set(LOSS_FUNCTIONS)


def test_f_divergence_types_are_the_divergences_implemented() -> None:
    from dpo_cluster import losses

    assert set(F_DIVERGENCE_TYPES) == set(losses.F_DIVERGENCE_TYPES)


def test_loss_type_groups_are_the_losses_groups() -> None:
    from dpo_cluster import losses
    from dpo_cluster.config.train import BATCH_SORTED_LOSS_TYPES, F_DIVERGENCE_LOSS_TYPES

    assert set(F_DIVERGENCE_LOSS_TYPES) == set(losses.F_DIVERGENCE_LOSS_TYPES)
    assert set(BATCH_SORTED_LOSS_TYPES) == set(losses.BATCH_SORTED_LOSS_TYPES)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.f_divergence_type=kl"],
            "train.f_divergence_type: unknown divergence 'kl'; valid: reverse_kl",
        ),
        (
            ["train.f_divergence_type=js_divergence", "train.loss_type=[sigmoid, bco_pair]"],
            "train.f_divergence_type: js_divergence applies only to .*; train.loss_type bco_pair has no f-divergence form",
        ),
        (
            ["train.use_weighting=true", "train.loss_type=[aot]"],
            "train.use_weighting: .* with aot, which sort",
        ),
        (["train.f_alpha_divergence_coef=0"], "train.f_alpha_divergence_coef: must be > 0, got 0"),
        (["train.discopop_tau=-1"], "train.discopop_tau: must be > 0"),
        (["train.ld_alpha=1.5"], r"train.ld_alpha: must be in \[0, 1\] or null, got 1.5"),
    ],
)
def test_loss_options_are_checked_at_load(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*_overrides(), *overrides])


def test_loss_options_load() -> None:
    config = load_config(
        None,
        [
            *_overrides(),
            "train.loss_type=[discopop, sft]",
            "train.f_divergence_type=alpha_divergence",
            "train.f_alpha_divergence_coef=0.3",
            "train.discopop_tau=0.5",
            "train.use_weighting=true",
            "train.ld_alpha=0.25",
        ],
    )
    train = config.train
    assert (train.f_divergence_type, train.f_alpha_divergence_coef, train.discopop_tau) == (
        "alpha_divergence",
        0.3,
        0.5,
    )
    assert (train.use_weighting, train.ld_alpha) == (True, 0.25)


def test_judge_rules_are_the_rules_implemented() -> None:
    from dpo_cluster.evaluation.judges import RULES

    assert set(JUDGE_RULES) == set(RULES)


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="train.loss_type: unknown loss 'dpo'; valid: sigmoid, hinge"):
        load_config(None, [*_overrides(), "train.loss_type=dpo"])
    with pytest.raises(ConfigError, match="evaluation.rule: unknown rule 'x'; valid: title_length"):
        load_config(None, [*_overrides(), "evaluation.rule=x"])


def test_loading_a_config_needs_no_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from dpo_cluster.config import load_config; "
        f"load_config(None, {_overrides()!r}); assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
