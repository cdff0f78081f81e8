"""Tests for dpo_cluster.train.deepspeed_config: literal expected configs, precision resolution,
batch arithmetic, the recursive override merge, and a real `deepspeed.initialize` (CPU, gloo,
one process) plus two optimizer steps for every ZeRO stage."""

from __future__ import annotations

import copy
import os
import socket
from collections.abc import Iterator

# DeepSpeed picks its accelerator once, at first use; these tests run on the CPU one.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

from dpo_cluster.config import Config, load_config  # noqa: E402
from dpo_cluster.train.deepspeed_config import (  # noqa: E402
    NEVER_PRINT_STEPS,
    build_deepspeed_config,
    merge_dicts,
)

REQUIRED = ["output_dir=/tmp/dpo-cluster-test", "model.name_or_path=x", "data.train=x"]


def _config(*overrides: str) -> Config:
    return load_config(None, [*REQUIRED, *overrides])


def test_default_cpu_config_zero2_two_workers() -> None:
    assert build_deepspeed_config(_config(), world_size=2) == {
        "train_batch_size": 8,  # 4 pairs x 1 accumulation step x 2 workers
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": 1e-6,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": 0.0,
                "torch_adam": True,
                "fused": True,
            },
        },
        "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
        "gradient_clipping": 1.0,
        "steps_per_print": NEVER_PRINT_STEPS,
        "wall_clock_breakdown": False,
    }


def test_zero3_offload_bf16_on_gpu() -> None:
    config = _config(
        "scaling.use_gpu=true",
        "scaling.num_workers=4",
        "deepspeed.zero_stage=3",
        "deepspeed.offload_optimizer=cpu",
        "deepspeed.offload_params=cpu",
        "train.micro_batch_size=2",
        "train.gradient_accumulation_steps=8",
        "train.learning_rate=5.0e-7",
        "train.adam_betas=[0.9, 0.95]",
        "train.weight_decay=0.01",
        "train.max_grad_norm=0",
    )
    assert build_deepspeed_config(config, world_size=4) == {
        "train_batch_size": 64,  # 2 x 8 x 4
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 8,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": 5e-7,
                "betas": [0.9, 0.95],
                "eps": 1e-8,
                "weight_decay": 0.01,
                "torch_adam": False,
            },
        },
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "offload_param": {"device": "cpu", "pin_memory": True},
            "reduce_bucket_size": 500_000_000,
            "sub_group_size": 1_000_000_000,
            "stage3_prefetch_bucket_size": 50_000_000,
            "stage3_param_persistence_threshold": 100_000,
            "stage3_max_live_parameters": 1_000_000_000,
            "stage3_max_reuse_distance": 1_000_000_000,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "bf16": {"enabled": True},
        "steps_per_print": NEVER_PRINT_STEPS,
        "wall_clock_breakdown": False,
    }


def test_offload_on_cpu_workers_does_not_pin() -> None:
    config = _config("deepspeed.zero_stage=1", "deepspeed.offload_optimizer=cpu", "deepspeed.precision=bf16")
    ds_config = build_deepspeed_config(config, world_size=2)
    assert ds_config["zero_optimization"] == {
        "stage": 1,
        "offload_optimizer": {"device": "cpu", "pin_memory": False},
    }
    assert ds_config["optimizer"]["params"]["torch_adam"] is False
    assert ds_config["bf16"] == {"enabled": True}


