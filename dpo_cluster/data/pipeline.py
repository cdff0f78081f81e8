"""The preference-data pipeline on Ray Data: read -> parse -> normalize -> split -> tokenize ->
write, in one streaming pass, with every row accounted for.

    sources (jsonl/json/parquet/csv/hub/inline)
      -> raw rows {row_id, raw}                                    (dpo_cluster.data.sources)
      -> process_batch: JSON parse, normalize_row, split by prompt hash, PairTokenizer
      -> one Parquet write partitioned by split and status          (status = "kept" or a drop reason)
      -> counts from Parquet metadata, quarantine.jsonl, data_report.json, prepared/{train,eval}/

Because every row, kept or dropped, flows to the same write, the counts in data_report.json are
read back from what was written: rows_in == rows_kept + sum(dropped) holds by construction and is
also asserted. The prepared Parquet carries a cache key (data, tokenizer, template, length and
split settings); `prepare` reuses it only when the key matches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dpo_cluster import __version__
from dpo_cluster.config import Config, SourceConfig
from dpo_cluster.data import sources
from dpo_cluster.data.formats import FormatSpec, detect_format, normalize_row, prompt_key
from dpo_cluster.data.records import DEFECT_REASONS, NOTES, DataError, DropRow, Pair
from dpo_cluster.data.tokenize import PairTokenizer, TokenizeSpec

KEPT = "kept"
SPLITS = ("train", "eval")
REPORT_FILE = "data_report.json"
QUARANTINE_FILE = "quarantine.jsonl"
PREPARED_DIR = "prepared"
MANIFEST_FILE = "manifest.json"
_SAMPLE_ROWS = 50
_EXAMPLES_PER_REASON = 5

OUTPUT_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("split", pa.string()),
        ("status", pa.string()),
        ("detail", pa.string()),
        ("raw", pa.binary()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("chosen_ids", pa.list_(pa.int32())),
        ("rejected_ids", pa.list_(pa.int32())),
        ("notes", pa.list_(pa.string())),
    ]
)


@dataclass(frozen=True)
class TokenizerRef:
    """How to load the tokenizer, in the driver and in every Ray Data worker."""

    name_or_path: str
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class ProcessSpec:
    """Everything `process_batch` needs; picklable and hashable."""

    role: str  # which configured source the rows come from: train | eval
    fmt: str  # the format detected (or configured) for this source
    format_spec: FormatSpec
    tokenize_spec: TokenizeSpec
    tokenizer: TokenizerRef
    eval_fraction: float
    split_seed: int
    on_bad_row: str


@dataclass
class PreparedData:
    """Where `prepare` put its results."""

    output_dir: Path
    report: dict[str, Any]
    cache_hit: bool

    @property
    def prepared_dir(self) -> Path:
        return self.output_dir / PREPARED_DIR

    def split_dir(self, split: str) -> Path | None:
        """Directory of the kept, tokenized rows of `split`, or None if the split is empty."""
        path = self.prepared_dir / split
        return path if path.is_dir() and any(path.glob("*.parquet")) else None

    def datasets(self) -> dict[str, Any]:
        """Ray Datasets of the kept rows per split, columns row_id, prompt_ids, chosen_ids,
        rejected_ids, notes; ready for `ray.train` `datasets=`."""
        import ray.data

        out = {}
        for split in SPLITS:
            path = self.split_dir(split)
            if path is not None:
                out[split] = ray.data.read_parquet(str(path))
        return out


# ----------------------------------------------------------------------------------------------
# The per-batch work, run inside Ray Data tasks.


def assign_split(key: bytes, eval_fraction: float, seed: int) -> str:
    """Deterministic train/eval assignment from a stable hash of `key` (the prompt), independent
    of worker count, block boundaries and row order."""
    if eval_fraction <= 0:
        return "train"
    digest = hashlib.blake2b(key, digest_size=8, person=seed.to_bytes(8, "little", signed=True)).digest()
    return "eval" if int.from_bytes(digest, "little") / 2**64 < eval_fraction else "train"


@functools.lru_cache(maxsize=4)
def _pair_tokenizer(ref: TokenizerRef, spec: TokenizeSpec) -> PairTokenizer:
    # Ray reuses worker processes across tasks, so each process loads the tokenizer once.
    return PairTokenizer(load_tokenizer(ref), spec)


def load_tokenizer(ref: TokenizerRef) -> Any:
    from dpo_cluster.modeling import load_tokenizer as load

    try:
        return load(ref.name_or_path, revision=ref.revision, trust_remote_code=ref.trust_remote_code)
    except Exception as e:  # OSError, ValueError, hub errors: all mean "cannot load this"
        raise DataError(f"cannot load the tokenizer from {ref.name_or_path!r}: {e}") from e


def parse_raw(raw: bytes) -> Any:
    """Raw bytes of one row -> the decoded JSON value. Raises DropRow."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DropRow("undecodable_text", f"invalid UTF-8 at byte {e.start}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DropRow("invalid_json", f"column {e.colno}: {e.msg}") from None


