"""Preference-data formats: turn one raw row into a canonical `Pair`, or drop it with a reason.

The format is detected once per dataset from a sample (`detect_format`), not per row, so one odd
row cannot silently change how its neighbours are read. The string formats (standard,
standard_implicit) are read here, the message formats in `conversational`. Every defect in row
content ends as `DropRow(reason, detail)` naming the field; text is kept byte-exact.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dpo_cluster.config.specs import CANONICAL_FIELDS as CANONICAL_FIELDS  # re-exported
from dpo_cluster.config.specs import FORMATS, FormatSpec, template_fields
from dpo_cluster.data.conversational import (
    normalize_conversational,
    normalize_conversational_implicit,
    normalize_sharegpt,
    normalize_unpaired_conversational,
)
from dpo_cluster.data.records import DataError, DropRow, Pair
from dpo_cluster.data.row_fields import (
    column_name,
    field_value,
    is_blank,
    require_label,
    require_text,
    shared_prefix_length,
    system_text,
    type_name,
)


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
            f"prompt/chosen/rejected or prompt/completion/label (e.g. data.columns.chosen=response_j)."
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
        raise DropRow("not_an_object", f"row: expected a JSON object, got {type_name(row)}")
    pair = normalize(row, spec)
    _check_encodable(pair)
    return pair


def prompt_key(pair: Pair) -> str:
    """Stable canonical string of the prompt (system text included) for hashing and grouping."""
    return json.dumps(pair.prompt, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


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
    unpaired = _classify_unpaired(row, spec)
    if unpaired is not None:
        return unpaired
    chosen = field_value(row, "chosen", spec)
    rejected = field_value(row, "rejected", spec)
    if chosen is None or rejected is None:
        return None
    prompt = field_value(row, "prompt", spec)
    both = (chosen, rejected)
    if _is_message_list(field_value(row, "conversations", spec)) and all(
        isinstance(x, (dict, str)) for x in both
    ):
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


def _classify_unpaired(row: Mapping[Any, Any], spec: FormatSpec) -> str | None:
    """unpaired / unpaired_conversational (TRL's unpaired preference rows), or None: a completion
    and a bool label (0 / 1 too), beside a string or message-list prompt."""
    completion, label = field_value(row, "completion", spec), field_value(row, "label", spec)
    if completion is None or not (isinstance(label, bool) or label in (0, 1)):
        return None
    prompt = field_value(row, "prompt", spec)
    if _is_message_list(prompt) and (_is_message_list(completion) or isinstance(completion, str)):
        return "unpaired_conversational"
    if isinstance(completion, str) and (isinstance(prompt, str) or spec.prompt_template is not None):
        return "unpaired"
    return None


# ---------------------------------------------------------------------------------------------
# Standard formats


def _render_template(row: Mapping[Any, Any], spec: FormatSpec, template: str) -> tuple[str, bool]:
    """Build the prompt from `template`; returns (prompt, True when every field value is blank)."""
    values: dict[str, str | int | float] = {}
    for name in template_fields(template):
        # {prompt} is the mapped prompt column, so one template works whatever the column is called.
        if name == "prompt":
            column, value = column_name("prompt", spec), field_value(row, "prompt", spec)
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
                f"got {type_name(value)}",
            )
        values[name] = value
    try:
        prompt = template.format_map(values)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        # E.g. a numeric format spec applied to text, or an int too large to print.
        raise DropRow("template_error", f"data.prompt_template failed on this row: {exc}") from None
    all_blank = bool(values) and all(isinstance(v, str) and is_blank(v) for v in values.values())
    return prompt, all_blank or is_blank(prompt)


def _with_system(prompt: str, system: str | None) -> str:
    return prompt if system is None else f"{system}\n\n{prompt}"


def _normalize_standard(row: Mapping[Any, Any], spec: FormatSpec) -> Pair:
    if spec.prompt_template is None:
        prompt = require_text(row, "prompt", spec)
        prompt_blank = is_blank(prompt)
    else:
        prompt, prompt_blank = _render_template(row, spec, spec.prompt_template)
    chosen = require_text(row, "chosen", spec)
    rejected = require_text(row, "rejected", spec)
    system = system_text(row, spec)
    if prompt_blank:
        raise DropRow("empty_prompt", f"field '{column_name('prompt', spec)}': the prompt is empty")
    _check_standard_answers(chosen, rejected, spec)
    return Pair(_with_system(prompt, system), chosen, rejected, conversational=False)


def _check_standard_answers(chosen: str, rejected: str, spec: FormatSpec) -> None:
    # An empty rejected answer is valid: recipes that only have good answers (SQL) use "".
    if is_blank(chosen):
        raise DropRow("empty_chosen", f"field '{column_name('chosen', spec)}': the chosen answer is empty")
    if chosen == rejected:
        raise DropRow(
            "chosen_equals_rejected",
            f"fields '{column_name('chosen', spec)}' and '{column_name('rejected', spec)}' are identical",
        )


def _normalize_standard_implicit(row: Mapping[Any, Any], spec: FormatSpec) -> Pair:
    chosen_text = require_text(row, "chosen", spec)
    rejected_text = require_text(row, "rejected", spec)
    system = system_text(row, spec)
    chosen_name, rejected_name = column_name("chosen", spec), column_name("rejected", spec)
    if chosen_text == rejected_text:
        raise DropRow("chosen_equals_rejected", f"fields '{chosen_name}' and '{rejected_name}' are identical")
    marker = spec.assistant_marker
    shared = shared_prefix_length(chosen_text, rejected_text)
    # The last marker lying wholly inside the shared prefix opens the final shared assistant
    # turn: in multi-turn transcripts everything before it is the prompt.
    at = chosen_text.rfind(marker, 0, shared)
    if at < 0:
        raise DropRow(
            "no_shared_prompt",
            f"fields '{chosen_name}' and '{rejected_name}': their shared prefix contains no "
            f"{marker!r} (data.assistant_marker) to split the prompt at",
        )
    if is_blank(chosen_text[:at]):
        raise DropRow(
            "empty_prompt", f"field '{chosen_name}': nothing before {marker!r} to use as the prompt"
        )
    cut = at + len(marker)
    prompt, chosen, rejected = chosen_text[:cut], chosen_text[cut:], rejected_text[cut:]
    _check_standard_answers(chosen, rejected, spec)
    return Pair(_with_system(prompt, system), chosen, rejected, conversational=False)


def _normalize_unpaired(row: Mapping[Any, Any], spec: FormatSpec) -> Pair:
    """TRL's standard unpaired row: prompt (or data.prompt_template), completion, bool label."""
    if spec.prompt_template is None:
        prompt = require_text(row, "prompt", spec)
        prompt_blank = is_blank(prompt)
    else:
        prompt, prompt_blank = _render_template(row, spec, spec.prompt_template)
    completion = require_text(row, "completion", spec)
    label = require_label(row, spec)
    system = system_text(row, spec)
    if prompt_blank:
        raise DropRow("empty_prompt", f"field '{column_name('prompt', spec)}': the prompt is empty")
    if label and is_blank(completion):
        # As an empty chosen answer: training toward saying nothing is a defect, avoiding it is not.
        raise DropRow(
            "empty_chosen", f"field '{column_name('completion', spec)}': the desirable completion is empty"
        )
    return Pair(_with_system(prompt, system), completion, completion, conversational=False, label=label)


_NORMALIZERS: dict[str, Callable[[Mapping[Any, Any], FormatSpec], Pair]] = {
    "standard": _normalize_standard,
    "standard_implicit": _normalize_standard_implicit,
    "conversational": normalize_conversational,
    "conversational_implicit": normalize_conversational_implicit,
    "sharegpt": normalize_sharegpt,
    "unpaired": _normalize_unpaired,
    "unpaired_conversational": normalize_unpaired_conversational,
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
