"""The Ray Serve application: base and tuned models side by side behind one HTTP front.

    Frontend (FastAPI routes, API key, limits, arena store)
        ├── "Models"       base weights once, + every LoRA adapter (tuned, serve.models), per request
        │   or "BaseModel" the base alone, when no served model is an adapter
        ├── "TunedModel"   full tuned model, with its own replicas and resources
        └── "Model-NAME"   each full model of serve.models, likewise

`build_app(config)` picks the layout from what `serve.tuned` and `serve.models` are (adapter
directories or full weights) and the engine from `serve.backend` (`replicas`: transformers or vLLM). `app_builder(args)`
is the entry Serve configs and RayService import (through `serve/app.py`); `dpo-cluster serve`
calls `build_app` directly.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from dpo_cluster.config import Config, ConfigError, ServeConfig, load_config
from dpo_cluster.modeling import resolve_name_or_path
from dpo_cluster.paths import looks_local
from dpo_cluster.serving.arena_store import ArenaStore
from dpo_cluster.serving.gateway import Gateway, Limits, ServedModel
from dpo_cluster.serving.generation import adapter_base, is_adapter_dir
from dpo_cluster.serving.generation.vllm_backend import choose_engine
from dpo_cluster.serving.replicas import ModelServer, VLLMServer

logger = logging.getLogger(__name__)
APP_NAME = "dpo-cluster"


@serve.deployment
@serve.ingress()
class Frontend:
    """The HTTP front: routes, API key, limits, the arena's vote store."""

    def __init__(
        self,
        models: dict[str, ServedModel],
        handles: dict[str, DeploymentHandle],
        settings: dict[str, Any],
    ) -> None:
        from dpo_cluster.serving.prompts import load_served_tokenizer

        self.settings = settings
        tokenizers = {
            name: load_served_tokenizer(m.source, m.adapter_of or m.source) for name, m in models.items()
        }
        limits = Limits(
            max_prompt_tokens=settings["max_prompt_tokens"],
            max_new_tokens=settings["max_new_tokens"],
            default_max_new_tokens=settings["default_max_new_tokens"],
            request_timeout_s=settings["request_timeout_s"],
        )
        self.gateway = Gateway(models, handles, tokenizers, limits)
        self.store = ArenaStore(settings["arena_db"])
        self.api_key = read_api_key(settings["api_key_env"], settings["api_key_file"])
        logger.info(
            "serving %s; API key %s; arena votes in %s",
            ", ".join(models),
            "required" if self.api_key else "NOT required",
            settings["arena_db"],
        )

    def __serve_build_asgi_app__(self) -> Any:
        from dpo_cluster.serving.api import build_api

        return build_api(
            self.gateway, self.store, api_key=self.api_key, max_body_bytes=self.settings["max_body_bytes"]
        )


def read_api_key(env_var: str | None, key_file: str | None) -> str | None:
    """The key from the file (a mounted Secret) or else the environment variable; None when
    neither holds one. Raises ConfigError for a file that does not exist or is empty, so a typo
    cannot silently leave the server open."""
    if key_file:
        path = Path(key_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"serve.api_key_file: no such file: {key_file}")
        key = path.read_text(encoding="utf-8").strip()
        if not key:
            raise ConfigError(f"serve.api_key_file: {key_file} is empty")
        return key
    value = os.environ.get(env_var or "", "").strip()
    return value or None


