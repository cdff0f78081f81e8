"""Preference-data formats: turn one raw row into a canonical `Pair`, or drop it with a reason.

A raw row is a mapping as produced by `json.loads` or `pyarrow.Table.to_pylist()`. Five layouts
are understood (the names are the values of `data.format`):

- `standard`: explicit string `prompt`, `chosen`, `rejected` (optionally built from other
  columns with `data.prompt_template`, e.g. stack-exchange-paired or b-mc2/sql-create-context).
- `standard_implicit`: `chosen` / `rejected` are whole transcripts sharing the prompt as a prefix
  (Anthropic hh-rlhf); the prompt is cut after the last `data.assistant_marker` they share.
- `conversational`: `prompt` is a message list, `chosen` / `rejected` are the assistant turn(s)
  that follow (or plain strings, taken as one assistant message).
- `conversational_implicit`: `chosen` / `rejected` are whole conversations; the prompt is their
  longest common prefix of messages (TRL's `extract_prompt`).
- `sharegpt`: LLaMA-Factory's DPO layout, `conversations` of {"from", "value"} plus a single
  `chosen` / `rejected` message and an optional `system` string.

`data.columns` maps the canonical field names (prompt, chosen, rejected, system, conversations)
to a dataset's own column names, and `data.constants` supplies a fixed value for a field a dataset
lacks. The format is detected once per dataset from a sample (`detect_format`), not per row, so
one odd row cannot silently change how its neighbours are read.

Every defect in row content ends as `DropRow(reason, detail)` with a reason from
`records.DEFECT_REASONS` and a detail naming the field; nothing else is raised for bad rows.
Messages keep only "role" and "content"; other keys (name, tool_calls, ...) are dropped. Text is
kept byte-exact: no stripping, no Unicode normalization.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from dpo_cluster.data.records import DataError, DropRow, Message, Pair

FORMATS: tuple[str, ...] = (
    "standard",
    "standard_implicit",
    "conversational",
    "conversational_implicit",
    "sharegpt",
)

CANONICAL_FIELDS: tuple[str, ...] = ("prompt", "chosen", "rejected", "system", "conversations")

ROLES: frozenset[str] = frozenset({"system", "user", "assistant", "tool"})

# LLaMA-Factory role tags -> canonical roles. A function call is something the assistant says;
# the function's answer (observation) comes back as a tool turn.
SHAREGPT_ROLES: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
    "function_call": "assistant",
}

_IDENTITY_ROLES: dict[str, str] = {role: role for role in ROLES}


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
            _template_fields(self.prompt_template)  # raises ValueError naming the problem


def detect_format(rows: Sequence[Any], spec: FormatSpec, source: str) -> str:
    """Return the format of a dataset from a sample of its rows (the pipeline passes the first ~50).

    An explicit `spec.format` wins. Otherwise each mapping row is classified after applying
    `spec.columns` / `spec.constants`, and the most common class wins (ties go to the earlier
    entry of FORMATS); rows that fit no format are ignored so a few junk rows cannot decide it.
    Raises DataError naming `source` and the columns seen when no row fits any format.
    """
    if spec.format != "auto":
        return spec.format
    votes = dict.fromkeys(FORMATS, 0)
    seen_columns: dict[str, None] = {}  # a dict keeps first-seen order, unlike a set
    objects = 0
    for row in rows:
        if not isinstance(row, Mapping):
            continue
        objects += 1
        seen_columns.update((key, None) for key in row if isinstance(key, str))
        fmt = _classify(row, spec)
        if fmt is not None:
            votes[fmt] += 1
    best = max(FORMATS, key=votes.__getitem__)
    if votes[best] == 0:
        if objects == 0:
            seen = f"none of the {len(rows)} sample rows is a JSON object"
        else:
            seen = f"columns seen in {objects} sample rows: {_list_columns(list(seen_columns))}"
        raise DataError(
            f"{source}: cannot tell the preference-data format ({seen}). Set data.format to one of "
            f"{', '.join(FORMATS)} and/or data.columns to map your columns onto "
            f"prompt/chosen/rejected (e.g. data.columns.chosen=response_j)."
        )
    return best


def normalize_row(row: Any, fmt: str, spec: FormatSpec) -> Pair:
    """Turn one raw row of format `fmt` into a canonical Pair; raises DropRow for defective rows.

    `fmt` must be one of FORMATS (what `detect_format` returned); anything else is a caller error
    and raises ValueError.
    """
    normalize = _NORMALIZERS.get(fmt)
    if normalize is None:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not isinstance(row, Mapping):
        raise DropRow("not_an_object", f"row: expected a JSON object, got {_type_name(row)}")
    pair = normalize(row, spec)
    _check_encodable(pair)
    return pair


def prompt_key(pair: Pair) -> str:
    """Stable canonical string of the prompt (system text included) for hashing and grouping."""
    return json.dumps(pair.prompt, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------
# Field access


def _column(canonical: str, spec: FormatSpec) -> str:
    return spec.columns.get(canonical, canonical)


def _value(row: Mapping[Any, Any], canonical: str, spec: FormatSpec) -> Any:
    """The row's value for a canonical field (after column mapping), else its constant, else None."""
    value = row.get(_column(canonical, spec))
    if value is None:
        value = spec.constants.get(canonical)
    return value


