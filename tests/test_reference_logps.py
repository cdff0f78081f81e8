"""The reference log-prob stage (`reference.mode: precompute`) on a real local Ray: its values are
the in-process reference's by row position, a run scores only the pairs it reads (eval first) and
only those the cache lacks, a stopped or killed stage keeps what it wrote and never more, waiting
workers get values as they come and the stage's failure when none will, and training on its
output equals training with the in-loop reference (Ray Train with 2 workers, and in one process
with LoRA)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dpo_cluster.batch.collate import ID_COLUMNS, REF_COLUMNS, collate_pairs
from dpo_cluster.batch.logps import sequence_logps
from dpo_cluster.config import Config, ConfigError, LoraConfig, ReferenceConfig, load_config
from dpo_cluster.data.pipeline import PreparedData, prepare
from dpo_cluster.modeling import load_reference, resolve_name_or_path
from dpo_cluster.reference import cache, precompute
from dpo_cluster.reference.cache import REFERENCE_DIR, REPORT_FILE, compute_reference_key, hash_weights
from dpo_cluster.reference.precompute import ReferenceLogps, build_reference_stage, compute_reference_logps
from dpo_cluster.reference.schedule import scoring_order
from dpo_cluster.reference.scorer import ReferenceScorer, build_reference_spec
from dpo_cluster.reference.values import ReferenceValues, scored_positions, write_fragment, write_status
from tests.test_train_local import losses, metrics_rows, train_config

pytestmark = pytest.mark.slow

# Two actors, and a batch size that divides neither split, so forwards end mid-item and the pool
# really has items to reorder.
STAGE = ("reference.mode=precompute", "reference.concurrency=2", "reference.batch_size=3")
# How far a bf16 loss may move when the reference scored the same pairs in other batch shapes.
BF16_LOSS_TOLERANCE = 1e-4
# Sums of a few hundred nats in float32 (one ulp: 3e-5) scored in other shapes, padded or packed.
FP32_LOGPS_TOLERANCE = 1e-4


def precompute_config(output_dir: Path, *overrides: str) -> Config:
    return train_config(output_dir, *STAGE, *overrides)


def prepared_table(prepared: PreparedData, split: str) -> pa.Table:
    """The prepared rows in position order (files by name, rows in file order)."""
    split_dir = prepared.split_dir(split)
    assert split_dir is not None
    files = sorted(split_dir.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def in_process_logps(name_or_path: str, table: pa.Table, batch_size: int = 5) -> torch.Tensor:
    """(N, 2) chosen/rejected reference log-probs of `table`'s pairs, scored here in fp32, padded."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_name_or_path(name_or_path)).eval()
    out = []
    for start in range(0, table.num_rows, batch_size):
        rows = table.slice(start, batch_size)
        batch = collate_pairs({name: rows.column(name).to_pylist() for name in ID_COLUMNS}, pad_token_id=1)
        with torch.no_grad():
            logps, _, _ = sequence_logps(model, batch)
        out.append(torch.stack([logps[: batch.num_pairs], logps[batch.num_pairs :]], dim=1))
    return torch.cat(out)


def stage_logps(values: ReferenceValues, positions: Any = None) -> torch.Tensor:
    """(N, 2) the stage's chosen/rejected values at `positions` (default: every row)."""
    positions = np.arange(values.num_rows) if positions is None else np.asarray(positions)
    got = values.lookup(positions)
    return torch.tensor(np.stack([got[REF_COLUMNS[0]], got[REF_COLUMNS[1]]], axis=1))


def cache_files(result: ReferenceLogps) -> dict[str, int]:
    """Every file of the cache directory -> its modification time (ns)."""
    return {str(p.relative_to(result.directory)): p.stat().st_mtime_ns for p in result.directory.rglob("*")}


def counts_of(prepared: PreparedData) -> dict[str, int]:
    return {split: prepared.report["splits"][split]["rows_kept"] for split in ("train", "eval")}


@pytest.fixture(scope="module")
def stage_run(
    tmp_path_factory: pytest.TempPathFactory, ray_local: None
) -> tuple[Config, PreparedData, ReferenceLogps]:
    config = precompute_config(tmp_path_factory.mktemp("stage"))
    prepared = prepare(config)
    return config, prepared, compute_reference_logps(config, prepared)


