"""The reference's actor pool: a Ray Data stage that scores pairs by position with the reference.

Each actor loads the reference once and opens the prepared splits' row layouts (memory-mapped, so
it reads only the rows it scores). It gets work items of row positions, reads those rows, cuts
them into forwards (`reference.batch_size` pairs, or pairs by the tokens they cost under
`reference.max_tokens_per_forward`), packs each forward's sequences without padding where the
model supports it (`reference.packing`), and scores them with `sequence_logps`, exactly as the
training loop scores its in-loop reference, so the stored values are the ones the loop would compute.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from dpo_cluster.batch.collate import ID_COLUMNS, REF_COLUMNS, collate_pairs
from dpo_cluster.batch.logps import sequence_logps
from dpo_cluster.batch.packing import pack_pairs, packing_route, take_rows
from dpo_cluster.batch.token_budget import TokenBudget
from dpo_cluster.config import Config, LoraConfig, ModelConfig, ReferenceConfig
from dpo_cluster.data.layout import LayoutRows
from dpo_cluster.modeling import load_reference, load_tokenizer

SPLIT_COLUMN = "split"
POSITIONS_COLUMN = "positions"
POSITION_COLUMN = "position"
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
    batch_size: reference.batch_size: the most pairs of one forward.
    packing: reference.packing: pack forwards where the model's attention supports it.
    max_tokens: reference.max_tokens_per_forward: a forward's token budget (None: none).
    split_dirs: split -> its prepared directory (prepared/{split}), read by position.
    """

    model: ModelConfig
    load_in_4bit: bool
    pad_token_id: int
    use_gpu: bool
    ld_alpha: float | None = None
    chunk_size: int = 0
    batch_size: int = 8
    packing: bool = False
    max_tokens: int | None = None
    split_dirs: dict[str, str] = field(default_factory=dict)


