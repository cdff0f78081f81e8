"""Tests for dpo_cluster.data.formats: every format against literal rows shaped like the real
datasets, detection, every drop reason, spec validation, and a hostile-row property loop."""

from __future__ import annotations

import contextlib
import copy
import random
from typing import Any

import pytest

from dpo_cluster.data.formats import FORMATS, FormatSpec, detect_format, normalize_row, prompt_key
from dpo_cluster.data.records import DEFECT_REASONS, DataError, DropRow, Pair

AUTO = FormatSpec()

# ---------------------------------------------------------------------------------------------
# Rows shaped like the real datasets (texts shortened)

STANDARD_ROW = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}

HH_SINGLE_TURN = {
    "chosen": "\n\nHuman: How do I make a cup of tea?\n\nAssistant: Boil water, then steep the tea bag "
    "for three minutes.",
    "rejected": "\n\nHuman: How do I make a cup of tea?\n\nAssistant: I don't know.",
}

HH_MULTI_TURN = {
    "chosen": "\n\nHuman: Can you help me plan a trip?\n\nAssistant: Of course! Where would you like to go?"
    "\n\nHuman: Somewhere warm in December.\n\nAssistant: The Canary Islands are mild in December.",
    "rejected": "\n\nHuman: Can you help me plan a trip?\n\nAssistant: Of course! Where would you like to go?"
    "\n\nHuman: Somewhere warm in December.\n\nAssistant: The Alps.",
}

YOUTUBE_TITLES_ROW = {
    "prompt": [
        {
            "role": "user",
            "content": "Given the YouTube video idea write an engaging title.\n\n"
            "**Video Idea**: intro to causal effects",
        }
    ],
    "chosen": [{"role": "assistant", "content": "Causal Effects Explained: A Beginner's Guide"}],
    "rejected": [{"role": "assistant", "content": "Understanding Causal Effects: An Introduction"}],
}

# trl-internal-testing/hh-rlhf-helpful-base-trl-style: "content" before "role", whole conversations.
TRL_STYLE_ROW = {
    "chosen": [
        {"content": "What is a good houseplant for a dark room?", "role": "user"},
        {"content": "A snake plant tolerates low light well.", "role": "assistant"},
        {"content": "How often should I water it?", "role": "user"},
        {"content": "Every two to three weeks; let the soil dry out first.", "role": "assistant"},
    ],
    "rejected": [
        {"content": "What is a good houseplant for a dark room?", "role": "user"},
        {"content": "A snake plant tolerates low light well.", "role": "assistant"},
        {"content": "How often should I water it?", "role": "user"},
        {"content": "Every day.", "role": "assistant"},
    ],
}

# LLaMA-Factory data/dpo_en_demo.json shape, with the optional system column.
SHAREGPT_ROW = {
    "conversations": [
        {"from": "human", "value": "Name a primary colour."},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Another one?"},
    ],
    "chosen": {"from": "gpt", "value": "Blue."},
    "rejected": {"from": "gpt", "value": "Purple."},
    "system": "You are a concise art teacher.",
}

STACK_EXCHANGE_ROW = {
    "qid": 1234,
    "question": "How do I reverse a list in Python?",
    "date": "2012/03/01",
    "metadata": ["https://stackoverflow.com/questions/1234"],
    "response_j": "Use `my_list[::-1]` or `my_list.reverse()`.",
    "response_k": "You can't.",
}
STACK_EXCHANGE_SPEC = FormatSpec(
    columns={"prompt": "question", "chosen": "response_j", "rejected": "response_k"},
    prompt_template="Question: {prompt}\n\nAnswer: ",
)

SQL_ROW = {
    "answer": "SELECT COUNT(*) FROM head WHERE age > 56",
    "question": "How many heads of the departments are older than 56 ?",
    "context": "CREATE TABLE head (age INTEGER)",
}
SQL_SPEC = FormatSpec(
    prompt_template="{context}\n\n{question}\n", columns={"chosen": "answer"}, constants={"rejected": ""}
)


# ---------------------------------------------------------------------------------------------
# 1. standard


def test_standard_row() -> None:
    assert normalize_row(STANDARD_ROW, "standard", AUTO) == Pair("The sky is", " blue.", " green.", False)


def test_standard_keeps_text_byte_exact() -> None:
    row = {"prompt": "  Q:\tcafe\u0301\n", "chosen": " A \n", "rejected": "B  "}
    assert normalize_row(row, "standard", AUTO) == Pair("  Q:\tcafe\u0301\n", " A \n", "B  ", False)


def test_standard_template_with_number_field() -> None:
    spec = FormatSpec(prompt_template="#{qid}: {prompt}", columns={"prompt": "question"})
    row = {"qid": 7, "question": "Why?", "chosen": "Because.", "rejected": "No."}
    assert normalize_row(row, "standard", spec) == Pair("#7: Why?", "Because.", "No.", False)


