"""The prepared-data cache: its key, and output_dir/prepared/ with the manifest that records it.

The key covers everything that changes the prepared rows (the data, the tokenizer, the format,
template, length and split settings), so `prepare` reuses an earlier run's rows only when a
fresh run would write the same ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from dpo_cluster import __version__
from dpo_cluster.config import Config
from dpo_cluster.data.accounting import REPORT_FILE
from dpo_cluster.data.layout import has_layout, write_layout
from dpo_cluster.data.process import KEPT, SPLITS
from dpo_cluster.paths import install_directory

PREPARED_DIR = "prepared"
MANIFEST_FILE = "manifest.json"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides a tokenizer's ids: its model, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "class": type(tokenizer).__name__,
        "model": backend.to_str()
        if backend is not None
        else json.dumps(tokenizer.get_vocab(), sort_keys=True),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def compute_cache_key(
    config: Config, formats: dict[str, str], fingerprints: dict[str, Any], tok_fp: str
) -> str:
    """The cache key of a prepare run: source fingerprints, detected formats, the format and
    tokenize specs, the tokenizer fingerprint and the split settings."""
    data = config.data
    parts = {
        "version": __version__,
        "sources": fingerprints,
        "formats": formats,
        "format_spec": dataclasses.asdict(data.format_spec()),
        "tokenize_spec": dataclasses.asdict(data.tokenize_spec()),
        "tokenizer": tok_fp,
        "split": [data.eval_fraction, data.split_seed],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cached_report(output_dir: Path, key: str) -> dict[str, Any] | None:
    """The data report of the prepared rows under `output_dir` if they were made with `key`, else None."""
    report_path = output_dir / REPORT_FILE
    prepared = output_dir / PREPARED_DIR
    if not report_path.exists() or _manifest_key(prepared) != key:
        return None
    if not all(has_layout(prepared, split) for split in SPLITS):
        return None  # prepared before training read the row layout: prepare again
    return json.loads(report_path.read_text())


def install_prepared(staging: Path, output_dir: Path, key: str) -> None:
    """Gather the kept rows under `staging` into {split}/ beside a manifest recording `key`, and
    rename that directory into output_dir/prepared whole, replacing whatever was there (this run
    re-prepared it for a reason: a new key, or data.cache off), so a reader never sees a prepared
    directory half written or mixed from two runs. The row layout training reads
    (`layout.write_layout`) is written first, inside the same directory."""
    fresh = staging / PREPARED_DIR
    fresh.mkdir()
    present = []
    for split in SPLITS:
        kept = staging / f"split={split}" / f"status={KEPT}"
        if kept.is_dir():
            kept.rename(fresh / split)
            present.append(split)
    write_layout(fresh, present)
    manifest = {"cache_key": key, "version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (fresh / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    install_directory(fresh, output_dir / PREPARED_DIR, is_complete=lambda path: False)


def _manifest_key(prepared: Path) -> str | None:
    """The cache key recorded in a prepared directory's manifest; None without a readable one."""
    try:
        return json.loads((prepared / MANIFEST_FILE).read_text()).get("cache_key")
    except (OSError, ValueError):
        return None
