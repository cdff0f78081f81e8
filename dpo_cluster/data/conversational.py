"""The message formats: conversational, conversational_implicit, sharegpt and unpaired_conversational
rows -> `Pair`.

They share one message parser, so every format keeps only "role" and "content" of a message and
rejects the same malformed lists (unknown role, system message after the first) the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from dpo_cluster.config.specs import FormatSpec
from dpo_cluster.data.records import DropRow, Message, Pair
from dpo_cluster.data.row_fields import (
    column_name,
    is_blank,
    require_field,
    require_label,
    shared_prefix_length,
    short_repr,
    system_text,
    type_name,
)

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


def _parse_message(item: Any, path: str, role_map: Mapping[str, str], sharegpt: bool = False) -> Message:
    """One message -> {"role", "content"}; `path` is how the detail names it, e.g. "prompt[1]"."""
    if not isinstance(item, dict):
        raise DropRow("invalid_messages", f"field '{path}': expected a message object, got {type_name(item)}")
    # LLaMA-Factory files use from/value; some ShareGPT exports use role/content instead.
    role_key, content_key = ("from", "value") if sharegpt and "role" not in item else ("role", "content")
    role = item.get(role_key)
    if role is None:
        raise DropRow("invalid_messages", f"field '{path}.{role_key}': missing or null")
    if not isinstance(role, str):
        raise DropRow(
            "invalid_messages", f"field '{path}.{role_key}': expected a string, got {type_name(role)}"
        )
    if role not in role_map:
        raise DropRow("invalid_messages", f"field '{path}.{role_key}': unknown role {short_repr(role)}")
    content = item.get(content_key)
    if content is None:
        raise DropRow("invalid_messages", f"field '{path}.{content_key}': missing or null")
    if not isinstance(content, str):
        raise DropRow(
            "invalid_messages", f"field '{path}.{content_key}': expected a string, got {type_name(content)}"
        )
    return {"role": role_map[role], "content": content}


def _parse_messages(
    value: Any, name: str, role_map: Mapping[str, str] = _IDENTITY_ROLES, sharegpt: bool = False
) -> list[Message]:
    """A message list; system is allowed only as the first message."""
    if not isinstance(value, list):
        raise DropRow("wrong_type", f"field '{name}': expected a list of messages, got {type_name(value)}")
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
                f"field '{name}': expected a string or a message object, got {type_name(value)}",
            )
    elif not isinstance(value, list):
        raise DropRow(
            "wrong_type", f"field '{name}': expected a string or a list of messages, got {type_name(value)}"
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
    if not any(m["role"] != "system" and not is_blank(m["content"]) for m in prompt):
        raise DropRow("empty_prompt", f"field '{prompt_name}': no non-empty user or tool message")
    if all(is_blank(m["content"]) for m in chosen if m["role"] == "assistant"):
        raise DropRow("empty_chosen", f"field '{chosen_name}': every assistant message is empty")
    if chosen == rejected:
        raise DropRow("chosen_equals_rejected", f"fields '{chosen_name}' and '{rejected_name}' are identical")
    if system is not None and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    return Pair(prompt, chosen, rejected, conversational=True)


def normalize_conversational(row: Mapping[Any, Any], spec: FormatSpec) -> Pair:
    names = (column_name("prompt", spec), column_name("chosen", spec), column_name("rejected", spec))
    prompt = _parse_messages(require_field(row, "prompt", spec), names[0])
    _check_prompt_messages(prompt, names[0])
    chosen = _completion(require_field(row, "chosen", spec), names[1], _parse_messages)
    rejected = _completion(require_field(row, "rejected", spec), names[2], _parse_messages)
    return _finish_conversational(prompt, chosen, rejected, system_text(row, spec), names)


def normalize_conversational_implicit(row: Mapping[Any, Any], spec: FormatSpec) -> Pair:
    # A "prompt" column, if any, is ignored: the prompt is what chosen and rejected share.
    names = (column_name("prompt", spec), column_name("chosen", spec), column_name("rejected", spec))
    chosen_all = _parse_messages(require_field(row, "chosen", spec), names[1])
    rejected_all = _parse_messages(require_field(row, "rejected", spec), names[2])
    system = system_text(row, spec)
    if chosen_all == rejected_all:
        raise DropRow("chosen_equals_rejected", f"fields '{names[1]}' and '{names[2]}' are identical")
    shared = shared_prefix_length(chosen_all, rejected_all)
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


def normalize_unpaired_conversational(row: Mapping[Any, Any], spec: FormatSpec) -> Pair:
    """TRL's conversational unpaired row: prompt messages, completion message(s), a bool label."""
    prompt_name, completion_name = column_name("prompt", spec), column_name("completion", spec)
    prompt = _parse_messages(require_field(row, "prompt", spec), prompt_name)
    _check_prompt_messages(prompt, prompt_name)
    completion = _completion(require_field(row, "completion", spec), completion_name, _parse_messages)
    label = require_label(row, spec)
    if not any(m["role"] != "system" and not is_blank(m["content"]) for m in prompt):
        raise DropRow("empty_prompt", f"field '{prompt_name}': no non-empty user or tool message")
    if label and all(is_blank(m["content"]) for m in completion if m["role"] == "assistant"):
        # As an empty chosen answer: training toward saying nothing is a defect, avoiding it is not.
        raise DropRow("empty_chosen", f"field '{completion_name}': the desirable completion is empty")
    system = system_text(row, spec)
    if system is not None and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    return Pair(prompt, completion, completion, conversational=True, label=label)


def _parse_sharegpt_messages(value: Any, name: str) -> list[Message]:
    return _parse_messages(value, name, SHAREGPT_ROLES, sharegpt=True)


def _parse_sharegpt_answer(value: Any, name: str) -> list[Message]:
    return [_parse_message(value, name, SHAREGPT_ROLES, sharegpt=True)]


def normalize_sharegpt(row: Mapping[Any, Any], spec: FormatSpec) -> Pair:
    names = (column_name("conversations", spec), column_name("chosen", spec), column_name("rejected", spec))
    prompt = _parse_sharegpt_messages(require_field(row, "conversations", spec), names[0])
    _check_prompt_messages(prompt, names[0])
    chosen = _completion(require_field(row, "chosen", spec), names[1], _parse_sharegpt_answer, single=True)
    rejected = _completion(
        require_field(row, "rejected", spec), names[2], _parse_sharegpt_answer, single=True
    )
    return _finish_conversational(prompt, chosen, rejected, system_text(row, spec), names)
