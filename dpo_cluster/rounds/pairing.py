"""From a round's candidates and the judge's comparisons to the next round's preference pairs, with
every candidate, prompt and comparison accounted for in the round's report.

Report (each line adds up; `check_accounting` verifies it):
    candidates: sampled == kept + sum(dropped)        dropped: empty_answer, duplicate_answer
    prompts:    in == with_pair + sum(dropped)        dropped: prompt_refused, fewer_than_two_candidates,
                                                               no_decisive_pair
    comparisons: judged == decisive + sum(ties)       ties: by the judge's reason
    pairs: written == decisive (pairing all) or == prompts.with_pair (best_vs_worst)
best_vs_worst ranks a prompt's candidates by wins minus losses over all its comparisons (for a
rule or a reward model that is the score order) and pairs the first against the last, when their
records differ.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from dpo_cluster.evaluation.judges import Prompt
from dpo_cluster.rounds.candidates import Candidate
from dpo_cluster.rounds.comparisons import Comparison

EMPTY_ANSWER = "empty_answer"
DUPLICATE_ANSWER = "duplicate_answer"
PROMPT_REFUSED = "prompt_refused"
FEWER_THAN_TWO = "fewer_than_two_candidates"
NO_DECISIVE_PAIR = "no_decisive_pair"


def keep_candidates(candidates: Sequence[Candidate]) -> tuple[dict[int, list[int]], dict[str, Any]]:
    """({prompt_index: kept sample indices}, the candidates' report): an empty (or whitespace)
    answer is dropped, and so is an answer equal, once stripped, to an earlier kept one of its
    prompt (a pair of equal texts teaches nothing)."""
    kept: dict[int, list[int]] = defaultdict(list)
    seen: dict[int, set[str]] = defaultdict(set)
    dropped: Counter[str] = Counter()
    for c in candidates:
        text = c.text.strip()
        if not text:
            dropped[EMPTY_ANSWER] += 1
        elif text in seen[c.prompt_index]:
            dropped[DUPLICATE_ANSWER] += 1
        else:
            seen[c.prompt_index].add(text)
            kept[c.prompt_index].append(c.sample)
    report = {"sampled": len(candidates), "kept": sum(map(len, kept.values())), "dropped": dict(dropped)}
    return dict(kept), report


def build_pairs(
    prompts: Sequence[Prompt],
    refused: Sequence[int],
    kept: dict[int, list[int]],
    texts: dict[tuple[int, int], str],
    comparisons: Sequence[Comparison],
    pairing: str,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(preference rows in the pipeline's formats, the prompts/comparisons/pairs report)."""
    by_prompt: dict[int, list[Comparison]] = defaultdict(list)
    for c in comparisons:
        by_prompt[c.prompt_index].append(c)
    rows: list[dict[str, Any]] = []
    prompts_dropped: Counter[str] = Counter({PROMPT_REFUSED: len(refused)} if refused else {})
    refused_set = set(refused)
    for index, prompt in enumerate(prompts):
        if index in refused_set:
            continue
        if len(kept.get(index, [])) < 2:
            prompts_dropped[FEWER_THAN_TWO] += 1
            continue
        decisive = [c for c in by_prompt[index] if c.winner is not None]
        if not decisive:
            prompts_dropped[NO_DECISIVE_PAIR] += 1
            continue
        if pairing == "all":
            chosen_rejected = [(c.winner, c.second if c.winner == c.first else c.first) for c in decisive]
        else:
            best_worst = _best_vs_worst(kept[index], by_prompt[index])
            if best_worst is None:
                prompts_dropped[NO_DECISIVE_PAIR] += 1
                continue
            chosen_rejected = [best_worst]
        rows += [_row(prompt, texts[(index, w)], texts[(index, lo)]) for w, lo in chosen_rejected]
    ties = Counter(c.tie_reason for c in comparisons if c.winner is None)
    report = {
        "prompts": {
            "in": len(prompts),
            "with_pair": len(prompts) - sum(prompts_dropped.values()),
            "dropped": dict(prompts_dropped),
        },
        "comparisons": {
            "judged": len(comparisons),
            "decisive": sum(1 for c in comparisons if c.winner is not None),
            "ties": {str(k): v for k, v in ties.items()},
        },
        "pairs": {"written": len(rows), "pairing": pairing},
    }
    return rows, report


def _best_vs_worst(samples: list[int], comparisons: list[Comparison]) -> tuple[int, int] | None:
    """(best, worst) by wins minus losses, lower sample index first among equals; None when all
    records are equal."""
    record = dict.fromkeys(samples, 0)
    for c in comparisons:
        if c.winner is not None:
            loser = c.second if c.winner == c.first else c.first
            record[c.winner] += 1
            record[loser] -= 1
    best = max(samples, key=lambda s: (record[s], -s))
    worst = min(samples, key=lambda s: (record[s], -s))
    return None if record[best] == record[worst] else (best, worst)


def _row(prompt: Prompt, chosen: str, rejected: str) -> dict[str, Any]:
    if isinstance(prompt, str):
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def check_accounting(report: dict[str, Any]) -> None:
    """Raise AssertionError naming the line of a round's report that does not add up."""
    cand, prompts, comps, pairs = (report[k] for k in ("candidates", "prompts", "comparisons", "pairs"))
    problems = []
    if cand["sampled"] != cand["kept"] + sum(cand["dropped"].values()):
        problems.append(f"candidates: {cand}")
    if prompts["in"] != prompts["with_pair"] + sum(prompts["dropped"].values()):
        problems.append(f"prompts: {prompts}")
    if comps["judged"] != comps["decisive"] + sum(comps["ties"].values()):
        problems.append(f"comparisons: {comps}")
    expected = comps["decisive"] if pairs["pairing"] == "all" else prompts["with_pair"]
    if pairs["written"] != expected:
        problems.append(f"pairs: {pairs} (expected {expected})")
    if problems:
        raise AssertionError("the round's report does not add up: " + "; ".join(problems))
