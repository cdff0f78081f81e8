"""The cache of scored pairs, output_dir/reference_logps/<key>/<split>/part-00000.parquet.

The key (`compute_reference_key`) covers the prepared data's own key, the reference's identity
(name or path, revision, a hash of local weight files), 4-bit loading, dtype, attention kernel and
how a log-prob is formed. The loss type, beta and label smoothing are left out: they act on these
values and never change them, so a sweep over them reuses one pass. A cache is written to a
staging directory, checked, sealed with its manifest and renamed into place, so a killed run never
leaves one that is trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dpo_cluster import __version__
from dpo_cluster.batch.collate import REF_COLUMNS
from dpo_cluster.config import Config
from dpo_cluster.data.pipeline import MANIFEST_FILE, SPLITS, PreparedData
from dpo_cluster.modeling import resolve_name_or_path
from dpo_cluster.paths import install_directory

logger = logging.getLogger(__name__)

REFERENCE_DIR = "reference_logps"
REPORT_FILE = "reference_report.json"
# How each stored value is formed; part of the cache key, so a change here never reuses old values.
LOGPS_FORM = "sum of completion-token log-probs: dpo_cluster.batch.logps.sequence_logps on collate_pairs"
# Files whose bytes define a local model's outputs (weights, architecture, adapter).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_WEIGHT_NAMES = ("config.json", "adapter_config.json")
# Rows per Parquet row group and per block handed to training: few, large ones instead of one per
# reference batch.
ROWS_PER_BLOCK = 8192
# The one Parquet file of each split in the cache.
CACHE_FILE = "part-00000.parquet"


# ----------------------------------------------------------------------------------------------
# The key.


def hash_weights(directory: Path) -> str | None:
    """sha256 over the names and bytes of a model directory's weight and config files (top level,
    as a Hugging Face model directory holds them); None when there are none."""
    files = sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and (p.name.endswith(_WEIGHT_SUFFIXES) or p.name in _WEIGHT_NAMES)
    )
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def reference_identity(config: Config) -> dict[str, Any]:
    """Which weights the reference is: name_or_path, revision, and (local or built-in) a hash of
    its weight files. With LoRA and no reference.name_or_path it is the base, model.name_or_path."""
    own = config.reference.name_or_path
    name = own or config.model.name_or_path
    revision = None if own else config.model.revision
    local = Path(resolve_name_or_path(name)).expanduser()  # a built-in is built here if missing
    weights = hash_weights(local) if local.is_dir() else None
    if weights is None and revision is None:
        logger.warning(
            "reference %s is a hub id with no revision: its cached log-probs are keyed by the name "
            "alone; set model.revision to pin the weights",
            name,
        )
    return {"name_or_path": name, "revision": revision, "weights_sha256": weights}


def compute_reference_key(config: Config, prepared_key: str) -> tuple[str, dict[str, Any]]:
    """(key, the parts it hashes) for the reference log-probs of `config`'s prepared data.

    prepared_key: the prepared Parquet's own cache key (data, tokenizer, template, lengths).
    """
    parts = {
        "version": __version__,
        "prepared": prepared_key,
        "reference": reference_identity(config),
        "load_in_4bit": config.lora.load_in_4bit,
        "dtype": config.reference.resolved_dtype(config.compute_dtype()),
        "attn_implementation": config.model.attn_implementation,
        "logps": LOGPS_FORM,
        "ld_alpha": config.train.ld_alpha,  # LD-DPO weights the sums (None: plain sums)
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    return key, parts


# ----------------------------------------------------------------------------------------------
# The plan: where a run's values live and whether they are there.


@dataclass(frozen=True)
class CachePlan:
    """Where the stage's values for a run live and whether they can be reused (`plan_cache`)."""

    key: str
    parts: dict[str, Any]
    counts: dict[str, int]  # rows per non-empty split
    root: Path  # output_dir/reference_logps
    final: Path  # root/<key>
    problem: str | None  # why the cache cannot be reused; None when it can

    @property
    def reusable(self) -> bool:
        return self.problem is None


def plan_cache(config: Config, prepared: PreparedData) -> CachePlan:
    """The cache key of `config`'s reference log-probs of `prepared`, and whether they are cached."""
    counts = {
        split: int(prepared.report["splits"][split]["rows_kept"])
        for split in SPLITS
        if prepared.split_dir(split) is not None
    }
    prepared_key = json.loads((prepared.prepared_dir / MANIFEST_FILE).read_text())["cache_key"]
    key, parts = compute_reference_key(config, prepared_key)
    root = Path(config.output_dir) / REFERENCE_DIR
    final = root / key
    problem = _cache_problem(final, key, counts) if config.reference.cache else "reference.cache is false"
    return CachePlan(key, parts, counts, root, final, problem)


