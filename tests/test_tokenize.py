"""Per-pair tokenization against literal ids, against TRL's own preprocessing, and its length policy.

Literal ids are those of the tiny tokenizers (`dpo_cluster.tiny`), whose build is deterministic.
Each literal case also checks independently that the ids decode to the expected text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from dpo_cluster.data.records import DropRow, Pair, TokenizedPair
from dpo_cluster.data.tokenize import (
    PLAIN_CHAT_TEMPLATE,
    PairTokenizer,
    TokenizeSpec,
    chat_template_override,
    load_chat_template,
)


def system(content: str) -> dict[str, str]:
    return {"role": "system", "content": content}


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_bos_tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_bos_tokenizer_dir)


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_plain_tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_plain_tokenizer_dir)


def tokenize_one(tokenizer: PreTrainedTokenizerBase, pair: Pair, **spec: Any) -> TokenizedPair | DropRow:
    return PairTokenizer(tokenizer, TokenizeSpec(**spec)).tokenize([pair])[0]


# --- literal ids -----------------------------------------------------------------------------------

QUESTION = Pair("Question: What is 3 plus 4?\nAnswer:", " 7.", " 8.", conversational=False)
QUESTION_PROMPT_IDS = [314, 30, 318, 280, 308, 347, 296, 35, 203, 313, 30]


def test_standard_literal(tokenizer: PreTrainedTokenizerBase) -> None:
    result = tokenize_one(tokenizer, QUESTION)
    assert result == TokenizedPair(QUESTION_PROMPT_IDS, [379, 18, 0], [518, 18, 0], set())
    assert tokenizer.decode(result.prompt_ids + result.chosen_ids) == (
        "Question: What is 3 plus 4?\nAnswer: 7.<|endoftext|>"
    )
    assert tokenizer.decode(result.prompt_ids + result.rejected_ids) == (
        "Question: What is 3 plus 4?\nAnswer: 8.<|endoftext|>"
    )
    # The mask a collator builds over prompt + chosen: only completion tokens carry labels.
    completion_mask = [0] * len(result.prompt_ids) + [1] * len(result.chosen_ids)
    assert completion_mask == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_conversational_literal(tokenizer: PreTrainedTokenizerBase) -> None:
    pair = Pair([user("Hi")], [assistant("Hello")], [assistant("Go away")], conversational=True)
    result = tokenize_one(tokenizer, pair)
    assert result == TokenizedPair(
        prompt_ids=[2, 332, 265, 203, 44, 77, 3, 203, 2, 69, 446, 203],
        chosen_ids=[44, 345, 709, 3, 203],
        rejected_ids=[43, 83, 266, 91, 390, 3, 203],
        notes=set(),
    )
    assert tokenizer.decode(result.prompt_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(result.prompt_ids + result.chosen_ids) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    )
    assert tokenizer.decode(result.rejected_ids) == "Go away<|im_end|>\n"


def test_bos_tokenizer_literal(bos_tokenizer: PreTrainedTokenizerBase) -> None:
    pair = Pair("The capital of France is", " Paris.", " Rome.", conversational=False)
    result = tokenize_one(bos_tokenizer, pair)
    # The bos is part of the prompt only; it is not repeated before the completion.
    assert result == TokenizedPair([4, 278, 374, 327, 892, 280], [900, 18, 0], [916, 18, 0], set())
    assert bos_tokenizer.decode(result.prompt_ids + result.chosen_ids) == (
        "<|bos|>The capital of France is Paris.<|endoftext|>"
    )


def test_plain_fallback_template_literal(plain_tokenizer: PreTrainedTokenizerBase) -> None:
    pair = Pair([system("Be brief."), user("Hi")], [assistant("Hello")], [assistant("Go away")], True)
    result = tokenize_one(plain_tokenizer, pair)
    assert result.chosen_ids == [225, 44, 345, 709, 0]
    assert plain_tokenizer.decode(result.prompt_ids) == "System: Be brief.\n\nUser: Hi\n\nAssistant:"
    assert plain_tokenizer.decode(result.prompt_ids + result.chosen_ids) == (
        "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello<|endoftext|>"
    )
    assert result.notes == set()


def test_configured_template_overrides_the_tokenizers(tokenizer: PreTrainedTokenizerBase) -> None:
    pair = Pair([user("Hi")], [assistant("Hello")], [assistant("Go away")], conversational=True)
    result = tokenize_one(tokenizer, pair, chat_template=PLAIN_CHAT_TEMPLATE)
    assert (
        tokenizer.decode(result.prompt_ids + result.chosen_ids) == "User: Hi\n\nAssistant: Hello<|endoftext|>"
    )


def test_chinese_round_trips(tokenizer: PreTrainedTokenizerBase) -> None:
    prompt, chosen = "请把这段话翻译成英文：", "今天天气很好，我们去公园散步吧。🙂"
    result = tokenize_one(tokenizer, Pair(prompt, chosen, "不知道。", conversational=False))
    assert tokenizer.decode(result.prompt_ids + result.chosen_ids) == prompt + chosen + "<|endoftext|>"
    assert tokenizer.decode(result.prompt_ids + result.rejected_ids) == prompt + "不知道。<|endoftext|>"


def test_empty_rejected_is_just_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    result = tokenize_one(tokenizer, Pair("你好，", "世界！🙂", "", conversational=False))
    assert result.rejected_ids == [tokenizer.eos_token_id] == [0]
    assert result.chosen_ids[-1] == 0


def test_eos_not_doubled(tokenizer: PreTrainedTokenizerBase) -> None:
    result = tokenize_one(tokenizer, Pair(QUESTION.prompt, " 7.<|endoftext|>", " 8.", False))
    assert result.chosen_ids == [379, 18, 0]


def test_mixed_batch_keeps_order_and_matches_single_rows(tokenizer: PreTrainedTokenizerBase) -> None:
    pairs = [
        QUESTION,
        Pair([user("Hi")], [assistant("Hello")], [assistant("Go away")], conversational=True),
        Pair("你好，", "世界！", "", conversational=False),
        Pair([system("Be brief."), user("2+2?")], [assistant("4")], [assistant("5")], conversational=True),
    ]
    batched = PairTokenizer(tokenizer, TokenizeSpec()).tokenize(pairs)
    assert batched == [tokenize_one(tokenizer, pair) for pair in pairs]


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_direct_backend_encoding_equals_the_tokenizer_call(
    tiny_bos_tokenizer_dir: Path, tmp_path: Path, add_special_tokens: bool
) -> None:
    """`_encode` hands all texts but the first to the Rust backend; the ids are the tokenizer
    call's, even when tokenizer.json carries truncation and padding that a call switches off."""
    import json
    import shutil

    shutil.copytree(tiny_bos_tokenizer_dir, tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    config["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}
    config["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": 8,
                         "pad_id": 0, "pad_type_id": 0, "pad_token": "<|endoftext|>"}  # fmt: skip
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    texts = ["Question: What is 3 plus 4?", "你好，世界！", "", "The cat sat down on the mat.", "🙂👍"]
    got = PairTokenizer(tokenizer, TokenizeSpec())._encode(texts, add_special_tokens)
    assert got == tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    assert max(map(len, got)) > 3 and len({len(ids) for ids in got}) > 1  # neither cut nor padded
    assert (got[0][0] == tokenizer.bos_token_id) is add_special_tokens


# --- parity with TRL -------------------------------------------------------------------------------

STANDARD_ROWS = [
    ("Question: What is 3 plus 4?\nAnswer:", " 7.", " 8."),
    ("The capital of France is", " Paris.", " Rome."),
    ("Translate to English: 今天天气很好。\n", "The weather is nice today.", "It rains."),
    ("请把这段话翻译成英文：", "我喜欢读书。", ""),
    ("Write SQL that counts users.\n", "SELECT COUNT(*) FROM users;", "SELECT * FROM users;"),
    ("def add(a, b):\n", "    return a + b", "    return a - b"),
    ("Emoji time: ", "🙂👍🚀", "👎"),
    ("The cat sa", "t down.", "ran away."),
    ("Answer: ", "42", "forty-two"),
    ("Numbers: 1 2 3", " 4 5 6", " 7 8 9"),
    ("", "An empty prompt still works.", "No it does not."),
    ("Say nothing.", "", " Something."),
    ("Already terminated?", " Yes.<|endoftext|>", " No."),
    ("  Leading and trailing spaces  ", "  kept  ", " \n"),
    ("Ünïcödé — “quotes” … ½", " ∑ √", " 한국어"),
    ("A long prompt. " * 12, "A short answer.", "A different short answer."),
    ("Question: Where is Tokyo?\nAnswer:", " Tokyo is in Japan.", " Tokyo is in Peru."),
    ("用户：你好\n助手：", "你好！有什么可以帮你的吗？", "走开。"),
    ("Multi\nline\nprompt\n", "multi\nline\nanswer", "single line"),
    ("<|im_start|>user\nLiteral markers in text<|im_end|>\n", "ok", "no"),
]

CONVERSATIONAL_ROWS = [
    ([user("Hi")], [assistant("Hello")], [assistant("Go away")]),
    ([system("Be brief."), user("What is 2+2?")], [assistant("4")], [assistant("5")]),
    ([user("今天天气怎么样？")], [assistant("今天天气很好。")], [assistant("不知道。")]),
    ([user("Emoji?")], [assistant("🙂👍")], [assistant("")]),
    (
        [user("What is the capital of Italy?"), assistant("Rome."), user("And of Spain?")],
        [assistant("Madrid.")],
        [assistant("Rome again.")],
    ),
    (
        [system("You answer in SQL."), user("Count the orders."), assistant("SELECT 1;"), user("Properly.")],
        [assistant("SELECT COUNT(*) FROM orders;")],
        [assistant("SELECT * FROM orders;")],
    ),
    ([user("Write a function.")], [assistant("def f():\n    return 1")], [assistant("no")]),
    (
        [user("Say something."), assistant("Something."), user("Again.")],
        [assistant("Something.")],
        [assistant("No.")],
    ),
    ([system("系统提示。"), user("你好")], [assistant("你好！")], [assistant("再见。")]),
    ([user("  spaced  ")], [assistant("  spaced answer  ")], [assistant("\n")]),
    ([user("Numbers 1 2 3")], [assistant("4 5 6")], [assistant("7 8 9")]),
    ([user("Long " * 20)], [assistant("Short.")], [assistant("Also short.")]),
    ([user("Ünïcödé?")], [assistant("Ja — “gut” …")], [assistant("Nein")]),
    (
        [user("Two turns?")],
        [assistant("First."), user("More?"), assistant("Second.")],
        [assistant("Only one.")],
    ),
    ([system("Be kind.")] + [user("Hello there")], [assistant("General Kenobi!")], [assistant("Hi.")]),
    ([user("Where is Nairobi?")], [assistant("Nairobi is in Kenya.")], [assistant("In Egypt.")]),
    ([user("Tab\tseparated")], [assistant("a\tb")], [assistant("a b")]),
    ([user("What is 17 plus 25?")], [assistant("17 + 25 = 42.")], [assistant("17 + 25 = 43.")]),
    ([user("Quote: 'single' and \"double\"")], [assistant("'ok'")], [assistant('"ok"')]),
    ([user("End with newline\n")], [assistant("Answer\n")], [assistant("Other\n")]),
]


def trl_ids(rows: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> list[TokenizedPair]:
    from dpo_cluster.data.trl_reference import trl_tokenize

    dataset = trl_tokenize(rows, tokenizer)
    assert len(dataset) == len(rows)  # TRL's keep_start filter dropped nothing
    return [
        TokenizedPair(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])
        for row in dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    ]


def our_ids(pairs: list[Pair], tokenizer: PreTrainedTokenizerBase) -> list[TokenizedPair]:
    results = PairTokenizer(tokenizer, TokenizeSpec(max_length=4096)).tokenize(pairs)
    assert all(isinstance(result, TokenizedPair) for result in results), results
    # TRL has no notes; compare ids only.
    return [TokenizedPair(r.prompt_ids, r.chosen_ids, r.rejected_ids) for r in results]


@pytest.mark.parametrize("variant", ["chatml", "bos", "plain"])
def test_parity_with_trl(variant: str, tokenizer, bos_tokenizer, plain_tokenizer) -> None:
    ours = {"chatml": tokenizer, "bos": bos_tokenizer, "plain": plain_tokenizer}[variant]
    theirs = ours
    if variant == "plain":
        # TRL only uses the tokenizer's own template; give a copy the fallback we pick ourselves.
        theirs = AutoTokenizer.from_pretrained(ours.name_or_path)
        theirs.chat_template = PLAIN_CHAT_TEMPLATE

    for rows, conversational in ((STANDARD_ROWS, False), (CONVERSATIONAL_ROWS, True)):
        pairs = [Pair(p, c, r, conversational) for p, c, r in rows]
        dicts = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows]
        assert our_ids(pairs, ours) == trl_ids(dicts, theirs)


def test_plain_template_prompt_is_a_prefix() -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    for prompt, chosen, rejected in CONVERSATIONAL_ROWS:
        rendered, _ = render_jinja_template(
            conversations=[prompt, prompt + chosen, prompt + rejected],
            chat_template=PLAIN_CHAT_TEMPLATE,
            add_generation_prompt=False,
            eos_token="<eos>",
        )
        (prompt_text,), _ = render_jinja_template(
            conversations=[prompt],
            chat_template=PLAIN_CHAT_TEMPLATE,
            add_generation_prompt=True,
            eos_token="<eos>",
        )
        assert prompt_text.endswith("Assistant:")
        assert rendered[1].startswith(prompt_text) and rendered[2].startswith(prompt_text)


# --- boundary merge --------------------------------------------------------------------------------


def test_boundary_merge(tokenizer: PreTrainedTokenizerBase) -> None:
    pair = Pair("The cat sa", "t down.", "ran away.", conversational=False)
    result = tokenize_one(tokenizer, pair)
    assert result.notes == {"boundary_merge"}
    # " sa" merged into " sat": the prompt keeps only "The cat", the completion starts at " sat".
    assert tokenizer("The cat sa")["input_ids"][:2] == result.prompt_ids == [278, 542]
    assert len(tokenizer("The cat sa")["input_ids"]) > 2
    assert result.prompt_ids + result.chosen_ids == tokenizer("The cat sat down.<|endoftext|>")["input_ids"]
    assert (
        result.prompt_ids + result.rejected_ids == tokenizer("The cat saran away.<|endoftext|>")["input_ids"]
    )
    assert tokenizer.decode(result.chosen_ids) == " sat down.<|endoftext|>"


# --- truncation ------------------------------------------------------------------------------------


def test_prompt_truncation_keep_end_and_keep_start(tokenizer: PreTrainedTokenizerBase) -> None:
    # 11 prompt tokens, max_length 8: the prompt budget is 7 and one completion token fits.
    keep_end = tokenize_one(tokenizer, QUESTION, max_length=8, prompt_overflow="truncate")
    assert keep_end == TokenizedPair(
        [308, 347, 296, 35, 203, 313, 30], [379], [518], {"truncated_prompt", "truncated_completion"}
    )
    assert tokenizer.decode(keep_end.prompt_ids) == " 3 plus 4?\nAnswer:"

    keep_start = tokenize_one(
        tokenizer, QUESTION, max_length=8, prompt_overflow="truncate", truncation_mode="keep_start"
    )
    assert keep_start == TokenizedPair(
        [314, 30, 318, 280, 308, 347, 296], [379], [518], {"truncated_prompt", "truncated_completion"}
    )
    assert tokenizer.decode(keep_start.prompt_ids) == "Question: What is 3 plus 4"


def test_prompt_overflow_drop(tokenizer: PreTrainedTokenizerBase) -> None:
    result = tokenize_one(tokenizer, QUESTION, max_length=8)
    assert isinstance(result, DropRow) and result.reason == "prompt_too_long"
    assert "11 tokens" in result.detail and "budget of 7" in result.detail


def test_max_prompt_length(tokenizer: PreTrainedTokenizerBase) -> None:
    truncated = tokenize_one(
        tokenizer, QUESTION, max_length=20, max_prompt_length=5, prompt_overflow="truncate"
    )
    assert truncated == TokenizedPair(
        [296, 35, 203, 313, 30], [379, 18, 0], [518, 18, 0], {"truncated_prompt"}
    )

    dropped = tokenize_one(tokenizer, QUESTION, max_length=20, max_prompt_length=5)
    assert isinstance(dropped, DropRow) and dropped.reason == "prompt_too_long"

    # Exactly at both limits: nothing is cut.
    exact = tokenize_one(tokenizer, QUESTION, max_length=14, max_prompt_length=11)
    assert exact == TokenizedPair(QUESTION_PROMPT_IDS, [379, 18, 0], [518, 18, 0], set())


def test_completion_truncation_keeps_start(tokenizer: PreTrainedTokenizerBase) -> None:
    result = tokenize_one(tokenizer, QUESTION, max_length=13)
    assert result == TokenizedPair(QUESTION_PROMPT_IDS, [379, 18], [518, 18], {"truncated_completion"})


def test_prompt_never_fills_max_length(tokenizer: PreTrainedTokenizerBase) -> None:
    # The 11-token prompt would fill max_length=11 and leave no completion token.
    dropped = tokenize_one(tokenizer, QUESTION, max_length=11)
    assert isinstance(dropped, DropRow) and dropped.reason == "prompt_too_long"

    truncated = tokenize_one(tokenizer, QUESTION, max_length=11, prompt_overflow="truncate")
    assert truncated.prompt_ids == QUESTION_PROMPT_IDS[1:]
    assert truncated.chosen_ids == [379] and truncated.rejected_ids == [518]

    # A max_prompt_length above max_length is held to max_length - 1 as well.
    clamped = tokenize_one(tokenizer, QUESTION, max_length=12, max_prompt_length=50)
    assert clamped == TokenizedPair(QUESTION_PROMPT_IDS, [379], [518], {"truncated_completion"})
    assert TokenizeSpec(max_length=12, max_prompt_length=50).prompt_budget == 11


def test_identical_after_truncation(tokenizer: PreTrainedTokenizerBase) -> None:
    # " The answer is 7." and " The answer is 8." share their first 3 tokens.
    pair = Pair("Q:", " The answer is 7.", " The answer is 8.", conversational=False)
    kept = tokenize_one(tokenizer, pair, max_length=6)
    assert kept == TokenizedPair(
        [53, 30], [520, 534, 280, 379], [520, 534, 280, 518], {"truncated_completion"}
    )

    dropped = tokenize_one(tokenizer, pair, max_length=5)
    assert isinstance(dropped, DropRow) and dropped.reason == "identical_after_truncation"


# --- template errors -------------------------------------------------------------------------------

STRICT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ raise_exception('system messages are not supported') }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_template_error_drops_only_its_row(tokenizer: PreTrainedTokenizerBase) -> None:
    good = Pair([user("Hi")], [assistant("Hello")], [assistant("Go away")], conversational=True)
    bad = Pair(
        [system("Be brief."), user("Hi")], [assistant("Hello")], [assistant("No")], conversational=True
    )
    results = PairTokenizer(tokenizer, TokenizeSpec(chat_template=STRICT_TEMPLATE)).tokenize(
        [good, bad, QUESTION, good]
    )
    assert isinstance(results[1], DropRow) and results[1].reason == "template_error"
    assert "system messages are not supported" in results[1].detail
    # The strict template renders ChatML like the tokenizer's own, so the good rows are unchanged.
    expected = PairTokenizer(tokenizer, TokenizeSpec()).tokenize([good, QUESTION, good])
    assert [results[0], results[2], results[3]] == expected


