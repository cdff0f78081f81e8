"""The reference log-prob stage (`reference.mode: precompute`) on a real local Ray: its values are
the in-process reference's, rows keep their order and ids, the cache is reused by key and only by
key, an interrupted write is never trusted, and training on its output equals training with the
in-loop reference (Ray Train with 2 workers, and in one process with LoRA)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

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
from dpo_cluster.reference.precompute import ReferenceLogps, compute_reference_logps
from dpo_cluster.reference.scorer import ReferenceScorer, build_reference_spec
from tests.test_train_local import losses, metrics_rows, train_config

pytestmark = pytest.mark.slow

# Two actors, and a batch size that divides neither split, so batches end mid-block and the pool
# really has rows to reorder.
STAGE = ("reference.mode=precompute", "reference.concurrency=2", "reference.batch_size=3")
# How far a bf16 loss may move when the reference scored the same pairs in other batch shapes.
BF16_LOSS_TOLERANCE = 1e-4


def precompute_config(output_dir: Path, *overrides: str) -> Config:
    return train_config(output_dir, *STAGE, *overrides)


def split_table(result: ReferenceLogps, split: str) -> pa.Table:
    import ray

    return pa.concat_tables(ray.get(result.datasets[split].to_arrow_refs()))


def prepared_table(prepared: PreparedData, split: str) -> pa.Table:
    """The prepared rows in the order training reads them (files by name, rows in file order)."""
    split_dir = prepared.split_dir(split)
    assert split_dir is not None
    files = sorted(split_dir.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def in_process_logps(name_or_path: str, table: pa.Table, batch_size: int = 5) -> torch.Tensor:
    """(N, 2) chosen/rejected reference log-probs of `table`'s pairs, scored here in fp32."""
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


def stage_logps(table: pa.Table) -> torch.Tensor:
    return torch.tensor([table.column(name).to_pylist() for name in REF_COLUMNS], dtype=torch.float32).T


def cache_files(result: ReferenceLogps) -> dict[str, int]:
    """Every file of the cache directory -> its modification time (ns)."""
    assert result.cache_dir is not None
    return {str(p.relative_to(result.cache_dir)): p.stat().st_mtime_ns for p in result.cache_dir.rglob("*")}


@pytest.fixture(scope="module")
def stage_run(
    tmp_path_factory: pytest.TempPathFactory, ray_local: None
) -> tuple[Config, PreparedData, ReferenceLogps]:
    config = precompute_config(tmp_path_factory.mktemp("stage"))
    prepared = prepare(config)
    return config, prepared, compute_reference_logps(config, prepared)


# ----------------------------------------------------------------------------------------------
# Values, order, columns.


def test_stage_values_equal_the_reference_scored_in_process(
    stage_run: tuple[Config, PreparedData, ReferenceLogps],
) -> None:
    _, prepared, result = stage_run
    assert set(result.datasets) == {"train", "eval"}
    for split in ("train", "eval"):
        got, want = split_table(result, split), prepared_table(prepared, split)
        assert got.num_rows == want.num_rows == prepared.report["splits"][split]["rows_kept"]
        # Same rows, same order, same ids and tokens; the reference columns added, float32, no nulls.
        assert got.column("row_id").to_pylist() == want.column("row_id").to_pylist()
        for name in ID_COLUMNS:
            assert got.column(name).to_pylist() == want.column(name).to_pylist(), name
        for name in REF_COLUMNS:
            assert got.schema.field(name).type == pa.float32()
            assert got.column(name).null_count == 0
        # The stage pads 3 pairs per batch, the in-process reference 5: other shapes, so the sums
        # (|logp| of several hundred, where one float32 ulp is 3e-5) agree to a few ulps.
        expected = in_process_logps("builtin:tiny", want)
        torch.testing.assert_close(stage_logps(got), expected, atol=1e-5, rtol=1e-6)
        assert (expected < 0).all()
        # The cached Parquet (what run_local reads) holds the same rows in the same order.
        split_dir = result.split_dir(split)
        assert split_dir is not None
        cached = pa.concat_tables([pq.read_table(f) for f in sorted(split_dir.glob("*.parquet"))])
        assert cached.equals(got.select(cached.column_names))


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
    got = stage_logps(scorer(table))
    model = scorer.model
    batch = collate_pairs({name: table.column(name).to_pylist() for name in ID_COLUMNS}, spec.pad_token_id)
    with torch.no_grad():
        weighted, _, _ = sequence_logps(model, batch, ld_alpha=0.25)
        plain, _, _ = sequence_logps(model, batch)
    torch.testing.assert_close(got, torch.stack([weighted[:6], weighted[6:]], dim=1).float())
    assert not torch.allclose(weighted, plain)