# ---------------------------------------------------------------------------------------------
# 2. standard_implicit


def test_standard_implicit_single_turn() -> None:
    assert normalize_row(HH_SINGLE_TURN, "standard_implicit", AUTO) == Pair(
        "\n\nHuman: How do I make a cup of tea?\n\nAssistant:",
        " Boil water, then steep the tea bag for three minutes.",
        " I don't know.",
        False,
    )


def test_standard_implicit_multi_turn_cuts_at_final_shared_marker() -> None:
    # The answers share " The " after the marker; the prompt still ends at "\n\nAssistant:".
    assert normalize_row(HH_MULTI_TURN, "standard_implicit", AUTO) == Pair(
        "\n\nHuman: Can you help me plan a trip?\n\nAssistant: Of course! Where would you like to go?"
        "\n\nHuman: Somewhere warm in December.\n\nAssistant:",
        " The Canary Islands are mild in December.",
        " The Alps.",
        False,
    )


def test_standard_implicit_custom_marker() -> None:
    spec = FormatSpec(assistant_marker="\n助手：")
    row = {"chosen": "用户：你好\n助手：你好！有什么可以帮你？", "rejected": "用户：你好\n助手：走开。"}
    assert normalize_row(row, "standard_implicit", spec) == Pair(
        "用户：你好\n助手：", "你好！有什么可以帮你？", "走开。", False
    )


def test_standard_implicit_empty_rejected_remainder_is_kept() -> None:
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant:"}
    assert normalize_row(row, "standard_implicit", AUTO) == Pair(
        "\n\nHuman: Hi\n\nAssistant:", " Hello!", "", False
    )


# ---------------------------------------------------------------------------------------------
# 3. conversational


def test_conversational_youtube_titles() -> None:
    assert normalize_row(YOUTUBE_TITLES_ROW, "conversational", AUTO) == Pair(
        [
            {
                "role": "user",
                "content": "Given the YouTube video idea write an engaging title.\n\n"
                "**Video Idea**: intro to causal effects",
            }
        ],
        [{"role": "assistant", "content": "Causal Effects Explained: A Beginner's Guide"}],
        [{"role": "assistant", "content": "Understanding Causal Effects: An Introduction"}],
        True,
    )


def test_conversational_string_answers_are_wrapped_and_extra_keys_dropped() -> None:
    row = {
        "prompt": [{"role": "user", "content": "2+2?", "name": "alice"}],
        "chosen": "4",
        "rejected": "5",
    }
    assert normalize_row(row, "conversational", AUTO) == Pair(
        [{"role": "user", "content": "2+2?"}],
        [{"role": "assistant", "content": "4"}],
        [{"role": "assistant", "content": "5"}],
        True,
    )


def test_conversational_multi_message_completion_with_tool() -> None:
    row = {
        "prompt": [{"role": "user", "content": "Weather in Paris?"}],
        "chosen": [
            {"role": "assistant", "content": '{"call": "weather", "city": "Paris"}'},
            {"role": "tool", "content": "18C, sunny"},
            {"role": "assistant", "content": "It is 18C and sunny."},
        ],
        "rejected": [{"role": "assistant", "content": "No idea."}],
    }
    assert normalize_row(row, "conversational", AUTO) == Pair(
        [{"role": "user", "content": "Weather in Paris?"}],
        [
            {"role": "assistant", "content": '{"call": "weather", "city": "Paris"}'},
            {"role": "tool", "content": "18C, sunny"},
            {"role": "assistant", "content": "It is 18C and sunny."},
        ],
        [{"role": "assistant", "content": "No idea."}],
        True,
    )


# ---------------------------------------------------------------------------------------------
# 4. conversational_implicit


def test_conversational_implicit_trl_style_multi_turn() -> None:
    assert normalize_row(TRL_STYLE_ROW, "conversational_implicit", AUTO) == Pair(
        [
            {"role": "user", "content": "What is a good houseplant for a dark room?"},
            {"role": "assistant", "content": "A snake plant tolerates low light well."},
            {"role": "user", "content": "How often should I water it?"},
        ],
        [{"role": "assistant", "content": "Every two to three weeks; let the soil dry out first."}],
        [{"role": "assistant", "content": "Every day."}],
        True,
    )


def test_conversational_implicit_ignores_string_prompt_column() -> None:
    row = {
        "prompt": "What color is the sky?",
        "chosen": [
            {"role": "user", "content": "What color is the sky?"},
            {"role": "assistant", "content": "It is blue."},
        ],
        "rejected": [
            {"role": "user", "content": "What color is the sky?"},
            {"role": "assistant", "content": "It is green."},
        ],
    }
    assert detect_format([row], AUTO, "sky.jsonl") == "conversational_implicit"
    assert normalize_row(row, "conversational_implicit", AUTO) == Pair(
        [{"role": "user", "content": "What color is the sky?"}],
        [{"role": "assistant", "content": "It is blue."}],
        [{"role": "assistant", "content": "It is green."}],
        True,
    )


