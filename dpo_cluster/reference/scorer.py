"""The reference's actor pool: a Ray Data stage that adds ref_chosen_logps / ref_rejected_logps to pairs.

Each actor loads the reference once and scores `reference.batch_size` pairs per call, padded by
`collate_pairs` and scored by `sequence_logps` exactly as the training loop scores its in-loop
reference, so the stored values are the ones the loop would compute. The input is read and
materialized before any actor starts: read tasks that waited for CPUs the actors hold would never
feed them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch

from dpo_cluster.batch.collate import ID_COLUMNS, REF_COLUMNS, collate_pairs
from dpo_cluster.batch.logps import sequence_logps
from dpo_cluster.config import Config, LoraConfig, ModelConfig, ReferenceConfig
from dpo_cluster.data.pipeline import PreparedData
from dpo_cluster.modeling import load_reference, load_tokenizer

SPLIT_COLUMN = "split"
# Reference batches per input block. An actor takes whole blocks, so the prepared splits (a few
# large blocks) are cut into many: enough to keep every actor busy, and each still worth a call.
_BATCHES_PER_BLOCK = 16
# Environment the actors need as the training workers do: offline hub, built-in cache, HF home.
_PASSED_ENV = ("HF_HUB_OFFLINE", "DPO_CLUSTER_CACHE", "HF_HOME", "HF_HUB_CACHE")


@dataclass(frozen=True)
class ReferenceSpec:
    """What a `ReferenceScorer` actor needs to load the reference; picklable.

    model: loading settings with name_or_path / revision of the reference and its dtype.
    load_in_4bit: load the 4-bit base of a QLoRA policy (CUDA only).
    pad_token_id: padding id of the training loop's batches (padding never changes the values:
        right padding sits after every real token of a causal model).
    use_gpu: score on the actor's GPU (reference.num_gpus > 0) instead of its CPUs.
    ld_alpha: train.ld_alpha: LD-DPO weights the reference's sums as the policy's (None: plain sums).
    chunk_size: train.logps_chunk_size: completion tokens per output-head call (0: full logits).
    """

    model: ModelConfig
    load_in_4bit: bool
    pad_token_id: int
    use_gpu: bool
    ld_alpha: float | None = None
    chunk_size: int = 0


class ReferenceScorer:
    """The callable class of the actor pool: loads the reference once per actor, then adds
    ref_chosen_logps / ref_rejected_logps to every batch of pairs it is given."""

    def __init__(self, spec: ReferenceSpec) -> None:
        if spec.use_gpu and not torch.cuda.is_available():
            raise RuntimeError("reference.num_gpus > 0, but this reference actor sees no CUDA device")
        self.device = torch.device("cuda" if spec.use_gpu else "cpu")
        self.pad_token_id = spec.pad_token_id
        self.ld_alpha = spec.ld_alpha
        self.chunk_size = spec.chunk_size
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
            logps, _, _ = sequence_logps(
                self.model, batch, ld_alpha=self.ld_alpha, chunk_size=self.chunk_size
            )
        values = logps.float().cpu().numpy()  # (2B,): chosen half, then rejected half
        n = batch.num_pairs
        table = table.append_column(REF_COLUMNS[0], pa.array(values[:n], pa.float32()))
        return table.append_column(REF_COLUMNS[1], pa.array(values[n:], pa.float32()))


def build_reference_spec(config: Config) -> ReferenceSpec:
    """The actors' loading settings for `config` (the driver loads the tokenizer for its pad id)."""
    reference = config.reference
    tokenizer = load_tokenizer(config.tokenizer_path(), trust_remote_code=config.model.trust_remote_code)
    # The training loop's choice, so both pad alike.
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return ReferenceSpec(
        model=config.reference_model(),
        load_in_4bit=config.lora.load_in_4bit,
        pad_token_id=int(pad_id),
        use_gpu=reference.num_gpus > 0,
        ld_alpha=config.train.ld_alpha,
        chunk_size=config.train.logps_chunk_size,
    )


def build_scored_dataset(config: Config, prepared: PreparedData, spec: ReferenceSpec) -> Any:
    """The stage: every prepared row of every split, in order, with a `split` column and the two
    reference columns; lazy, over input rows already materialized (this reads them). Build it
    inside `preserve_order()`, or the actor pool may return batches out of order."""
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


def _tag_split(table: pa.Table, split: str) -> pa.Table:
    return table.append_column(SPLIT_COLUMN, pa.array([split] * table.num_rows, pa.string()))


def select_split(table: pa.Table, split: str) -> pa.Table:
    """The rows of `split` in a scored table, without the `split` column."""
    return table.filter(pc.equal(table[SPLIT_COLUMN], split)).drop_columns([SPLIT_COLUMN])


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