# ----------------------------------------------------------------------------------------------
# Values by position.


def test_stage_values_equal_the_reference_scored_in_process(
    stage_run: tuple[Config, PreparedData, ReferenceLogps],
) -> None:
    _, prepared, result = stage_run
    for split in ("train", "eval"):
        want = prepared_table(prepared, split)
        values = result.values(split)
        assert values.num_rows == want.num_rows == prepared.report["splits"][split]["rows_kept"]
        assert values.known.all()
        # The stage scores 3 pairs a forward, packed; the in-process reference 5, padded: other
        # shapes, so the sums (|logp| of several hundred) agree to a few float32 ulps.
        expected = in_process_logps("builtin:tiny", want)
        torch.testing.assert_close(stage_logps(values), expected, atol=FP32_LOGPS_TOLERANCE, rtol=1e-6)
        assert (expected < 0).all()
        # Fragments hold positions (each once) and float32 values, nothing else.
        fragments = [pq.read_table(f) for f in sorted((result.directory / split).glob("*.parquet"))]
        assert all(f.schema.names == ["position", *REF_COLUMNS] for f in fragments)
        assert all(f.schema.field(name).type == pa.float32() for f in fragments for name in REF_COLUMNS)
        positions = np.concatenate([f.column("position").to_numpy() for f in fragments])
        assert sorted(positions.tolist()) == list(range(want.num_rows))


def test_the_scorer_weights_its_sums_as_ld_dpo_when_asked(
    stage_run: tuple[Config, PreparedData, ReferenceLogps],
) -> None:
    """An actor's values with train.ld_alpha equal `sequence_logps(..., ld_alpha=)` in process, and
    differ from the plain sums where a pair's answers differ in length."""
    config, prepared, _ = stage_run
    table = prepared_table(prepared, "train").slice(0, 6)
    spec = build_reference_spec(
        dataclasses.replace(config, train=dataclasses.replace(config.train, ld_alpha=0.25))
    )
    assert spec.ld_alpha == 0.25
    scorer = ReferenceScorer(spec)
    scored = scorer(table)
    got = torch.tensor([scored.column(name).to_pylist() for name in REF_COLUMNS]).T
    model = scorer.model
    batch = collate_pairs({name: table.column(name).to_pylist() for name in ID_COLUMNS}, spec.pad_token_id)
    with torch.no_grad():
        weighted, _, _ = sequence_logps(model, batch, ld_alpha=0.25)
        plain, _, _ = sequence_logps(model, batch)
    torch.testing.assert_close(
        got, torch.stack([weighted[:6], weighted[6:]], dim=1).float(), atol=1e-4, rtol=1e-6
    )
    assert not torch.allclose(weighted, plain)


def test_a_token_budget_cuts_forwards_by_cost_and_keeps_the_values(
    stage_run: tuple[Config, PreparedData, ReferenceLogps],
) -> None:
    """reference.max_tokens_per_forward: forwards hold pairs by what they cost (packed: their real
    tokens), never more than batch_size; the values stay the in-process reference's."""
    config, prepared, _ = stage_run
    table = prepared_table(prepared, "train").slice(0, 40)
    budget = precompute_config(Path(config.output_dir), "reference.max_tokens_per_forward=300",
                               "reference.batch_size=16")  # fmt: skip
    scorer = ReferenceScorer(build_reference_spec(budget))
    assert scorer.route == "mask" and scorer.budget is not None  # packed rows, sdpa on CPU
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in ID_COLUMNS}
    forwards = scorer.forwards(columns)
    assert sorted(np.concatenate(forwards).tolist()) == list(range(40))
    assert 2 < len(forwards) < 40 and all(len(f) <= 16 for f in forwards)
    for indices in forwards:
        lengths = [
            len(columns["prompt_ids"][i]) + len(columns[k][i])
            for i in indices
            for k in ("chosen_ids", "rejected_ids")
        ]
        assert len(indices) == 1 or scorer.budget.cost(lengths) <= 300
    got = scorer(table)
    expected = in_process_logps("builtin:tiny", table)
    torch.testing.assert_close(
        torch.tensor([got.column(name).to_pylist() for name in REF_COLUMNS]).T,
        expected,
        atol=FP32_LOGPS_TOLERANCE,
        rtol=1e-6,
    )


