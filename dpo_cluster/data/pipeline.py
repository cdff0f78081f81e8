"""The preference-data pipeline on Ray Data: sources -> read -> process -> one partitioned write.

`prepare` plans the reads of every source (read units: byte ranges, row groups, row ranges),
detects each source's format, runs `process.process_batch` over every row in one streaming pass,
one task per unit, and writes kept and dropped rows alike, partitioned by split, source and
status, so the report counted from the written files (`accounting`) accounts for every row; a
matching cache key (`cache`) skips the run. The driver holds plans and counts, never rows.
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

from dpo_cluster.config import Config, ConfigError, DataConfig, SourceConfig
from dpo_cluster.config.model_data import TRAIN_REQUIRED
from dpo_cluster.config.specs import UNPAIRED_FORMATS
from dpo_cluster.data import sources
from dpo_cluster.data.accounting import (
    QUARANTINE_FILE,
    REPORT_FILE,
    build_report,
    check_bad_fraction,
    count_sources,
    partitions,
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
    COPIES,
    KEPT,
    SPLITS,
    ProcessSpec,
    TokenizerRef,
    assign_split,
    load_tokenizer,
    parse_raw,
    read_and_process,
    source_label,
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
        rejected_ids, notes (read lazily; training reads the row layout instead)."""
        import ray.data

        out = {}
        for split in SPLITS:
            path = self.split_dir(split)
            if path is not None:
                out[split] = ray.data.read_parquet(str(path))
        return out


@dataclass
class _Source:
    role: str  # train | eval
    key: str  # its config key: data.train, data.train[1]
    position: int  # its index in data.{role}
    config: SourceConfig
    units: list[sources.ReadUnit]
    sample: list[Any]  # first rows, parsed, for format detection
    fingerprint: dict[str, Any]

    @property
    def label(self) -> str:
        return source_label(self.role, self.position)


def prepare(config: Config) -> PreparedData:
    """Run (or reuse) the pipeline for `config`; write output_dir/{data_report.json,
    quarantine.jsonl, prepared/}. Raises DataError on data problems, naming file, row and field."""
    import ray

    if config.data.train is None:  # a rounds config with rounds.prompts may leave it out
        raise ConfigError(TRAIN_REQUIRED)

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

    planned = [
        _plan_source(role, key, position, source, target_units)
        for role in SPLITS
        for position, (key, source) in enumerate(data.sources(role))
    ]
    formats = [detect_format(s.sample, data.format_spec(s.config), s.config.describe()) for s in planned]
    _check_formats_fit_loss(config, planned, formats)
    key = compute_cache_key(
        config, _by_role(data, planned, formats), _by_role(data, planned, _fingerprints(planned)), tok_fp
    )
    if data.cache:
        report = cached_report(output_dir, key)
        if report is not None:
            return PreparedData(output_dir, report, cache_hit=True)

    staging = output_dir / f".prepare-{uuid.uuid4().hex[:8]}"
    seconds = _write(_build_dataset(planned, formats, ref, data), staging, data.num_cpus)
    try:
        report = build_report(staging, output_dir, with_copies=data.mixes())
        report["sources"] = _sources_report(data, planned, formats, staging)
        report["seconds"] = round(seconds, 3)
        report["cache_key"] = key
        write_report(output_dir, report)
        check_bad_fraction(report, data.max_bad_fraction, output_dir)
        if report["splits"]["train"]["rows_kept"] == 0:
            names = ", ".join(s.config.describe() for s in planned if s.role == "train")
            raise DataError(f"data.train ({names}): no rows were kept; see {output_dir / REPORT_FILE}")
        _flatten_kept(staging, [s.label for s in planned])
        install_prepared(staging, output_dir, key)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PreparedData(output_dir, report, cache_hit=False)


def _check_formats_fit_loss(config: Config, planned: list[_Source], formats: list[str]) -> None:
    """Unpaired rows (prompt, completion, label) train only an unpaired loss (kto); pairs train any
    loss, kto taking each pair as a desirable and an undesirable example."""
    if config.train.unpaired():
        return
    for source, fmt in zip(planned, formats):
        if fmt in UNPAIRED_FORMATS:
            raise DataError(
                f"{source.key} ({source.config.describe()}): format {fmt} holds single labelled "
                f"completions, not pairs; train.loss_type {', '.join(config.train.loss_type)} needs "
                "pairs (train.loss_type: [kto] trains on these rows)"
            )


def _build_dataset(planned: list[_Source], formats: list[str], ref: TokenizerRef, data: DataConfig) -> Any:
    """One Ray Dataset of output rows (`process.OUTPUT_SCHEMA`) over every source: one block, and
    so one read-process-write task, per read unit, the sources' units interleaved in proportion
    so the written files (whose names follow task order) alternate between sources."""
    import ray.data

    specs = tuple(
        ProcessSpec(
            role=s.role,
            fmt=fmt,
            format_spec=data.format_spec(s.config),
            tokenize_spec=data.tokenize_spec(),
            tokenizer=ref,
            eval_fraction=data.eval_fraction,
            split_seed=data.split_seed,
            on_bad_row=data.on_bad_row,
            position=s.position,
            weight=s.config.weight,
        )
        for s, fmt in zip(planned, formats)
    )
    order = sorted(
        ((j + 0.5) / len(s.units), i, j) for i, s in enumerate(planned) for j in range(len(s.units))
    )
    items = [{**dataclasses.asdict(planned[i].units[j]), "source_index": i} for _, i, j in order]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_and_process,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={
            "specs": specs,
            "sources_by_index": tuple(s.config for s in planned),
            "batch_size": data.batch_size,
        },
    )


