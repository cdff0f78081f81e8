"""Loading pretrained artefacts by name, and the policy and reference models DPO trains against.

Names are hub ids, local directories, "builtin:NAME" (a model its owner builds, found by name
through the `dpo_cluster.builtins` entry points, so this layer imports no owner) or local .gguf
files; the last two are built or converted once into a cache, so examples and tests run with no
model hub and everything after that loads a plain directory. The reference is a second model, the
LoRA policy with its adapter off (`reference_context`), or none when its log-probs are precomputed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import torch

from dpo_cluster import __version__
from dpo_cluster.config import Config, ConfigError, LoraConfig, ModelConfig, ReferenceConfig
from dpo_cluster.gguf_models import convert_gguf, gguf_cache_name, is_gguf_name
from dpo_cluster.paths import install_directory, looks_local

BUILTIN_PREFIX = "builtin:"
# The entry-point group of the built-in models: NAME = "module:builder", the builder taking the
# directory to build into. Each owner declares its own in pyproject.toml.
BUILTIN_GROUP = "dpo_cluster.builtins"
# A built-in directory is complete only when all of these exist; a cache written by an older
# layout (the tokenizer alone) is rebuilt rather than trusted.
BUILTIN_FILES = ("tokenizer.json", "config.json", "model.safetensors")


def cache_dir() -> Path:
    """Where built-in artefacts live: $DPO_CLUSTER_CACHE, else ~/.cache/dpo-cluster."""
    return Path(os.environ.get("DPO_CLUSTER_CACHE", Path.home() / ".cache" / "dpo-cluster"))


def builtin_entry_points() -> dict[str, EntryPoint]:
    """The built-in models by name, as declared in the group `BUILTIN_GROUP` (nothing is imported).

    The installed package's metadata is read; where it declares none (the source tree run without
    installing it, as a Ray job's working_dir is), the table in the pyproject.toml beside the
    package is, so both places always agree.
    """
    found = {ep.name: ep for ep in entry_points(group=BUILTIN_GROUP)}
    return found or _pyproject_entry_points(Path(__file__).resolve().parents[1] / "pyproject.toml")


def _pyproject_entry_points(pyproject: Path) -> dict[str, EntryPoint]:
    """The `BUILTIN_GROUP` table of a pyproject.toml; empty without the file or tomllib (< 3.11)."""
    try:
        import tomllib
    except ModuleNotFoundError:
        return {}
    if not pyproject.is_file():
        return {}
    table = tomllib.loads(pyproject.read_text()).get("project", {}).get("entry-points", {})
    return {
        name: EntryPoint(name, value, BUILTIN_GROUP) for name, value in table.get(BUILTIN_GROUP, {}).items()
    }


def resolve_name_or_path(name_or_path: str) -> str:
    """A hub id or directory as is; "builtin:NAME" or a .gguf file -> a local directory in
    `cache_dir()`, built or converted if missing.

    "builtin:NAME" goes to NAME-VERSION, a complete one returned without importing its builder.
    A .gguf file (model.name_or_path, or the directory and model.gguf_file together) goes to
    gguf-STEM-HASH (`dpo_cluster.gguf_models.gguf_cache_name`), converted once by
    `convert_gguf`. Raises ValueError listing the available built-ins for an unknown NAME, and
    FileNotFoundError naming the path of a missing .gguf file.
    """
    if is_gguf_name(name_or_path):
        return _resolve_gguf(name_or_path)
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    name = name_or_path[len(BUILTIN_PREFIX) :]
    available = builtin_entry_points()
    if name not in available:
        listed = ", ".join(BUILTIN_PREFIX + n for n in sorted(available)) or (
            f"none (no {BUILTIN_GROUP!r} entry points: install dpo-cluster, e.g. pip install -e .)"
        )
        raise ValueError(f"unknown built-in {name_or_path!r}; available: {listed}")
    target = cache_dir() / f"{name}-{__version__}"
    if not _is_complete_builtin(target):
        _build_into(target, available[name].load())
    return str(target)


def _resolve_gguf(gguf_path: str) -> str:
    target = cache_dir() / gguf_cache_name(gguf_path)  # FileNotFoundError for a missing file
    if not _is_complete_builtin(target):
        source = Path(gguf_path).expanduser()
        _build_into(target, lambda staging: convert_gguf(source, staging))
    return str(target)


def _build_into(target: Path, build: Callable[[Path], object]) -> None:
    # Built beside the target and renamed into place: concurrent first uses never see half of it.
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        build(staging)
        install_directory(staging, target, is_complete=_is_complete_builtin)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a failed build, or another process's win


def _is_complete_builtin(path: Path) -> bool:
    return all((path / f).exists() for f in BUILTIN_FILES)


# What a causal LM needs from a hub repository: config, safetensors weights and their index,
# tokenizer and chat template files, and code for trust_remote_code; not other weight formats.
HUB_MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py")


def is_hub_id(name_or_path: str) -> bool:
    """Whether a model name is a hub id (not a built-in, a .gguf file or a local directory)."""
    return not (
        name_or_path.startswith(BUILTIN_PREFIX)
        or is_gguf_name(name_or_path)
        or looks_local(name_or_path)
        or Path(name_or_path).expanduser().exists()
    )


def download_hub_models(config: Config) -> dict[str, str]:
    """Download, once and before any worker starts, the hub models the workers will load
    (model.name_or_path, reference.name_or_path, data.tokenizer) into the Hugging Face cache ->
    {config key: local snapshot directory}. Workers on this node (or every node, where HF_HOME
    is shared storage) then read the cache instead of each downloading for itself while the
    others wait in a collective. Raises ConfigError naming the key when one cannot be had."""
    from huggingface_hub import snapshot_download

    wanted = {"model.name_or_path": (config.model.name_or_path, config.model.revision)}
    if config.reference.name_or_path is not None:
        wanted["reference.name_or_path"] = (config.reference.name_or_path, None)
    if config.data.tokenizer is not None:
        wanted["data.tokenizer"] = (config.data.tokenizer, None)
    fetched: dict[str, str] = {}
    for key, (name, revision) in wanted.items():
        if not is_hub_id(name):
            continue
        try:
            fetched[key] = snapshot_download(name, revision=revision, allow_patterns=list(HUB_MODEL_FILES))
        except Exception as exc:  # offline and not cached, unknown or gated repository, network
            raise ConfigError(f"{key}: could not download {name!r} from the hub: {exc}") from exc
        if key != "data.tokenizer" and not any(Path(fetched[key]).glob("*.safetensors")):
            # An older repository with PyTorch .bin weights only.
            snapshot_download(name, revision=revision, allow_patterns=["*.bin", "*.bin.index.json"])
    return fetched


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """`AutoTokenizer.from_pretrained` with built-in names and .gguf files resolved."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        resolve_name_or_path(name_or_path), revision=revision, trust_remote_code=trust_remote_code
    )


