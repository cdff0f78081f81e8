"""The preference-data pipeline on Ray Data: sources -> read -> process -> one partitioned write.

`prepare` plans the reads, detects each source's format, runs `process.process_batch` over every
row in one streaming pass and writes kept and dropped rows alike, so the report counted from the
written files (`accounting`) accounts for every row; a matching cache key (`cache`) skips the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from dpo_cluster.config import Config, DataConfig, SourceConfig
from dpo_cluster.data import sources
from dpo_cluster.data.accounting import (
    QUARANTINE_FILE,
    REPORT_FILE,
    build_report,
    check_bad_fraction,
    write_report,
)
from dpo_cluster.data.cache import (
    MANIFEST_FILE,
    PREPARED_DIR,
    cached_report,
    compute_cache_key,
    install_prepared,
    tokenizer_fingerprint,
)
from dpo_cluster.data.formats import detect_format
from dpo_cluster.data.process import (
    SPLITS,
    ProcessSpec,
    TokenizerRef,
    assign_split,
    load_tokenizer,
    parse_raw,
    process_batch,
    read_and_process,
)
from dpo_cluster.data.records import DataError, DropRow
from dpo_cluster.ray_session import ensure_ray

__all__ = [
    "MANIFEST_FILE",
    "PREPARED_DIR",
    "QUARANTINE_FILE",
    "REPORT_FILE",
    "SPLITS",
    "PreparedData",
    "assign_split",
    "ensure_ray",
    "parse_raw",
    "prepare",
]

_SAMPLE_ROWS = 50


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


@dataclass
class _Source:
    role: str
    config: SourceConfig
    dataset: Any  # ray.data.Dataset of read units (reads_units) or of raw rows {row_id, raw}
    reads_units: bool
    sample: list[Any]  # first rows, parsed, for format detection
    fingerprint: dict[str, Any]


def prepare(config: Config) -> PreparedData:
    """Run (or reuse) the pipeline for `config`; write output_dir/{data_report.json,
    quarantine.jsonl, prepared/}. Raises DataError on data problems, naming file, row and field."""
    import ray

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
    if data.cache:
        report = cached_report(output_dir, key)
        if report is not None:
            return PreparedData(output_dir, report, cache_hit=True)

    staging = output_dir / f".prepare-{uuid.uuid4().hex[:8]}"
    seconds = _write(_build_dataset(raw_sources, formats, ref, data), staging, data.num_cpus)
    try:
        report = build_report(staging, output_dir)
        report["sources"] = {
            s.role: {"source": s.config.describe(), "format": formats[s.role]} for s in raw_sources
        }
        report["seconds"] = round(seconds, 3)
        report["cache_key"] = key
        write_report(output_dir, report)
        check_bad_fraction(report, data.max_bad_fraction, output_dir)
        if report["splits"]["train"]["rows_kept"] == 0:
            raise DataError(
                f"data.train ({data.train.describe()}): no rows were kept; see {output_dir / REPORT_FILE}"  # type: ignore[union-attr]
            )
        install_prepared(staging, output_dir, key)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PreparedData(output_dir, report, cache_hit=False)


def _build_dataset(
    raw_sources: list[_Source], formats: dict[str, str], ref: TokenizerRef, data: DataConfig
) -> Any:
    """One Ray Dataset of output rows (`process.OUTPUT_SCHEMA`) over every source."""
    datasets = []
    for s in raw_sources:
        spec = ProcessSpec(
            role=s.role,
            fmt=formats[s.role],
            format_spec=data.format_spec(),
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
    return datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])


def _write(ds: Any, staging: Path, num_cpus: int | None) -> float:
    """Run the pipeline into `staging`, partitioned by split and status; return the seconds taken.
    A DataError raised in a task is raised here as itself."""
    import ray.data

    started = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    limits = ctx.execution_options.resource_limits
    if num_cpus is not None:
        ctx.execution_options.resource_limits = limits.copy(cpu=num_cpus)
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
    return time.perf_counter() - started


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
