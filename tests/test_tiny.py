"""The tiny tokenizers: deterministic, fast, exact round trips, bos and chat template as asked."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dpo_cluster.tiny import BOS_TOKEN, CHATML_TEMPLATE, build_tiny_tokenizer


def test_rebuild_is_byte_identical(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    start = time.perf_counter()
    rebuilt = build_tiny_tokenizer(tmp_path / "again")
    # Generous bound: a build takes well under a tenth of a second.
    assert time.perf_counter() - start < 3.0
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (rebuilt / name).read_bytes() == (tiny_tokenizer_dir / name).read_bytes(), name


def test_variants_share_vocabulary_and_special_ids(
    tiny_tokenizer_dir: Path, tiny_bos_tokenizer_dir: Path, tiny_plain_tokenizer_dir: Path
) -> None:
    tokenizers = [
        AutoTokenizer.from_pretrained(d)
        for d in (tiny_tokenizer_dir, tiny_bos_tokenizer_dir, tiny_plain_tokenizer_dir)
    ]
    for tokenizer in tokenizers:
        assert len(tokenizer) == 1024
        assert tokenizer.get_vocab() == tokenizers[0].get_vocab()
        assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|endoftext|>", 0)
        assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|pad|>", 1)
        assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", BOS_TOKEN]) == [2, 3, 4]


@pytest.mark.parametrize(
    "text",
    [
        "今天天气很好，我们去公园散步吧。",
        "Emoji 🙂👍🚀 and rare ones 🦩🪐, mixed with 中文 and ascii.",
        "  leading spaces, tabs\tand\nnewlines\n\n  ",
        "Ünïcödé ñ ß ø — “quotes” … ½ ∑ √ 한국어 العربية",
    ],
)
def test_unicode_round_trips_exactly(tiny_tokenizer_dir: Path, text: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_bos_added_only_by_bos_variant(tiny_tokenizer_dir: Path, tiny_bos_tokenizer_dir: Path) -> None:
    plain = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    with_bos = AutoTokenizer.from_pretrained(tiny_bos_tokenizer_dir)
    text = "The cat sat down."
    ids = plain(text)["input_ids"]
    assert plain.bos_token is None
    assert with_bos.bos_token == BOS_TOKEN
    assert with_bos(text)["input_ids"] == [4, *ids]
    assert with_bos(text, add_special_tokens=False)["input_ids"] == ids
    assert with_bos.decode(with_bos(text)["input_ids"]) == BOS_TOKEN + text


def test_chat_template_renders_chatml(tiny_tokenizer_dir: Path, tiny_plain_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    # The markers are single special tokens, never split into bytes.
    ids = tokenizer.apply_chat_template(messages[1:2], tokenize=True, return_dict=False)
    assert ids[0] == 2 and ids.count(3) == 1

    assert AutoTokenizer.from_pretrained(tiny_plain_tokenizer_dir).chat_template is None


def test_vocab_size_too_small(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer(tmp_path, vocab_size=100)
