"""The `model` and `data` sections, and the sources of a split's rows (`data.train`, `data.eval`:
one source, or a list of weighted sources mixed row by row).

The field rules of `data.*` format and tokenization settings are those of the specs the data
pipeline runs (`specs`), checked here at load time so a bad setting fails before Ray starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from dpo_cluster.config.loader import ConfigError
from dpo_cluster.config.specs import FormatSpec, TokenizeSpec, load_chat_template
from dpo_cluster.paths import looks_local

# A model name with this suffix is a GGUF file (`dpo_cluster.gguf_models` converts it).
GGUF_SUFFIX = ".gguf"

# Row formats, as `data.format` and a source's own `format` name them (`specs.FORMATS` plus auto).
DataFormat = Literal[
    "auto",
    "standard",
    "standard_implicit",
    "conversational",
    "conversational_implicit",
    "sharegpt",
    "unpaired",
    "unpaired_conversational",
]


TRAIN_REQUIRED = "data.train: required (a path, a hub dataset id, or inline rows)"


@dataclass
class SourceConfig:
    """Where some of a split's rows come from. In YAML a plain string is shorthand for
    `{path: ...}`; `data.train` (and `data.eval`) is one of these or a list of them."""

    SHORTHAND_FIELD: ClassVar[str] = "path"

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
    # Mixing weight, > 0: each row is kept floor(weight) times, plus once more with probability
    # frac(weight), drawn per row from a stable hash of (data.split_seed, the source's position,
    # the row id). 0.25 keeps about a quarter of the rows (the rest are dropped as not_sampled),
    # 1.5 every row plus a copy of about half (copies get ids ROW_ID~1, ~2, ...). 1 = every row once.
    weight: float = 1.0
    # This source's row format, as data.format (auto = detected from its first rows). null = data.format.
    format: DataFormat | None = None
    # This source's canonical field -> column mapping, as data.columns (replacing it, not merged).
    # null = data.columns.
    columns: dict[str, str] | None = None

    def check(self, key: str) -> None:
        if (self.path is None) == (self.rows is None):
            raise ConfigError(f"{key}: set exactly one of {key}.path or {key}.rows")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ConfigError(f"{key}.weight: must be > 0, got {self.weight:g}")

    def identity(self) -> tuple[Any, ...]:
        """What names the rows this source reads (not how they are weighted or formatted)."""
        return (self.path, self.split, self.subset, self.data_dir, self.revision, repr(self.rows))

    def describe(self) -> str:
        """A short human name for messages and row ids."""
        return self.path if self.path is not None else "inline rows"


@dataclass
class ModelConfig:
    # The base (policy) model: a Hugging Face hub id, a local directory, "builtin:NAME", or a local
    # .gguf file (dequantized to float32 and converted once into the built-in cache, then loaded
    # as a plain directory). Required.
    name_or_path: str = ""
    # A .gguf file inside the directory model.name_or_path, as transformers' gguf_file argument:
    # {name_or_path: DIR, gguf_file: FILE.gguf} is model.name_or_path DIR/FILE.gguf, which the
    # pair becomes when the config is built (so this key then reads null). null = none.
    gguf_file: str | None = None
    # Hub only: git revision of the model.
    revision: str | None = None
    # Allow model/tokenizer code from the hub repo to run (needed by some architectures).
    trust_remote_code: bool = False
    # Policy weights dtype when loading: auto (deepspeed.precision's: bfloat16 for bf16, float16
    # for fp16, float32 for fp32) | float32 | bfloat16 | float16. float32 here with bf16 there
    # loads fp32 weights that DeepSpeed casts for the forward. References compute in the
    # policy's compute dtype whatever this says (`Config.compute_dtype`).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Attention kernel: null (transformers' default) | eager | sdpa | flash_attention_2 (GPU).
    attn_implementation: str | None = None
    # Recompute activations in backward to save memory (slower steps).
    gradient_checkpointing: bool = False
    # Gated SiLU MLPs (Llama, Qwen2, Mistral, ...) keep their gate and up projections for backward
    # and recompute silu there instead of also keeping its output: the same values, about a tenth
    # less activation memory, no extra matrix work (dpo_cluster.mlp_recompute). Other MLPs stay.
    recompute_mlp_activations: bool = True

    def __post_init__(self) -> None:
        # Folded here rather than resolved at each use: every part that reads model.name_or_path
        # (tokenizer, policy, reference, serving, evaluation) then sees the one .gguf path.
        if self.gguf_file is None:
            return
        if not self.gguf_file.endswith(GGUF_SUFFIX):
            raise ConfigError(
                f"model.gguf_file: must name a {GGUF_SUFFIX} file inside model.name_or_path, got {self.gguf_file!r}"
            )
        if not self.name_or_path:
            raise ConfigError("model.gguf_file: needs model.name_or_path, the directory holding it")
        self.name_or_path = str(Path(self.name_or_path) / self.gguf_file)
        self.gguf_file = None

    def check(self) -> None:
        if not self.name_or_path:
            raise ConfigError("model.name_or_path: required (a hub id or a local model directory)")
        check_local_model(self.name_or_path, "model.name_or_path")


def check_local_model(path: str, key: str) -> None:
    """A model name spelled as a path must exist now (a hub id is checked when it loads): a .gguf
    name is always a local file (hub repositories are named without one), any other a directory."""
    if path.endswith(GGUF_SUFFIX):
        if not Path(path).expanduser().is_file():
            raise ConfigError(f"{key}: no such GGUF file: {path}")
    elif looks_local(path) and not Path(path).expanduser().is_dir():
        raise ConfigError(f"{key}: no such local model directory: {path}")


@dataclass
class DataConfig:
    # Training rows: one source, or a list of sources mixed by their `weight`
    # ([a.jsonl, {path: b.jsonl, weight: 0.5, format: conversational}]). Required for prepare/train.
    train: SourceConfig | list[SourceConfig] | None = None
    # Evaluation rows, one source or a list as data.train. If unset, data.eval_fraction of the
    # train rows are held out instead.
    eval: SourceConfig | list[SourceConfig] | None = None
    # Row format: auto (detected per source from its first rows) | standard | standard_implicit |
    # conversational | conversational_implicit | sharegpt | unpaired | unpaired_conversational
    # (prompt, completion, bool label: for train.loss_type kto). A source's own `format` overrides it.
    format: DataFormat = "auto"
    # Canonical field -> column name in the data. Canonical fields: prompt, chosen, rejected,
    # system, conversations, completion, label. E.g. {prompt: question, chosen: response_j, rejected: response_k}.
    # A source's own `columns` replaces it for that source.
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
    # Seed mixed into the split hash and the per-row draw of weighted sources; change it to draw
    # a different held-out set and a different sample.
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

    def sources(self, role: str) -> list[tuple[str, SourceConfig]]:
        """(config key, source) of each source of `role` (train | eval), in the order given: the key
        is data.train for a single source and data.train[i] for the items of a list."""
        value = self.train if role == "train" else self.eval
        if value is None:
            return []
        if isinstance(value, SourceConfig):
            return [(f"data.{role}", value)]
        return [(f"data.{role}[{i}]", s) for i, s in enumerate(value)]

    def mixes(self) -> bool:
        """Whether a split is given as a list of sources or with a weight: the report then accounts
        per source and counts copies."""
        return (
            isinstance(self.train, list)
            or isinstance(self.eval, list)
            or any(s.weight != 1.0 for role in ("train", "eval") for _, s in self.sources(role))
        )

    def check(self, *, require_train: bool = True) -> None:
        """`require_train`: false where the command has prompts of its own (`rounds.prompts`);
        `prepare` still refuses to run without data.train."""
        if self.train is None and require_train:
            raise ConfigError(TRAIN_REQUIRED)
        for role in ("train", "eval"):
            value = self.train if role == "train" else self.eval
            if isinstance(value, list) and not value:
                raise ConfigError(f"data.{role}: the list of sources is empty; give at least one")
            seen: dict[tuple[Any, ...], str] = {}
            for key, source in self.sources(role):
                source.check(key)
                if source.identity() in seen:
                    raise ConfigError(
                        f"{key}: the same rows as {seen[source.identity()]}; give them once, with "
                        "the weight the two would add up to"
                    )
                seen[source.identity()] = key
                if source.format is not None or source.columns is not None:
                    try:
                        self.format_spec(source)
                    except ValueError as e:
                        message = (
                            str(e)
                            .replace("data.columns", f"{key}.columns")
                            .replace("data.format", f"{key}.format")
                        )
                        raise ConfigError(message) from e
        if self.eval is not None and self.eval_fraction > 0:
            raise ConfigError("data.eval_fraction: must be 0 when data.eval is set (use one or the other)")
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
        # The specs' own field rules, surfaced under our keys.
        try:
            self.format_spec()
        except ValueError as e:
            raise ConfigError(f"data (format settings): {e}") from e
        try:
            self.tokenize_spec()
        except (ValueError, OSError) as e:
            raise ConfigError(f"data (tokenization settings): {e}") from e

    def format_spec(self, source: SourceConfig | None = None) -> FormatSpec:
        """How the pipeline reads this data's rows (those of `source`, with its own format and
        columns where it sets them)."""
        fmt = source.format if source is not None and source.format is not None else self.format
        columns = source.columns if source is not None and source.columns is not None else self.columns
        return FormatSpec(
            format=fmt,
            columns=dict(columns),
            prompt_template=self.prompt_template,
            system_prompt=self.system_prompt,
            assistant_marker=self.assistant_marker,
            constants=dict(self.constants),
        )

    def tokenize_spec(self) -> TokenizeSpec:
        """How the pipeline tokenizes pairs and fits them to length (a template file is read now)."""
        return TokenizeSpec(
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
            truncation_mode=self.truncation_mode,
            prompt_overflow=self.prompt_overflow,
            chat_template=load_chat_template(self.chat_template),
        )