def test_the_report_and_the_workers_side(stage_run: tuple[Config, PreparedData, ReferenceLogps]) -> None:
    config, prepared, result = stage_run
    report = json.loads((Path(config.output_dir) / REPORT_FILE).read_text())
    counts = counts_of(prepared)
    assert report["reused"] is False and report["state"] == "done" and report["rows"] == counts
    assert report["rows_needed"] == counts and report["rows_scored"] == sum(counts.values())
    assert report["rows_reused"] == {"train": 0, "eval": 0} and report["seconds"] > 0
    assert report["cache_dir"] == str(Path(config.output_dir) / REFERENCE_DIR / report["cache_key"])
    assert report["key_parts"]["reference"]["name_or_path"] == "builtin:tiny"
    assert len(report["key_parts"]["reference"]["weights_sha256"]) == 64
    assert len(report["key_parts"]["row_order"]) == 64
    assert report["actors"]["concurrency"] == 2 and report["actors"]["batch_size"] == 3
    assert report["actors"]["packing"] is True
    # Nobody waits on a finished stage: no status file is left in the cache.
    assert not list(result.directory.glob("status-*"))
    # Training workers in this mode load no reference model.
    assert load_reference(config.model, config.reference, config.lora) is None


# ----------------------------------------------------------------------------------------------
# What is scored: what the run reads, less what the cache holds.