def _require(row: Mapping[Any, Any], canonical: str, spec: FormatSpec) -> Any:
    value = _value(row, canonical, spec)
    if value is None:
        raise DropRow("missing_field", f"field '{_column(canonical, spec)}': missing or null")
    return value


def _require_str(row: Mapping[Any, Any], canonical: str, spec: FormatSpec) -> str:
    value = _require(row, canonical, spec)
    if not isinstance(value, str):
        raise DropRow(
            "wrong_type", f"field '{_column(canonical, spec)}': expected a string, got {_type_name(value)}"
        )
    return value


def _system_text(row: Mapping[Any, Any], spec: FormatSpec) -> str | None:
    """System text from the row's system column if non-blank, else `spec.system_prompt`."""
    value = _value(row, "system", spec)
    if value is not None:
        if not isinstance(value, str):
            raise DropRow(
                "wrong_type", f"field '{_column('system', spec)}': expected a string, got {_type_name(value)}"
            )
        if not _blank(value):
            return value
    return spec.system_prompt or None


def _blank(text: str) -> bool:
    return not text or text.isspace()


def _type_name(value: Any) -> str:
    return type(value).__name__


def _short(text: str, limit: int = 40) -> str:
    # Keeps details readable when a junk value is megabytes long.
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _list_columns(columns: list[str], limit: int = 30) -> str:
    if not columns:
        return "(none)"
    shown = ", ".join(repr(c) for c in columns[:limit])
    return shown if len(columns) <= limit else f"{shown} ... (+{len(columns) - limit} more)"


# ---------------------------------------------------------------------------------------------
# Format detection


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _classify(row: Mapping[Any, Any], spec: FormatSpec) -> str | None:
    """The format one row looks like, or None. Mirrors what each normalizer accepts."""
    chosen = _value(row, "chosen", spec)
    rejected = _value(row, "rejected", spec)
    if chosen is None or rejected is None:
        return None
    prompt = _value(row, "prompt", spec)
    both = (chosen, rejected)
    if _is_message_list(_value(row, "conversations", spec)) and all(isinstance(x, (dict, str)) for x in both):
        return "sharegpt"
    if _is_message_list(prompt) and all(_is_message_list(x) or isinstance(x, str) for x in both):
        return "conversational"
    # A string prompt next to conversational chosen/rejected is ignored, as TRL's
    # maybe_extract_prompt does: such datasets repeat the prompt inside each conversation.
    if all(_is_message_list(x) for x in both) and (prompt is None or isinstance(prompt, str)):
        return "conversational_implicit"
    if all(isinstance(x, str) for x in both):
        if isinstance(prompt, str) or spec.prompt_template is not None:
            return "standard"
        if prompt is None:
            return "standard_implicit"
    return None


# ---------------------------------------------------------------------------------------------
# Standard formats


@lru_cache(maxsize=64)
def _template_fields(template: str) -> tuple[str, ...]:
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
            names.extend(n for n in _template_fields(format_spec) if n not in names)
    return tuple(names)


