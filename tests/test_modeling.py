"""Name resolution for pretrained artefacts (hub ids and paths pass through, built-ins are built),
and the policy and reference models: full, LoRA, adapter-disabled and frozen-copy references."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from dpo_cluster import __version__
from dpo_cluster.config import LoraConfig, ModelConfig, ReferenceConfig
from dpo_cluster.modeling import (
    BUILTIN_FILES,
    BUILTIN_GROUP,
    _pyproject_entry_points,
    builtin_entry_points,
    count_parameters,
    load_policy,
    load_reference,
    load_tokenizer,
    reference_context,
    resolve_name_or_path,
)
from dpo_cluster.tiny import build_tiny_model, build_tiny_tokenizer, randomize_lora_b

REPO = Path(__file__).resolve().parents[1]


def hub_cache_of(model_dir: Path, hub_cache: Path, repo_id: str) -> Path:
    """Lay `model_dir`'s files out as the Hugging Face cache holds a downloaded `repo_id` (a
    snapshot named by its commit, refs/main naming it): with HF_HUB_CACHE=hub_cache and
    HF_HUB_OFFLINE=1 the real hub loading code finds it as if it had been downloaded."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.is_file():
            (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_models_are_downloaded_once_by_key_and_missing_ones_name_theirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base_dir: Path
) -> None:
    """The driver's download of hub ids before the workers start: cached ones resolve to their
    snapshot, built-ins and directories are skipped, and an id the cache lacks with no hub fails
    naming its config key."""
    from dpo_cluster.config import ConfigError, load_config
    from dpo_cluster.modeling import download_hub_models

    snapshot = hub_cache_of(base_dir, tmp_path / "hub", "dpo-cluster/tiny-hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both when it is imported: point its constants at them too.
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    def config(*overrides: str) -> Any:
        return load_config(None, ["output_dir=/tmp/x", "data.train=x", *overrides])

    hub = config("model.name_or_path=dpo-cluster/tiny-hub", f"data.tokenizer={base_dir}")
    assert download_hub_models(hub) == {"model.name_or_path": str(snapshot)}
    assert download_hub_models(config("model.name_or_path=builtin:tiny")) == {}
    missing = config("model.name_or_path=builtin:tiny", "reference.mode=model",
                     "reference.name_or_path=dpo-cluster/not-cached")  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"^reference.name_or_path: could not download 'dpo-cluster/not-cached'"
    ):
        download_hub_models(missing)


def test_hub_ids_and_paths_pass_through() -> None:
    assert resolve_name_or_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve_name_or_path("/models/llama") == "/models/llama"


def test_builtin_tiny_is_built_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPO_CLUSTER_CACHE", str(tmp_path))
    path = Path(resolve_name_or_path("builtin:tiny"))
    assert path.parent == tmp_path and (path / "tokenizer.json").exists()
    stamp = os.stat(path / "tokenizer.json").st_mtime_ns
    assert resolve_name_or_path("builtin:tiny") == str(path)
    assert os.stat(path / "tokenizer.json").st_mtime_ns == stamp  # reused, not rebuilt
    tokenizer = load_tokenizer("builtin:tiny")
    assert tokenizer.decode(tokenizer("标题 ✨")["input_ids"]) == "标题 ✨"


def test_unknown_builtin_names_the_choices() -> None:
    with pytest.raises(
        ValueError,
        match="unknown built-in 'builtin:huge'; available: builtin:demo, builtin:smollm2-135m-instruct, builtin:tiny$",
    ):
        resolve_name_or_path("builtin:huge")


