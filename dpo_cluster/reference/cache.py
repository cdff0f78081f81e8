"""The cache of reference log-probs: output_dir/reference_logps/<key>/{manifest.json, <split>/*.parquet}.

The key (`compute_reference_key`) covers the prepared data's own key and the order of its rows
(values are stored by row position), the reference's identity (name or path, revision, a hash of
local weight files), 4-bit loading, dtype, attention kernel and how a log-prob is formed. The loss
type, beta and label smoothing are left out: they act on these values and never change them, so a
sweep over them reuses one pass. Under a key, values are fragments by position
(`dpo_cluster.reference.values`), each written whole or not at all, so a killed run keeps what it
scored and a later run that needs more pairs scores only the positions that are missing.
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
from dpo_cluster.config import Config
from dpo_cluster.data.layout import ROWS_SUFFIX, has_layout, rows_dir
from dpo_cluster.data.pipeline import MANIFEST_FILE, SPLITS, PreparedData
from dpo_cluster.modeling import resolve_name_or_path

logger = logging.getLogger(__name__)

REFERENCE_DIR = "reference_logps"
REPORT_FILE = "reference_report.json"
# How each stored value is formed; part of the cache key, so a change here never reuses old values.
LOGPS_FORM = (
    "sum of completion-token log-probs by prepared row position: dpo_cluster.batch.logps.sequence_logps "
    "on collate_pairs or pack_pairs"
)
# Files whose bytes define a local model's outputs (weights, architecture, adapter).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_WEIGHT_NAMES = ("config.json", "adapter_config.json")
# The stage's status file under a cache (or scratch) directory, for workers that wait on it.
STATUS_PREFIX = "status-"


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


def row_order_digest(prepared: PreparedData) -> str:
    """sha256 over each prepared file's name, row count and first and last row ids, in the order
    rows are numbered: a prepared directory written again (same key, other files) gets another
    digest, so values stored by position are never read against other rows. Reads two row ids
    per file (from the memory-mapped layout)."""
    digest = hashlib.sha256()
    for split in SPLITS:
        path = prepared.split_dir(split)
        for part in sorted(path.glob("*.parquet")) if path is not None else []:
            if has_layout(prepared.prepared_dir, split):
                mapped = pa.memory_map(
                    str(rows_dir(prepared.prepared_dir, split) / f"{part.stem}{ROWS_SUFFIX}")
                )
                ids = pa.ipc.open_file(mapped).read_all().column("row_id")
            else:
                ids = pq.read_table(part, columns=["row_id"]).column("row_id")
            ends = [ids[0].as_py(), ids[-1].as_py()] if len(ids) else []
            digest.update(json.dumps([split, part.name, len(ids), ends]).encode())
    return digest.hexdigest()


def compute_reference_key(
    config: Config, prepared_key: str, row_order: str = ""
) -> tuple[str, dict[str, Any]]:
    """(key, the parts it hashes) for the reference log-probs of `config`'s prepared data.

    prepared_key: the prepared Parquet's own cache key (data, tokenizer, template, lengths).
    row_order: `row_order_digest` of the prepared directory.
    """
    parts = {
        "version": __version__,
        "prepared": prepared_key,
        "row_order": row_order,
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
# The plan: where a run's values live.


@dataclass(frozen=True)
class CachePlan:
    """Where the stage's values for a run live (`plan_cache`)."""

    key: str
    parts: dict[str, Any]
    counts: dict[str, int]  # rows per non-empty prepared split
    root: Path  # output_dir/reference_logps
    directory: Path  # root/<key> (cache on), or a scratch directory removed after the run (off)
    cached: bool  # reference.cache

    def split_dir(self, split: str) -> Path:
        """The fragment directory of `split`."""
        return self.directory / split

    def status_file(self, run_id: str) -> Path:
        return self.directory / f"{STATUS_PREFIX}{run_id}.json"


def plan_cache(config: Config, prepared: PreparedData) -> CachePlan:
    """The cache key of `config`'s reference log-probs of `prepared`, and the directory of its values."""
    counts = {
        split: int(prepared.report["splits"][split]["rows_kept"])
        for split in SPLITS
        if prepared.split_dir(split) is not None
    }
    prepared_key = json.loads((prepared.prepared_dir / MANIFEST_FILE).read_text())["cache_key"]
    key, parts = compute_reference_key(config, prepared_key, row_order_digest(prepared))
    root = Path(config.output_dir) / REFERENCE_DIR
    cached = config.reference.cache
    directory = root / key if cached else root / f".scratch-{key}-{uuid.uuid4().hex[:8]}"
    return CachePlan(key, parts, counts, root, directory, cached)


def open_cache(plan: CachePlan) -> None:
    """Make `plan.directory` ready for fragments: its manifest names this key and these row counts.
    A directory whose manifest does not (unreadable, another key: not this cache) is emptied."""
    manifest_path = plan.directory / MANIFEST_FILE
    manifest = {"cache_key": plan.key, "rows": plan.counts, "key_parts": plan.parts}
    try:
        existing = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        existing = None
    if existing is not None and {k: existing.get(k) for k in ("cache_key", "rows")} == {
        "cache_key": plan.key,
        "rows": plan.counts,
    }:
        return
    if plan.directory.exists():
        logger.warning(
            "reference log-probs: %s is not a whole cache of key %s; starting it again",
            plan.directory,
            plan.key,
        )
        shutil.rmtree(plan.directory, ignore_errors=True)
    plan.directory.mkdir(parents=True, exist_ok=True)
    manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    partial = plan.directory / f".{MANIFEST_FILE}.{uuid.uuid4().hex[:8]}"
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    partial.rename(manifest_path)


def write_report(config: Config, plan: CachePlan, **figures: Any) -> dict[str, Any]:
    """Write output_dir/reference_report.json for a run of the stage; return it."""
    reference = config.reference
    report = {
        "cache_key": plan.key,
        "cache_dir": str(plan.directory) if plan.cached else None,
        "rows": plan.counts,
        **figures,
        "key_parts": plan.parts,
        "actors": {
            "concurrency": reference.concurrency,
            "batch_size": reference.batch_size,
            "max_tokens_per_forward": reference.max_tokens_per_forward,
            "packing": reference.packing,
            "num_cpus": reference.num_cpus,
            "num_gpus": reference.num_gpus,
            "accelerator_type": reference.accelerator_type,
        },
    }
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
