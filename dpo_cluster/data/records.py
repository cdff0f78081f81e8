"""The records every pipeline stage agrees on: the canonical preference pair, the tokenized pair,
and the drop reasons a row can end with.

Every input row ends either as a `TokenizedPair` or dropped with exactly one reason from
`DROP_REASONS`; `data_report.json` counts them per split so that
rows_in == rows_kept + sum(dropped) always holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Message = dict[str, str]
"""One chat message: {"role": "system"|"user"|"assistant"|"tool", "content": str}."""

Text = str | list[Message]
"""A plain string (standard format) or a list of messages (conversational format)."""

# Reasons that mean the row itself is defective. `data.on_bad_row` and `data.max_bad_fraction`
# act on these.
DEFECT_REASONS: dict[str, str] = {
    "invalid_json": "the line is not valid JSON",
    "undecodable_text": "the bytes are not valid UTF-8",
    "not_an_object": "the row is not a JSON object / mapping",
    "missing_field": "a required field is absent or null",
    "wrong_type": "a field has the wrong type (e.g. a number where text is expected)",
    "invalid_messages": "a message list is malformed (role/content missing, unknown role, wrong turn order)",
    "empty_prompt": "the prompt is empty",
    "empty_chosen": "the chosen answer is empty",
    "chosen_equals_rejected": "chosen and rejected are identical: no preference signal",
    "no_shared_prompt": "implicit-prompt row whose chosen and rejected share no prompt at a turn boundary",
    "template_error": "the chat template or prompt template failed on this row",
}

# Reasons that come from length policy, not from defective data. They are reported like defects
# but never trip `on_bad_row: fail` or `max_bad_fraction`.
FILTER_REASONS: dict[str, str] = {
    "prompt_too_long": "the prompt leaves no room for a completion within data.max_length",
    "identical_after_truncation": "chosen and rejected token ids are identical after truncation",
}

# Reasons that come from mixing weighted sources (`data.train[i].weight`): the row is fine, it was
# just not drawn this run. Counted, never written to quarantine.jsonl, never a defect.
SAMPLING_REASONS: dict[str, str] = {
    "not_sampled": "a well-formed row of a source with weight < 1 (or a fractional weight) that the "
    "seeded per-row draw left out",
}

DROP_REASONS: dict[str, str] = {**DEFECT_REASONS, **FILTER_REASONS, **SAMPLING_REASONS}

# Things that happened to a kept row; counted in the report, the row is still kept.
NOTES: dict[str, str] = {
    "truncated_prompt": "prompt tokens were cut to fit max_prompt_length / max_length",
    "truncated_completion": "chosen or rejected tokens were cut to fit max_length",
    "boundary_merge": "the tokenizer merged tokens across the prompt/completion boundary; "
    "the completion starts where prompt and prompt+completion token ids diverge",
}


class DropRow(Exception):
    """Raised by a stage to drop the current row. `reason` is a key of `DROP_REASONS`;
    `detail` names the field and what is wrong, e.g. "field 'chosen': expected text, got int"."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in DROP_REASONS:
            raise ValueError(f"unknown drop reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Pair:
    """One preference pair in canonical form.

    Standard (conversational=False): `prompt`, `chosen`, `rejected` are strings; the completion
    text follows the prompt text directly (any separator belongs to the prompt).
    Conversational (conversational=True): `prompt` is a message list ending with a user (or
    tool) turn, optionally starting with a system message; `chosen` and `rejected` are message
    lists holding the assistant turn(s) that follow the prompt.
    """

    prompt: Text
    chosen: Text
    rejected: Text
    conversational: bool
    # An unpaired row (formats unpaired, unpaired_conversational): True desirable, False not; its
    # completion is in both `chosen` and `rejected`, and tokenization keeps it on the label's side
    # only. None for a pair.
    label: bool | None = None


@dataclass
class TokenizedPair:
    """Token ids of one pair. Sequences fed to the model are prompt_ids + chosen_ids and
    prompt_ids + rejected_ids; only completion tokens carry labels. An unpaired row keeps its
    completion on one side (chosen_ids when desirable, rejected_ids when not), the other empty."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    notes: set[str] = field(default_factory=set)


class DataError(Exception):
    """A problem with a whole dataset or file (cannot detect its format, unreadable file, too many
    bad rows). The message names the source and, where there is one, the row or line."""