def process_batch(batch: pa.Table, spec: ProcessSpec) -> pa.Table:
    """Raw rows (row_id, raw) -> output rows (OUTPUT_SCHEMA), one per input row, in order."""
    row_ids: list[str] = batch.column("row_id").to_pylist()
    raws: list[bytes] = batch.column("raw").to_pylist()
    splits: list[str] = []
    drops: list[DropRow | None] = []
    pairs: list[Pair] = []
    pair_rows: list[int] = []
    for i, raw in enumerate(raws):
        try:
            pair = normalize_row(parse_raw(raw), spec.fmt, spec.format_spec)
        except DropRow as drop:
            drops.append(drop)
            key = raw  # no prompt known: the raw bytes still give a stable split
        else:
            drops.append(None)
            pairs.append(pair)
            pair_rows.append(i)
            key = prompt_key(pair).encode("utf-8")
        splits.append(
            "eval" if spec.role == "eval" else assign_split(key, spec.eval_fraction, spec.split_seed)
        )

    tokenized: list[Any] = [None] * len(raws)
    if pairs:
        results = _pair_tokenizer(spec.tokenizer, spec.tokenize_spec).tokenize(pairs)
        for i, result in zip(pair_rows, results):
            if isinstance(result, DropRow):
                drops[i] = result
            else:
                tokenized[i] = result

    if spec.on_bad_row == "fail":
        for row_id, drop in zip(row_ids, drops):
            if drop is not None and drop.reason in DEFECT_REASONS:
                raise DataError(
                    f"{row_id}: {drop.reason}: {drop.detail} (data.on_bad_row is 'fail'; set it to 'skip' "
                    "to drop and count such rows instead)"
                )

    columns: dict[str, list[Any]] = {name: [] for name in OUTPUT_SCHEMA.names}
    for i, drop in enumerate(drops):
        columns["row_id"].append(row_ids[i])
        columns["split"].append(splits[i])
        if drop is not None:
            columns["status"].append(drop.reason)
            columns["detail"].append(drop.detail)
            columns["raw"].append(raws[i])
            for name in ("prompt_ids", "chosen_ids", "rejected_ids", "notes"):
                columns[name].append([])
        else:
            t = tokenized[i]
            columns["status"].append(KEPT)
            columns["detail"].append("")
            columns["raw"].append(b"")
            columns["prompt_ids"].append(t.prompt_ids)
            columns["chosen_ids"].append(t.chosen_ids)
            columns["rejected_ids"].append(t.rejected_ids)
            columns["notes"].append(sorted(t.notes))
    return pa.table(columns, schema=OUTPUT_SCHEMA)


def read_and_process(units: pa.Table, spec: ProcessSpec, batch_size: int) -> Iterator[pa.Table]:
    """Read units (one per row) -> output rows, `batch_size` rows at a time.

    Reading and processing are one stage on purpose: were they two `map_batches`, Ray Data would
    fuse them and bundle read units up to the processing batch size, so a handful of large
    units would all run in one task instead of one task per unit."""
    for unit in units.to_pylist():
        for raw in sources.read_unit(sources.ReadUnit(**unit)):
            table = pa.table(raw, schema=sources.RAW_SCHEMA)
            for offset in range(0, table.num_rows, batch_size):
                yield process_batch(table.slice(offset, batch_size), spec)


# ----------------------------------------------------------------------------------------------
# Driver side: build the Ray Dataset, run it, account for every row.


