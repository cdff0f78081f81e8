"""The one configuration tree of dpo-cluster.

A config is a YAML file loaded strictly into the dataclasses below, then patched by dotted
`key=value` overrides from the command line (`data.max_length=512`, `train.loss_type=[sigmoid,sft]`).
Unknown keys are an error that lists the valid ones; types are checked against the annotations;
cross-field rules run at load time so a bad config fails before any Ray worker starts.

Every field carries a comment with its allowed values and units. Values derived from several
fields are methods (`DataConfig.format_spec()`), never stored twice.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

if typing.TYPE_CHECKING:
    from dpo_cluster.data.formats import FormatSpec
    from dpo_cluster.data.tokenize import TokenizeSpec


class ConfigError(ValueError):
    """An invalid configuration; the message names the key."""


@dataclass
class SourceConfig:
    """Where one split's rows come from. In YAML a plain string is shorthand for `{path: ...}`."""

    # A local file (.jsonl/.json/.parquet/.csv), a directory of such files, a glob
    # ("data/*.jsonl"), a directory written by `datasets.save_to_disk`, or a Hugging Face hub
    # dataset id ("lvwerra/stack-exchange-paired"). A path that exists locally is always local.
    path: str | None = None
    # Hub and save_to_disk only: the split to load ("train", "test", "train[:10%]").
    split: str = "train"
    # Hub only: the dataset configuration name (load_dataset's `name`).
    subset: str | None = None
    # Hub only: a sub-directory of the dataset repo (stack-exchange-paired uses "data/rl").
    data_dir: str | None = None
    # Hub only: a git revision (tag, branch or commit) to pin the data.
    revision: str | None = None
    # Inline rows instead of a path (small examples and tests). Exactly one of path/rows.
    rows: list[Any] | None = None

    def check(self, key: str) -> None:
        if (self.path is None) == (self.rows is None):
            raise ConfigError(f"{key}: set exactly one of {key}.path or {key}.rows")

    def describe(self) -> str:
        """A short human name for messages and row ids."""
        return self.path if self.path is not None else "inline rows"


@dataclass
class ModelConfig:
    # Hugging Face hub id or local directory of the base (policy) model. Required.
    name_or_path: str = ""
    # Hub only: git revision of the model.
    revision: str | None = None
    # Allow model/tokenizer code from the hub repo to run (needed by some architectures).
    trust_remote_code: bool = False

    def check(self) -> None:
        if not self.name_or_path:
            raise ConfigError("model.name_or_path: required (a hub id or a local model directory)")


