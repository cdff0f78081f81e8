"""The pairs of `dpo-cluster bench train`: generated with log-normal lengths, prepared by
dpo-cluster, and counted in non-pad tokens by both tokenizations. The text is built from a corpus's
tokens so that TRL (strings) and dpo-cluster (the same rows as JSONL) train on identical pairs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from dpo_cluster.bench.train_settings import BenchSettings


def generate_length_pairs(
    num_pairs: int,
    tokenizer: Any,
    *,
    seed: int,
    prompt_median: int = 60,
    chosen_median: int = 50,
    rejected_median: int = 40,
    sigma: float = 0.6,
    max_length: int = 512,
) -> list[dict[str, str]]:
    """`num_pairs` standard pairs {prompt, chosen, rejected} of plain text whose lengths in
    `tokenizer`'s tokens are log-normal with these medians and shape `sigma`, a function of `seed`.

    The heavy tail is clipped: prompts at max_length // 2 tokens (so no pipeline drops a pair for
    its prompt), answers at max_length (prompt + answer beyond it is truncated in training). Text
    is a random run of tokens of an English corpus (`dpo_cluster.tiny.corpus_lines`) decoded back to
    text, so its length re-tokenizes to the drawn one up to a token at the edges; each prompt ends
    with a newline, where no token merges with the answer.
    """
    rng = np.random.default_rng(seed)
    pool = _token_pool(tokenizer, rng, 4 * max_length + 2048)

    def lengths(median: int, cap: int) -> np.ndarray:
        drawn = np.round(rng.lognormal(math.log(median), sigma, num_pairs))
        return np.clip(drawn, 2, cap).astype(np.int64)

    def piece(n: int) -> str:
        while True:
            start = int(rng.integers(0, len(pool) - n))
            text = tokenizer.decode(pool[start : start + n])
            if text.strip():
                return text

    prompt_lengths = lengths(prompt_median, max_length // 2)
    chosen_lengths = lengths(chosen_median, max_length)
    rejected_lengths = lengths(rejected_median, max_length)
    rows = []
    for p, c, r in zip(prompt_lengths, chosen_lengths, rejected_lengths):
        chosen = piece(int(c))
        rejected = piece(int(r))
        while rejected == chosen:
            rejected = piece(int(r))
        rows.append({"prompt": piece(int(p)) + "\n", "chosen": chosen, "rejected": rejected})
    return rows


def write_bench_pairs(s: BenchSettings, tokenizer: Any) -> list[dict[str, str]]:
    """`s.pairs` generated pairs of the settings' lengths, written as JSONL to `s.data_file` -> the rows."""
    from dpo_cluster.data.samples import write_jsonl

    rows = generate_length_pairs(
        s.pairs,
        tokenizer,
        seed=s.seed,
        prompt_median=s.prompt_median,
        chosen_median=s.chosen_median,
        rejected_median=s.rejected_median,
        sigma=s.length_sigma,
        max_length=s.max_length,
    )
    write_jsonl(rows, s.data_file)
    return rows


def _token_pool(tokenizer: Any, rng: np.random.Generator, min_tokens: int) -> list[int]:
    from dpo_cluster.tiny import corpus_lines

    # ASCII only: a run cut out of a multi-byte character would not decode to the same tokens.
    lines = [line for line in corpus_lines() if line.isascii()]
    ids: list[int] = []
    while len(ids) < min_tokens:
        text = " ".join(lines[i] for i in rng.permutation(len(lines)))
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def prepare_pairs(s: BenchSettings) -> tuple[Path, str]:
    """dpo-cluster's preparation of the pairs file: (the train split directory, how it was made)."""
    from dpo_cluster.config import load_config

    config = load_config(None, s.dpo_cluster_overrides("dpo-cluster", s.prepare_dir))
    try:
        import ray
    except ImportError:
        return prepare_in_process(config), "PairTokenizer in one process (Ray is not installed)"
    from dpo_cluster.data.pipeline import prepare

    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    try:
        prepared = prepare(config)
    finally:
        ray.shutdown()
    train_dir = prepared.split_dir("train")
    assert train_dir is not None
    return train_dir, "Ray Data (dpo_cluster.data.pipeline.prepare)"


def prepare_in_process(config: Any) -> Path:
    """The pipeline's per-pair work (normalize, tokenize, fit to length) without Ray, written as
    one Parquet file that `IndexedPairSource` reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpo_cluster.data.formats import normalize_row
    from dpo_cluster.data.records import TokenizedPair
    from dpo_cluster.data.tokenize import PairTokenizer
    from dpo_cluster.modeling import load_tokenizer

    path = Path(config.data.train.path)
    pairs = [normalize_row(row, "standard", config.data.format_spec()) for row in read_jsonl(path)]
    results = PairTokenizer(load_tokenizer(config.tokenizer_path()), config.data.tokenize_spec()).tokenize(
        pairs
    )
    kept = [r for r in results if isinstance(r, TokenizedPair)]
    ids = pa.list_(pa.int32())
    table = pa.table(
        {
            "row_id": [f"{path}:{i + 1}" for i in range(len(kept))],
            "prompt_ids": pa.array([r.prompt_ids for r in kept], ids),
            "chosen_ids": pa.array([r.chosen_ids for r in kept], ids),
            "rejected_ids": pa.array([r.rejected_ids for r in kept], ids),
        }
    )
    out = Path(config.output_dir) / "prepared" / "train"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    pq.write_table(table, out / "part-0.parquet")
    return out


def read_ids(train_dir: Path) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """prompt_ids, chosen_ids, rejected_ids of a prepared split directory, files in name order."""
    import pyarrow.parquet as pq

    columns: dict[str, list[list[int]]] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for f in sorted(train_dir.glob("*.parquet")):
        table = pq.read_table(f, columns=list(columns))
        for name in columns:
            columns[name] += table.column(name).to_pylist()
    return columns["prompt_ids"], columns["chosen_ids"], columns["rejected_ids"]


def count_trl_tokens(rows: list[dict[str, str]], tokenizer: Any, max_length: int) -> int | None:
    """Non-pad tokens of TRL's preparation of `rows` after its collator's keep_start truncation;
    None where TRL is not installed."""
    try:
        from dpo_cluster.data.trl_reference import trl_tokenize
    except ImportError:
        return None
    out = trl_tokenize(rows, tokenizer, max_length=max_length)
    return sum(
        min(len(r["prompt_ids"]) + len(r["chosen_ids"]), max_length)
        + min(len(r["prompt_ids"]) + len(r["rejected_ids"]), max_length)
        for r in out.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    )