def test_builtins_are_the_declared_entry_points() -> None:
    from dpo_cluster.demo.model import build_demo_model
    from dpo_cluster.gguf_models import build_smollm2_135m_instruct

    declared = {ep.name: ep for ep in entry_points(group=BUILTIN_GROUP)}
    assert sorted(declared) == ["demo", "smollm2-135m-instruct", "tiny"]
    assert {name: ep.load() for name, ep in declared.items()} == {
        "tiny": build_tiny_model,
        "demo": build_demo_model,
        "smollm2-135m-instruct": build_smollm2_135m_instruct,
    }
    # The source tree declares the same, for where the package runs without being installed.
    in_source = _pyproject_entry_points(REPO / "pyproject.toml")
    assert {n: ep.value for n, ep in in_source.items()} == {n: ep.value for n, ep in declared.items()}
    assert builtin_entry_points().keys() == declared.keys()


def test_a_complete_cached_builtin_is_returned_without_loading_its_builder(tmp_path: Path) -> None:
    cached = tmp_path / f"demo-{__version__}"
    cached.mkdir()
    for name in BUILTIN_FILES:
        (cached / name).write_text("{}")
    # A fresh interpreter, so that "not imported" means the lookup did not import the builder.
    code = (
        "import sys; from dpo_cluster.modeling import resolve_name_or_path; "
        "print(resolve_name_or_path('builtin:demo')); print('dpo_cluster.demo.model' in sys.modules)"
    )
    env = os.environ | {"DPO_CLUSTER_CACHE": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.split() == [str(cached), "False"]
    assert all((cached / name).read_text() == "{}" for name in BUILTIN_FILES)  # not rebuilt


def test_builtin_tiny_has_a_model_that_generates() -> None:
    path = resolve_name_or_path("builtin:tiny")
    tokenizer = load_tokenizer("builtin:tiny")
    model = AutoModelForCausalLM.from_pretrained(path)
    prompt = tokenizer("The cat", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 3)


def test_builtin_cache_without_a_model_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPO_CLUSTER_CACHE", str(tmp_path))
    stale = tmp_path / f"tiny-{__version__}"
    build_tiny_tokenizer(stale)  # the layout of a cache that held the tokenizer alone
    path = Path(resolve_name_or_path("builtin:tiny"))
    assert path == stale and (path / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporaries left


# --- policy and reference -------------------------------------------------------------------


def _input_ids() -> torch.Tensor:
    return torch.tensor([[5, 17, 300, 42, 9, 800], [7, 7, 120, 3, 64, 1000]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=_input_ids()).logits


def test_full_policy_trains_every_weight(base_dir: Path) -> None:
    policy = load_policy(ModelConfig(name_or_path=str(base_dir)), LoraConfig())
    assert all(p.requires_grad for p in policy.parameters())
    trainable, total = count_parameters(policy)
    assert trainable == total == sum(p.numel() for p in policy.parameters())
    assert policy.config.use_cache is False
    assert policy.is_gradient_checkpointing is False


def test_gradient_checkpointing_is_honoured(base_dir: Path) -> None:
    config = ModelConfig(name_or_path=str(base_dir), gradient_checkpointing=True)
    policy = load_policy(config, LoraConfig())
    assert policy.is_gradient_checkpointing and policy.config.use_cache is False
    policy.train()
    _logits(policy).sum().backward()
    assert policy.model.layers[0].mlp.down_proj.weight.grad is not None


def test_dtype_and_attention_kernel_are_honoured(base_dir: Path) -> None:
    config = ModelConfig(name_or_path=str(base_dir), dtype="bfloat16", attn_implementation="eager")
    policy = load_policy(config, LoraConfig())
    assert all(p.dtype == torch.bfloat16 for p in policy.parameters())
    assert policy.config._attn_implementation == "eager"


@pytest.mark.parametrize(
    ("target_modules", "expected_trainable"),
    [
        # r * (in + out) per adapted linear, hidden 64, kv 2 heads x 16 = 32, intermediate 128, r = 4:
        # q 4*(64+64)=512, k 4*(64+32)=384, v 384, o 512, gate 4*(64+128)=768, up 768, down 768
        # -> 4096 per layer, 2 layers -> 8192. The lm_head (tied embedding) is never adapted.
        (["all-linear"], 8192),
        # q + v only: (512 + 384) * 2 layers = 1792.
        (["q_proj", "v_proj"], 1792),
    ],
)
def test_lora_trains_only_the_adapter(
    base_dir: Path, target_modules: list[str], expected_trainable: int
) -> None:
    base_total = count_parameters(AutoModelForCausalLM.from_pretrained(base_dir))[1]
    lora = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=target_modules)
    policy = load_policy(ModelConfig(name_or_path=str(base_dir), gradient_checkpointing=True), lora)
    assert isinstance(policy, PeftModel)
    trainable_names = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable_names and all("lora_" in n for n in trainable_names)
    assert count_parameters(policy) == (expected_trainable, base_total + expected_trainable)
    assert policy.config.use_cache is False
    # Checkpointed blocks still backpropagate into the adapter (enable_input_require_grads).
    policy.train()
    _logits(policy).sum().backward()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)


def test_adapter_disabled_reference_is_the_base_model(base_dir: Path) -> None:
    model = ModelConfig(name_or_path=str(base_dir))
    lora = LoraConfig(enabled=True, r=4, alpha=8)
    assert ReferenceConfig().resolved_mode(lora.enabled) == "adapter_disabled"
    assert load_reference(model, ReferenceConfig(), lora) is None
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(base_dir))
    policy = load_policy(model, lora)
    policy.eval()

    with reference_context(policy, "adapter_disabled"):
        ref_logits = _logits(policy)
    assert not ref_logits.requires_grad
    assert torch.equal(ref_logits, base_logits)
    # Fresh LoRA has B = 0: the policy starts at its reference.
    assert torch.equal(_logits(policy), base_logits)

    assert randomize_lora_b(policy, 0.1) == 14  # all-linear: 7 linears in each of 2 layers
    policy_logits = _logits(policy)
    assert policy_logits.requires_grad
    assert not torch.allclose(policy_logits, base_logits)
    with reference_context(policy, "adapter_disabled"):
        assert torch.equal(_logits(policy), base_logits)
    # The adapter is back on after the context.
    assert torch.equal(_logits(policy), policy_logits)