def load_policy(
    model: ModelConfig, lora: LoraConfig, *, device: torch.device | None = None
) -> torch.nn.Module:
    """The model DPO trains: every weight trainable, or (lora.enabled) a peft LoRA model whose
    adapter weights alone are trainable, over a 4-bit base when lora.load_in_4bit (QLoRA).

    The KV cache is off (training never reuses it, and it conflicts with gradient checkpointing).
    Gated SiLU MLPs recompute silu in backward unless model.recompute_mlp_activations is false
    (`dpo_cluster.mlp_recompute`).
    device: where the weights go; None leaves them on the CPU (DeepSpeed moves them itself).
    Raises ValueError naming model.name_or_path when it cannot be loaded, and when QLoRA is asked
    for without a CUDA GPU.
    """
    policy = _load_causal_lm(
        model, model.name_or_path, model.revision, load_in_4bit=lora.load_in_4bit, device=device
    )
    if model.recompute_mlp_activations:
        from dpo_cluster.mlp_recompute import recompute_mlp_activations

        recompute_mlp_activations(policy)
    checkpointing_kwargs = {"use_reentrant": False}
    if lora.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        # Casts norms to fp32, freezes the quantized base and sets up checkpointing for k-bit
        # training, which gradient_checkpointing_enable alone does not do for a 4-bit model.
        policy = prepare_model_for_kbit_training(
            policy,
            use_gradient_checkpointing=model.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
    elif model.gradient_checkpointing:
        # The name every transformers 5.x has (5.20 added activation_checkpointing_enable as the
        # new one, keeping this until v6); the CPU build of vLLM needs transformers < 5.20.
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
        if lora.enabled:
            # The frozen embeddings' output has no grad. Non-reentrant checkpointing copes, but a
            # model whose own code uses the reentrant kind would then skip backward through its
            # checkpointed blocks, leaving LoRA's weights there without gradients.
            policy.enable_input_require_grads()
    policy.config.use_cache = False

    if lora.enabled:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        target_modules: str | list[str] = (
            "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
        )
        policy = get_peft_model(
            policy,
            PeftLoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    return policy


def load_reference(
    model: ModelConfig,
    reference: ReferenceConfig,
    lora: LoraConfig,
    *,
    device: torch.device | None = None,
) -> torch.nn.Module | None:
    """The frozen reference model, or None when the reference needs no second model.

    mode "model": reference.name_or_path, else the policy's own starting weights
    (model.name_or_path at model.revision), loaded with the policy's dtype and attention kernel
    (and 4-bit when the policy is QLoRA, so both start from the same quantized weights); in eval
    mode, every parameter with requires_grad False. "adapter_disabled": None, the policy with its
    adapter off is the reference (see `reference_context`). "precomputed": None, the data carries
    the reference log-probs.
    """
    mode = reference.resolved_mode(lora.enabled)
    if mode != "model":
        return None
    if reference.name_or_path is not None:
        name_or_path, revision = reference.name_or_path, None
    else:
        name_or_path, revision = model.name_or_path, model.revision
    ref = _load_causal_lm(model, name_or_path, revision, load_in_4bit=lora.load_in_4bit, device=device)
    ref.eval()
    ref.requires_grad_(False)
    ref.config.use_cache = False
    return ref


@contextlib.contextmanager
def reference_context(policy: torch.nn.Module, mode: str) -> Iterator[None]:
    """Run reference forwards inside this: gradients off, and for mode "adapter_disabled" the
    policy's LoRA adapter switched off, so `policy(...)` computes with the base weights alone.

    That base is the reference: DPO's pi_ref is the starting point of training, and a LoRA policy
    starts with B = 0, i.e. exactly its base. No second copy of the weights is held. For any other
    mode (a separate reference model, precomputed log-probs) this is `torch.no_grad()` alone.
    Train/eval mode is left to the caller.
    """
    if mode != "adapter_disabled":
        with torch.no_grad():
            yield
        return
    if not hasattr(policy, "disable_adapter"):
        raise ValueError(
            "reference mode 'adapter_disabled' needs a LoRA (peft) policy; "
            f"got {type(policy).__name__} (set lora.enabled: true or reference.mode: model)"
        )
    with policy.disable_adapter(), torch.no_grad():
        yield


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied weights counted once."""
    trainable = total = 0
    for param in module.parameters():  # parameters() yields a tied tensor once
        # ZeRO-3 leaves each rank an empty shard; ds_numel is the full size.
        numel = getattr(param, "ds_numel", param.numel())
        if param.__class__.__name__ == "Params4bit":
            # bitsandbytes packs two 4-bit values per byte of its uint8 storage.
            numel *= 2 * param.quant_storage.itemsize if hasattr(param, "quant_storage") else 2
        total += numel
        if param.requires_grad:
            trainable += numel
    return trainable, total


def _load_causal_lm(
    model: ModelConfig,
    name_or_path: str,
    revision: str | None,
    *,
    load_in_4bit: bool,
    device: torch.device | None,
) -> Any:
    """`AutoModelForCausalLM.from_pretrained` with model's dtype, attention kernel and remote-code
    setting; 4-bit (nf4, bf16 compute) on the current CUDA device when load_in_4bit."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "revision": revision,
        "trust_remote_code": model.trust_remote_code,
        # auto is resolved from deepspeed.precision by `Config.policy_model`; a ModelConfig used
        # on its own loads float32.
        "dtype": torch.float32 if model.dtype == "auto" else getattr(torch, model.dtype),
    }
    if model.attn_implementation is not None:
        kwargs["attn_implementation"] = model.attn_implementation
    if load_in_4bit:
        if not torch.cuda.is_available():
            raise ValueError(
                "lora.load_in_4bit: QLoRA needs CUDA GPUs (bitsandbytes 4-bit kernels), and none is "
                "available; set lora.load_in_4bit: false to train LoRA over full-precision weights"
            )
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        # Quantized weights cannot be moved with .to() after loading: place them while loading.
        kwargs["device_map"] = {"": device if device is not None else torch.cuda.current_device()}
    resolved = os.path.expanduser(resolve_name_or_path(name_or_path))
    if looks_local(resolved) and not Path(resolved).is_dir():
        # Spelled as a path, so not a hub id: say so, rather than the hub's repo-id complaint.
        raise ValueError(f"could not load model {name_or_path!r}: no such local directory")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(resolved, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"could not load model {name_or_path!r}: {exc}") from exc
    if device is not None and not load_in_4bit:
        loaded = loaded.to(device)
    return loaded
