"""Reading one canonical field of a raw row: column mapping, constants, and the drops they raise.

Every format reads its fields through these, so a defect is reported the same way whichever
format the row is in: a `DropRow` whose detail names the dataset's own column.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dpo_cluster.config.specs import FormatSpec
from dpo_cluster.data.records import DropRow


def column_name(canonical: str, spec: FormatSpec) -> str:
    return spec.columns.get(canonical, canonical)


def field_value(row: Mapping[Any, Any], canonical: str, spec: FormatSpec) -> Any:
    """The row's value for a canonical field (after column mapping), else its constant, else None."""
    value = row.get(column_name(canonical, spec))
    if value is None:
        value = spec.constants.get(canonical)
    return value


def require_field(row: Mapping[Any, Any], canonical: str, spec: FormatSpec) -> Any:
    value = field_value(row, canonical, spec)
    if value is None:
        raise DropRow("missing_field", f"field '{column_name(canonical, spec)}': missing or null")
    return value


def require_text(row: Mapping[Any, Any], canonical: str, spec: FormatSpec) -> str:
    value = require_field(row, canonical, spec)
    if not isinstance(value, str):
        raise DropRow(
            "wrong_type", f"field '{column_name(canonical, spec)}': expected a string, got {type_name(value)}"
        )
    return value


def require_label(row: Mapping[Any, Any], spec: FormatSpec) -> bool:
    """An unpaired row's label: a JSON bool, or 0 / 1 as tables often store it."""
    value = require_field(row, "label", spec)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise DropRow(
        "wrong_type",
        f"field '{column_name('label', spec)}': expected true/false (or 0/1), got {short_repr(str(value))}",
    )


def system_text(row: Mapping[Any, Any], spec: FormatSpec) -> str | None:
    """System text from the row's system column if non-blank, else `spec.system_prompt`."""
    value = field_value(row, "system", spec)
    if value is not None:
        if not isinstance(value, str):
            raise DropRow(
                "wrong_type",
                f"field '{column_name('system', spec)}': expected a string, got {type_name(value)}",
            )
        if not is_blank(value):
            return value
    return spec.system_prompt or None


def is_blank(text: str) -> bool:
    return not text or text.isspace()


def type_name(value: Any) -> str:
    return type(value).__name__


def short_repr(text: str, limit: int = 40) -> str:
    # Keeps details readable when a junk value is megabytes long.
    return repr(text if len(text) <= limit else text[:limit] + "...")


def shared_prefix_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
