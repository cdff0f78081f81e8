"""The `serve` section: the Ray Serve app that shows the base and tuned models side by side.

Request limits and replica counts are checked at load time, so a bad value fails `serve run`
before any replica loads a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from dpo_cluster.config.loader import ConfigError

# What a name of serve.models may be: it is the `model` field of requests and a label in the arena.
SERVED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class ServeConfig:
    # The base model: hub id, local directory or builtin name. null = model.name_or_path.
    base: str | None = None
    # The tuned model: a training run's final/ (full model or LoRA adapter), a hub id or a
    # directory. null = output_dir/final. An adapter is served over the base's weights (one copy).
    tuned: str | None = None
    # More models beside base and tuned (sweeps, training rounds): served name -> a run's final/
    # (LoRA adapter or full model), a hub id or a directory. Adapters over the base share its
    # deployment (one copy of the base weights); each full model gets its own. Every served name
    # answers /v1/chat/completions and /v1/compare, and the arena draws battles among all of them.
    models: dict[str, str] = field(default_factory=dict)
    # HTTP address of Ray Serve's proxy. 127.0.0.1 keeps it local; 0.0.0.0 listens on every
    # interface (put an API key on it).
    host: str = "127.0.0.1"
    port: int = 8000
    # Generation engine: auto (vllm where vLLM is installed and serves the model, else hf) | hf
    # (transformers, one static batch at a time per replica, @serve.batch) | vllm (continuous
    # batching and a paged KV cache; base and LoRA adapters in one engine). /healthz says which.
    backend: Literal["auto", "hf", "vllm"] = "auto"
    # vllm without a GPU: the KV cache's size in GiB (vLLM would otherwise take most of the RAM).
    vllm_kv_cache_gb: float = 1.0
    # vllm on GPUs: the share of each GPU's memory an engine takes (weights and KV cache), in
    # (0, 1]. null = 0.9 x serve.num_gpus, so engines packed onto one GPU fit beside each other.
    vllm_gpu_memory_utilization: float | None = None
    # Generation device: null (cuda when a GPU is visible, else cpu) | cpu | cuda.
    device: str | None = None
    # Weights dtype for serving: auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # API key for generation, compare, arena battle/vote and export routes, read from this
    # environment variable, or (api_key_file) from a file such as a mounted Kubernetes Secret.
    # Neither set or both empty: no key is asked for (fine on 127.0.0.1 only).
    api_key_env: str = "DPO_CLUSTER_API_KEY"
    api_key_file: str | None = None
    # SQLite file of arena battles and votes. null = output_dir/arena/votes.sqlite.
    arena_db: str | None = None
    # Limits on each request: prompt tokens (after the chat template), the max_new_tokens a client
    # may ask for, the default when it asks for none, the request body in bytes.
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 512
    default_max_new_tokens: int = 128
    max_body_bytes: int = 65536
    # Seconds a generation may take before the client gets 504 (the row stops generating too).
    request_timeout_s: float = 60.0
    # Dynamic batching on each model replica (@serve.batch): most requests per batch, and seconds
    # to wait for a batch to fill.
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    # Requests a model replica takes at once (Serve queues the rest). >= max_batch_size.
    max_ongoing_requests: int = 32
    # Model replicas: fixed at min_replicas, or autoscaled between min_replicas and max_replicas
    # to keep target_ongoing_requests per replica when max_replicas > min_replicas.
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 4.0
    # Resources per model replica (GPUs may be fractional to pack both models on one GPU).
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Replicas of the HTTP front (routes, arena); they share arena_db, so keep them on one node.
    ingress_replicas: int = 1
    # Requests each front replica holds at once, those waiting on a model included; more wait in
    # Serve's proxy. Ray Serve's own default (5) would cap every engine's batch at 5 requests.
    ingress_max_ongoing_requests: int = 1024
    # Serve health checks: how often, and how long a check may take before the replica restarts.
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0

    def check(self) -> None:
        positive = {
            "port": self.port,
            "max_prompt_tokens": self.max_prompt_tokens,
            "max_new_tokens": self.max_new_tokens,
            "default_max_new_tokens": self.default_max_new_tokens,
            "max_body_bytes": self.max_body_bytes,
            "request_timeout_s": self.request_timeout_s,
            "max_batch_size": self.max_batch_size,
            "max_ongoing_requests": self.max_ongoing_requests,
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "ingress_replicas": self.ingress_replicas,
            "ingress_max_ongoing_requests": self.ingress_max_ongoing_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"serve.{name}: must be > 0, got {value}")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ConfigError(
                f"serve.default_max_new_tokens: {self.default_max_new_tokens} is over the cap "
                f"serve.max_new_tokens ({self.max_new_tokens})"
            )
        if self.max_ongoing_requests < self.max_batch_size:
            raise ConfigError(
                f"serve.max_ongoing_requests: must be >= serve.max_batch_size ({self.max_batch_size}), "
                "or batches can never fill"
            )
        if self.max_replicas < self.min_replicas:
            raise ConfigError(
                f"serve.max_replicas: {self.max_replicas} is below serve.min_replicas ({self.min_replicas})"
            )
        if self.batch_wait_timeout_s < 0 or self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("serve.batch_wait_timeout_s, serve.num_cpus, serve.num_gpus: must be >= 0")
        for name, source in self.models.items():
            if name in ("base", "tuned") or not SERVED_NAME.fullmatch(str(name)):
                raise ConfigError(
                    f"serve.models: {name!r} is not a served name: letters, digits and . _ - "
                    "(at most 64), other than base and tuned"
                )
            if not isinstance(source, str) or not source:
                raise ConfigError(
                    f"serve.models.{name}: expected a model directory or hub id, got {source!r}"
                )
        if self.vllm_kv_cache_gb <= 0:
            raise ConfigError(f"serve.vllm_kv_cache_gb: must be > 0, got {self.vllm_kv_cache_gb}")
        utilization = self.vllm_gpu_memory_utilization
        if utilization is not None and not 0 < utilization <= 1:
            raise ConfigError(f"serve.vllm_gpu_memory_utilization: must be in (0, 1], got {utilization}")
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"serve.device: null, cpu, cuda or cuda:N, got {self.device!r}")

    def gpu_memory_utilization(self) -> float:
        """The share of a GPU each vLLM engine takes (see vllm_gpu_memory_utilization)."""
        if self.vllm_gpu_memory_utilization is not None:
            return self.vllm_gpu_memory_utilization
        return 0.9 * min(1.0, self.num_gpus) if self.num_gpus > 0 else 0.9