def _write(ds: Any, staging: Path, num_cpus: int | None) -> float:
    """Run the pipeline into `staging`, partitioned by split, source and status; return the seconds
    taken. A DataError raised in a task is raised here as itself."""
    import ray.data

    started = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    limits = ctx.execution_options.resource_limits
    if num_cpus is not None:
        ctx.execution_options.resource_limits = limits.copy(cpu=num_cpus)
    try:
        with _quiet_data_errors():
            ds.write_parquet(str(staging), partition_cols=["split", "source", "status"])
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        data_error = _find_data_error(e)
        if data_error is not None:
            raise DataError(str(data_error)) from None
        raise
    finally:
        ctx.execution_options.resource_limits = limits
    return time.perf_counter() - started


def _plan_source(role: str, key: str, position: int, source: SourceConfig, target_units: int) -> _Source:
    """Read units, a parsed sample and the fingerprint of one source, from its metadata (file
    sizes, line counts, row group and row counts) and its first rows."""
    if source.rows is not None:
        rows = len(source.rows)
        pieces = max(1, min(target_units, rows // 64))
        step = -(-rows // pieces) if rows else 1
        units = [sources.ReadUnit("rows", "inline", i, min(rows, i + step), i) for i in range(0, rows, step)]
        sample = source.rows[:_SAMPLE_ROWS]
        return _Source(
            role,
            key,
            position,
            source,
            units or [sources.ReadUnit("rows", "inline", 0, 0, 0)],
            sample,
            sources.fingerprint(source),
        )
    if sources.is_local(source) and not sources.is_saved_dataset(source.path or ""):
        files = sources.list_local_files(source)
        units = sources.plan_local_reads(files, target_units)
        sample: list[Any] = []
        for raw in sources.read_unit(units[0], batch_rows=_SAMPLE_ROWS):
            sample = _parse_sample(raw["raw"])
            break
        return _Source(role, key, position, source, units, sample, sources.fingerprint(source, files=files))
    # save_to_disk directories and hub datasets: opened here for their length, size and first rows
    # (memory-mapped, nothing read in full); each task re-opens the dataset and reads its range.
    hf = sources.load_hf_dataset(source)
    units = sources.plan_row_ranges(source.describe(), "hf", len(hf), hf.data.nbytes, target_units)
    sample = [dict(r) for r in hf.select(range(min(len(hf), _SAMPLE_ROWS)))]
    return _Source(role, key, position, source, units, sample, sources.fingerprint(source, hf_dataset=hf))


def _fingerprints(planned: list[_Source]) -> list[dict[str, Any]]:
    """Each source's content fingerprint, with the per-source settings that change its rows
    where they are set (so a single unweighted source keeps the key it always had)."""
    out = []
    for s in planned:
        fp = dict(s.fingerprint)
        if s.config.weight != 1.0:
            fp["weight"] = s.config.weight
        if s.config.format is not None:
            fp["format"] = s.config.format
        if s.config.columns is not None:
            fp["columns"] = dict(sorted(s.config.columns.items()))
        out.append(fp)
    return out


def _by_role(data: DataConfig, planned: list[_Source], values: list[Any]) -> dict[str, Any]:
    """{role: value} for a role given one source, {role: [value per source]} for a list."""
    out: dict[str, Any] = {}
    for s, value in zip(planned, values):
        if isinstance(data.train if s.role == "train" else data.eval, list):
            out.setdefault(s.role, []).append(value)
        else:
            out[s.role] = value
    return out


def _sources_report(
    data: DataConfig, planned: list[_Source], formats: list[str], staging: Path
) -> dict[str, Any]:
    """report["sources"]: {role: {source, format}}; when the run mixes sources (a list, or a
    weight), also `mix`, one entry per source: key, source, format, weight, rows_in, rows_kept,
    dropped ({reason: count}) and copies, with rows_in == rows_kept + sum(dropped) for each."""
    counts = count_sources(staging) if data.mixes() else {}
    out: dict[str, Any] = {}
    for role in SPLITS:
        entries = [(s, fmt) for s, fmt in zip(planned, formats) if s.role == role]
        if not entries:
            continue
        names = [s.config.describe() for s, _ in entries]
        fmts = list(dict.fromkeys(fmt for _, fmt in entries))
        out[role] = {"source": ", ".join(names), "format": ", ".join(fmts)}
        if data.mixes():
            empty = {"rows_in": 0, "rows_kept": 0, "dropped": {}, "copies": 0}
            out[role]["mix"] = [
                {
                    "key": s.key,
                    "source": s.config.describe(),
                    "format": fmt,
                    "weight": s.config.weight,
                    **counts.get(s.label, empty),
                }
                for s, fmt in entries
            ]
    return out


def _flatten_kept(staging: Path, labels: list[str]) -> None:
    """Gather each split's kept files (split=S/source=L/status=kept/) into split=S/status=kept/,
    the layout `install_prepared` takes, named in task order and, within a task, source order
    (each source's rows before its copies): the order training reads them in."""
    rank = {label: 2 * i for i, label in enumerate(labels)}
    rank.update({label + COPIES: 2 * i + 1 for i, label in enumerate(labels)})
    parts = partitions(staging)
    for split in SPLITS:
        files = sorted(
            (f.name, rank[source], f)
            for (part_split, source, status), fs in parts.items()
            if part_split == split and status == KEPT
            for f in fs
        )
        if not files:
            continue
        target = staging / f"split={split}" / f"status={KEPT}"
        target.mkdir()
        for k, (_, _, f) in enumerate(files):
            f.rename(target / f"{k:06d}-{f.stem}-{f.parent.parent.name.split('=', 1)[1]}.parquet")


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