def _render_template(row: Mapping[Any, Any], spec: FormatSpec, template: str) -> tuple[str, bool]:
    """Build the prompt from `template`; returns (prompt, True when every field value is blank)."""
    values: dict[str, str | int | float] = {}
    for name in _template_fields(template):
        # {prompt} is the mapped prompt column, so one template works whatever the column is called.
        if name == "prompt":
            column, value = _column("prompt", spec), _value(row, "prompt", spec)
        else:
            column, value = name, row.get(name)
        if value is None:
            raise DropRow(
                "missing_field", f"field '{column}': missing or null (used by data.prompt_template)"
            )
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise DropRow(
                "wrong_type",
                f"field '{column}': expected a string or number for data.prompt_template, "
                f"got {_type_name(value)}",
            )
        values[name] = value
    try:
        prompt = template.format_map(values)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        # E.g. a numeric format spec applied to text, or an int too large to print.
        raise DropRow("template_error", f"data.prompt_template failed on this row: {exc}") from None
    all_blank = bool(values) and all(isinstance(v, str) and _blank(v) for v in values.values())
    return prompt, all_blank or _blank(prompt)


def _with_system(prompt: str, system: str | None) -> str:
    return prompt if system is None else f"{system}\n\n{prompt}"


def _normalize_standard(row: Mapping[Any, Any], spec: FormatSpec) -> Pair:
    if spec.prompt_template is None:
        prompt = _require_str(row, "prompt", spec)
        prompt_blank = _blank(prompt)
    else:
        prompt, prompt_blank = _render_template(row, spec, spec.prompt_template)
    chosen = _require_str(row, "chosen", spec)
    rejected = _require_str(row, "rejected", spec)
    system = _system_text(row, spec)
    if prompt_blank:
        raise DropRow("empty_prompt", f"field '{_column('prompt', spec)}': the prompt is empty")
    _check_standard_answers(chosen, rejected, spec)
    return Pair(_with_system(prompt, system), chosen, rejected, conversational=False)


def _check_standard_answers(chosen: str, rejected: str, spec: FormatSpec) -> None:
    # An empty rejected answer is valid: recipes that only have good answers (SQL) use "".
    if _blank(chosen):
        raise DropRow("empty_chosen", f"field '{_column('chosen', spec)}': the chosen answer is empty")
    if chosen == rejected:
        raise DropRow(
            "chosen_equals_rejected",
            f"fields '{_column('chosen', spec)}' and '{_column('rejected', spec)}' are identical",
        )


def _common_prefix_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _normalize_standard_implicit(row: Mapping[Any, Any], spec: FormatSpec) -> Pair:
    chosen_text = _require_str(row, "chosen", spec)
    rejected_text = _require_str(row, "rejected", spec)
    system = _system_text(row, spec)
    chosen_name, rejected_name = _column("chosen", spec), _column("rejected", spec)
    if chosen_text == rejected_text:
        raise DropRow("chosen_equals_rejected", f"fields '{chosen_name}' and '{rejected_name}' are identical")
    marker = spec.assistant_marker
    shared = _common_prefix_length(chosen_text, rejected_text)
    # The last marker lying wholly inside the shared prefix opens the final shared assistant
    # turn: in multi-turn transcripts everything before it is the prompt.
    at = chosen_text.rfind(marker, 0, shared)
    if at < 0:
        raise DropRow(
            "no_shared_prompt",
            f"fields '{chosen_name}' and '{rejected_name}': their shared prefix contains no "
            f"{marker!r} (data.assistant_marker) to split the prompt at",
        )
    if _blank(chosen_text[:at]):
        raise DropRow(
            "empty_prompt", f"field '{chosen_name}': nothing before {marker!r} to use as the prompt"
        )
    cut = at + len(marker)
    prompt, chosen, rejected = chosen_text[:cut], chosen_text[cut:], rejected_text[cut:]
    _check_standard_answers(chosen, rejected, spec)
    return Pair(_with_system(prompt, system), chosen, rejected, conversational=False)


# ---------------------------------------------------------------------------------------------
# Conversational formats


