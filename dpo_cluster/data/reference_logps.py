"""Reference log-probs as a Ray Data stage (`reference.mode: precompute`).

DPO's reference pi_ref is frozen, so log pi_ref(y|x) of every pair is a fixed number. This stage
computes those numbers once, with an actor pool of the reference model, and hands the trainer
datasets that carry them; the training workers then load no reference model and
run no reference forward (the loop reads the columns, as for `precomputed`).

    prepared/{train,eval}  (tokenized pairs, `dpo_cluster.data.pipeline.prepare`)
      -> each row tagged with its split, one union (one actor pool scores both splits),
         materialized before any actor starts
      -> map_batches(ReferenceScorer): reference.concurrency actors, each loading the reference
         once; reference.batch_size pairs are padded by `collate_pairs` and scored by
         `sequence_logps`, exactly as the training loop scores its in-loop reference, and the
         rows gain ref_chosen_logps / ref_rejected_logps (float32, summed completion log-probs);
         materialized, so the actors exit before anything else runs
      -> cache on:  written to Parquet in output_dir/reference_logps/.tmp-<key>-*, renamed to
                    <key>/ once complete and checked, then read back
         cache off: split in the object store, nothing written
      -> per split, a materialized Ray Dataset in the prepared row order: the trainer's datasets

The three executions (read, score, write) run one after another on purpose: in one streaming
execution the read and write tasks would wait for CPUs the actors hold, and a pool that takes
every CPU of the cluster (2 actors of 1 CPU on 2 CPUs) would never receive its first batch. Fed
from the object store, the scoring execution runs actors alone, all of them at once.

The cache key (`compute_reference_key`) covers the prepared data's own key (sources, tokenizer,
template, length and split settings), the reference's identity (name or path, revision, and a
hash of the weight files when they are local or built in), whether it is loaded 4-bit, its dtype
and attention kernel, and how the per-sequence log-prob is formed. A run with the same key reuses
the directory; any other key gets a directory of its own. The loss type, beta and label smoothing
are left out on purpose: they act on these numbers in the loop and never change them, so a sweep
over them reuses one pass.

Before training or beside it: this module is the pre-pass, which scores everything, then lets
the workers start. `dpo_cluster.data.reference_stream` runs the same actor pool beside training,
feeding the workers block by block, where the cluster can hold the actors next to the workers;
the cache, its key and the report are shared. A lazy stage handed to the trainer instead would
run once per worker and per pass (every worker reads the whole dataset in one fixed order each
epoch, `dpo_cluster.train.context`), and `streaming_split` deals blocks to whichever worker asks
first, which is neither deterministic nor every row to every worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from dpo_cluster import __version__
from dpo_cluster.batch.collate import ID_COLUMNS, REF_COLUMNS, collate_pairs
from dpo_cluster.batch.logps import sequence_logps
from dpo_cluster.config import Config, LoraConfig, ModelConfig, ReferenceConfig
from dpo_cluster.data.pipeline import MANIFEST_FILE, SPLITS, PreparedData
from dpo_cluster.modeling import load_reference, load_tokenizer, resolve_name_or_path

logger = logging.getLogger(__name__)

REFERENCE_DIR = "reference_logps"
REPORT_FILE = "reference_report.json"
SPLIT_COLUMN = "split"
# How each stored value is formed; part of the cache key, so a change here never reuses old values.
LOGPS_FORM = "sum of completion-token log-probs: dpo_cluster.train.forward.sequence_logps on collate_pairs"
# Files whose bytes define a local model's outputs (weights, architecture, adapter).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_WEIGHT_NAMES = ("config.json", "adapter_config.json")
# Rows per Parquet file and per block handed to training: few, large files instead of one per
# reference batch.
_ROWS_PER_FILE = 8192
# Reference batches per input block. An actor takes whole blocks, so the prepared splits (a few
# large blocks) are cut into many: enough to keep every actor busy, and each still worth a call.
_BATCHES_PER_BLOCK = 16
# The one Parquet file of each split in the cache.
CACHE_FILE = "part-00000.parquet"
# Environment the actors need as the training workers do: offline hub, built-in cache, HF home.
_PASSED_ENV = ("HF_HUB_OFFLINE", "DPO_CLUSTER_CACHE", "HF_HOME")


@dataclass(frozen=True)
class ReferenceSpec:
    """What a `ReferenceScorer` actor needs to load the reference; picklable.

    model: loading settings with name_or_path / revision of the reference and its dtype.
    load_in_4bit: load the 4-bit base of a QLoRA policy (CUDA only).
    pad_token_id: padding id of the training loop's batches (padding never changes the values:
        right padding sits after every real token of a causal model).
    use_gpu: score on the actor's GPU (reference.num_gpus > 0) instead of its CPUs.
    """

    model: ModelConfig
    load_in_4bit: bool
    pad_token_id: int
    use_gpu: bool


class ReferenceScorer:
    """The callable class of the actor pool: loads the reference once per actor, then adds
    ref_chosen_logps / ref_rejected_logps to every batch of pairs it is given."""

    def __init__(self, spec: ReferenceSpec) -> None:
        if spec.use_gpu and not torch.cuda.is_available():
            raise RuntimeError("reference.num_gpus > 0, but this reference actor sees no CUDA device")
        self.device = torch.device("cuda" if spec.use_gpu else "cpu")
        self.pad_token_id = spec.pad_token_id
        # mode "model" with no name of its own loads spec.model: the reference weights, frozen, in
        # eval mode (dropout off), 4-bit like the policy's base when QLoRA.
        self.model = load_reference(
            spec.model,
            ReferenceConfig(mode="model"),
            LoraConfig(load_in_4bit=spec.load_in_4bit),
            device=self.device,
        )

    def __call__(self, table: pa.Table) -> pa.Table:
        """B rows with prompt_ids, chosen_ids, rejected_ids (and any other columns) -> the same
        B rows, in order, plus ref_chosen_logps and ref_rejected_logps (B,) float32."""
        table = table.drop_columns([name for name in REF_COLUMNS if name in table.column_names])
        columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in ID_COLUMNS}
        batch = collate_pairs(columns, self.pad_token_id).to(self.device)
        with torch.no_grad():  # as `reference_context` runs the in-loop reference
            logps, _, _ = sequence_logps(self.model, batch)
        values = logps.float().cpu().numpy()  # (2B,): chosen half, then rejected half
        n = batch.num_pairs
        table = table.append_column(REF_COLUMNS[0], pa.array(values[:n], pa.float32()))
        return table.append_column(REF_COLUMNS[1], pa.array(values[n:], pa.float32()))


@dataclass
class ReferenceLogps:
    """The stage's result.

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