@dataclass
class DataConfig:
    # Training rows. Required for prepare/train.
    train: SourceConfig | None = None
    # Evaluation rows. If unset, data.eval_fraction of the train rows are held out instead.
    eval: SourceConfig | None = None
    # Row format: auto (detected per dataset from its first rows) | standard | standard_implicit |
    # conversational | conversational_implicit | sharegpt.
    format: Literal[
        "auto", "standard", "standard_implicit", "conversational", "conversational_implicit", "sharegpt"
    ] = "auto"
    # Canonical field -> column name in the data. Canonical fields: prompt, chosen, rejected,
    # system, conversations. E.g. {prompt: question, chosen: response_j, rejected: response_k}.
    columns: dict[str, str] = field(default_factory=dict)
    # Python format string building a standard prompt from columns, e.g.
    # "Question: {prompt}\n\nAnswer: " or "{context}\n\n{question}\n". null = prompt column as is.
    prompt_template: str | None = None
    # System prompt used when a row carries none (conversational: a system message; standard:
    # prepended to the prompt followed by a blank line).
    system_prompt: str | None = None
    # standard_implicit only: the prompt is the shared prefix of chosen and rejected, cut right
    # after the last occurrence of this marker.
    assistant_marker: str = "\n\nAssistant:"
    # Canonical field -> fixed value for rows lacking that field, e.g. {rejected: ""} for data
    # with an empty rejected answer.
    constants: dict[str, str] = field(default_factory=dict)
    # Tokenizer hub id or directory. null = the model's (model.name_or_path).
    tokenizer: str | None = None
    # Chat template for conversational rows: inline jinja text or a path to a .jinja file.
    # null = the tokenizer's own, or a plain "User:/Assistant:" template if it has none.
    chat_template: str | None = None
    # Tokens per sequence, prompt + completion (chosen and rejected each). >= 2.
    max_length: int = 1024
    # Tokens for the prompt alone. null = limited only by max_length - 1.
    max_prompt_length: int | None = None
    # Which end of an over-long prompt is kept: keep_end (its last tokens, the recent context)
    # | keep_start. Completions are always cut at their end.
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    # What happens to a prompt longer than its budget: drop (reason prompt_too_long) | truncate.
    prompt_overflow: Literal["drop", "truncate"] = "drop"
    # Fraction of train rows held out for eval when data.eval is unset, in [0, 1). Rows are
    # assigned by a stable hash of their prompt, so pairs sharing a prompt share a split.
    eval_fraction: float = 0.0
    # Seed mixed into the split hash; change it to draw a different held-out set.
    split_seed: int = 0
    # Defective rows (see data_report.json reasons): skip (drop and count) | fail (stop at the
    # first one, naming file, line and field).
    on_bad_row: Literal["skip", "fail"] = "skip"
    # Fail the run if more than this fraction of a split's rows are defective, in [0, 1].
    # Length-policy drops (prompt_too_long, ...) do not count.
    max_bad_fraction: float = 0.1
    # Rows per tokenization batch handed to each Ray Data actor.
    batch_size: int = 256
    # CPUs the pipeline may use at once (read + tokenize tasks). null = all the cluster offers.
    num_cpus: int | None = None
    # Reuse output_dir/prepared when its cache key (data, tokenizer, template, lengths) matches.
    cache: bool = True

    def check(self) -> None:
        if self.train is None:
            raise ConfigError("data.train: required (a path, a hub dataset id, or inline rows)")
        self.train.check("data.train")
        if self.eval is not None:
            self.eval.check("data.eval")
            if self.eval_fraction > 0:
                raise ConfigError(
                    "data.eval_fraction: must be 0 when data.eval is set (use one or the other)"
                )
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"data.max_bad_fraction: must be in [0, 1], got {self.max_bad_fraction}")
        if self.max_length < 2:
            raise ConfigError(
                f"data.max_length: must be >= 2 (a prompt token and a completion token), got {self.max_length}"
            )
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            raise ConfigError(
                f"data.max_prompt_length: must be in [1, data.max_length={self.max_length}), got {self.max_prompt_length}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size: must be >= 1, got {self.batch_size}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"data.num_cpus: must be >= 1, got {self.num_cpus}")
        # The field-level rules live with the code that uses them; surface them under our keys.
        try:
            self.format_spec()
        except ValueError as e:
            raise ConfigError(f"data (format settings): {e}") from e
        try:
            self.tokenize_spec()
        except (ValueError, OSError) as e:
            raise ConfigError(f"data (tokenization settings): {e}") from e

    def format_spec(self) -> FormatSpec:
        from dpo_cluster.data.formats import FormatSpec

        return FormatSpec(
            format=self.format,
            columns=dict(self.columns),
            prompt_template=self.prompt_template,
            system_prompt=self.system_prompt,
            assistant_marker=self.assistant_marker,
            constants=dict(self.constants),
        )

    def tokenize_spec(self) -> TokenizeSpec:
        from dpo_cluster.data.tokenize import TokenizeSpec, load_chat_template

        return TokenizeSpec(
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
            truncation_mode=self.truncation_mode,
            prompt_overflow=self.prompt_overflow,
            chat_template=load_chat_template(self.chat_template),
        )


@dataclass
class TrainConfig:
    # DPO loss type(s); a list combines several with train.loss_weights. See dpo_cluster.losses.
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    # Temperature of the implicit reward beta * log(pi/pi_ref) (Rafailov et al. 2023). > 0.
    beta: float = 0.1

    def check(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"train.beta: must be > 0, got {self.beta}")
        if not self.loss_type:
            raise ConfigError("train.loss_type: at least one loss type is required")


@dataclass
class ScalingConfig:
    # Ray Train workers (one process each; one GPU each when use_gpu). >= 1.
    num_workers: int = 2
    # Train on GPUs (NCCL) instead of CPUs (gloo).
    use_gpu: bool = False

    def check(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"scaling.num_workers: must be >= 1, got {self.num_workers}")


@dataclass
class Config:
    # Directory for everything a run writes: data_report.json, prepared/, metrics, final/.
    output_dir: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)

    def check(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir: required (the directory this run writes to)")
        self.model.check()
        self.data.check()
        self.train.check()
        self.scaling.check()

    def tokenizer_path(self) -> str:
        return self.data.tokenizer or self.model.name_or_path

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Loading: YAML -> dict -> overrides -> typed dataclasses -> cross-field checks.


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or start from defaults), apply `key=value` overrides, type-check and
    validate. Raises ConfigError naming the offending key."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        raw = loaded or {}
    for item in overrides or []:
        apply_override(raw, item)
    config = build_dataclass(Config, raw, "")
    config.check()
    return config


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, null, [lists]),
    falling back to the literal string."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text  # not YAML (a template with a lone brace, say): take it as the string typed
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and _field_type_at(parts[: depth + 1]) is SourceConfig:
            child = {"path": child}  # the string shorthand gains a sibling key
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
        node[part] = child
        node = child
    node[parts[-1]] = value


def valid_keys(cls: type) -> list[str]:
    """All dotted keys of a config dataclass, for error messages and docs."""
    keys: list[str] = []
    for name, hint in typing.get_type_hints(cls).items():
        inner = _dataclass_in(hint)
        if inner is not None:
            keys.extend(f"{name}.{sub}" for sub in valid_keys(inner))
        else:
            keys.append(name)
    return keys


def build_dataclass(cls: type, value: Any, key: str) -> Any:
    """Build `cls` from a mapping, recursively, rejecting unknown keys and wrong types."""
    if cls is SourceConfig and isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {_type_name(value)}")
    hints = typing.get_type_hints(cls)
    unknown = [k for k in value if k not in hints]
    if unknown:
        prefix = f"{key}." if key else ""
        valid = [f"{prefix}{k}" for k in valid_keys(cls)]
        close = difflib.get_close_matches(f"{prefix}{unknown[0]}", valid, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s}{hint}; valid keys: " + ", ".join(valid))
    kwargs = {}
    for name, hint in hints.items():
        if name in value:
            kwargs[name] = _coerce(hint, value[name], f"{key}.{name}" if key else name)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{key}: {_type_name(value)} fits none of its types"
        )
    if value is None:
        raise ConfigError(f"{key}: must not be null")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of: {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, key)
    if origin is list:
        (item_type,) = args
        if isinstance(value, str) and item_type is str:
            value = [value]  # `loss_type: sigmoid` means [sigmoid]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_type_name(value)}")
        return [_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_type, item_type = args
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_type_name(value)}")
        return {_coerce(key_type, k, key): _coerce(item_type, v, f"{key}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported annotation {hint!r}")


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint  # type: ignore[return-value]
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg  # type: ignore[return-value]
    return None


def _field_type_at(parts: list[str]) -> type | None:
    cls: type | None = Config
    for part in parts:
        if cls is None:
            return None
        hint = typing.get_type_hints(cls).get(part)
        cls = _dataclass_in(hint) if hint is not None else None
    return cls


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__