def test_reference_context_without_adapter(base_dir: Path) -> None:
    policy = load_policy(ModelConfig(name_or_path=str(base_dir)), LoraConfig())
    with reference_context(policy, "model"):
        assert not _logits(policy).requires_grad
    with pytest.raises(ValueError, match="needs a LoRA"), reference_context(policy, "adapter_disabled"):
        pass


def test_model_reference_is_a_frozen_copy(base_dir: Path, tmp_path: Path) -> None:
    model = ModelConfig(name_or_path=str(base_dir))
    reference = load_reference(model, ReferenceConfig(), LoraConfig())
    assert reference is not None and not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    assert count_parameters(reference)[0] == 0
    assert reference.config.use_cache is False
    policy = load_policy(model, LoraConfig())
    ref_logits = _logits(reference)
    assert not ref_logits.requires_grad
    assert torch.equal(ref_logits, _logits(policy))

    # A different reference model is loaded from its own path.
    other = build_tiny_model(tmp_path, seed=1)
    reference = load_reference(model, ReferenceConfig(name_or_path=str(other)), LoraConfig())
    assert reference is not None and not torch.allclose(_logits(reference), ref_logits)


def test_precomputed_reference_loads_nothing(base_dir: Path) -> None:
    model = ModelConfig(name_or_path=str(base_dir))
    assert load_reference(model, ReferenceConfig(mode="precomputed"), LoraConfig()) is None


def test_qlora_needs_cuda(base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lora = LoraConfig(enabled=True, load_in_4bit=True)
    with pytest.raises(ValueError, match="QLoRA needs CUDA"):
        load_policy(ModelConfig(name_or_path=str(base_dir)), lora)


@pytest.mark.parametrize("name", ["/no/such/model-dir", "no-such-org/no-such-model"])
def test_a_model_that_cannot_load_is_named(name: str) -> None:
    with pytest.raises(ValueError, match=f"could not load model '{name}'"):
        load_policy(ModelConfig(name_or_path=name), LoraConfig())