# ----------------------------------------------------------------------------------------------
# The cache key.


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
        "dtype": config.reference.resolved_dtype(config.model.dtype),
        "attn_implementation": config.model.attn_implementation,
        "logps": LOGPS_FORM,
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    return key, parts


# ----------------------------------------------------------------------------------------------
# The stage.


def build_reference_spec(config: Config) -> ReferenceSpec:
    """The actors' loading settings for `config` (the driver loads the tokenizer for its pad id)."""
    reference = config.reference
    tokenizer = load_tokenizer(config.tokenizer_path(), trust_remote_code=config.model.trust_remote_code)
    # The training loop's choice, so both pad alike.
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = dataclasses.replace(
        config.model,
        name_or_path=reference.name_or_path or config.model.name_or_path,
        revision=None if reference.name_or_path else config.model.revision,
        dtype=reference.resolved_dtype(config.model.dtype),
        gradient_checkpointing=False,
    )
    return ReferenceSpec(
        model=model,
        load_in_4bit=config.lora.load_in_4bit,
        pad_token_id=int(pad_id),
        use_gpu=reference.num_gpus > 0,
    )


def build_scored_dataset(config: Config, prepared: PreparedData, spec: ReferenceSpec) -> Any:
    """The stage: every prepared row of every split, in order, with a `split` column and the two
    reference columns; lazy, over input rows already materialized (this reads them). Build it
    with DataContext preserve_order on (`compute_reference_logps` does), or the actor pool may
    return batches out of order."""
    return score_rows(config, scoring_input(config, prepared), spec)


def scoring_input(config: Config, prepared: PreparedData) -> Any:
    """Every prepared row tagged with its split, all splits in one dataset, in blocks of
    reference.batch_size x _BATCHES_PER_BLOCK rows; materialized (read now, while no actor or
    training worker holds a CPU the read tasks need)."""
    tagged = [
        ds.map_batches(
            _tag_split,
            batch_size=None,
            batch_format="pyarrow",
            fn_kwargs={"split": split},
            udf_modifying_row_count=False,
        )
        for split, ds in prepared.datasets().items()
    ]
    rows = tagged[0] if len(tagged) == 1 else tagged[0].union(*tagged[1:])
    return rows.repartition(
        target_num_rows_per_block=config.reference.batch_size * _BATCHES_PER_BLOCK
    ).materialize()