class ReferenceScorer:
    """Loads the reference once, then scores pairs: `score(columns)` for token-id columns,
    `__call__(table)` for a table of pairs (the same table plus the two reference columns)."""

    def __init__(self, spec: ReferenceSpec) -> None:
        if spec.use_gpu and not torch.cuda.is_available():
            raise RuntimeError("reference.num_gpus > 0, but this reference actor sees no CUDA device")
        self.device = torch.device("cuda" if spec.use_gpu else "cpu")
        self.spec = spec
        # mode "model" with no name of its own loads spec.model: the reference weights, frozen, in
        # eval mode (dropout off), 4-bit like the policy's base when QLoRA.
        self.model = load_reference(
            spec.model,
            ReferenceConfig(mode="model"),
            LoraConfig(load_in_4bit=spec.load_in_4bit),
            device=self.device,
        )
        self.route = packing_route(self.model)[0] if spec.packing else None
        self.budget = (
            TokenBudget(spec.max_tokens, self.route or "padded") if spec.max_tokens is not None else None
        )

    def forwards(self, columns: dict[str, Any]) -> list[np.ndarray]:
        """The pairs of `columns` cut into forwards -> each forward's pair indices: consecutive
        runs of batch_size pairs, or under a token budget pairs longest first by what they cost
        (`TokenBudget.cut`), no forward holding more than batch_size pairs."""
        num_pairs = len(columns[ID_COLUMNS[0]])
        size = self.spec.batch_size
        if self.budget is None:
            return [np.arange(start, min(start + size, num_pairs)) for start in range(0, num_pairs, size)]
        pieces = self.budget.cut(columns, world_size=1)[0]
        return [piece[start : start + size] for piece in pieces for start in range(0, len(piece), size)]

    def score(self, columns: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Token-id columns of B pairs (prompt_ids, chosen_ids, rejected_ids) -> (chosen (B,),
        rejected (B,)) float32 reference log-probs, in the pairs' order."""
        num_pairs = len(columns[ID_COLUMNS[0]])
        chosen, rejected = np.zeros(num_pairs, np.float32), np.zeros(num_pairs, np.float32)
        for indices in self.forwards(columns):
            pairs = take_rows(columns, indices)
            if self.route is None:
                batch = collate_pairs(pairs, self.spec.pad_token_id)
            else:
                batch = pack_pairs(pairs, self.spec.pad_token_id, varlen=self.route == "varlen")
            with torch.no_grad():  # as `reference_context` runs the in-loop reference
                logps, _, _ = sequence_logps(
                    self.model,
                    batch.to(self.device),
                    ld_alpha=self.spec.ld_alpha,
                    chunk_size=self.spec.chunk_size,
                )
            values = logps.float().cpu().numpy()  # (2b,): chosen half, then rejected half
            chosen[indices], rejected[indices] = values[: len(indices)], values[len(indices) :]
        return chosen, rejected

    def __call__(self, table: pa.Table) -> pa.Table:
        """B rows with prompt_ids, chosen_ids, rejected_ids (and any other columns) -> the same
        B rows, in order, plus ref_chosen_logps and ref_rejected_logps (B,) float32."""
        table = table.drop_columns([name for name in REF_COLUMNS if name in table.column_names])
        chosen, rejected = self.score(_id_columns(table))
        table = table.append_column(REF_COLUMNS[0], pa.array(chosen, pa.float32()))
        return table.append_column(REF_COLUMNS[1], pa.array(rejected, pa.float32()))


class PositionScorer:
    """The callable class of the actor pool: work items (split, positions) in, one row per
    position out (split, position, ref_chosen_logps, ref_rejected_logps), in the items' order."""

    def __init__(self, spec: ReferenceSpec) -> None:
        self.scorer = ReferenceScorer(spec)
        self.rows = {split: LayoutRows(path) for split, path in spec.split_dirs.items()}

    def __call__(self, items: pa.Table) -> pa.Table:
        out = []
        for split, positions in zip(
            items.column(SPLIT_COLUMN).to_pylist(), items.column(POSITIONS_COLUMN).to_pylist()
        ):
            positions = np.asarray(positions, dtype=np.int64)
            chosen, rejected = self.scorer.score(_id_columns(self.rows[split].take(positions)))
            out.append(
                pa.table(
                    {
                        SPLIT_COLUMN: pa.array([split] * len(positions), pa.string()),
                        POSITION_COLUMN: pa.array(positions),
                        REF_COLUMNS[0]: pa.array(chosen),
                        REF_COLUMNS[1]: pa.array(rejected),
                    }
                )
            )
        return pa.concat_tables(out)


def _id_columns(table: pa.Table) -> dict[str, Any]:
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in ID_COLUMNS}


def build_reference_spec(config: Config, split_dirs: dict[str, str] | None = None) -> ReferenceSpec:
    """The actors' settings for `config` (the driver loads the tokenizer for its pad id);
    `split_dirs`: the prepared split directories the actors read by position."""
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
        batch_size=reference.batch_size,
        packing=reference.packing,
        max_tokens=reference.max_tokens_per_forward,
        split_dirs=dict(split_dirs or {}),
    )


def score_items(config: Config, items: Any, spec: ReferenceSpec) -> Any:
    """Work items (a Ray Dataset of split, positions; one item per block) through the actor pool of
    the reference -> scored positions; lazy. Build it inside `preserve_order()`, or the pool may
    return items out of order."""
    import ray.data

    reference = config.reference
    env = {key: os.environ[key] for key in _PASSED_ENV if key in os.environ}
    options: dict[str, Any] = (
        {"accelerator_type": reference.accelerator_type} if reference.accelerator_type else {}
    )
    return items.map_batches(
        PositionScorer,
        fn_constructor_kwargs={"spec": spec},
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=reference.concurrency),
        num_cpus=reference.num_cpus,
        num_gpus=reference.num_gpus,
        runtime_env={"env_vars": env},
        **options,
    )


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