def _parse_message(item: Any, path: str, role_map: Mapping[str, str], sharegpt: bool = False) -> Message:
    """One message -> {"role", "content"}; `path` is how the detail names it, e.g. "prompt[1]"."""
    if not isinstance(item, dict):
        raise DropRow(
            "invalid_messages", f"field '{path}': expected a message object, got {_type_name(item)}"
        )
    # LLaMA-Factory files use from/value; some ShareGPT exports use role/content instead.
    role_key, content_key = ("from", "value") if sharegpt and "role" not in item else ("role", "content")
    role = item.get(role_key)
    if role is None:
        raise DropRow("invalid_messages", f"field '{path}.{role_key}': missing or null")
    if not isinstance(role, str):
        raise DropRow(
            "invalid_messages", f"field '{path}.{role_key}': expected a string, got {_type_name(role)}"
        )
    if role not in role_map:
        raise DropRow("invalid_messages", f"field '{path}.{role_key}': unknown role {_short(role)}")
    content = item.get(content_key)
    if content is None:
        raise DropRow("invalid_messages", f"field '{path}.{content_key}': missing or null")
    if not isinstance(content, str):
        raise DropRow(
            "invalid_messages", f"field '{path}.{content_key}': expected a string, got {_type_name(content)}"
        )
    return {"role": role_map[role], "content": content}


def _parse_messages(
    value: Any, name: str, role_map: Mapping[str, str] = _IDENTITY_ROLES, sharegpt: bool = False
) -> list[Message]:
    """A message list; system is allowed only as the first message."""
    if not isinstance(value, list):
        raise DropRow("wrong_type", f"field '{name}': expected a list of messages, got {_type_name(value)}")
    if not value:
        raise DropRow("invalid_messages", f"field '{name}': the message list is empty")
    messages = [_parse_message(item, f"{name}[{i}]", role_map, sharegpt) for i, item in enumerate(value)]
    for i, message in enumerate(messages[1:], start=1):
        if message["role"] == "system":
            raise DropRow("invalid_messages", f"field '{name}[{i}]': a system message may only come first")
    return messages


def _check_prompt_messages(prompt: list[Message], name: str) -> None:
    if prompt[-1]["role"] == "assistant":
        raise DropRow(
            "invalid_messages",
            f"field '{name}[{len(prompt) - 1}]': the prompt ends with an assistant turn, "
            "so there is nothing for chosen/rejected to answer",
        )


def _check_completion_messages(messages: list[Message], name: str) -> None:
    if messages[0]["role"] != "assistant":
        raise DropRow(
            "invalid_messages",
            f"field '{name}[0]': a completion must start with an assistant message, "
            f"got role {messages[0]['role']!r}",
        )
    for i, message in enumerate(messages):
        if message["role"] == "system":
            raise DropRow(
                "invalid_messages", f"field '{name}[{i}]': a completion may not contain a system message"
            )