def test_the_report_and_the_workers_side(stage_run: tuple[Config, PreparedData, ReferenceLogps]) -> None:
    config, prepared, result = stage_run
    report = json.loads((Path(config.output_dir) / REPORT_FILE).read_text())
    counts = {split: prepared.report["splits"][split]["rows_kept"] for split in ("train", "eval")}
    assert report["reused"] is False and report["rows"] == counts
    assert report["rows_scored"] == sum(counts.values()) and report["seconds"] > 0
    assert report["cache_dir"] == str(Path(config.output_dir) / REFERENCE_DIR / report["cache_key"])
    assert report["key_parts"]["reference"]["name_or_path"] == "builtin:tiny"
    assert len(report["key_parts"]["reference"]["weights_sha256"]) == 64
    assert report["actors"]["concurrency"] == 2 and report["actors"]["batch_size"] == 3
    # Training workers in this mode load no reference model.
    assert load_reference(config.model, config.reference, config.lora) is None


# ----------------------------------------------------------------------------------------------
# The cache.


def test_a_second_run_reuses_the_cache_without_scoring(
    stage_run: tuple[Config, PreparedData, ReferenceLogps],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config, prepared, first = stage_run
    before = cache_files(first)

    def no_scoring(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the reference stage ran although its cache matches")

    monkeypatch.setattr(precompute, "build_scored_dataset", no_scoring)
    with caplog.at_level(logging.INFO, logger=precompute.__name__):
        second = compute_reference_logps(config, prepared)
    assert second.report["reused"] is True and second.report["rows_scored"] == 0
    assert second.report["cache_key"] == first.report["cache_key"]
    assert json.loads((Path(config.output_dir) / REPORT_FILE).read_text())["reused"] is True
    assert any(
        "reusing" in r.getMessage() and first.report["cache_key"] in r.getMessage() for r in caplog.records
    )
    assert cache_files(second) == before  # nothing rewritten
    for split in ("train", "eval"):
        assert split_table(second, split).equals(split_table(first, split))


def test_another_reference_recomputes_and_the_old_key_still_reuses(
    stage_run: tuple[Config, PreparedData, ReferenceLogps], tmp_path: Path
) -> None:
    """Same prepared pairs, another reference: another key, scored anew, other values (the
    reference's); the first key's cache is still whole. (Which settings change the key:
    test_the_key_covers_weights_dtype_and_data_but_not_the_loss.)"""
    from dpo_cluster.tiny import build_tiny_model

    config, prepared, first = stage_run
    other = build_tiny_model(tmp_path / "other_reference", seed=1)
    changed_config = precompute_config(
        tmp_path / "run", "reference.concurrency=1", f"reference.name_or_path={other}"
    )
    changed = compute_reference_logps(changed_config, prepared)
    assert changed.report["reused"] is False and changed.report["rows_scored"] > 0
    assert changed.report["cache_key"] != first.report["cache_key"]
    assert cache.plan_cache(changed_config, prepared).reusable
    assert cache.plan_cache(config, prepared).reusable
    base, values = (stage_logps(split_table(run, "train")) for run in (first, changed))
    assert not torch.allclose(base, values)
    expected = in_process_logps(str(other), split_table(changed, "train"))
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-6)  # other batch shapes: a few ulps


def test_an_interrupted_write_leaves_no_usable_cache(
    stage_run: tuple[Config, PreparedData, ReferenceLogps], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, prepared, first = stage_run
    config = precompute_config(tmp_path, "reference.concurrency=1")
    plan = cache.plan_cache(config, prepared)
    tables = {split: split_table(first, split) for split in plan.counts}
    root = tmp_path / REFERENCE_DIR

    def killed(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("killed after the Parquet was written, before the rename")

    # Interrupted between writing and installing: nothing under the key.
    with monkeypatch.context() as m:
        m.setattr(cache, "install_directory", killed)
        with pytest.raises(RuntimeError, match="killed"):
            cache.write_cache(tables, plan)
    assert not [p for p in root.iterdir() if not p.name.startswith(".")]

    # What a hard kill leaves: a complete staging directory (never renamed), and a key directory
    # copied without its manifest. Neither is trusted; both are replaced by a fresh, whole cache.
    cache.write_cache(tables, plan)
    assert cache.plan_cache(config, prepared).reusable
    shutil.copytree(root / plan.key, root / f".tmp-{plan.key}-deadbeef")
    (root / plan.key / "manifest.json").unlink()
    assert "has no manifest.json" in str(cache.plan_cache(config, prepared).problem)
    again = compute_reference_logps(config, prepared)
    assert again.report["reused"] is False and again.report["rows_scored"] > 0
    assert (root / plan.key / "manifest.json").is_file()
    assert [p.name for p in root.iterdir()] == [plan.key]
    assert cache.plan_cache(config, prepared).reusable


def test_cache_off_scores_every_run_and_writes_nothing(
    stage_run: tuple[Config, PreparedData, ReferenceLogps],
) -> None:
    """Also one pair per batch, the shapes the in-process reference gets here: equal to 1e-5."""
    _, prepared, cached = stage_run
    config = precompute_config(Path(prepared.output_dir), "reference.cache=false", "reference.batch_size=1")
    result = compute_reference_logps(config, prepared)
    assert result.cache_dir is None and result.split_dir("train") is None
    assert result.report["reused"] is False and result.report["cache_dir"] is None
    assert [p.name for p in (Path(prepared.output_dir) / REFERENCE_DIR).iterdir()] == [
        cached.report["cache_key"]
    ]
    for split in ("train", "eval"):
        got, want = split_table(result, split), split_table(cached, split)
        assert got.column("row_id").to_pylist() == want.column("row_id").to_pylist()
        expected = in_process_logps("builtin:tiny", prepared_table(prepared, split), batch_size=1)
        torch.testing.assert_close(stage_logps(got), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(stage_logps(got), stage_logps(want), atol=1e-5, rtol=1e-6)


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
    policy all compute in bf16, so each starts at ln 2 and the precomputed runs follow the in-loop one."""
    from dpo_cluster.train.run import run_training

    common = ("train.micro_batch_size=2", "scaling.num_workers=2", "train.shuffle=false", "train.max_steps=4",
              "train.eval_strategy=steps", "train.eval_steps=2", "deepspeed.precision=bf16")  # fmt: skip
    runs = {
        "model": ("reference.mode=model",),
        # Scored beside training (actors of 0 CPUs fit beside 2 workers on 2 CPUs), the workers
        # reading the stage's log; then scored before training, the workers reading datasets.
        "overlapped": ("reference.mode=precompute", "reference.num_cpus=0"),
        "before": ("reference.mode=precompute", "reference.overlap=false"),
    }
    for name, overrides in runs.items():
        run_training(train_config(tmp_path / name, *common, *overrides))
    in_loop = losses(tmp_path / "model")
    assert in_loop[0] == pytest.approx(math.log(2), abs=1e-6)
    evals = {
        name: [r["eval_loss"] for r in metrics_rows(tmp_path / name) if "eval_loss" in r] for name in runs
    }
    for name in ("overlapped", "before"):
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
        assert report["reused"] is False and report["rows"]["train"] > 0
        assert report["overlapped"] is (name == "overlapped")
        # Both leave a complete cache a later run reuses.
        config = train_config(tmp_path / name, *common, *runs[name])
        assert cache.plan_cache(config, prepare(config)).reusable
    assert not (tmp_path / "model" / REPORT_FILE).exists()


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

    scored_dir, plain_dir = result.split_dir("train"), prepared.split_dir("train")
    assert scored_dir is not None and plain_dir is not None
    runs = {}
    for mode, data in (("precompute", scored_dir), ("adapter_disabled", plain_dir)):
        run_local(train_config(tmp_path / mode, *lora, f"reference.mode={mode}"), data)
        runs[mode] = losses(tmp_path / mode)
    assert runs["precompute"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert runs["precompute"] == pytest.approx(runs["adapter_disabled"], abs=1e-4)
    # Without the stage's columns the loop says where they come from.
    with pytest.raises(ValueError, match="ReferenceLogps.split_dir"):
        run_local(train_config(tmp_path / "missing", *lora, "reference.mode=precompute"), plain_dir)
