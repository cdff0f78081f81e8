"""How rows are read and tokenized: the plain spec dataclasses `data.*` settings turn into.

`dpo_cluster.data.formats` and `dpo_cluster.data.tokenize` run them; they live here, free of
torch and transformers, so a config checks their field rules when it loads, before any Ray
worker starts.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

# The row layouts `data.format` names:
# - standard: string prompt, chosen, rejected (the prompt may be built with data.prompt_template);
# - standard_implicit: chosen / rejected are whole transcripts sharing the prompt as a prefix (hh-rlhf),
#   cut after the last data.assistant_marker they share;
# - conversational: prompt is a message list, chosen / rejected the assistant turn(s) that follow
#   (or plain strings, taken as one assistant message);
# - conversational_implicit: chosen / rejected are whole conversations; the prompt is their longest
#   common prefix of messages (TRL's extract_prompt);
# - sharegpt: LLaMA-Factory's layout, conversations of {from, value}, one chosen / rejected message
#   and an optional system string;
# - unpaired: TRL's unpaired preference rows (KTO): string prompt and completion, a bool label
#   (true: desirable); unpaired_conversational: the same with a message-list prompt and completion.
FORMATS: tuple[str, ...] = (
    "standard",
    "standard_implicit",
    "conversational",
    "conversational_implicit",
    "sharegpt",
    "unpaired",
    "unpaired_conversational",
)

# The formats whose rows are single labelled completions, not pairs.
UNPAIRED_FORMATS: tuple[str, ...] = ("unpaired", "unpaired_conversational")

CANONICAL_FIELDS: tuple[str, ...] = (
    "prompt",
    "chosen",
    "rejected",
    "system",
    "conversations",
    "completion",
    "label",
)

TRUNCATION_MODES = ("keep_end", "keep_start")
PROMPT_OVERFLOW = ("drop", "truncate")

# Values of `chat_template` with these suffixes are file paths, never inline templates.
TEMPLATE_FILE_SUFFIXES = (".jinja", ".j2", ".txt")


@dataclass(frozen=True)
class FormatSpec:
    """How to read a dataset's rows (the `data.*` format settings)."""

    # "auto" (detect per dataset from a sample) or one of FORMATS.
    format: str = "auto"
    # Canonical field name -> the dataset's column name, e.g. {"chosen": "response_j"}.
    columns: dict[str, str] = field(default_factory=dict)
    # str.format template building a standard prompt, e.g. "Question: {prompt}\n\nAnswer: ".
    # Fields: {prompt} (the mapped prompt column) and any raw column name ({context}, {question}).
    prompt_template: str | None = None
    # System text used when a row has neither a system message nor a non-empty system column.
    system_prompt: str | None = None
    # Turn boundary that ends the prompt in standard_implicit transcripts.
    assistant_marker: str = "\n\nAssistant:"
    # Canonical field -> fixed value used when the row lacks that field, e.g. {"rejected": ""}.
    constants: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format != "auto" and self.format not in FORMATS:
            raise ValueError(
                f"data.format: unknown format {self.format!r}; expected 'auto' or one of {', '.join(FORMATS)}"
            )
        for setting, mapping in (("data.columns", self.columns), ("data.constants", self.constants)):
            for key, value in mapping.items():
                if key not in CANONICAL_FIELDS:
                    raise ValueError(
                        f"{setting}: unknown field {key!r}; expected one of {', '.join(CANONICAL_FIELDS)}"
                    )
                if not isinstance(value, str):
                    raise ValueError(f"{setting}.{key}: expected a string, got {type(value).__name__}")
        for key, column in self.columns.items():
            if not column:
                raise ValueError(f"data.columns.{key}: the column name is empty")
        if not isinstance(self.assistant_marker, str) or not self.assistant_marker:
            raise ValueError("data.assistant_marker: must be a non-empty string")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError(
                f"data.system_prompt: expected a string, got {type(self.system_prompt).__name__}"
            )
        if self.prompt_template is not None:
            if not isinstance(self.prompt_template, str):
                raise ValueError(
                    f"data.prompt_template: expected a string, got {type(self.prompt_template).__name__}"
                )
            template_fields(self.prompt_template)  # raises ValueError naming the problem