# ---------------------------------------------------------------------------------------------
# 5. sharegpt


def test_sharegpt_with_system() -> None:
    assert normalize_row(SHAREGPT_ROW, "sharegpt", AUTO) == Pair(
        [
            {"role": "system", "content": "You are a concise art teacher."},
            {"role": "user", "content": "Name a primary colour."},
            {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "Another one?"},
        ],
        [{"role": "assistant", "content": "Blue."}],
        [{"role": "assistant", "content": "Purple."}],
        True,
    )


def test_sharegpt_tool_roles_and_string_answers() -> None:
    row = {
        "conversations": [
            {"from": "human", "value": "What time is it in Tokyo?"},
            {"from": "function_call", "value": '{"name": "clock", "arguments": {"tz": "Asia/Tokyo"}}'},
            {"from": "observation", "value": "21:05"},
        ],
        "chosen": "It is 21:05 in Tokyo.",
        "rejected": {"from": "assistant", "value": "Noon."},
    }
    assert normalize_row(row, "sharegpt", AUTO) == Pair(
        [
            {"role": "user", "content": "What time is it in Tokyo?"},
            {"role": "assistant", "content": '{"name": "clock", "arguments": {"tz": "Asia/Tokyo"}}'},
            {"role": "tool", "content": "21:05"},
        ],
        [{"role": "assistant", "content": "It is 21:05 in Tokyo."}],
        [{"role": "assistant", "content": "Noon."}],
        True,
    )


# ---------------------------------------------------------------------------------------------
# 6. column mapping


def test_stack_exchange_mapping_with_template() -> None:
    assert normalize_row(STACK_EXCHANGE_ROW, "standard", STACK_EXCHANGE_SPEC) == Pair(
        "Question: How do I reverse a list in Python?\n\nAnswer: ",
        "Use `my_list[::-1]` or `my_list.reverse()`.",
        "You can't.",
        False,
    )


def test_sql_mapping_with_constant_keeps_empty_rejected() -> None:
    assert normalize_row(SQL_ROW, "standard", SQL_SPEC) == Pair(
        "CREATE TABLE head (age INTEGER)\n\nHow many heads of the departments are older than 56 ?\n",
        "SELECT COUNT(*) FROM head WHERE age > 56",
        "",
        False,
    )


def test_mapping_for_conversational_and_sharegpt_columns() -> None:
    spec = FormatSpec(columns={"prompt": "messages", "chosen": "good", "rejected": "bad"})
    row = {"messages": [{"role": "user", "content": "Hi"}], "good": "Hello!", "bad": "Go away."}
    assert normalize_row(row, "conversational", spec) == Pair(
        [{"role": "user", "content": "Hi"}],
        [{"role": "assistant", "content": "Hello!"}],
        [{"role": "assistant", "content": "Go away."}],
        True,
    )
    spec = FormatSpec(columns={"conversations": "dialog"})
    row = {"dialog": [{"from": "user", "value": "Hi"}], "chosen": "Hello!", "rejected": "Bye."}
    assert normalize_row(row, "sharegpt", spec) == Pair(
        [{"role": "user", "content": "Hi"}],
        [{"role": "assistant", "content": "Hello!"}],
        [{"role": "assistant", "content": "Bye."}],
        True,
    )


# ---------------------------------------------------------------------------------------------
# 7. system prompt


def test_standard_system_column_and_spec_system_prompt() -> None:
    row = {"prompt": "Hi", "chosen": "Hello", "rejected": "Go", "system": "Be kind."}
    spec = FormatSpec(system_prompt="Be brief.")
    assert normalize_row(row, "standard", spec) == Pair("Be kind.\n\nHi", "Hello", "Go", False)
    blank_column = {"prompt": "Hi", "chosen": "Hello", "rejected": "Go", "system": "  "}
    assert normalize_row(blank_column, "standard", spec) == Pair("Be brief.\n\nHi", "Hello", "Go", False)
    assert normalize_row(STANDARD_ROW, "standard", spec) == Pair(
        "Be brief.\n\nThe sky is", " blue.", " green.", False
    )


def test_system_column_mapping() -> None:
    spec = FormatSpec(columns={"system": "instruction"})
    row = {"prompt": "Hi", "chosen": "Hello", "rejected": "Go", "instruction": "Be kind."}
    assert normalize_row(row, "standard", spec) == Pair("Be kind.\n\nHi", "Hello", "Go", False)