def score_rows(config: Config, rows: Any, spec: ReferenceSpec) -> Any:
    """`rows` (from `scoring_input`) through the actor pool of the reference; lazy."""
    import ray.data

    reference = config.reference
    env = {key: os.environ[key] for key in _PASSED_ENV if key in os.environ}
    options: dict[str, Any] = (
        {"accelerator_type": reference.accelerator_type} if reference.accelerator_type else {}
    )
    return rows.map_batches(
        ReferenceScorer,
        fn_constructor_kwargs={"spec": spec},
        batch_size=reference.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=reference.concurrency),
        num_cpus=reference.num_cpus,
        num_gpus=reference.num_gpus,
        runtime_env={"env_vars": env},
        udf_modifying_row_count=False,
        **options,
    )


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
                split: _in_prepared_order(prepared, split, ray.data.read_parquet(str(final / split)))
                for split in counts
            }
        else:
            logger.info("reference log-probs: scoring %d pairs (%s)", total, plan.problem)
            scored = build_scored_dataset(config, prepared, build_reference_spec(config)).materialize()
            tables = {
                split: _in_prepared_order(prepared, split, ds)
                for split, ds in _split_in_memory(scored, counts).items()
            }
            if config.reference.cache:
                _write_cache(tables, plan)
        datasets = {split: ray.data.from_arrow(table).materialize() for split, table in tables.items()}

    report = write_report(config, plan, seconds=time.perf_counter() - started, overlapped=False)
    return ReferenceLogps(datasets, report, final if config.reference.cache else None)


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


# ----------------------------------------------------------------------------------------------
# Helpers.


def _tag_split(table: pa.Table, split: str) -> pa.Table:
    return table.append_column(SPLIT_COLUMN, pa.array([split] * table.num_rows, pa.string()))


def select_split(table: pa.Table, split: str) -> pa.Table:
    return table.filter(pc.equal(table[SPLIT_COLUMN], split)).drop_columns([SPLIT_COLUMN])


def _split_in_memory(everything: Any, counts: dict[str, int]) -> dict[str, Any]:
    """The materialized stage (all splits) -> one materialized dataset per split, rows in order;
    batches of _ROWS_PER_FILE rows merge the stage's small blocks into fewer, larger ones."""
    datasets = {
        split: everything.map_batches(
            select_split, batch_size=_ROWS_PER_FILE, batch_format="pyarrow", fn_kwargs={"split": split}
        ).materialize()
        for split in counts
    }
    got = {split: ds.count() for split, ds in datasets.items()}
    if got != counts:
        raise RuntimeError(f"reference stage returned {got} rows per split for the {counts} it was given")
    return datasets


@contextlib.contextmanager
def preserve_order() -> Iterator[None]:
    """Datasets made inside keep their rows in input order through the actor pool (a dataset
    copies the current DataContext when it is made); the caller's setting is restored after."""
    import ray.data

    options = ray.data.DataContext.get_current().execution_options
    previous = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = previous


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


def prepared_row_ids(prepared: PreparedData, split: str) -> list[Any]:
    """The row ids of a prepared split in training order: files in name order, rows in file order
    (the order Ray Data reads them in with preserve_order)."""
    path = prepared.split_dir(split)
    files = sorted(path.glob("*.parquet")) if path is not None else []
    return [row_id for f in files for row_id in pq.read_table(f, columns=["row_id"]).column(0).to_pylist()]


def _in_prepared_order(prepared: PreparedData, split: str, ds: Any) -> pa.Table:
    """The rows of `ds` (a scored or cached split) as one table in the prepared split's order, which
    training depends on (matched by row id; collected in this process, once per split)."""
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


def _write_cache(tables: dict[str, pa.Table], plan: CachePlan) -> None:
    """Write the scored splits (in order) into a staging directory, then `seal_cache` it."""
    staging = new_staging_dir(plan)
    try:
        # One file per split written here, in order: Ray Data's writers name files in an order
        # that need not be the rows' order, and training reads files in name order.
        for split, table in tables.items():
            (staging / split).mkdir(parents=True)
            pq.write_table(table, staging / split / CACHE_FILE, row_group_size=_ROWS_PER_FILE)
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
    """Check the complete staging directory, write its manifest, then rename it to `plan.final`: a
    run killed at any point leaves only a .tmp-* directory, which nothing trusts."""
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
    _install(staging, plan.final, plan.key, plan.counts)


def _install(staging: Path, final: Path, key: str, counts: dict[str, int]) -> None:
    """Rename the complete staging directory to `final` (atomic on one filesystem)."""
    if final.exists():  # an unusable older attempt under the same key: move it out of the way
        stale = final.with_name(f".stale-{key}-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(OSError):  # another run moved it already
            final.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        staging.rename(final)
    except OSError:
        if _cache_problem(final, key, counts) is not None:
            raise
        # Another run with the same key installed an identical, complete cache first.