def build_app(config: Config) -> serve.Application:
    """The Serve application for config's serve section (see the module docstring)."""
    s = config.serve
    base = config.serve_base()
    base_path = _model_path(base, "serve.base")
    tuned = {
        "tuned": _model_path(config.serve_tuned(), "serve.tuned", " (train first, or point it elsewhere)")
    }
    tuned |= {name: _model_path(source, f"serve.models.{name}") for name, source in s.models.items()}
    adapters = {name: path for name, path in tuned.items() if is_adapter_dir(path)}
    full = {name: path for name, path in tuned.items() if name not in adapters}
    backend = choose_backend(s, [base_path, *full.values()], list(adapters.values()))
    replica_options = _replica_options(s)

    def server(name: str, weights: str, names: dict[str, str | None]) -> DeploymentHandle:
        if backend == "vllm":
            engine = {
                "max_model_len": s.max_prompt_tokens + s.max_new_tokens,
                "kv_cache_gb": s.vllm_kv_cache_gb,
                "gpu_memory_utilization": s.gpu_memory_utilization(),
            }
            return VLLMServer.options(name=name, **replica_options).bind(
                weights, names, dtype=s.dtype, engine=engine
            )
        return ModelServer.options(name=name, **replica_options).bind(
            weights,
            names,
            device=s.device,
            dtype=s.dtype,
            max_batch_size=s.max_batch_size,
            batch_wait_timeout_s=s.batch_wait_timeout_s,
        )

    for name, path in adapters.items():
        declared = adapter_base(path)
        if declared and declared not in (base, base_path, resolve_name_or_path(base)):
            logger.warning("%s: adapter %s was trained on %s; serving it over %s", name, path, declared, base)
    # The base and every adapter over it in one deployment: the base weights once.
    shared = "Models" if adapters else "BaseModel"
    models = {"base": ServedModel("base", base, None, shared)}
    models |= {name: ServedModel(name, path, base, shared) for name, path in adapters.items()}
    handle = server(shared, base_path, {"base": None, **adapters})
    handles = {name: handle for name in models}
    for name, path in full.items():
        deployment = "TunedModel" if name == "tuned" else f"Model-{name}"
        models[name] = ServedModel(name, path, None, deployment)
        handles[name] = server(deployment, path, {name: None})
    # In the order people read them: base, tuned, then the others as configured.
    order = ["base", "tuned", *s.models]
    models = {name: models[name] for name in order}
    return Frontend.options(
        num_replicas=s.ingress_replicas,
        max_ongoing_requests=s.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    ).bind(models, {name: handles[name] for name in order}, _front_settings(config))


def choose_backend(s: ServeConfig, weights: list[str], adapters: list[str]) -> str:
    """ "hf" or "vllm" for serve.backend (see `choose_engine`); the replicas have GPUs when
    serve.num_gpus says so, whatever the driver has."""
    try:
        return choose_engine(s.backend, weights, adapters, on_gpu=s.num_gpus > 0)
    except ValueError as error:
        raise ConfigError(f"serve.backend: {error}") from error


def _model_path(name: str, key: str, hint: str = "") -> str:
    """An existing path made absolute, or a hub id or builtin name as given; ConfigError for a
    name spelled as a path that does not exist (a typo must not be sent to the hub)."""
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    if looks_local(name):
        raise ConfigError(f"{key}: no such model directory: {name}{hint}")
    return name


def _replica_options(s: ServeConfig) -> dict[str, Any]:
    """Deployment options of every model server: resources, health checks, replicas."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
        "max_ongoing_requests": s.max_ongoing_requests,
        "health_check_period_s": s.health_check_period_s,
        "health_check_timeout_s": s.health_check_timeout_s,
    }
    if s.max_replicas > s.min_replicas:
        options["autoscaling_config"] = {
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = s.min_replicas
    return options


def _front_settings(config: Config) -> dict[str, Any]:
    """What the Frontend replicas need of the config, with paths made absolute."""
    s = config.serve
    return {
        "max_prompt_tokens": s.max_prompt_tokens,
        "max_new_tokens": s.max_new_tokens,
        "default_max_new_tokens": s.default_max_new_tokens,
        "request_timeout_s": s.request_timeout_s,
        "max_body_bytes": s.max_body_bytes,
        "arena_db": str(Path(config.arena_db()).expanduser().resolve()),
        "api_key_env": s.api_key_env,
        "api_key_file": str(Path(s.api_key_file).expanduser().resolve()) if s.api_key_file else None,
    }


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry for Serve config files and RayService: `args` may name a dpo-cluster YAML
    (`config`), dotted `overrides`, and serve.* keys directly (`base`, `tuned`, `port`, ...):

        applications:
          - name: dpo-cluster
            import_path: serve.app:app_builder
            args: {config: configs/sample_train.yaml, api_key_file: /secrets/api-key}
    """
    args = dict(args or {})
    path = args.pop("config", None)
    overrides = list(args.pop("overrides", []) or [])
    overrides += [f"serve.{key}={json.dumps(value)}" for key, value in args.items()]
    return build_app(load_config(path, overrides, serving=True))
