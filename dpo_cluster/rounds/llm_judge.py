"""The pairwise LLM judge: a model behind any OpenAI-compatible `/chat/completions` (the project's
own serve app included) is asked which of two answers is better, in both orders.

Asking both orders cancels the position bias judges are known for: a pair is decided only when
both replies pick the same answer. Replies that disagree, or that name neither A nor B, are ties,
and each reply is kept in the comparison's detail for the round's report.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dpo_cluster.config.rounds import RoundsConfig
from dpo_cluster.evaluation.judges import Prompt
from dpo_cluster.rounds.comparisons import JUDGE_NAMED_NEITHER, ORDERS_DISAGREE, Comparison
from dpo_cluster.rounds.http_json import api_key, request_json

_LETTER = re.compile(r"\b([AB])\b")


def read_choice(reply: str) -> str | None:
    """ "A" or "B": the first standalone capital A or B in the judge's reply; None when it names
    neither (an empty reply, "Both are fine", "a")."""
    match = _LETTER.search(reply)
    return match.group(1) if match else None


def prompt_text(prompt: Prompt) -> str:
    """A prompt as the judge reads it: the text itself, or a chat as "role: content" lines (a
    single user message is its content alone)."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def decide(first_shown_first: str | None, first_shown_second: str | None) -> tuple[str | None, str | None]:
    """("first" | "second" | None, tie reason) from the two orders' choices: order 1 shows the
    first candidate as A, order 2 shows it as B."""
    if first_shown_first is None or first_shown_second is None:
        return None, JUDGE_NAMED_NEITHER
    order_1 = "first" if first_shown_first == "A" else "second"
    order_2 = "first" if first_shown_second == "B" else "second"
    if order_1 != order_2:
        return None, ORDERS_DISAGREE
    return order_1, None


class LLMJudge:
    """Asks `rounds.judge_model` at `rounds.judge_url` through its chat completions route."""

    def __init__(self, settings: RoundsConfig) -> None:
        assert settings.judge_url and settings.judge_model  # RoundsConfig.check
        self.settings = settings
        self.url = settings.judge_url.rstrip("/") + "/chat/completions"
        self.key = api_key(settings.api_key_env)

    def ask(self, prompt: Prompt, answer_a: str, answer_b: str) -> str:
        """The judge's reply (greedy) to one question: which of answer_a, answer_b is better."""
        s = self.settings
        question = s.judge_prompt_template().format(
            prompt=prompt_text(prompt), answer_a=answer_a, answer_b=answer_b
        )
        body = {
            "model": s.judge_model,
            "messages": [{"role": "user", "content": question}],
            "temperature": 0,
            "max_tokens": s.judge_max_tokens,
        }
        answer = request_json("POST", self.url, body, key=self.key, timeout_s=s.request_timeout_s)
        try:
            return str(answer["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"POST {self.url}: not a chat completion: {str(answer)[:200]}") from None

    def compare(
        self,
        pairs: Sequence[tuple[int, int, int]],
        prompts: Sequence[Prompt],
        texts: dict[tuple[int, int], str],
    ) -> list[Comparison]:
        """Every (prompt_index, first, second) pair judged in both orders, rounds.judge_concurrency
        questions in flight."""

        def questions(pair: tuple[int, int, int]) -> list[tuple[Prompt, str, str]]:
            index, first, second = pair
            a, b = texts[(index, first)], texts[(index, second)]
            return [(prompts[index], a, b), (prompts[index], b, a)]

        from tqdm import tqdm

        asked = [q for pair in pairs for q in questions(pair)]
        with ThreadPoolExecutor(self.settings.judge_concurrency) as pool:
            answers = pool.map(lambda q: self.ask(*q), asked)
            replies = list(
                tqdm(answers, total=len(asked), desc="asking the judge", unit="question", file=sys.stderr)
            )
        decided = []
        for k, (index, first, second) in enumerate(pairs):
            reply_1, reply_2 = replies[2 * k], replies[2 * k + 1]
            side, reason = decide(read_choice(reply_1), read_choice(reply_2))
            winner = {"first": first, "second": second}.get(side or "")
            detail: dict[str, Any] = {"replies": [reply_1, reply_2]}
            decided.append(Comparison(index, first, second, winner, reason, detail))
        return decided