def test_stage0_and_fp16() -> None:
    ds_config = build_deepspeed_config(
        _config("scaling.use_gpu=true", "deepspeed.zero_stage=0", "deepspeed.precision=fp16"), world_size=1
    )
    assert ds_config["zero_optimization"] == {"stage": 0}
    assert ds_config["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    assert "bf16" not in ds_config


def test_overrides_merge_nested_and_replace_scalars() -> None:
    config = _config(
        "deepspeed.overrides={zero_optimization: {reduce_bucket_size: 1000, overlap_comm: true},"
        " optimizer: {params: {betas: [0.5, 0.6]}}, gradient_clipping: 0.5,"
        " activation_checkpointing: {partition_activations: true}, train_batch_size: 8}"
    )
    ds_config = build_deepspeed_config(config, world_size=2)
    assert ds_config["zero_optimization"] == {
        "stage": 2,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 1000,
    }
    assert ds_config["optimizer"] == {
        "type": "AdamW",
        "params": {
            "lr": 1e-6,
            "betas": [0.5, 0.6],
            "eps": 1e-8,
            "weight_decay": 0.0,
            "torch_adam": True,
            "fused": True,
        },
    }
    assert ds_config["gradient_clipping"] == 0.5
    assert ds_config["activation_checkpointing"] == {"partition_activations": True}
    # Restating the derived batch size is harmless.
    assert ds_config["train_batch_size"] == 8
    assert config.deepspeed.overrides["zero_optimization"] == {
        "reduce_bucket_size": 1000,
        "overlap_comm": True,
    }


@pytest.mark.parametrize(
    "override",
    [
        "deepspeed.overrides={train_batch_size: 16}",
        "deepspeed.overrides={train_micro_batch_size_per_gpu: 2}",
        "deepspeed.overrides={gradient_accumulation_steps: 4}",
    ],
)
def test_overrides_may_not_change_batch_sizes(override: str) -> None:
    with pytest.raises(ValueError, match="deepspeed.overrides.*train.micro_batch_size"):
        build_deepspeed_config(_config(override), world_size=2)


def test_merge_dicts() -> None:
    base = {"a": {"b": 1, "c": {"d": 2}}, "e": [1, 2], "f": {"g": 3}, "h": 4}
    override = {"a": {"c": {"x": 9}, "b": 5}, "e": [3], "f": 0, "h": {"i": 1}, "new": {"n": 1}}
    base_before, override_before = copy.deepcopy(base), copy.deepcopy(override)
    merged = merge_dicts(base, override)
    assert merged == {
        "a": {"b": 5, "c": {"d": 2, "x": 9}},  # nested mappings merge
        "e": [3],  # lists replace, never concatenate
        "f": 0,  # a scalar replaces a mapping
        "h": {"i": 1},  # and a mapping a scalar
        "new": {"n": 1},
    }
    assert base == base_before and override == override_before
    merged["a"]["c"]["d"] = 100
    merged["new"]["n"] = 100
    assert base == base_before and override == override_before
    assert merge_dicts({"a": 1}, {}) == {"a": 1}


@pytest.mark.parametrize(
    ("overrides", "precision", "weights", "compute"),
    [
        # auto: fp32 on CPU, bf16 on GPUs; model.dtype auto follows the precision.
        ([], "fp32", "float32", "float32"),
        (["scaling.use_gpu=true"], "bf16", "bfloat16", "bfloat16"),
        (["deepspeed.precision=bf16"], "bf16", "bfloat16", "bfloat16"),
        (["scaling.use_gpu=true", "deepspeed.precision=fp16"], "fp16", "float16", "float16"),
        (["scaling.use_gpu=true", "deepspeed.precision=fp32"], "fp32", "float32", "float32"),
        # fp32 master weights under bf16: the forward (and so every reference) is still bf16.
        (["deepspeed.precision=bf16", "model.dtype=float32"], "bf16", "float32", "bfloat16"),
        # No mixed precision: the forward runs in the weights' own dtype.
        (["deepspeed.precision=fp32", "model.dtype=bfloat16"], "fp32", "bfloat16", "bfloat16"),
    ],
)
def test_precision_and_dtypes_resolve_from_the_config(
    overrides: list[str], precision: str, weights: str, compute: str
) -> None:
    config = _config(*overrides)
    assert config.deepspeed.resolved_precision(config.scaling.use_gpu) == precision
    assert (config.weights_dtype(), config.compute_dtype()) == (weights, compute)
    assert config.policy_model().dtype == weights
    # Every reference mode computes in the policy's compute dtype unless reference.dtype says.
    assert config.reference_model().dtype == compute


def test_reference_dtype_of_precompute_overrides_the_compute_dtype() -> None:
    config = _config("deepspeed.precision=bf16", "reference.mode=precompute", "reference.dtype=float32")
    assert (config.compute_dtype(), config.reference_model().dtype) == ("bfloat16", "float32")


def test_auto_precision_in_built_config() -> None:
    gpu = _config("scaling.use_gpu=true")
    assert build_deepspeed_config(gpu, world_size=2)["bf16"] == {"enabled": True}
    ds_config = build_deepspeed_config(_config(), world_size=2)
    assert "bf16" not in ds_config and "fp16" not in ds_config


@pytest.mark.parametrize(
    ("micro", "accumulation", "world_size", "expected"),
    [(1, 1, 1, 1), (4, 1, 2, 8), (2, 8, 4, 64), (3, 5, 7, 105)],
)
def test_batch_arithmetic(micro: int, accumulation: int, world_size: int, expected: int) -> None:
    config = _config(
        f"train.micro_batch_size={micro}",
        f"train.gradient_accumulation_steps={accumulation}",
        f"scaling.num_workers={world_size}",
    )
    ds_config = build_deepspeed_config(config, world_size=world_size)
    assert ds_config["train_batch_size"] == expected == config.train.pairs_per_step(world_size)
    assert ds_config["train_micro_batch_size_per_gpu"] == micro
    assert ds_config["gradient_accumulation_steps"] == accumulation


def test_world_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="world_size"):
        build_deepspeed_config(_config(), world_size=0)