def _cache_problem(final: Path, key: str, counts: dict[str, int]) -> str | None:
    """Why `final` cannot be reused (a short reason), or None when it can: its manifest (written
    last, before the atomic rename) names this key and every split has its rows and both columns."""
    manifest_path = final / MANIFEST_FILE
    if not final.is_dir():
        return f"no cache for key {key}"
    if not manifest_path.is_file():
        return f"{final} has no {MANIFEST_FILE} (an incomplete write)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return f"{manifest_path} is unreadable"
    if manifest.get("cache_key") != key or manifest.get("rows") != counts:
        return f"{manifest_path} does not match this run's key and row counts"
    for split, rows in counts.items():
        files = sorted((final / split).glob("*.parquet"))
        try:
            metadata = [pq.read_metadata(f) for f in files]
        except (OSError, pa.ArrowException):
            return f"{final / split} has an unreadable Parquet file"
        if sum(m.num_rows for m in metadata) != rows or any(
            name not in m.schema.names for m in metadata for name in REF_COLUMNS
        ):
            return f"{final / split} does not hold {rows} scored rows"
    return None


# ----------------------------------------------------------------------------------------------
# The prepared order, which training depends on.


def prepared_row_ids(prepared: PreparedData, split: str) -> list[Any]:
    """The row ids of a prepared split in training order: files in name order, rows in file order
    (the order Ray Data reads them in with preserve_order)."""
    path = prepared.split_dir(split)
    files = sorted(path.glob("*.parquet")) if path is not None else []
    return [row_id for f in files for row_id in pq.read_table(f, columns=["row_id"]).column(0).to_pylist()]


def in_prepared_order(prepared: PreparedData, split: str, ds: Any) -> pa.Table:
    """The rows of `ds` (a scored or cached split) as one table in the prepared split's order
    (matched by row id; collected in this process, once per split)."""
    expected = prepared_row_ids(prepared, split)
    table = pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))
    row_ids = table.column("row_id").to_pylist()
    if row_ids != expected:
        logger.warning(
            "reference log-probs: the %s split came back reordered; restoring the prepared order", split
        )
        position = {row_id: i for i, row_id in enumerate(row_ids)}
        table = table.take([position[row_id] for row_id in expected])
    return table


# ----------------------------------------------------------------------------------------------
# Writing: staging, seal, install.


def write_cache(tables: dict[str, pa.Table], plan: CachePlan) -> None:
    """Write the scored splits (in order) into a staging directory, then `seal_cache` it."""
    staging = new_staging_dir(plan)
    try:
        # One file per split written here, in order: Ray Data's writers name files in an order
        # that need not be the rows' order, and training reads files in name order.
        for split, table in tables.items():
            (staging / split).mkdir(parents=True)
            pq.write_table(table, staging / split / CACHE_FILE, row_group_size=ROWS_PER_BLOCK)
        seal_cache(staging, plan)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def new_staging_dir(plan: CachePlan) -> Path:
    """An empty staging directory for `plan`'s cache (a killed run's staging for the same key is
    removed first)."""
    plan.root.mkdir(parents=True, exist_ok=True)
    for leftover in plan.root.glob(f".tmp-{plan.key}-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staging = plan.root / f".tmp-{plan.key}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def seal_cache(staging: Path, plan: CachePlan) -> None:
    """Check the complete staging directory, write its manifest, then install it as `plan.final`.

    An unusable directory under the key (an older attempt) is replaced; an identical cache another
    run installed first is kept. Raises RuntimeError when the staging directory is incomplete.
    """
    manifest = {
        "cache_key": plan.key,
        "rows": plan.counts,
        "key_parts": plan.parts,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    problem = _cache_problem(staging, plan.key, plan.counts)
    if problem is not None:
        raise RuntimeError(f"reference stage output is incomplete: {problem}")
    install_directory(
        staging, plan.final, is_complete=lambda path: _cache_problem(path, plan.key, plan.counts) is None
    )


def write_report(config: Config, plan: CachePlan, *, seconds: float, **extra: Any) -> dict[str, Any]:
    """Write output_dir/reference_report.json for a run of the stage (or its reuse); return it."""
    reference = config.reference
    report = {
        "cache_key": plan.key,
        "reused": plan.reusable,
        "cache_dir": str(plan.final) if reference.cache else None,
        "rows": plan.counts,
        "rows_scored": 0 if plan.reusable else sum(plan.counts.values()),
        "seconds": round(seconds, 3),
        **extra,
        "key_parts": plan.parts,
        "actors": {
            "concurrency": reference.concurrency,
            "batch_size": reference.batch_size,
            "num_cpus": reference.num_cpus,
            "num_gpus": reference.num_gpus,
            "accelerator_type": reference.accelerator_type,
        },
    }
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
