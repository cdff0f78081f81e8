"""The reference pre-pass: score every prepared pair (or reuse the cache) before the workers start.

    prepared/{train,eval} -> one union, materialized -> actor pool, materialized
      -> cache on: Parquet under output_dir/reference_logps/<key>/, read back; off: in memory
      -> per split, a materialized Ray Dataset in the prepared row order (the trainer's datasets)

Read, score and write run as three executions one after another: in one streaming execution the
read and write tasks would wait for CPUs the actors hold, and a pool that takes every CPU of the
cluster would never receive its first batch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_cluster.config import Config
from dpo_cluster.data.pipeline import PreparedData
from dpo_cluster.reference.cache import (
    ROWS_PER_BLOCK,
    in_prepared_order,
    plan_cache,
    write_cache,
    write_report,
)
from dpo_cluster.reference.scorer import (
    build_reference_spec,
    build_scored_dataset,
    preserve_order,
    select_split,
)

logger = logging.getLogger(__name__)


@dataclass
class ReferenceLogps:
    """The pre-pass's result.

    datasets: split -> materialized Ray Dataset of the prepared rows (same order, same row ids)
        plus ref_chosen_logps / ref_rejected_logps; ready for `ray.train` `datasets=`.
    report: what `reference_report.json` holds (cache key, rows, seconds, reused).
    cache_dir: output_dir/reference_logps/<key>, or None when reference.cache is false.
    """

    datasets: dict[str, Any]
    report: dict[str, Any]
    cache_dir: Path | None

    def split_dir(self, split: str) -> Path | None:
        """The cached Parquet of `split` (prepared columns + reference columns), for
        `dpo_cluster.train.local.run_local`; None without a cache or for an empty split."""
        if self.cache_dir is None:
            return None
        path = self.cache_dir / split
        return path if path.is_dir() and any(path.glob("*.parquet")) else None


def compute_reference_logps(config: Config, prepared: PreparedData) -> ReferenceLogps:
    """Score every prepared pair with the reference (or reuse the cache); write
    output_dir/reference_report.json; return the per-split datasets for training.

    Needs Ray (`prepare` has joined or started it). Raises RuntimeError when the stage returns a
    different number of rows than it was given.
    """
    import ray.data

    plan = plan_cache(config, prepared)
    counts, final = plan.counts, plan.final
    total = sum(counts.values())
    started = time.perf_counter()

    with preserve_order():
        if plan.reusable:
            logger.info("reference log-probs: reusing %s (cache key %s, %d pairs)", final, plan.key, total)
            # In the order of the prepared splits as they are now: a later prepare with the same
            # key holds the same rows, not necessarily in the order the cache was scored in.
            tables = {
                split: in_prepared_order(prepared, split, ray.data.read_parquet(str(final / split)))
                for split in counts
            }
        else:
            logger.info("reference log-probs: scoring %d pairs (%s)", total, plan.problem)
            scored = build_scored_dataset(config, prepared, build_reference_spec(config)).materialize()
            tables = {
                split: in_prepared_order(prepared, split, ds)
                for split, ds in _split_in_memory(scored, counts).items()
            }
            if config.reference.cache:
                write_cache(tables, plan)
        datasets = {split: ray.data.from_arrow(table).materialize() for split, table in tables.items()}

    report = write_report(config, plan, seconds=time.perf_counter() - started, overlapped=False)
    return ReferenceLogps(datasets, report, final if config.reference.cache else None)


def _split_in_memory(everything: Any, counts: dict[str, int]) -> dict[str, Any]:
    """The materialized stage (all splits) -> one materialized dataset per split, rows in order;
    batches of ROWS_PER_BLOCK rows merge the stage's small blocks into fewer, larger ones."""
    datasets = {
        split: everything.map_batches(
            select_split, batch_size=ROWS_PER_BLOCK, batch_format="pyarrow", fn_kwargs={"split": split}
        ).materialize()
        for split in counts
    }
    got = {split: ds.count() for split, ds in datasets.items()}
    if got != counts:
        raise RuntimeError(f"reference stage returned {got} rows per split for the {counts} it was given")
    return datasets