@dataclass
class _Source:
    role: str
    config: SourceConfig
    dataset: Any  # ray.data.Dataset of read units (reads_units) or of raw rows {row_id, raw}
    reads_units: bool
    sample: list[Any]  # first rows, parsed, for format detection
    fingerprint: dict[str, Any]


def ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (or `ray job submit`'s), else start a local one."""
    import ray

    if not ray.is_initialized():
        # The dashboard (on 127.0.0.1 only) also serves the State API that Ray Train uses to
        # watch its controller; without it Ray Train logs a warning every few seconds.
        ray.init(log_to_driver=True)


def _raw_source(role: str, source: SourceConfig, target_units: int) -> _Source:
    import ray.data

    if source.rows is not None:
        table = pa.table(sources.inline_batches(source.rows), schema=sources.RAW_SCHEMA)
        pieces = max(1, min(target_units, table.num_rows // 64))
        step = -(-table.num_rows // pieces) if table.num_rows else 1
        tables = [table.slice(i, step) for i in range(0, max(1, table.num_rows), step)]
        sample = source.rows[:_SAMPLE_ROWS]
        return _Source(role, source, ray.data.from_arrow(tables), False, sample, sources.fingerprint(source))
    if sources.is_local(source) and not sources.is_saved_dataset(source.path or ""):
        files = sources.list_local_files(source)
        units = sources.plan_local_reads(files, target_units)
        sample: list[Any] = []
        for raw in sources.read_unit(units[0]):
            sample = _parse_sample(raw["raw"][:_SAMPLE_ROWS])
            break
        ds = ray.data.from_items([dataclasses.asdict(u) for u in units], override_num_blocks=len(units))
        return _Source(role, source, ds, True, sample, sources.fingerprint(source, files=files))
    hf = sources.load_hf_dataset(source)
    hf = hf.add_column("__index", list(range(len(hf))))
    sample = [
        {k: v for k, v in r.items() if k != "__index"} for r in hf.select(range(min(len(hf), _SAMPLE_ROWS)))
    ]
    ds = ray.data.from_huggingface(hf).map_batches(
        sources.hf_to_raw, batch_format="pyarrow", fn_kwargs={"name": source.describe()}
    )
    return _Source(role, source, ds, False, sample, sources.fingerprint(source, hf_dataset=hf))


def _parse_sample(raws: list[bytes]) -> list[Any]:
    sample = []
    for raw in raws:
        try:
            sample.append(parse_raw(raw))
        except DropRow:
            continue
    return sample


def tokenizer_fingerprint(tokenizer: Any) -> str:
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


def prepare(config: Config) -> PreparedData:
    """Run (or reuse) the pipeline for `config`; write output_dir/{data_report.json,
    quarantine.jsonl, prepared/}. Raises DataError on data problems, naming file, row and field."""
    import ray
    import ray.data

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ensure_ray()
    data = config.data
    cpus = data.num_cpus or max(1, int(ray.cluster_resources().get("CPU", 1)))
    target_units = 2 * cpus  # enough read units to keep every CPU busy, few enough to stay cheap

    ref = TokenizerRef(
        config.tokenizer_path(),
        config.model.revision if not data.tokenizer else None,
        config.model.trust_remote_code,
    )
    tok_fp = tokenizer_fingerprint(load_tokenizer(ref))

    raw_sources = [_raw_source("train", data.train, target_units)]  # type: ignore[arg-type]
    if data.eval is not None:
        raw_sources.append(_raw_source("eval", data.eval, target_units))
    format_spec = data.format_spec()
    formats = {s.role: detect_format(s.sample, format_spec, s.config.describe()) for s in raw_sources}
    key = compute_cache_key(config, formats, {s.role: s.fingerprint for s in raw_sources}, tok_fp)

    manifest_path = output_dir / PREPARED_DIR / MANIFEST_FILE
    if data.cache and manifest_path.exists() and (output_dir / REPORT_FILE).exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("cache_key") == key:
            report = json.loads((output_dir / REPORT_FILE).read_text())
            return PreparedData(output_dir, report, cache_hit=True)

    datasets = []
    for s in raw_sources:
        spec = ProcessSpec(
            role=s.role,
            fmt=formats[s.role],
            format_spec=format_spec,
            tokenize_spec=data.tokenize_spec(),
            tokenizer=ref,
            eval_fraction=data.eval_fraction,
            split_seed=data.split_seed,
            on_bad_row=data.on_bad_row,
        )
        if s.reads_units:
            ds = s.dataset.map_batches(
                read_and_process,
                batch_size=1,
                batch_format="pyarrow",
                fn_kwargs={"spec": spec, "batch_size": data.batch_size},
            )
        else:
            ds = s.dataset.map_batches(
                process_batch, batch_size=data.batch_size, batch_format="pyarrow", fn_kwargs={"spec": spec}
            )
        datasets.append(ds)
    ds = datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])

    staging = output_dir / f".prepare-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    limits = ctx.execution_options.resource_limits
    if data.num_cpus is not None:
        ctx.execution_options.resource_limits = limits.copy(cpu=data.num_cpus)
    try:
        with _quiet_data_errors():
            ds.write_parquet(str(staging), partition_cols=["split", "status"])
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        data_error = _find_data_error(e)
        if data_error is not None:
            raise DataError(str(data_error)) from None
        raise
    finally:
        ctx.execution_options.resource_limits = limits
    seconds = time.perf_counter() - started

    try:
        report = _account(staging, output_dir)
        report["sources"] = {
            s.role: {"source": s.config.describe(), "format": formats[s.role]} for s in raw_sources
        }
        report["seconds"] = round(seconds, 3)
        report["cache_key"] = key
        (output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        check_bad_fraction(report, data.max_bad_fraction, output_dir)
        if report["splits"]["train"]["rows_kept"] == 0:
            raise DataError(
                f"data.train ({data.train.describe()}): no rows were kept; see {output_dir / REPORT_FILE}"  # type: ignore[union-attr]
            )
        _install_prepared(staging, output_dir, key)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PreparedData(output_dir, report, cache_hit=False)


class _HideDataErrorTraces(logging.Filter):
    """Ray Data logs a task's exception with its full worker traceback before re-raising it. For
    our own DataError (a row the user must fix, already named in the message we print) that
    traceback is noise, so records carrying one are not shown; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += str(record.exc_info[1])
        if "Exception occurred in Ray Data or Ray Core internal code" in text:
            # The header Ray logs before the trace (for generator UDFs it cannot tell user code
            # from its own); the trace itself still shows for any error that is not ours.
            return False
        return f"{DataError.__module__}.DataError" not in text and "RayTaskError(DataError)" not in text


@contextlib.contextmanager
def _quiet_data_errors() -> Iterator[None]:
    handlers = [h for name in ("ray", "ray.data") for h in logging.getLogger(name).handlers]
    hide = _HideDataErrorTraces()
    for handler in handlers:
        handler.addFilter(hide)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(hide)


def _find_data_error(error: BaseException) -> DataError | None:
    """Ray wraps exceptions raised in tasks (RayTaskError, UserCodeException) and, for Ray Data
    tasks, keeps the original only as text in the worker traceback; find ours either way."""
    match = re.search(rf"{re.escape(DataError.__module__)}\.DataError: (.+)", str(error))
    if match:
        return DataError(match.group(1).strip())
    seen = set()
    stack: list[BaseException | None] = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DataError):
            return e
        stack.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    return None


def _partitions(staging: Path) -> dict[tuple[str, str], list[Path]]:
    parts: dict[tuple[str, str], list[Path]] = {}
    for status_dir in staging.glob("split=*/status=*"):
        split = status_dir.parent.name.split("=", 1)[1]
        status = status_dir.name.split("=", 1)[1]
        parts[(split, status)] = sorted(status_dir.glob("*.parquet"))
    return parts


def _account(staging: Path, output_dir: Path) -> dict[str, Any]:
    """Count rows per split and status from the written Parquet; write quarantine.jsonl."""
    parts = _partitions(staging)
    splits: dict[str, Any] = {}
    quarantine: list[dict[str, Any]] = []
    for split in SPLITS:
        dropped: Counter[str] = Counter()
        kept = 0
        for (part_split, status), files in parts.items():
            if part_split != split:
                continue
            count = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
            if status == KEPT:
                kept = count
            else:
                dropped[status] += count
                for f in files:
                    for row in pq.read_table(f, columns=["row_id", "detail", "raw"]).to_pylist():
                        quarantine.append(
                            {
                                "row_id": row["row_id"],
                                "split": split,
                                "reason": status,
                                "detail": row["detail"],
                                "raw": row["raw"].decode("utf-8", errors="backslashreplace"),
                            }
                        )
        rows_in = kept + sum(dropped.values())
        splits[split] = {
            "rows_in": rows_in,
            "rows_kept": kept,
            "dropped": dict(sorted(dropped.items())),
            **_kept_stats(parts.get((split, KEPT), [])),
        }
    quarantine.sort(key=lambda q: (q["split"], q["reason"], _natural_key(q["row_id"])))
    for split, stats in splits.items():
        examples: dict[str, list[str]] = {}
        for q in quarantine:
            if q["split"] == split and len(examples.setdefault(q["reason"], [])) < _EXAMPLES_PER_REASON:
                examples[q["reason"]].append(q["row_id"])
        stats["examples"] = examples
        assert stats["rows_in"] == stats["rows_kept"] + sum(stats["dropped"].values())
    with open(output_dir / QUARANTINE_FILE, "w", encoding="utf-8") as f:
        for q in quarantine:
            f.write(json.dumps(q, ensure_ascii=False) + "\n")
    return {"splits": splits}


def _kept_stats(files: list[Path]) -> dict[str, Any]:
    """Note counts and token-length statistics of kept rows."""
    notes = dict.fromkeys(NOTES, 0)
    tokens: dict[str, Any] = {}
    if not files:
        return {"notes": notes, "tokens": tokens}
    table = pa.concat_tables(
        [pq.read_table(f, columns=["prompt_ids", "chosen_ids", "rejected_ids", "notes"]) for f in files]
    )
    for note, count in Counter(pc.list_flatten(table.column("notes")).to_pylist()).items():
        notes[note] = count
    for name in ("prompt", "chosen", "rejected"):
        lengths = pc.list_value_length(table.column(f"{name}_ids"))
        tokens[name] = {
            "mean": round(pc.mean(lengths).as_py(), 2),
            "max": pc.max(lengths).as_py(),
            "total": pc.sum(lengths).as_py(),
        }
    return {"notes": notes, "tokens": tokens}


def _natural_key(row_id: str) -> tuple[Any, ...]:
    # "a.jsonl:10" sorts after "a.jsonl:9"
    head, _, tail = row_id.rpartition(":") if ":" in row_id else row_id.rpartition("#")
    return (head, int(tail)) if tail.isdigit() else (row_id, 0)


def check_bad_fraction(report: dict[str, Any], max_bad_fraction: float, output_dir: Path) -> None:
    """Fail if any split has more defective rows than data.max_bad_fraction allows."""
    for split, stats in report["splits"].items():
        defects = {r: n for r, n in stats["dropped"].items() if r in DEFECT_REASONS}
        bad = sum(defects.values())
        if stats["rows_in"] == 0 or bad / stats["rows_in"] <= max_bad_fraction:
            continue
        worst = sorted(defects.items(), key=lambda kv: -kv[1])[:3]
        reasons = "; ".join(
            f"{reason} x{count} (e.g. {', '.join(stats['examples'].get(reason, [])[:3])})"
            for reason, count in worst
        )
        raise DataError(
            f"{split}: {bad} of {stats['rows_in']} rows ({bad / stats['rows_in']:.1%}) are defective, more than "
            f"data.max_bad_fraction={max_bad_fraction}. Worst: {reasons}. Every dropped row is in "
            f"{output_dir / QUARANTINE_FILE}; counts are in {output_dir / REPORT_FILE}."
        )


def _install_prepared(staging: Path, output_dir: Path, key: str) -> None:
    """Move kept rows into output_dir/prepared/{split}/ and write the manifest last, so an
    interrupted run never leaves a prepared directory that looks complete."""
    prepared = output_dir / PREPARED_DIR
    shutil.rmtree(prepared, ignore_errors=True)
    prepared.mkdir(parents=True)
    for split in SPLITS:
        kept = staging / f"split={split}" / f"status={KEPT}"
        if kept.is_dir():
            shutil.move(str(kept), str(prepared / split))
    manifest = {"cache_key": key, "version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (prepared / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
