"""People as the round's judge: every pair of candidates is posted to the serve app's arena queue
(`POST /v1/arena/queue`) as a blind battle, and the round waits for the votes until
rounds.arena_deadline_s. A pair nobody voted on by then is a tie, and so are "tie" and "both bad".

The battle ids are written to a file before any wait, so a round interrupted while waiting
resumes by waiting on the same battles instead of posting them again.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dpo_cluster.config.rounds import RoundsConfig
from dpo_cluster.evaluation.judges import Prompt
from dpo_cluster.rounds.comparisons import NO_VOTE_BY_DEADLINE, VOTED_BOTH_BAD, VOTED_TIE, Comparison
from dpo_cluster.rounds.http_json import api_key, request_json
from dpo_cluster.serving.arena_battles import QUEUED_PREFIX

POLL_S = 1.0
_TIES = {"tie": VOTED_TIE, "both_bad": VOTED_BOTH_BAD}


def candidate_label(prompt_index: int, sample: int) -> str:
    return f"prompt-{prompt_index}/sample-{sample}"


class ArenaJudge:
    """Posts a round's pairs to the arena at rounds.arena_url and collects the votes."""

    def __init__(self, settings: RoundsConfig, battles_file: Path) -> None:
        assert settings.arena_url  # RoundsConfig.check
        self.settings = settings
        self.base = settings.arena_url.rstrip("/")
        self.key = api_key(settings.api_key_env)
        self.battles_file = battles_file

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return request_json(
            method, self.base + path, body, key=self.key, timeout_s=self.settings.request_timeout_s
        )

    def post(
        self,
        pairs: Sequence[tuple[int, int, int]],
        prompts: Sequence[Prompt],
        texts: dict[tuple[int, int], str],
    ) -> list[str]:
        """The battle id of every pair, posting them unless `battles_file` already lists them."""
        if self.battles_file.exists():
            saved = json.loads(self.battles_file.read_text())
            if saved["pairs"] == [list(p) for p in pairs]:
                return list(saved["battle_ids"])
        ids = []
        for index, first, second in pairs:
            prompt = prompts[index]
            body: dict[str, Any] = {"prompt": prompt} if isinstance(prompt, str) else {"messages": prompt}
            body["answers"] = {
                candidate_label(index, first): texts[(index, first)],
                candidate_label(index, second): texts[(index, second)],
            }
            ids.append(self._call("POST", "/v1/arena/queue", body)["battle_id"])
        tmp = self.battles_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pairs": [list(p) for p in pairs], "battle_ids": ids}))
        tmp.replace(self.battles_file)
        return ids

    def compare(
        self,
        pairs: Sequence[tuple[int, int, int]],
        prompts: Sequence[Prompt],
        texts: dict[tuple[int, int], str],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> list[Comparison]:
        """Post the pairs (once), then wait until each has a vote or the deadline passes."""
        from tqdm import tqdm

        ids = self.post(pairs, prompts, texts)
        deadline = clock() + self.settings.arena_deadline_s
        states: dict[str, dict[str, Any]] = {}
        with tqdm(total=len(ids), desc=f"votes at {self.base}/arena", unit="vote", file=sys.stderr) as bar:
            while True:
                for battle_id in ids:
                    if battle_id not in states:
                        state = self._call("GET", f"/v1/arena/battles/{battle_id}")
                        if state["voted"]:
                            states[battle_id] = state
                            bar.update(1)
                if len(states) == len(ids) or clock() >= deadline:
                    break
                time.sleep(POLL_S)
        return [self._decide(pair, battle_id, states.get(battle_id)) for pair, battle_id in zip(pairs, ids)]

    @staticmethod
    def _decide(pair: tuple[int, int, int], battle_id: str, state: dict[str, Any] | None) -> Comparison:
        index, first, second = pair
        if state is None:
            return Comparison(index, first, second, None, NO_VOTE_BY_DEADLINE, {"battle_id": battle_id})
        detail = {"battle_id": battle_id, "vote": state["winner"]}
        if state["winner"] in _TIES:
            return Comparison(index, first, second, None, _TIES[state["winner"]], detail)
        winner_label = state["models"][state["winner"]].removeprefix(QUEUED_PREFIX)
        winner = first if winner_label == candidate_label(index, first) else second
        return Comparison(index, first, second, winner, None, detail)