# ----------------------------------------------------------------------------------------------
# The built configs accepted and run by DeepSpeed itself.

DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def single_process_group() -> Iterator[None]:
    """A one-process gloo group, as a worker of a world of one sees it."""
    import deepspeed
    import torch.distributed as dist

    saved = {name: os.environ.get(name) for name in DIST_ENV}
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    created = not dist.is_initialized()
    if created:
        deepspeed.init_distributed(dist_backend="gloo")
    yield
    if created:
        # DeepSpeed's destroy also drops the group references it caches; torch's alone would leave
        # them pointing at a dead group for the next process group in this process.
        deepspeed.comm.destroy_process_group()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.distributed deprecations inside ZeRO-3
@pytest.mark.parametrize(
    ("zero_stage", "extra"),
    [
        (0, ()),
        (1, ()),
        (2, ()),
        (3, ()),
        (1, ("deepspeed.precision=bf16",)),
        # Parameter offload alone keeps torch's AdamW; optimizer offload (DeepSpeed's CPU Adam) is
        # left out here because its first use compiles the cpu_adam op for minutes.
        (3, ("deepspeed.offload_params=cpu", "deepspeed.precision=bf16")),
    ],
)
def test_deepspeed_initialize_and_step(
    single_process_group: None, zero_stage: int, extra: tuple[str, ...]
) -> None:
    import deepspeed

    config = _config(
        "scaling.num_workers=1",
        f"deepspeed.zero_stage={zero_stage}",
        "train.micro_batch_size=2",
        "train.learning_rate=0.05",
        *extra,
    )
    ds_config = build_deepspeed_config(config, world_size=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def constant_schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    # As the training loop does: no scheduler in the JSON, a torch one handed to initialize.
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=copy.deepcopy(ds_config),
        lr_scheduler=constant_schedule,
    )
    assert engine.zero_optimization_stage() == zero_stage
    assert engine.bfloat16_enabled() == ("bf16" in ds_config)
    assert engine.train_batch_size() == ds_config["train_batch_size"] == 2
    assert engine.gradient_clipping() == 1.0
    assert isinstance(engine.basic_optimizer, torch.optim.AdamW)
    assert isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)

    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    inputs, targets = torch.randn(2, 8, dtype=dtype), torch.randn(2, 1, dtype=dtype)

    def loss_now() -> torch.Tensor:
        return torch.nn.functional.mse_loss(engine(inputs), targets)

    first_loss = None
    for _ in range(2):
        loss = loss_now()
        first_loss = loss.item() if first_loss is None else first_loss
        engine.backward(loss)
        engine.step()
    with torch.no_grad():
        final_loss = loss_now().item()
    assert engine.global_steps == 2
    assert final_loss < first_loss, (first_loss, final_loss)