def _completion(
    value: Any,
    name: str,
    parse: Callable[[Any, str], list[Message]],
    single: bool = False,
) -> list[Message]:
    """chosen/rejected as messages: a plain string is one assistant message; otherwise
    `parse` reads the value (a list, or one message object when `single`)."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if single:
        if not isinstance(value, dict):
            raise DropRow(
                "wrong_type",
                f"field '{name}': expected a string or a message object, got {_type_name(value)}",
            )
    elif not isinstance(value, list):
        raise DropRow(
            "wrong_type", f"field '{name}': expected a string or a list of messages, got {_type_name(value)}"
        )
    messages = parse(value, name)
    _check_completion_messages(messages, name)
    return messages


def _finish_conversational(
    prompt: list[Message],
    chosen: list[Message],
    rejected: list[Message],
    system: str | None,
    names: tuple[str, str, str],
) -> Pair:
    """Content checks shared by every conversational format, then the system message."""
    prompt_name, chosen_name, rejected_name = names
    if not any(m["role"] != "system" and not _blank(m["content"]) for m in prompt):
        raise DropRow("empty_prompt", f"field '{prompt_name}': no non-empty user or tool message")
    if all(_blank(m["content"]) for m in chosen if m["role"] == "assistant"):
        raise DropRow("empty_chosen", f"field '{chosen_name}': every assistant message is empty")
    if chosen == rejected:
        raise DropRow("chosen_equals_rejected", f"fields '{chosen_name}' and '{rejected_name}' are identical")
    if system is not None and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    return Pair(prompt, chosen, rejected, conversational=True)


def _normalize_conversational(row: Mapping[Any, Any], spec: FormatSpec) -> Pair:
    names = (_column("prompt", spec), _column("chosen", spec), _column("rejected", spec))
    prompt = _parse_messages(_require(row, "prompt", spec), names[0])
    _check_prompt_messages(prompt, names[0])
    chosen = _completion(_require(row, "chosen", spec), names[1], _parse_messages)
    rejected = _completion(_require(row, "rejected", spec), names[2], _parse_messages)
    return _finish_conversational(prompt, chosen, rejected, _system_text(row, spec), names)


def _normalize_conversational_implicit(row: Mapping[Any, Any], spec: FormatSpec) -> Pair:
    # A "prompt" column, if any, is ignored: the prompt is what chosen and rejected share.
    names = (_column("prompt", spec), _column("chosen", spec), _column("rejected", spec))
    chosen_all = _parse_messages(_require(row, "chosen", spec), names[1])
    rejected_all = _parse_messages(_require(row, "rejected", spec), names[2])
    system = _system_text(row, spec)
    if chosen_all == rejected_all:
        raise DropRow("chosen_equals_rejected", f"fields '{names[1]}' and '{names[2]}' are identical")
    shared = _common_prefix_length(chosen_all, rejected_all)
    # The shared messages are a prompt only if both conversations go on with an assistant turn
    # right after them and the shared part does not itself end with an assistant message.
    if (
        shared == 0
        or shared == len(chosen_all)
        or shared == len(rejected_all)
        or chosen_all[shared - 1]["role"] == "assistant"
        or chosen_all[shared]["role"] != "assistant"
        or rejected_all[shared]["role"] != "assistant"
    ):
        raise DropRow(
            "no_shared_prompt",
            f"fields '{names[1]}' and '{names[2]}': they share {shared} leading message(s), "
            "which do not end right before an assistant turn in both",
        )
    prompt, chosen, rejected = chosen_all[:shared], chosen_all[shared:], rejected_all[shared:]
    prompt_name = f"{names[1]}[:{shared}]"  # the prompt is the shared head of the conversations
    return _finish_conversational(prompt, chosen, rejected, system, (prompt_name, names[1], names[2]))


def _parse_sharegpt_messages(value: Any, name: str) -> list[Message]:
    return _parse_messages(value, name, SHAREGPT_ROLES, sharegpt=True)


def _parse_sharegpt_answer(value: Any, name: str) -> list[Message]:
    return [_parse_message(value, name, SHAREGPT_ROLES, sharegpt=True)]


def _normalize_sharegpt(row: Mapping[Any, Any], spec: FormatSpec) -> Pair:
    names = (_column("conversations", spec), _column("chosen", spec), _column("rejected", spec))
    prompt = _parse_sharegpt_messages(_require(row, "conversations", spec), names[0])
    _check_prompt_messages(prompt, names[0])
    chosen = _completion(_require(row, "chosen", spec), names[1], _parse_sharegpt_answer, single=True)
    rejected = _completion(_require(row, "rejected", spec), names[2], _parse_sharegpt_answer, single=True)
    return _finish_conversational(prompt, chosen, rejected, _system_text(row, spec), names)


_NORMALIZERS: dict[str, Callable[[Mapping[Any, Any], FormatSpec], Pair]] = {
    "standard": _normalize_standard,
    "standard_implicit": _normalize_standard_implicit,
    "conversational": _normalize_conversational,
    "conversational_implicit": _normalize_conversational_implicit,
    "sharegpt": _normalize_sharegpt,
}


def _check_encodable(pair: Pair) -> None:
    """JSON allows lone surrogates ("\\ud800") that no tokenizer or UTF-8 hash can take; drop
    such rows here, naming the field, rather than fail later in the pipeline."""
    for name in ("prompt", "chosen", "rejected"):
        value = getattr(pair, name)
        texts = [value] if isinstance(value, str) else [m["content"] for m in value]
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise DropRow(
                    "undecodable_text", f"field '{name}': contains a lone surrogate that is not valid UTF-8"
                ) from None
