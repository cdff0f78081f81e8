"""Held-out reward accuracy: does the tuned model's implicit reward prefer the chosen answers?

DPO's reward is r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023, eq. 5); a
pair is right when r(chosen) > r(rejected), TRL's `rewards/accuracies`. The log-probs come from
training's own collator and per-sequence code, so the figure matches training's eval metrics.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dpo_cluster import stats
from dpo_cluster.batch.collate import ID_COLUMNS, collate_pairs
from dpo_cluster.batch.logps import MicroBatch
from dpo_cluster.losses import compute_rewards


def _natural_key(row_id: str) -> tuple[Any, ...]:
    """Source order for row ids: "a.jsonl:10" after "a.jsonl:9", "rows[10]" after "rows[9]"."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", row_id))


def read_eval_pairs(split_dir: str | Path, max_pairs: int | None = None) -> dict[str, list[Any]]:
    """The tokenized pairs of a prepared split directory (Parquet written by
    `dpo_cluster.data.pipeline.prepare`), in source order, the first `max_pairs` of them.

    Returns columns row_id (str), prompt_ids, chosen_ids, rejected_ids (lists of ints), one entry
    per pair. Unpaired rows (KTO data: one side empty, `dpo_cluster.batch.unpaired`) are no pairs
    and are left out.
    """
    files = sorted(Path(split_dir).glob("*.parquet"))
    columns = ["row_id", *ID_COLUMNS]
    if not files:
        return {name: [] for name in columns}
    table = pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
    rows = [r for r in table.to_pylist() if r["chosen_ids"] and r["rejected_ids"]]
    rows = sorted(rows, key=lambda r: _natural_key(r["row_id"]))
    if max_pairs is not None:
        rows = rows[:max_pairs]
    return {name: [r[name] for r in rows] for name in columns}


def compute_pair_logps(
    policy_logps: Callable[[MicroBatch], torch.Tensor],
    reference_logps: Callable[[MicroBatch], torch.Tensor],
    pairs: Mapping[str, Sequence[Any]],
    *,
    pad_token_id: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Summed completion log-probs of N pairs under policy and reference.

    pairs: columns prompt_ids, chosen_ids, rejected_ids (N sequences each). Each batch of
    `batch_size` pairs is collated as in training (`collate_pairs`: (2b, T), chosen rows first) and
    both scorers (`EvalModels.policy_logps` / `reference_logps`: batch -> (2b,) summed log-probs,
    training's `batch.logps.sequence_logps`) score it. Returns policy_chosen_logps,
    policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, each (N,) float64 on the CPU.
    `progress(b)` is called after each batch of b pairs.
    """
    n = len(pairs["prompt_ids"])
    parts: dict[str, list[torch.Tensor]] = {
        "policy_chosen_logps": [],
        "policy_rejected_logps": [],
        "ref_chosen_logps": [],
        "ref_rejected_logps": [],
    }
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            columns = {name: list(pairs[name][start : start + batch_size]) for name in ID_COLUMNS}
            batch = collate_pairs(columns, pad_token_id).to(device)
            b = batch.num_pairs
            policy = policy_logps(batch)  # (2b,)
            ref = reference_logps(batch)
            parts["policy_chosen_logps"].append(policy[:b].double().cpu())
            parts["policy_rejected_logps"].append(policy[b:].double().cpu())
            parts["ref_chosen_logps"].append(ref[:b].double().cpu())
            parts["ref_rejected_logps"].append(ref[b:].double().cpu())
            if progress is not None:
                progress(b)
    empty = torch.zeros(0, dtype=torch.float64)
    return {name: torch.cat(values) if values else empty for name, values in parts.items()}


def summarize_rewards(logps: Mapping[str, torch.Tensor], beta: float) -> dict[str, Any]:
    """TRL-named reward metrics of N pairs from their log-probs (each (N,)), as JSON-able values.

    rewards/chosen, rewards/rejected: means of beta * (policy - ref) log-probs; rewards/margins:
    mean of chosen minus rejected reward; rewards/accuracies: the fraction of pairs whose chosen
    reward is strictly higher (a tie is not right, as in TRL) as a `stats.rate_with_ci` dict
    ({"successes", "n", "rate", "ci_low", "ci_high", "method"}); logps/chosen, logps/rejected: mean policy log-probs; pairs: N.
    Means are None when N == 0.
    """
    chosen = compute_rewards(logps["policy_chosen_logps"], logps["ref_chosen_logps"], beta)
    rejected = compute_rewards(logps["policy_rejected_logps"], logps["ref_rejected_logps"], beta)
    n = int(chosen.numel())
    correct = int((chosen > rejected).sum().item())

    def mean(values: torch.Tensor) -> float | None:
        return float(values.mean().item()) if n else None

    return {
        "pairs": n,
        "beta": beta,
        "rewards/accuracies": stats.rate_with_ci(correct, n),
        "rewards/margins": mean(chosen - rejected),
        "rewards/chosen": mean(chosen),
        "rewards/rejected": mean(rejected),
        "logps/chosen": mean(logps["policy_chosen_logps"]),
        "logps/rejected": mean(logps["policy_rejected_logps"]),
    }


def compute_reward_accuracy(
    policy_logps: Callable[[MicroBatch], torch.Tensor],
    reference_logps: Callable[[MicroBatch], torch.Tensor],
    pairs: Mapping[str, Sequence[Any]],
    *,
    beta: float,
    pad_token_id: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """`compute_pair_logps` then `summarize_rewards`: the reward-accuracy section of a report."""
    logps = compute_pair_logps(
        policy_logps,
        reference_logps,
        pairs,
        pad_token_id=pad_token_id,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    return summarize_rewards(logps, beta)