def test_conversational_system_prepended_unless_present() -> None:
    spec = FormatSpec(system_prompt="Be brief.")
    assert normalize_row(YOUTUBE_TITLES_ROW, "conversational", spec).prompt[0] == {
        "role": "system",
        "content": "Be brief.",
    }
    row = {
        "prompt": [{"role": "system", "content": "Own system."}, {"role": "user", "content": "Hi"}],
        "chosen": "Hello",
        "rejected": "Bye",
        "system": "Column system.",
    }
    assert normalize_row(row, "conversational", spec) == Pair(
        [{"role": "system", "content": "Own system."}, {"role": "user", "content": "Hi"}],
        [{"role": "assistant", "content": "Hello"}],
        [{"role": "assistant", "content": "Bye"}],
        True,
    )


def test_conversational_implicit_system_from_spec() -> None:
    pair = normalize_row(TRL_STYLE_ROW, "conversational_implicit", FormatSpec(system_prompt="Be helpful."))
    assert pair.prompt[0] == {"role": "system", "content": "Be helpful."}
    assert len(pair.prompt) == 4


# ---------------------------------------------------------------------------------------------
# Chinese, emoji and mixed scripts round-trip exactly

ZH = "你好，世界！🌍 café naïve Ω — 日本語"


def test_unicode_round_trip_every_format() -> None:
    assert normalize_row(
        {"prompt": ZH + "？", "chosen": "是的 👍", "rejected": "不是 👎"}, "standard", AUTO
    ) == Pair(ZH + "？", "是的 👍", "不是 👎", False)
    assert normalize_row(
        {
            "chosen": f"\n\nHuman: {ZH}\n\nAssistant: 好的 ✅",
            "rejected": f"\n\nHuman: {ZH}\n\nAssistant: 不 ❌",
        },
        "standard_implicit",
        AUTO,
    ) == Pair(f"\n\nHuman: {ZH}\n\nAssistant:", " 好的 ✅", " 不 ❌", False)
    assert normalize_row(
        {"prompt": [{"role": "user", "content": ZH}], "chosen": "对 🎉", "rejected": "错"},
        "conversational",
        AUTO,
    ) == Pair(
        [{"role": "user", "content": ZH}],
        [{"role": "assistant", "content": "对 🎉"}],
        [{"role": "assistant", "content": "错"}],
        True,
    )
    assert normalize_row(
        {
            "chosen": [{"role": "user", "content": ZH}, {"role": "assistant", "content": "对 🎉"}],
            "rejected": [{"role": "user", "content": ZH}, {"role": "assistant", "content": "错"}],
        },
        "conversational_implicit",
        AUTO,
    ) == Pair(
        [{"role": "user", "content": ZH}],
        [{"role": "assistant", "content": "对 🎉"}],
        [{"role": "assistant", "content": "错"}],
        True,
    )
    assert normalize_row(
        {
            "conversations": [{"from": "human", "value": ZH}],
            "chosen": {"from": "gpt", "value": "对 🎉"},
            "rejected": {"from": "gpt", "value": "错"},
            "system": "你是一个助手。",
        },
        "sharegpt",
        AUTO,
    ) == Pair(
        [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": ZH}],
        [{"role": "assistant", "content": "对 🎉"}],
        [{"role": "assistant", "content": "错"}],
        True,
    )
    spec = FormatSpec(prompt_template="问题：{问题}\n回答：", columns={"chosen": "好", "rejected": "坏"})
    assert normalize_row({"问题": ZH, "好": "对", "坏": "错"}, "standard", spec) == Pair(
        f"问题：{ZH}\n回答：", "对", "错", False
    )


def test_prompt_key_is_canonical_and_keeps_unicode() -> None:
    assert prompt_key(Pair("你好", "a", "b", False)) == '"你好"'
    pair = Pair([{"role": "user", "content": "你好 🌍"}], [], [], True)
    assert prompt_key(pair) == '[{"content":"你好 🌍","role":"user"}]'
    reordered = Pair([{"content": "你好 🌍", "role": "user"}], [], [], True)
    assert prompt_key(reordered) == prompt_key(pair)
    with_system = normalize_row(YOUTUBE_TITLES_ROW, "conversational", FormatSpec(system_prompt="S"))
    assert prompt_key(with_system).startswith('[{"content":"S","role":"system"},')


# ---------------------------------------------------------------------------------------------
# detect_format


@pytest.mark.parametrize(
    ("row", "spec", "expected"),
    [
        (STANDARD_ROW, AUTO, "standard"),
        (HH_SINGLE_TURN, AUTO, "standard_implicit"),
        (HH_MULTI_TURN, AUTO, "standard_implicit"),
        (YOUTUBE_TITLES_ROW, AUTO, "conversational"),
        (TRL_STYLE_ROW, AUTO, "conversational_implicit"),
        (SHAREGPT_ROW, AUTO, "sharegpt"),
        (STACK_EXCHANGE_ROW, STACK_EXCHANGE_SPEC, "standard"),
        (SQL_ROW, SQL_SPEC, "standard"),
    ],
)
def test_detect_real_dataset_shapes(row: dict[str, Any], spec: FormatSpec, expected: str) -> None:
    assert detect_format([row] * 5, spec, "data.jsonl") == expected


def test_detect_majority_vote_ignores_junk_rows() -> None:
    rows: list[Any] = [HH_SINGLE_TURN] * 6 + [STANDARD_ROW] * 2
    rows += [None, 42, "text", [1, 2], {"chosen": 1, "rejected": 2}, {"foo": "bar"}, {}]
    assert detect_format(rows, AUTO, "hh.jsonl") == "standard_implicit"


def test_detect_tie_goes_to_earlier_format() -> None:
    assert detect_format([HH_SINGLE_TURN, STANDARD_ROW], AUTO, "x") == "standard"


def test_detect_error_names_source_and_columns() -> None:
    rows = [{"question": "q", "response_j": "a", "response_k": "b"}] * 3
    with pytest.raises(DataError) as info:
        detect_format(rows, AUTO, "hf://lvwerra/stack-exchange-paired[train]")
    message = str(info.value)
    assert "hf://lvwerra/stack-exchange-paired[train]" in message
    for column in ("question", "response_j", "response_k"):
        assert column in message
    assert "data.format" in message and "data.columns" in message


def test_detect_error_when_no_objects() -> None:
    with pytest.raises(DataError, match="bad.jsonl.*none of the 2 sample rows"):
        detect_format([1, "x"], AUTO, "bad.jsonl")


def test_detect_explicit_format_short_circuits() -> None:
    spec = FormatSpec(format="sharegpt")
    assert detect_format([], spec, "empty.jsonl") == "sharegpt"
    assert detect_format([STANDARD_ROW], spec, "x.jsonl") == "sharegpt"


def test_detect_applies_mapping_and_constants() -> None:
    row = {"q": "Hi", "a": "Hello"}
    assert detect_format(
        [row], FormatSpec(columns={"prompt": "q", "chosen": "a"}, constants={"rejected": ""}), "x"
    ) == ("standard")
    with pytest.raises(DataError):
        detect_format([row], AUTO, "x")


# ---------------------------------------------------------------------------------------------
# Every drop reason, with the field named in the detail

CONV_PROMPT = [{"role": "user", "content": "Hi"}]

DROP_CASES: list[tuple[str, Any, str, FormatSpec, str, str]] = [
    ("not_an_object", ["a", "b"], "standard", AUTO, "not_an_object", "row"),
    ("not_an_object_none", None, "sharegpt", AUTO, "not_an_object", "row"),
    ("missing_chosen", {"prompt": "p", "rejected": "r"}, "standard", AUTO, "missing_field", "'chosen'"),
    ("null_rejected", {"prompt": "p", "chosen": "c", "rejected": None}, "standard", AUTO, "missing_field", "'rejected'"),
    ("missing_prompt", {"chosen": "c", "rejected": "r"}, "standard", AUTO, "missing_field", "'prompt'"),
    ("missing_mapped", {"question": "q", "response_j": "a"}, "standard", STACK_EXCHANGE_SPEC, "missing_field", "'response_k'"),
    ("missing_template_field", {"question": "q", "answer": "a"}, "standard", SQL_SPEC, "missing_field", "'context'"),
    ("missing_conversations", {"chosen": "c", "rejected": "r"}, "sharegpt", AUTO, "missing_field", "'conversations'"),
    ("int_chosen", {"prompt": "p", "chosen": 3, "rejected": "r"}, "standard", AUTO, "wrong_type", "'chosen'"),
    ("list_prompt_standard", {"prompt": CONV_PROMPT, "chosen": "c", "rejected": "r"}, "standard", AUTO, "wrong_type", "'prompt'"),
    ("int_implicit", {"chosen": 1, "rejected": "r"}, "standard_implicit", AUTO, "wrong_type", "'chosen'"),
    ("int_conv_chosen", {"prompt": CONV_PROMPT, "chosen": 5, "rejected": "r"}, "conversational", AUTO, "wrong_type", "'chosen'"),
    ("str_conv_prompt", {"prompt": "Hi", "chosen": "c", "rejected": "r"}, "conversational", AUTO, "wrong_type", "'prompt'"),
    ("str_implicit_conv", {"chosen": "c", "rejected": "r"}, "conversational_implicit", AUTO, "wrong_type", "'chosen'"),
    ("list_sharegpt_answer", {"conversations": [{"from": "human", "value": "q"}], "chosen": [], "rejected": "r"}, "sharegpt", AUTO, "wrong_type", "'chosen'"),
    ("dict_template_field", {"question": "q", "context": {"a": 1}, "answer": "a"}, "standard", SQL_SPEC, "wrong_type", "'context'"),
    ("bool_template_field", {"question": True, "context": "c", "answer": "a"}, "standard", SQL_SPEC, "wrong_type", "'question'"),
    ("int_system", {"prompt": "p", "chosen": "c", "rejected": "r", "system": 1}, "standard", AUTO, "wrong_type", "'system'"),
    ("message_not_dict", {"prompt": ["Hi"], "chosen": "c", "rejected": "r"}, "conversational", AUTO, "invalid_messages", "'prompt[0]'"),
    ("missing_role", {"prompt": [{"content": "Hi"}], "chosen": "c", "rejected": "r"}, "conversational", AUTO, "invalid_messages", "'prompt[0].role'"),
    ("missing_content", {"prompt": [{"role": "user"}], "chosen": "c", "rejected": "r"}, "conversational", AUTO, "invalid_messages", "'prompt[0].content'"),
    ("content_not_str", {"prompt": [{"role": "user", "content": [{"type": "text"}]}], "chosen": "c", "rejected": "r"}, "conversational", AUTO, "invalid_messages", "'prompt[0].content'"),
    ("role_not_str", {"prompt": [{"role": 1, "content": "Hi"}], "chosen": "c", "rejected": "r"}, "conversational", AUTO, "invalid_messages", "'prompt[0].role'"),
    ("unknown_role", {"prompt": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "x"}], "chosen": "c", "rejected": "r"}, "conversational", AUTO, "invalid_messages", "'prompt[1].role': unknown role 'bot'"),
    ("unknown_sharegpt_role", {"conversations": [{"from": "robot", "value": "q"}], "chosen": "c", "rejected": "r"}, "sharegpt", AUTO, "invalid_messages", "'conversations[0].from'"),
    ("empty_prompt_list", {"prompt": [], "chosen": "c", "rejected": "r"}, "conversational", AUTO, "invalid_messages", "'prompt'"),
    ("late_system", {"prompt": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "s"}], "chosen": "c", "rejected": "r"}, "conversational", AUTO, "invalid_messages", "'prompt[1]'"),
    ("prompt_ends_assistant", {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "chosen": "c", "rejected": "r"}, "conversational", AUTO, "invalid_messages", "'prompt[1]'"),
    ("chosen_starts_user", {"prompt": CONV_PROMPT, "chosen": [{"role": "user", "content": "c"}], "rejected": "r"}, "conversational", AUTO, "invalid_messages", "'chosen[0]'"),
    ("empty_rejected_list", {"prompt": CONV_PROMPT, "chosen": "c", "rejected": []}, "conversational", AUTO, "invalid_messages", "'rejected'"),
    ("system_in_completion", {"prompt": CONV_PROMPT, "chosen": [{"role": "assistant", "content": "c"}, {"role": "system", "content": "s"}], "rejected": "r"}, "conversational", AUTO, "invalid_messages", "'chosen[1]'"),
    ("sharegpt_answer_from_human", {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "human", "value": "c"}, "rejected": "r"}, "sharegpt", AUTO, "invalid_messages", "'chosen[0]'"),
    ("sharegpt_ends_gpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "chosen": "c", "rejected": "r"}, "sharegpt", AUTO, "invalid_messages", "'conversations[1]'"),
    ("blank_prompt", {"prompt": " \n", "chosen": "c", "rejected": "r"}, "standard", AUTO, "empty_prompt", "'prompt'"),
    ("blank_template_fields", {"question": "", "context": " ", "answer": "a"}, "standard", SQL_SPEC, "empty_prompt", "'prompt'"),
    ("system_only_prompt", {"prompt": [{"role": "system", "content": "s"}], "chosen": "c", "rejected": "r"}, "conversational", AUTO, "empty_prompt", "'prompt'"),
    ("blank_user_message", {"prompt": [{"role": "user", "content": "  "}], "chosen": "c", "rejected": "r"}, "conversational", AUTO, "empty_prompt", "'prompt'"),
    ("implicit_nothing_before_marker", {"chosen": "\n\nAssistant: a", "rejected": "\n\nAssistant: b"}, "standard_implicit", AUTO, "empty_prompt", "'chosen'"),
    ("implicit_conv_system_only_prompt", {"chosen": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "rejected": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]}, "conversational_implicit", AUTO, "empty_prompt", "'chosen[:1]'"),
    ("blank_chosen", {"prompt": "p", "chosen": "\t", "rejected": "r"}, "standard", AUTO, "empty_chosen", "'chosen'"),
    ("implicit_blank_chosen", {"chosen": "\n\nHuman: q\n\nAssistant: ", "rejected": "\n\nHuman: q\n\nAssistant: no"}, "standard_implicit", AUTO, "empty_chosen", "'chosen'"),
    ("conv_blank_chosen", {"prompt": CONV_PROMPT, "chosen": [{"role": "assistant", "content": ""}, {"role": "tool", "content": "x"}, {"role": "assistant", "content": " "}], "rejected": "r"}, "conversational", AUTO, "empty_chosen", "'chosen'"),
    ("sharegpt_blank_chosen", {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": ""}, "rejected": "r"}, "sharegpt", AUTO, "empty_chosen", "'chosen'"),
    ("mapped_blank_chosen", {"question": "q", "response_j": "", "response_k": "r"}, "standard", STACK_EXCHANGE_SPEC, "empty_chosen", "'response_j'"),
    ("equal_standard", {"prompt": "p", "chosen": "same", "rejected": "same"}, "standard", AUTO, "chosen_equals_rejected", "'chosen'"),
    ("equal_implicit", {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: a"}, "standard_implicit", AUTO, "chosen_equals_rejected", "'rejected'"),
    ("equal_after_wrapping", {"prompt": CONV_PROMPT, "chosen": "same", "rejected": [{"role": "assistant", "content": "same", "id": 1}]}, "conversational", AUTO, "chosen_equals_rejected", "'chosen'"),
    ("equal_implicit_conv", {"chosen": TRL_STYLE_ROW["chosen"], "rejected": TRL_STYLE_ROW["chosen"]}, "conversational_implicit", AUTO, "chosen_equals_rejected", "'chosen'"),
    ("no_marker", {"chosen": "Q: hi\nA: hello", "rejected": "Q: hi\nA: bye"}, "standard_implicit", AUTO, "no_shared_prompt", "data.assistant_marker"),
    ("marker_only_after_divergence", {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: x"}, "standard_implicit", AUTO, "no_shared_prompt", "'chosen'"),
    ("no_common_messages", {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}], "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}, "conversational_implicit", AUTO, "no_shared_prompt", "'chosen'"),
    ("diverge_before_user", {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}, {"role": "user", "content": "b"}], "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}, {"role": "user", "content": "c"}]}, "conversational_implicit", AUTO, "no_shared_prompt", "'rejected'"),
    ("chosen_prefix_of_rejected", {"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}]}, "conversational_implicit", AUTO, "no_shared_prompt", "'chosen'"),
    ("shared_prefix_ends_assistant", {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}], "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}, {"role": "assistant", "content": "z"}]}, "conversational_implicit", AUTO, "no_shared_prompt", "'chosen'"),
    ("format_spec_on_text", {"n": "seven", "chosen": "c", "rejected": "r"}, "standard", FormatSpec(prompt_template="{n:d}"), "template_error", "data.prompt_template"),
    ("huge_int_in_template", {"n": 10**5000, "chosen": "c", "rejected": "r"}, "standard", FormatSpec(prompt_template="{n}"), "template_error", "data.prompt_template"),
    ("lone_surrogate", {"prompt": "bad \ud800", "chosen": "c", "rejected": "r"}, "standard", AUTO, "undecodable_text", "'prompt'"),
    ("lone_surrogate_message", {"prompt": CONV_PROMPT, "chosen": "c \udfff", "rejected": "r"}, "conversational", AUTO, "undecodable_text", "'chosen'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("row", "fmt", "spec", "reason", "named"),
    [case[1:] for case in DROP_CASES],
    ids=[c[0] for c in DROP_CASES],
)
def test_drop_reasons(row: Any, fmt: str, spec: FormatSpec, reason: str, named: str) -> None:
    with pytest.raises(DropRow) as info:
        normalize_row(row, fmt, spec)
    assert info.value.reason == reason
    assert named in info.value.detail


def test_drop_cases_cover_every_reason_formats_can_raise() -> None:
    covered = {case[4] for case in DROP_CASES}
    # invalid_json is decided by the reader, before a row exists.
    assert covered == set(DEFECT_REASONS) - {"invalid_json"}


def test_drop_detail_examples() -> None:
    with pytest.raises(DropRow) as info:
        normalize_row({"prompt": CONV_PROMPT, "chosen": 3, "rejected": "r"}, "conversational", AUTO)
    assert info.value.detail == "field 'chosen': expected a string or a list of messages, got int"
    with pytest.raises(DropRow) as info:
        normalize_row(
            {
                "prompt": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}],
                "chosen": "c",
                "rejected": "",
            },
            "conversational",
            AUTO,
        )
    assert info.value.detail == "field 'prompt[1].role': unknown role 'bot'"


def test_unknown_format_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="unknown format 'auto'"):
        normalize_row(STANDARD_ROW, "auto", AUTO)


# ---------------------------------------------------------------------------------------------
# FormatSpec validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"format": "alpaca"}, "data.format: unknown format 'alpaca'"),
        ({"columns": {"answer": "response_j"}}, "data.columns: unknown field 'answer'"),
        ({"constants": {"reject": ""}}, "data.constants: unknown field 'reject'"),
        ({"columns": {"chosen": ""}}, "data.columns.chosen"),
        ({"constants": {"rejected": 0}}, "data.constants.rejected: expected a string"),
        ({"prompt_template": "Question: {prompt"}, "data.prompt_template: malformed"),
        ({"prompt_template": "Answer: }"}, "data.prompt_template: malformed"),
        ({"prompt_template": "{}"}, "not a column name"),
        ({"prompt_template": "{0}"}, "not a column name"),
        ({"prompt_template": "{prompt.__class__}"}, "not a column name"),
        ({"prompt_template": "{prompt!x}"}, "unknown conversion"),
        ({"assistant_marker": ""}, "data.assistant_marker"),
    ],
)
def test_format_spec_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FormatSpec(**kwargs)


def test_format_spec_accepts_every_format_and_nested_template_fields() -> None:
    for fmt in ("auto", *FORMATS):
        assert FormatSpec(format=fmt).format == fmt
    spec = FormatSpec(prompt_template="{prompt:>{width}}")
    row = {"prompt": "ab", "width": 4, "chosen": "c", "rejected": "r"}
    assert normalize_row(row, "standard", spec) == Pair("  ab", "c", "r", False)


# ---------------------------------------------------------------------------------------------
# Hostile rows: a Pair or a DropRow, never anything else

ROLE_WORDS = ["user", "assistant", "system", "tool", "human", "gpt", "observation", "bot", "", "USER"]
KEYS = ["prompt", "chosen", "rejected", "system", "conversations", "question", "context", "extra"]


def _junk(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(12 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([0, -1, 10**400, -(10**5000), True, False])
    if kind == 2:
        return rng.choice([0.5, float("nan"), float("inf"), -0.0])
    if kind in (3, 4):
        return rng.choice(["", " ", "hi", "你好 🌍", "\n\nHuman: q\n\nAssistant: a", "\ud800", "x" * 500])
    if kind == 5:
        return rng.choice([b"bytes", (1, 2), {1, 2}, object()])
    if kind == 6:
        return []
    if kind in (7, 8):
        return [_message(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 9:
        return _message(rng, depth + 1)
    if kind == 10:
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(KEYS + [1, None]): _junk(rng, depth + 1) for _ in range(rng.randrange(4))}


def _message(rng: random.Random, depth: int) -> Any:
    message: dict[Any, Any] = {}
    role_key, content_key = rng.choice([("role", "content"), ("from", "value")])
    if rng.random() < 0.9:
        message[role_key] = rng.choice(ROLE_WORDS) if rng.random() < 0.8 else _junk(rng, depth + 1)
    if rng.random() < 0.9:
        message[content_key] = (
            rng.choice(["hi", "你好", "", "  "]) if rng.random() < 0.7 else _junk(rng, depth + 1)
        )
    if rng.random() < 0.1:
        message["tool_calls"] = _junk(rng, depth + 1)
    return message


VALID_ROWS = [STANDARD_ROW, HH_MULTI_TURN, YOUTUBE_TITLES_ROW, TRL_STYLE_ROW, SHAREGPT_ROW, SQL_ROW]


def _mutated_row(rng: random.Random) -> dict[str, Any]:
    """A real row shape with zero to two fields, or messages inside them, broken or removed."""
    row = copy.deepcopy(rng.choice(VALID_ROWS))
    for _ in range(rng.randrange(3)):
        key = rng.choice(list(row))
        value = row[key]
        if isinstance(value, list) and value and rng.random() < 0.5:
            value[rng.randrange(len(value))] = _junk(rng) if rng.random() < 0.5 else _message(rng, 1)
        elif isinstance(value, dict) and rng.random() < 0.5:
            value[rng.choice(list(value) or ["from"])] = _junk(rng, 2)
        elif rng.random() < 0.3:
            del row[key]
        else:
            row[key] = _junk(rng)
    return row


def _hostile_row(rng: random.Random) -> Any:
    draw = rng.random()
    if draw < 0.05:
        return _junk(rng)
    if draw < 0.5:
        return _mutated_row(rng)
    return {key: _junk(rng) for key in KEYS if rng.random() < 0.7}


def test_hostile_rows_only_pair_or_droprow() -> None:
    rng = random.Random(20240601)
    specs = [
        AUTO,
        FormatSpec(system_prompt="Be safe."),
        FormatSpec(prompt_template="{context}: {question} / {prompt}"),
        FormatSpec(columns={"prompt": "question", "chosen": "context"}, constants={"rejected": ""}),
    ]
    outcomes = {"pair": 0, "drop": 0}
    for i in range(1000):
        row = _hostile_row(rng)
        spec = specs[i % len(specs)]
        for fmt in FORMATS:
            try:
                pair = normalize_row(row, fmt, spec)
            except DropRow as drop:
                assert drop.reason in DEFECT_REASONS
                outcomes["drop"] += 1
            else:
                assert isinstance(pair, Pair)
                prompt_key(pair).encode("utf-8")
                outcomes["pair"] += 1
        with contextlib.suppress(DataError):  # a sample with no usable row is a valid outcome
            assert detect_format([row, _hostile_row(rng)], spec, "fuzz") in FORMATS
    # The generator must reach both outcomes, or the loop proves little.
    assert outcomes["pair"] > 50 and outcomes["drop"] > 1000
