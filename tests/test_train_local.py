"""The training loop in a plain process (world size 1, real DeepSpeed on CPU with gloo) on the
built-in tiny Qwen2 model and the bundled sample preferences."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from dpo_cluster.config import Config, load_config
from dpo_cluster.data.pipeline import PreparedData, prepare
from dpo_cluster.data.samples import SAMPLE_FILE
from dpo_cluster.train.local import run_local
from dpo_cluster.train.loop import LoopState, NonFiniteLossError

pytestmark = pytest.mark.slow

TRL_METRICS = {
    "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
    "logps/rejected", "logits/chosen", "logits/rejected", "grad_norm", "learning_rate", "step", "epoch",
    "tokens_per_second",
}  # fmt: skip


def train_config(output_dir: Path, *overrides: str) -> Config:
    return load_config(
        None,
        [
            f"output_dir={output_dir}",
            "model.name_or_path=builtin:tiny",
            f"data.train={SAMPLE_FILE}",
            "data.eval_fraction=0.1",
            "data.max_length=128",
            "train.micro_batch_size=4",
            "train.max_steps=6",
            "train.logging_steps=1",
            "train.learning_rate=1e-3",
            "train.eval_strategy=no",
            "train.save_strategy=no",
            "scaling.num_workers=1",
            *overrides,
        ],
    )


def metrics_rows(output_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(output_dir: Path) -> list[float]:
    return [row["loss"] for row in metrics_rows(output_dir) if "loss" in row]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> PreparedData:
    return prepare(train_config(tmp_path_factory.mktemp("prepared")))


@pytest.fixture(scope="module")
def full_run(prepared: PreparedData, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """6 steps with eval and a checkpoint every 3 steps; shared by several tests."""
    out = tmp_path_factory.mktemp("full")
    config = train_config(out, "train.eval_strategy=steps", "train.eval_steps=3", "train.save_strategy=steps",
                          "train.save_steps=3")  # fmt: skip
    summary, reporter = run_local(config, prepared.split_dir("train"), prepared.split_dir("eval"))
    return out, reporter


def test_first_step_is_ln2_then_the_model_learns(full_run: tuple[Path, Any]) -> None:
    out, _ = full_run
    rows = metrics_rows(out)
    first = rows[0]
    # policy == reference at step 1: every implicit reward is 0, so the sigmoid loss is -log sigmoid(0)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
    assert first["rewards/accuracies"] == 0.0  # ties count as not preferred, as in TRL
    assert set(first) >= TRL_METRICS
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows[-1]["loss"] < 0.6
    assert train_rows[-1]["rewards/accuracies"] > 0.8
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] < math.log(2)
    assert evals[-1]["eval_rewards/accuracies"] > 0.8
    assert first["learning_rate"] > train_rows[-1]["learning_rate"]  # linear decay


def test_grad_norm_is_reported_without_zero_and_equals_zeros(
    prepared: PreparedData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeepSpeed measures the gradient norm under ZeRO only; without ZeRO the loop does, and the
    two agree on the same step (the same gradients, before clipping). A single worker without ZeRO
    all-reduces no gradients (DeepSpeed would flatten them all into a second copy to do so); the
    real all_reduce still runs for the loop's own metric sums. Without ZeRO in fp32 the output head
    adds its weight gradient straight into `.grad` and the tied lookup's share is sparse
    (`fused_head.allow_grad_in_place`); with two micro-batches a step, both paths give the same
    losses and norms."""
    import torch.distributed as dist

    reduced_sizes: list[int] = []
    real_all_reduce = dist.all_reduce

    def spy(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        reduced_sizes.append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", spy)
    norms, losses = {}, {}
    for stage in (0, 2):
        out = tmp_path / f"zero{stage}"
        reduced_sizes.clear()
        overrides = (
            f"deepspeed.zero_stage={stage}",
            "train.max_steps=2",
            "train.gradient_accumulation_steps=2",
        )
        run_local(train_config(out, *overrides), prepared.split_dir("train"))
        norms[stage] = [r["grad_norm"] for r in metrics_rows(out) if "loss" in r]
        losses[stage] = [r["loss"] for r in metrics_rows(out) if "loss" in r]
        if stage == 0:
            largest_without_zero = max(reduced_sizes)
    assert all(isinstance(n, float) and n > 0 for n in norms[0]), norms
    assert norms[0] == pytest.approx(norms[2], rel=1e-4)
    assert losses[0] == pytest.approx(losses[2], abs=1e-5) and losses[0][1] != losses[0][0]
    assert largest_without_zero < 100, "ZeRO-0 on one worker all-reduced a gradient-sized tensor"


def test_final_model_loads_and_changed(full_run: tuple[Path, Any]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_cluster.modeling import resolve_name_or_path

    out, _ = full_run
    final = out / "final"
    tuned = AutoModelForCausalLM.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(resolve_name_or_path("builtin:tiny"))
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("A Beginner's Guide to Home Espresso", return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(tuned(**ids).logits, base(**ids).logits)
    summary = json.loads((final / "metrics_summary.json").read_text())
    assert summary["steps"] == 6 and "eval_loss" in summary
    assert summary["loss"] == metrics_rows(out)[-1]["loss"]  # the last step's training metrics too
    assert "train:" in (final / "dpo_config.yaml").read_text()


def test_resume_from_a_checkpoint_matches_the_uninterrupted_run(
    full_run: tuple[Path, Any], prepared: PreparedData, tmp_path: Path
) -> None:
    out, reporter = full_run
    step3 = next(path for path, _ in reporter.checkpoints if path.name == "step-0000003")
    config = train_config(
        tmp_path, "train.eval_strategy=steps", "train.eval_steps=3", f"train.resume_from={step3}"
    )
    run_local(config, prepared.split_dir("train"), prepared.split_dir("eval"))
    resumed = {r["step"]: r["loss"] for r in metrics_rows(tmp_path) if "loss" in r}
    uninterrupted = {r["step"]: r["loss"] for r in metrics_rows(out) if "loss" in r}
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-6)


def test_gradient_accumulation_equals_a_bigger_micro_batch(prepared: PreparedData, tmp_path: Path) -> None:
    runs = {}
    for name, micro, accum in (("micro4", 4, 1), ("accum4", 1, 4)):
        config = train_config(tmp_path / name, f"train.micro_batch_size={micro}",
                              f"train.gradient_accumulation_steps={accum}", "train.max_steps=4")  # fmt: skip
        run_local(config, prepared.split_dir("train"))
        runs[name] = losses(tmp_path / name)
    assert len(runs["micro4"]) == 4
    assert runs["micro4"] == pytest.approx(runs["accum4"], abs=1e-5)


def test_lora_disabled_adapter_reference_equals_a_frozen_copy(prepared: PreparedData, tmp_path: Path) -> None:
    """With LoRA the policy starts equal to the base, so the base with the adapter switched off and
    a separately loaded frozen base are the same reference."""
    from peft import AutoPeftModelForCausalLM

    runs = {}
    for mode in ("adapter_disabled", "model"):
        config = train_config(tmp_path / mode, "lora.enabled=true", "lora.r=8", f"reference.mode={mode}",
                              "train.learning_rate=5e-3", "train.max_steps=4")  # fmt: skip
        run_local(config, prepared.split_dir("train"))
        runs[mode] = losses(tmp_path / mode)
    assert runs["adapter_disabled"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert runs["adapter_disabled"] == pytest.approx(runs["model"], abs=1e-6)
    assert runs["adapter_disabled"][-1] < runs["adapter_disabled"][0]
    adapter = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter_disabled" / "final")
    assert any("lora_" in name for name, _ in adapter.named_parameters())


@pytest.mark.parametrize("mode", ["model", "adapter_disabled"])
def test_bf16_policy_and_in_loop_reference_start_at_ln2(
    prepared: PreparedData, tmp_path: Path, mode: str
) -> None:
    """DeepSpeed's bf16 casts only the engine's module; the frozen copy loads in the same compute
    dtype (model.dtype auto), and the adapter-disabled policy is the engine's module, so at step 1
    both sides compute the same bf16 log-probs and the loss is ln 2 (an fp32 copy: ln 2 + 2e-4)."""
    lora = ("lora.enabled=true", "lora.r=8") if mode == "adapter_disabled" else ()
    config = train_config(tmp_path, *lora, f"reference.mode={mode}", "deepspeed.precision=bf16",
                          "train.max_steps=2")  # fmt: skip
    assert config.compute_dtype() == "bfloat16"
    run_local(config, prepared.split_dir("train"))
    rows = metrics_rows(tmp_path)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards/margins"] == 0.0
    assert rows[1]["loss"] < rows[0]["loss"]


def test_lora_checkpoints_hold_the_adapter_and_resume_and_load_best_from_it(
    prepared: PreparedData, tmp_path: Path
) -> None:
    """A LoRA checkpoint holds the trainable weights and their optimizer state, not the frozen
    base: far smaller than the base, and still enough to resume (the same losses as the
    uninterrupted run) and to export the best checkpoint's adapter."""
    from safetensors.torch import load_file

    from dpo_cluster.modeling import resolve_name_or_path

    lora = ("lora.enabled=true", "lora.r=8", "train.learning_rate=5e-3", "train.eval_strategy=steps",
            "train.eval_steps=2", "train.save_strategy=steps", "train.save_steps=2")  # fmt: skip
    config = train_config(tmp_path / "full", *lora, "train.num_checkpoints_to_keep=3",
                          "train.load_best_at_end=true", "train.best_metric=eval_loss", "train.best_mode=max")  # fmt: skip
    _, reporter = run_local(config, prepared.split_dir("train"), prepared.split_dir("eval"))
    base = Path(resolve_name_or_path("builtin:tiny")) / "model.safetensors"
    for checkpoint, _ in reporter.checkpoints:
        module_file = checkpoint / "state" / "mp_rank_00_model_states.pt"
        module = torch.load(module_file, weights_only=False)["module"]
        # Tied lm_head.weight included: DeepSpeed's own exclusion keeps it.
        assert module and all("lora_" in name for name in module), "only the adapter's weights"
        assert module_file.stat().st_size < base.stat().st_size / 4, checkpoint.name

    # load-best: final/ is the best (highest eval loss: an early) checkpoint's adapter.
    best, last = reporter.best(), reporter.latest()
    assert best is not None and last is not None and best != last
    final = load_file(tmp_path / "full" / "final" / "adapter_model.safetensors")

    def adapter_of(checkpoint: Path) -> dict[str, torch.Tensor]:
        module = torch.load(checkpoint / "state" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        # peft saves adapter names without the adapter's own name ("default").
        return {name.replace(".default", ""): value for name, value in module.items()}

    for source, expect_equal in ((best, True), (last, False)):
        weights = adapter_of(source)
        assert set(final) == set(weights)
        assert all(torch.equal(final[name], weights[name]) for name in final) is expect_equal, source.name

    # resume from step 2: the frozen base comes from model.name_or_path, the rest from the checkpoint.
    step2 = next(path for path, _ in reporter.checkpoints if path.name == "step-0000002")
    resumed = train_config(tmp_path / "resumed", *lora, f"train.resume_from={step2}")
    run_local(resumed, prepared.split_dir("train"), prepared.split_dir("eval"))
    after = {r["step"]: r["loss"] for r in metrics_rows(tmp_path / "resumed") if "loss" in r}
    before = {r["step"]: r["loss"] for r in metrics_rows(tmp_path / "full") if "loss" in r}
    assert sorted(after) == [3, 4, 5, 6]
    assert [after[s] for s in after] == pytest.approx([before[s] for s in after], abs=1e-6)


@pytest.mark.parametrize("lora", [False, True])
def test_zero3_loads_policy_and_reference_partitioned(tmp_path: Path, lora: bool) -> None:
    """Under ZeRO-3 the models are built under deepspeed.zero.Init and filled shard by shard: each
    weight is a DeepSpeed partition (no full tensor, ds_numel its size) straight from loading,
    before deepspeed.initialize; outside the block loading is plain again."""
    from types import SimpleNamespace

    from dpo_cluster.modeling import load_policy, load_reference
    from dpo_cluster.train.deepspeed_config import build_deepspeed_config
    from dpo_cluster.train.setup import init_process_group, zero3_loading

    overrides = ("deepspeed.zero_stage=3", "reference.mode=model", *(("lora.enabled=true",) if lora else ()))
    config = train_config(tmp_path, *overrides)
    init_process_group(SimpleNamespace(world_size=1), "gloo")  # type: ignore[arg-type]
    with zero3_loading(build_deepspeed_config(config, world_size=1)):
        policy = load_policy(config.policy_model(), config.lora)
        reference = load_reference(config.reference_model(), config.reference, config.lora)
    assert reference is not None
    for model in (policy, reference):
        # LoRA's own small matrices are made by peft after loading: DeepSpeed partitions those at
        # initialize. Every weight of the pretrained model is a partition already.
        base = [(n, p) for n, p in model.named_parameters() if "lora_" not in n]
        assert base and all(hasattr(p, "ds_id") and p.numel() == 0 and p.ds_numel > 0 for _, p in base)
    plain = load_reference(config.reference_model(), config.reference, config.lora)
    assert plain is not None and not any(hasattr(p, "ds_id") for p in plain.parameters())


def test_lora_merged_on_save_is_a_full_model(prepared: PreparedData, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    config = train_config(tmp_path, "lora.enabled=true", "lora.merge_on_save=true", "train.max_steps=2")
    run_local(config, prepared.split_dir("train"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    assert not (tmp_path / "final" / "adapter_config.json").exists()


@pytest.mark.parametrize("mode", ["model", "adapter_disabled"])
def test_ld_dpo_weights_the_reference_like_the_policy(
    prepared: PreparedData, tmp_path: Path, mode: str
) -> None:
    """LD-DPO (train.ld_alpha) down-weights the longer answer's tail in the policy's log-probs; the
    reference's are weighted alike, so at step 1 (policy == reference) every reward is 0 and the
    loss is ln 2."""
    lora = ("lora.enabled=true", "lora.r=8") if mode == "adapter_disabled" else ()
    config = train_config(
        tmp_path, *lora, f"reference.mode={mode}", "train.ld_alpha=0.5", "train.max_steps=1"
    )
    run_local(config, prepared.split_dir("train"))
    first = metrics_rows(tmp_path)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == 0.0


def test_non_finite_loss_stops_with_step_and_rows(prepared: PreparedData, tmp_path: Path) -> None:
    config = train_config(tmp_path, "train.learning_rate=1e9", "train.max_grad_norm=0", "train.lr_scheduler=constant",
                          "train.save_strategy=steps", "train.save_steps=1", "train.max_steps=20")  # fmt: skip
    with pytest.raises(NonFiniteLossError) as e:
        run_local(config, prepared.split_dir("train"))
    message = str(e.value)
    assert "non-finite loss at optimizer step" in message
    assert "title_preferences.jsonl:" in message  # the rows of the offending batch
    failed_step = int(message.split("optimizer step ")[1].split()[0])
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept[-1] == f"step-{failed_step - 1:07d}"  # the last good checkpoint is kept


def test_load_best_at_end_exports_the_best_checkpoint(prepared: PreparedData, tmp_path: Path) -> None:
    """Ranking by the *highest* eval loss makes the best checkpoint an early one, so exporting it
    (and not the last step) is visible in the weights."""
    from safetensors.torch import load_file

    config = train_config(tmp_path, "train.eval_strategy=steps", "train.eval_steps=2", "train.save_strategy=steps",
                          "train.save_steps=2", "train.num_checkpoints_to_keep=3", "train.load_best_at_end=true",
                          "train.best_metric=eval_loss", "train.best_mode=max")  # fmt: skip
    _, reporter = run_local(config, prepared.split_dir("train"), prepared.split_dir("eval"))
    best, last = reporter.best(), reporter.latest()
    assert best is not None and last is not None and best != last
    final = load_file(tmp_path / "final" / "model.safetensors")

    def module_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
        return torch.load(checkpoint / "state" / "mp_rank_00_model_states.pt", weights_only=False)["module"]

    for source, expect_equal in ((best, True), (last, False)):
        weights = module_weights(source)
        same = all(torch.equal(final[name], weights[name]) for name in final)
        assert same is expect_equal, source.name


def test_precomputed_reference_logps_equal_the_in_loop_reference(
    prepared: PreparedData, tmp_path: Path
) -> None:
    """Reference log-probs stored as data columns (no reference model loaded) give the same run."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    from dpo_cluster.batch.collate import collate_pairs
    from dpo_cluster.batch.logps import sequence_logps
    from dpo_cluster.modeling import resolve_name_or_path

    reference = AutoModelForCausalLM.from_pretrained(resolve_name_or_path("builtin:tiny")).eval()
    with_ref = tmp_path / "with_ref"
    with_ref.mkdir()
    for f in sorted(prepared.split_dir("train").glob("*.parquet")):
        table = pq.read_table(f)
        batch = collate_pairs({c: table.column(c).to_pylist() for c in table.column_names}, pad_token_id=1)
        with torch.no_grad():
            logps, _, _ = sequence_logps(reference, batch)
        n = table.num_rows
        table = table.append_column("ref_chosen_logps", pa.array(logps[:n].tolist(), pa.float64()))
        table = table.append_column("ref_rejected_logps", pa.array(logps[n:].tolist(), pa.float64()))
        pq.write_table(table, with_ref / f.name)

    runs = {}
    for mode, data in (("model", prepared.split_dir("train")), ("precomputed", with_ref)):
        run_local(train_config(tmp_path / mode, f"reference.mode={mode}", "train.max_steps=4"), data)
        runs[mode] = losses(tmp_path / mode)
    assert runs["precomputed"] == pytest.approx(runs["model"], abs=1e-5)


def test_tensorboard_events_are_written(full_run: tuple[Path, Any]) -> None:
    out, _ = full_run
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_loop_state_takes_only_its_own_keys_from_a_checkpoint() -> None:
    """DeepSpeed's `load_checkpoint` returns its leftover keys beside the loop's (`optimizer` under
    ZeRO, `ds_config`, ...): the loop keeps its own state only, so they never reach a later checkpoint."""
    saved = {"step": 6, "best": {"step": 3, "value": 0.5}, "last_eval": {"eval_loss": 0.5},
             "last_train": {"loss": 0.6}, "optimizer": {"state": {}}, "ds_config": {},
             "global_samples": 24}  # fmt: skip
    state = LoopState.from_client_state(saved)
    assert state.client_state() == {k: saved[k] for k in ("step", "best", "last_eval", "last_train")}
    state.step, state.last_eval = 9, {"eval_loss": 0.4}
    state.update_best("eval_loss", "min")
    state.step, state.last_eval = 12, {"eval_loss": 0.45}
    state.update_best("eval_loss", "min")
    assert state.client_state()["best"] == {"step": 9, "value": 0.4}
    assert LoopState().client_state() == {"step": 0, "best": None, "last_eval": {}, "last_train": {}}