def test_a_second_run_reuses_the_cache_without_scoring(
    stage_run: tuple[Config, PreparedData, ReferenceLogps],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config, prepared, first = stage_run
    before = cache_files(first)

    def no_scoring(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the reference stage ran although its cache holds every pair")

    monkeypatch.setattr(precompute, "score_items", no_scoring)
    second = compute_reference_logps(config, prepared)
    assert second.report["reused"] is True and second.report["rows_scored"] == 0
    assert second.report["rows_reused"] == counts_of(prepared)
    assert second.report["cache_key"] == first.report["cache_key"]
    assert json.loads((Path(config.output_dir) / REPORT_FILE).read_text())["reused"] is True
    assert cache_files(second) == before  # nothing rewritten
    for split in ("train", "eval"):
        assert torch.equal(stage_logps(second.values(split)), stage_logps(first.values(split)))


def test_a_short_run_scores_what_it_reads_and_a_longer_one_only_the_rest(
    stage_run: tuple[Config, PreparedData, ReferenceLogps], tmp_path: Path
) -> None:
    """max_steps 2 scores the eval split and 2 steps' pairs; max_steps 5 then scores only its pairs
    not scored yet; the values are those of scoring everything at once."""
    _, prepared, full = stage_run
    counts = counts_of(prepared)
    common = ("reference.concurrency=1", "train.eval_strategy=steps", "train.micro_batch_size=4")
    short = precompute_config(tmp_path, *common, "train.max_steps=2")
    order = scoring_order(short, counts)
    first = compute_reference_logps(short, prepared, order)
    assert len(order["train"]) == 2 * 4 and first.report["rows_needed"] == {"eval": 60, "train": 8}
    assert first.report["rows_scored"] == 68 < sum(counts.values())
    covered = scored_positions(first.directory / "train", counts["train"])
    assert sorted(np.flatnonzero(covered).tolist()) == sorted(order["train"].tolist())

    longer = precompute_config(tmp_path, *common, "train.max_steps=5")
    more = scoring_order(longer, counts)
    second = compute_reference_logps(longer, prepared, more)
    assert second.report["cache_key"] == first.report["cache_key"]
    assert second.report["rows_reused"] == {"eval": 60, "train": 8}
    assert second.report["rows_scored"] == 5 * 4 - 8
    for split, positions in more.items():
        torch.testing.assert_close(
            stage_logps(second.values(split), positions), stage_logps(full.values(split), positions),
            atol=FP32_LOGPS_TOLERANCE, rtol=1e-6,
        )  # fmt: skip
    # A position the runs never read was never scored, and asking for it says so.
    unread = int(np.flatnonzero(~scored_positions(second.directory / "train", counts["train"]))[0])
    with pytest.raises(ValueError, match="no reference log-probs for 1 of 1 rows"):
        second.values("train").lookup(np.array([unread]))


def test_a_stopped_stage_keeps_what_it_wrote_and_the_next_run_scores_the_rest(
    stage_run: tuple[Config, PreparedData, ReferenceLogps], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training ended (or the driver died) before the stage: it stops at the next item, its
    fragments are whole, a partial fragment of a killed write is never read, and the next run
    scores exactly the positions that are missing."""
    _, prepared, full = stage_run
    # A fragment per scored item, and items of one-pair forwards (16 pairs, about 0.6 s each here):
    # the first fragment is there long before the last of the 25 items is scored.
    monkeypatch.setattr(precompute, "FLUSH_SECONDS", 0.0)
    config = precompute_config(tmp_path, "reference.concurrency=1", "reference.batch_size=1")
    stage = build_reference_stage(config, prepared)
    stage.start()
    deadline = time.monotonic() + 120
    while not list((stage.plan.directory / "eval").glob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.05)
    stage.stop()
    stage.wait()
    assert stage.report["state"] == "stopped"
    done = stage.report["rows_scored"]
    assert 0 < done < sum(counts_of(prepared).values())
    covered = {
        split: scored_positions(stage.plan.split_dir(split), n) for split, n in counts_of(prepared).items()
    }
    assert sum(int(c.sum()) for c in covered.values()) == done
    # What a hard kill leaves mid-write: a temporary file, never taken for a fragment.
    stage.plan.split_dir("train").mkdir(exist_ok=True)
    (stage.plan.split_dir("train") / ".00000099-deadbeef.tmp").write_bytes(b"PAR1 half a file")
    again = compute_reference_logps(precompute_config(tmp_path, "reference.concurrency=1"), prepared)
    assert again.report["rows_scored"] == sum(counts_of(prepared).values()) - done
    for split in ("train", "eval"):
        torch.testing.assert_close(
            stage_logps(again.values(split)),
            stage_logps(full.values(split)),
            atol=FP32_LOGPS_TOLERANCE,
            rtol=1e-6,
        )


def test_a_cache_of_another_key_or_rows_is_started_again(
    stage_run: tuple[Config, PreparedData, ReferenceLogps], tmp_path: Path
) -> None:
    _, prepared, _ = stage_run
    config = precompute_config(tmp_path, "reference.concurrency=1")
    plan = cache.plan_cache(config, prepared)
    cache.open_cache(plan)
    write_fragment(
        plan.split_dir("train"), 0, np.array([0, 1]), np.array([-1.0, -2.0]), np.array([-3.0, -4.0])
    )
    manifest = json.loads((plan.directory / "manifest.json").read_text())
    (plan.directory / "manifest.json").write_text(json.dumps(manifest | {"rows": {"train": 1}}))
    cache.open_cache(plan)  # the manifest does not match: emptied, not trusted
    assert not scored_positions(plan.split_dir("train"), plan.counts["train"]).any()
    assert json.loads((plan.directory / "manifest.json").read_text())["rows"] == plan.counts


def test_cache_off_scores_every_run_and_leaves_nothing(
    stage_run: tuple[Config, PreparedData, ReferenceLogps],
) -> None:
    """Also unpacked, one pair per forward: the shapes the in-process reference gets here, so the
    values agree to 1e-5 (float32 noise of the actor's other threads), not only to packing's ulps."""
    _, prepared, cached = stage_run
    config = precompute_config(Path(prepared.output_dir), "reference.cache=false", "reference.batch_size=1",
                               "reference.packing=false")  # fmt: skip
    result = compute_reference_logps(config, prepared)
    assert result.report["reused"] is False and result.report["cache_dir"] is None
    assert result.report["rows_scored"] == sum(counts_of(prepared).values())
    assert result.directory.name.startswith(".scratch-")
    for split in ("train", "eval"):
        expected = in_process_logps("builtin:tiny", prepared_table(prepared, split), batch_size=1)
        torch.testing.assert_close(stage_logps(result.values(split)), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            stage_logps(result.values(split)),
            stage_logps(cached.values(split)),
            atol=FP32_LOGPS_TOLERANCE,
            rtol=1e-6,
        )
    result.close()
    assert [p.name for p in (Path(prepared.output_dir) / REFERENCE_DIR).iterdir()] == [
        cached.report["cache_key"]
    ]


# ----------------------------------------------------------------------------------------------
# Workers beside the stage.


def test_a_waiting_worker_gets_values_as_they_come_and_the_stage_failure_when_none_will(
    tmp_path: Path,
) -> None:
    directory, status = tmp_path / "train", tmp_path / "status.json"
    write_status(status, "running")
    values = ReferenceValues(directory, 10, status)

    def score_later() -> None:
        time.sleep(0.5)
        write_fragment(directory, 0, np.array([3, 7]), np.array([-3.0, -7.0]), np.array([-30.0, -70.0]))

    thread = threading.Thread(target=score_later)
    thread.start()
    got = values.lookup(np.array([7, 3]))
    thread.join()
    assert got[REF_COLUMNS[0]].tolist() == [-7.0, -3.0] and got[REF_COLUMNS[1]].tolist() == [-70.0, -30.0]
    assert values.waited_seconds >= 0.3
    write_status(status, "failed", "RuntimeError('the actor died')")
    with pytest.raises(RuntimeError, match="reference stage failed: RuntimeError\\('the actor died'\\)"):
        values.lookup(np.array([1]))
    write_status(status, "stopped")
    with pytest.raises(ValueError, match="no reference log-probs for 1 of 2 rows"):
        values.lookup(np.array([3, 1]))
    with pytest.raises(ValueError, match="outside the split's 10 rows"):
        write_fragment(directory, 1, np.array([10]), np.array([0.0]), np.array([0.0]))
        values.refresh()


def test_the_key_covers_weights_dtype_and_data_but_not_the_loss(tmp_path: Path) -> None:
    base = load_config(None, ["output_dir=/tmp/x", "model.name_or_path=builtin:tiny", "data.train=a.jsonl",
                              "reference.mode=precompute"])  # fmt: skip

    def key(config: Config, prepared_key: str = "p1") -> str:
        return compute_reference_key(config, prepared_key)[0]

    def changed(*overrides: str) -> Config:
        return load_config(None, ["output_dir=/tmp/x", "model.name_or_path=builtin:tiny", "data.train=a.jsonl",
                                  "reference.mode=precompute", *overrides])  # fmt: skip

    assert key(base) == key(changed())
    assert key(base) != key(base, "p2")  # other prepared data (data, tokenizer, template, lengths)
    # The same prepared key written again in another row order: values by position would not fit.
    assert compute_reference_key(base, "p1", "order-a")[0] != compute_reference_key(base, "p1", "order-b")[0]
    assert key(base) != key(changed("reference.dtype=bfloat16"))
    assert key(base) != key(changed("model.attn_implementation=eager"))
    assert key(base) != key(changed("train.ld_alpha=0.5"))  # LD-DPO weights the stored sums
    # The loss acts on the stored values; it never changes them.
    assert key(base) == key(changed("train.beta=0.5", "train.loss_type=ipo", "reference.concurrency=4"))
    # A local copy of the same weights, then the same copy with one weight file changed.
    copy = tmp_path / "copy"
    shutil.copytree(resolve_name_or_path("builtin:tiny"), copy)
    same = hash_weights(copy)
    assert same == hash_weights(Path(resolve_name_or_path("builtin:tiny")))
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert hash_weights(copy) != same
    assert key(changed(f"reference.name_or_path={copy}")) != key(base)


# ----------------------------------------------------------------------------------------------
# Configuration.


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["reference.batch_size=4"], "reference.batch_size: only used with reference.mode: precompute"),
        (["reference.mode=adapter_disabled", "lora.enabled=true", "reference.cache=false"],
         "reference.cache: only used with reference.mode: precompute"),
        (["reference.mode=precompute", "reference.concurrency=0"], "reference.concurrency: must be >= 1"),
        (["reference.mode=precompute", "reference.batch_size=0"], "reference.batch_size: must be >= 1"),
        (["reference.mode=precompute", "reference.num_gpus=-1"], "must be >= 0"),
        (["reference.mode=precompute", "reference.accelerator_type=L4"], "reference.num_gpus is 0"),
        (["reference.mode=precompute", "reference.dtype=float16"], "float16 needs GPU actors"),
        (["reference.mode=precompute", "reference.name_or_path=/no/such/model"], "no such local model directory"),
        (["reference.mode=precompute", "lora.enabled=true", "lora.load_in_4bit=true", "scaling.use_gpu=true"],
         "set reference.num_gpus > 0"),
        (["reference.mode=adapter_disabled", "lora.enabled=true", "reference.name_or_path=org/ref"],
         "only used with reference.mode: model or precompute"),
    ],
)  # fmt: skip
def test_config_rejects(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(
            None, ["output_dir=/tmp/x", "model.name_or_path=builtin:tiny", "data.train=a.jsonl", *overrides]
        )


def test_config_accepts_hub_ids_gpu_fractions_and_lora_base() -> None:
    config = load_config(None, ["output_dir=/tmp/x", "model.name_or_path=builtin:tiny", "data.train=a.jsonl",
                                "reference.mode=precompute", "reference.name_or_path=org/reference-7b",
                                "reference.num_gpus=0.25", "reference.accelerator_type=L4",
                                "reference.dtype=bfloat16", "lora.enabled=true"])  # fmt: skip
    assert config.reference.resolved_mode(True) == "precompute"
    assert config.reference.resolved_dtype(config.model.dtype) == "bfloat16"
    assert ReferenceConfig().resolved_dtype("float32") == "float32"
    assert load_reference(config.model, config.reference, LoraConfig(enabled=True)) is None


# ----------------------------------------------------------------------------------------------
# Training on the stage's output equals training with the in-loop reference.


def test_ray_training_with_precompute_equals_the_in_loop_reference(tmp_path: Path, ray_local: None) -> None:
    """In bf16, as GPU runs train: the actors (model.dtype auto), the in-loop copy and the engine's
    policy all compute in bf16, so each starts at ln 2 and the run whose workers wait for the stage
    beside them follows the in-loop one. (Scored before training, the workers read the same values
    without waiting: test_a_stage_that_cannot_overlap_is_done_before_the_workers_start.)"""
    from dpo_cluster.train.run import run_training

    common = ("train.micro_batch_size=2", "scaling.num_workers=2", "train.shuffle=false", "train.max_steps=4",
              "train.eval_strategy=steps", "train.eval_steps=2", "deepspeed.precision=bf16")  # fmt: skip
    runs = {
        "model": ("reference.mode=model",),
        # Scored beside training (actors of 0 CPUs fit beside 2 workers on 2 CPUs), the workers
        # waiting for the values they need.
        "overlapped": ("reference.mode=precompute", "reference.num_cpus=0"),
    }
    for name, overrides in runs.items():
        run_training(train_config(tmp_path / name, *common, *overrides))
    in_loop = losses(tmp_path / "model")
    assert in_loop[0] == pytest.approx(math.log(2), abs=1e-6)
    evals = {
        name: [r["eval_loss"] for r in metrics_rows(tmp_path / name) if "eval_loss" in r] for name in runs
    }
    for name in ("overlapped",):
        stage = losses(tmp_path / name)
        assert len(stage) == 4
        # bf16 rounds a sequence's log-prob sum differently for other batch shapes (the actors
        # score 3 pairs a call, the loop 2): ~3e-5 off ln 2 here. An fp32 reference under a bf16
        # policy is ~2e-4 off on these short titles, and more on longer sequences.
        assert stage[0] == pytest.approx(math.log(2), abs=BF16_LOSS_TOLERANCE)
        # Each bf16 update carries the difference on: the curves stay together, less tightly.
        assert stage == pytest.approx(in_loop, abs=10 * BF16_LOSS_TOLERANCE), name
        assert stage[-1] < stage[0]
        assert len(evals[name]) == 2
        assert evals[name] == pytest.approx(evals["model"], abs=10 * BF16_LOSS_TOLERANCE), name
        report = json.loads((tmp_path / name / REPORT_FILE).read_text())
        assert report["key_parts"]["dtype"] == "bfloat16"  # reference.dtype auto: the compute dtype
        assert report["reused"] is False and report["overlapped"] is True
        # Only what 4 steps of 2 x 2 pairs and the evaluations read: not the whole train split.
        assert report["rows_needed"]["train"] == 4 * 2 * 2 < report["rows"]["train"]
        assert report["rows_needed"]["eval"] == report["rows"]["eval"] // 4 * 4
        # It leaves a cache that holds what the same run reads again.
        config = train_config(tmp_path / name, *common, *runs[name])
        prepared = prepare(config)
        assert (
            build_reference_stage(config, prepared, scoring_order(config, counts_of(prepared))).rows_to_score
            == 0
        )
        assert not list((tmp_path / name / REFERENCE_DIR / report["cache_key"]).glob("status-*"))
    assert not (tmp_path / "model" / REPORT_FILE).exists()


def test_a_stage_that_cannot_overlap_is_done_before_the_workers_start(
    stage_run: tuple[Config, PreparedData, ReferenceLogps],
) -> None:
    """The driver's choice for `reference.overlap: false` (or no room beside the workers): the stage
    scores the run's pairs and ends before the trainer is built, and the workers' files name no
    status to wait on, so every value a worker looks up is there."""
    from dpo_cluster.train.run import _pair_source, _training_data

    _, prepared, _ = stage_run
    # Another dtype: another key, so this run scores rather than finds everything cached.
    config = precompute_config(Path(prepared.output_dir), "reference.overlap=false", "reference.dtype=bfloat16",
                               "train.max_steps=2", "train.eval_strategy=steps")  # fmt: skip
    counts = counts_of(prepared)
    stage, files = _training_data(config, prepared, counts)
    try:
        assert stage is not None and stage.report["state"] == "done" and stage.report["overlapped"] is False
        assert stage.report["rows_scored"] == sum(stage.needed.values()) == 60 + 2 * 4
        assert all(where.reference_status is None for where in files.values())
        order = scoring_order(config, counts)
        for split, positions in order.items():
            source = _pair_source(config, files, split, shuffle=False)
            assert source is not None and source.reference is not None
            got = source.take(positions)  # no waiting: nothing to wait on
            assert np.isfinite(got[REF_COLUMNS[0]]).all() and (got[REF_COLUMNS[1]] < 0).all()
    finally:
        if stage is not None:
            stage.close()


def test_lora_precompute_scores_with_the_base_and_run_local_equals_adapter_disabled(
    stage_run: tuple[Config, PreparedData, ReferenceLogps], tmp_path: Path
) -> None:
    """With LoRA the reference is the base without adapter: the stage (same key as without LoRA,
    so the cache is reused) trains the same curve as the in-loop adapter-disabled reference."""
    from dpo_cluster.train.local import run_local

    _, prepared, plain = stage_run
    lora = ("lora.enabled=true", "lora.r=8", "train.learning_rate=5e-3", "train.max_steps=4")
    config = precompute_config(Path(prepared.output_dir), *lora)
    result = compute_reference_logps(config, prepared)
    assert result.report["reused"] is True and result.report["cache_key"] == plain.report["cache_key"]

    train_dir = prepared.split_dir("train")
    assert train_dir is not None
    runs = {}
    for mode, reference_dir in (("precompute", result.directory), ("adapter_disabled", None)):
        run_local(
            train_config(tmp_path / mode, *lora, f"reference.mode={mode}"),
            train_dir,
            reference_dir=reference_dir,
        )
        runs[mode] = losses(tmp_path / mode)
    assert runs["precompute"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert runs["precompute"] == pytest.approx(runs["adapter_disabled"], abs=1e-4)
    # Without the stage's values the loop says where they come from.
    with pytest.raises(ValueError, match="run_local\\(..., reference_dir="):
        run_local(train_config(tmp_path / "missing", *lora, "reference.mode=precompute"), train_dir)