@lru_cache(maxsize=64)
def template_fields(template: str) -> tuple[str, ...]:
    """Names of the fields a prompt template uses, nested format specs included.

    Raises ValueError for a malformed template or fields that are not plain column names.
    """
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"data.prompt_template: malformed template {template!r}: {exc}") from None
    for _literal, name, format_spec, conversion in parsed:
        if name is None:
            continue
        if conversion not in (None, "r", "s", "a"):
            raise ValueError(f"data.prompt_template: field {{{name}!{conversion}}} has an unknown conversion")
        # Positional fields ({} / {0}) have nothing to bind to, and attribute/index access
        # ({a.b}, {a[0]}) would reach into values; only column names are meaningful here.
        if not name or name.isdigit() or "." in name or "[" in name:
            raise ValueError(
                f"data.prompt_template: field {{{name}}} is not a column name; "
                "use {prompt} or a column of the dataset, e.g. {question}"
            )
        if name not in names:
            names.append(name)
        if format_spec:
            names.extend(n for n in template_fields(format_spec) if n not in names)
    return tuple(names)


@dataclass(frozen=True)
class TokenizeSpec:
    """How pairs are tokenized and fitted to length."""

    max_length: int = 1024
    """Tokens per sequence, prompt + completion (chosen and rejected separately). At least 2."""
    max_prompt_length: int | None = None
    """Tokens for the prompt; None: only max_length limits it. The prompt budget is never more
    than max_length - 1, so at least one completion token always fits."""
    truncation_mode: str = "keep_end"
    """Which end of the prompt survives truncation: keep_end (its last tokens) | keep_start."""
    prompt_overflow: str = "drop"
    """When the prompt exceeds its budget: drop (reason prompt_too_long) | truncate."""
    chat_template: str | None = None
    """Jinja text (see `load_chat_template` for files); None: the tokenizer's own template, or
    the plain fallback template (`dpo_cluster.data.tokenize.PLAIN_CHAT_TEMPLATE`) when it has none."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {self.max_length!r}")
        if self.max_prompt_length is not None and (
            not isinstance(self.max_prompt_length, int) or self.max_prompt_length < 1
        ):
            raise ValueError(f"max_prompt_length must be None or an int >= 1, got {self.max_prompt_length!r}")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(
                f"truncation_mode must be one of {TRUNCATION_MODES}, got {self.truncation_mode!r}"
            )
        if self.prompt_overflow not in PROMPT_OVERFLOW:
            raise ValueError(
                f"prompt_overflow must be one of {PROMPT_OVERFLOW}, got {self.prompt_overflow!r}"
            )
        if self.chat_template is not None and (
            not isinstance(self.chat_template, str) or not self.chat_template.strip()
        ):
            raise ValueError("chat_template must be None or non-empty jinja text")

    @property
    def prompt_budget(self) -> int:
        """Most prompt tokens a sequence may hold."""
        budget = self.max_length - 1
        if self.max_prompt_length is not None:
            budget = min(budget, self.max_prompt_length)
        return budget


def load_chat_template(value: str | None) -> str | None:
    """Return the jinja text of a chat template given inline or as a file path.

    A value ending with .jinja/.j2/.txt is a path and must exist (FileNotFoundError otherwise);
    any other value naming an existing file is read too; everything else is inline jinja.
    """
    if value is None:
        return None
    # Inline templates hold jinja tags or newlines; recognising them first avoids asking the file
    # system about a long template string.
    if "{{" in value or "{%" in value or "\n" in value:
        return value
    path = Path(value).expanduser()
    try:
        is_file = path.is_file()
    except OSError:  # e.g. a name too long to be a path
        is_file = False
    if is_file:
        return path.read_text(encoding="utf-8")
    if value.endswith(TEMPLATE_FILE_SUFFIXES):
        raise FileNotFoundError(f"chat template file not found: {value}")
    return value