def test_non_string_content_is_a_template_error(tokenizer: PreTrainedTokenizerBase) -> None:
    pair = Pair(
        [user("Hi")], [{"role": "assistant", "content": None}], [assistant("No")], conversational=True
    )
    result = tokenize_one(tokenizer, pair)
    assert isinstance(result, DropRow) and result.reason == "template_error"


# --- spec and template loading ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_length": 1}, "max_length"),
        ({"max_length": 0}, "max_length"),
        ({"max_length": "1024"}, "max_length"),
        ({"max_prompt_length": 0}, "max_prompt_length"),
        ({"truncation_mode": "left"}, "truncation_mode"),
        ({"prompt_overflow": "skip"}, "prompt_overflow"),
        ({"chat_template": "  "}, "chat_template"),
    ],
)
def test_spec_validation(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TokenizeSpec(**kwargs)


def test_load_chat_template(tmp_path: Path) -> None:
    assert load_chat_template(None) is None
    assert load_chat_template(STRICT_TEMPLATE) == STRICT_TEMPLATE
    path = tmp_path / "strict.jinja"
    path.write_text(STRICT_TEMPLATE, encoding="utf-8")
    assert load_chat_template(str(path)) == STRICT_TEMPLATE
    missing = tmp_path / "missing.j2"
    with pytest.raises(FileNotFoundError, match="missing.j2"):
        load_chat_template(str(missing))
    # Text that is neither jinja nor an existing file stays inline, even when too long for a path.
    assert load_chat_template("x" * 5000) == "x" * 5000
    assert "Assistant:" in PLAIN_CHAT_TEMPLATE


def test_chat_template_override_prefers_config_then_tokenizer_then_plain(
    tiny_tokenizer_dir: Path, tiny_plain_tokenizer_dir: Path
) -> None:
    """Training and serving render chats by this one rule, so a served model sees its training
    format: a configured template, else the tokenizer's own (None lets transformers pick it),
    else the plain fallback."""
    chatml = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    plain = AutoTokenizer.from_pretrained(tiny_plain_tokenizer_dir)
    assert chat_template_override(chatml, "{{ 'x' }}") == "{{ 'x' }}"
    assert chat_template_override(plain, "{{ 'x' }}") == "{{ 'x' }}"
    assert chat_template_override(chatml, None) is None
    assert chat_template_override(plain, None) == PLAIN_CHAT_TEMPLATE
