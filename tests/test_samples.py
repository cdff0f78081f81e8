"""The bundled sample data carries the preference it claims: chosen titles are 30-75 characters,
rejected ones are not; generation is deterministic and the shipped file is what the generator makes."""

from __future__ import annotations

import json

from dpo_cluster.data.samples import SAMPLE_FILE, SAMPLE_ROWS, generate_title_pairs, is_good_title


def test_chosen_titles_are_good_and_rejected_are_not() -> None:
    for conversational in (True, False):
        for row in generate_title_pairs(500, seed=3, conversational=conversational):
            chosen, rejected = row["chosen"], row["rejected"]
            if conversational:
                chosen, rejected = chosen[0]["content"], rejected[0]["content"]
            assert is_good_title(chosen), chosen
            assert not is_good_title(rejected), rejected


def test_shipped_sample_is_the_generated_one() -> None:
    shipped = [json.loads(line) for line in SAMPLE_FILE.read_text(encoding="utf-8").splitlines()]
    assert shipped == generate_title_pairs(SAMPLE_ROWS, seed=0)
    assert generate_title_pairs(20, seed=1) == generate_title_pairs(20, seed=1)


def test_a_plain_title_is_a_good_title_not_wrapped_in_quotes() -> None:
    from dpo_cluster.data.samples import is_plain_title

    title = "A Beginner's Guide to Knitting a Sweater"  # 40 characters
    assert is_good_title(title) and is_plain_title(title)
    for quoted in (f'"{title}"', f"“{title}”", f"'{title}'"):
        assert is_good_title(quoted) and not is_plain_title(quoted)
    assert is_plain_title(f'The "{title[:20]}" Video')  # quotes inside are fine
    assert not is_plain_title("Short")  # still 30-75 characters
