"""`dpo-cluster bench serve`: the serve app's engines side by side, and what a comparison costs.

For each backend asked for (`--backend hf,vllm`), one after the other in one run, the app is
deployed with the same base, tuned model, prompts and greedy sampling, and the same client threads
(`serve_load`) measure three phases: one model (`/v1/chat/completions` on "tuned", JSON), the same
requests streamed (for the time to first token), and `/v1/compare` (both models, JSON only). Each
phase starts with a few uncounted warm-up requests. `serve_report` prints the table (one column
per backend, ratios against the first) and the JSON carries every number. A benchmark, not a
test: nothing is asserted on speed.
"""

from __future__ import annotations

import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dpo_cluster.bench.serve_load import Send, json_sender, run_phase, stream_sender, summarize
from dpo_cluster.bench.serve_report import PHASES, RATIO_KEYS, TTFT_NOTE, format_table, ratio
from dpo_cluster.config import ConfigError

BACKENDS = ("auto", "hf", "vllm")
DEFAULT_BASE = "builtin:smollm2-135m-instruct"
# The server's own per-generation limit: queued behind full batches at this load, an answer may
# wait long, and a 504 would measure the limit instead of the engine.
SERVER_TIMEOUT_S = 600.0

PROMPTS = [
    "Suggest a title for a video about sourdough bread.",
    "Write a short title for a talk on distributed training.",
    "A catchy title for a travel vlog in Lisbon.",
    "Give me a title for a tutorial on Ray Serve.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three prime numbers and say why they are prime.",
    "Explain in two sentences why the sky is blue.",
    "List three tips for a first marathon.",
    "How do I boil an egg so the yolk stays soft?",
    "Describe a cat to someone who has never seen one.",
    "What does a compiler do?",
    "Suggest a name for a small coffee shop by the river.",
    "Why do leaves change colour in autumn?",
    "Write one sentence that welcomes new members to a chess club.",
    "What is the difference between weather and climate?",
]


@dataclass(frozen=True)
class BenchPlan:
    """What one run measures. tuned None: a LoRA adapter over base is built for the run;
    overrides: dotted serve.* keys applied last, over the benchmark's own."""

    backends: tuple[str, ...] = ("hf",)
    base: str = DEFAULT_BASE
    tuned: str | None = None
    requests: int = 128
    concurrency: int = 32
    max_new_tokens: int = 64
    warmup: int = 4
    port: int = 8000
    api_key_file: str | None = None
    overrides: tuple[str, ...] = field(default_factory=tuple)

    def check(self) -> None:
        if not self.backends:
            raise ConfigError("--backend: name at least one of " + ", ".join(BACKENDS))
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or len(set(self.backends)) != len(self.backends):
            raise ConfigError(f"--backend: each of {', '.join(BACKENDS)} at most once, got {self.backends}")
        counts = {
            "requests": self.requests,
            "concurrency": self.concurrency,
            "max_new_tokens": self.max_new_tokens,
        }
        for name, value in counts.items():
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup: must be >= 0, got {self.warmup}")
        if "vllm" in self.backends:
            from dpo_cluster.serving.generation.vllm_backend import MISSING_VLLM, vllm_installed

            if not vllm_installed():  # before the first backend's minutes, not after them
                raise ConfigError(MISSING_VLLM)


def parse_backends(text: str) -> tuple[str, ...]:
    """ "hf,vllm" -> ("hf", "vllm")."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def build_demo_adapter(out_dir: Path, base: str = "builtin:tiny") -> Path:
    """A LoRA adapter over `base` (q_proj and v_proj, r 8, small random B, seed 1): its answers
    differ from the base's and, on a real model, stay fluent. Saved with the base's tokenizer."""
    from transformers import AutoTokenizer

    from dpo_cluster.modeling import resolve_name_or_path
    from dpo_cluster.tiny import build_lora_adapter

    base_dir = resolve_name_or_path(base)
    return build_lora_adapter(
        base_dir,
        out_dir,
        AutoTokenizer.from_pretrained(base_dir),
        random_b=True,
        seed=1,
        r=8,
        alpha=32,
        target_modules=("q_proj", "v_proj"),
        b_std=0.05,
    )


def run_serve_benchmark(plan: BenchPlan, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every backend of `plan` in turn, print the table, return all the numbers."""
    plan.check()
    say = progress or _print
    with tempfile.TemporaryDirectory(prefix="dpo-cluster-bench-serve-") as tmp:
        workdir = Path(tmp)
        if plan.tuned is None:
            say(f"building a LoRA adapter over {plan.base} ...")
        tuned = plan.tuned or str(build_demo_adapter(workdir / "final", plan.base))
        backends = {name: bench_backend(name, plan, tuned, workdir, say) for name in plan.backends}
    reference = plan.backends[0]
    result = {
        "settings": asdict(plan) | {"tuned_built": plan.tuned is None, "sampling": "greedy (temperature 0)"},
        "ttft": TTFT_NOTE,
        "backends": backends,
        "ratios": {
            f"{name}/{reference}": compute_ratios(backends[name], backends[reference])
            for name in plan.backends[1:]
        },
    }
    say(format_table(result))
    return result


def bench_backend(
    name: str, plan: BenchPlan, tuned: str, workdir: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    """Deploy the app on backend `name`, run the phases, remove the app."""
    from dpo_cluster.config import load_config
    from dpo_cluster.serving.app import read_api_key
    from dpo_cluster.serving.launch import start_serving, stop_serving

    config = load_config(None, serve_overrides(plan, name, tuned, workdir), serving=True)
    key = read_api_key(config.serve.api_key_env, config.serve.api_key_file)
    say(f"[{name}] deploying the app (serve.backend={name}) ...")
    started = time.perf_counter()
    urls = start_serving(config)
    try:
        deploy_s = time.perf_counter() - started
        engine = served_engine(urls.base)
        say(f"[{name}] up after {deploy_s:.1f} s, engine {engine}")
        chat = urls.openai + "/chat/completions"
        senders = {"one": json_sender(chat, key), "one_stream": stream_sender(chat, key)}
        senders["compare"] = json_sender(urls.compare, key)
        bodies = phase_bodies(plan)
        phases = {
            phase: bench_phase(name, phase, senders[phase], bodies[phase], plan, say) for phase in PHASES
        }
    finally:
        stop_serving()
    return {
        "engine": engine,
        "deploy_s": deploy_s,
        "phases": phases,
        "compare_over_one_p50": ratio(phases["compare"]["p50_s"], phases["one"]["p50_s"]),
        "compare_over_one_p95": ratio(phases["compare"]["p95_s"], phases["one"]["p95_s"]),
    }


def serve_overrides(plan: BenchPlan, backend: str, tuned: str, workdir: Path) -> list[str]:
    """The serve.* keys of one deployment; the plan's own overrides come last and win."""
    # A compare is two generations: room for every client's in one replica and one hf batch.
    in_flight = 2 * plan.concurrency
    overrides = [
        f"serve.base={plan.base}",
        f"serve.tuned={tuned}",
        f"serve.backend={backend}",
        f"serve.port={plan.port}",
        f"serve.arena_db={workdir / 'votes.sqlite'}",
        f"serve.max_new_tokens={plan.max_new_tokens}",
        f"serve.default_max_new_tokens={plan.max_new_tokens}",
        f"serve.max_batch_size={in_flight}",
        f"serve.max_ongoing_requests={in_flight}",
        f"serve.request_timeout_s={SERVER_TIMEOUT_S}",
    ]
    if plan.api_key_file:
        overrides.append(f"serve.api_key_file={plan.api_key_file}")
    return overrides + list(plan.overrides)


def served_engine(base_url: str) -> str:
    """The engine serving "tuned", as `/healthz` describes it (what `auto` chose)."""
    import json

    with urllib.request.urlopen(base_url + "/healthz", timeout=60) as response:
        health = json.loads(response.read())
    return str(health["models"]["tuned"].get("backend", "?"))


def phase_bodies(plan: BenchPlan) -> dict[str, list[dict[str, Any]]]:
    """The request bodies of each phase: the same chats, in the same order, greedy."""
    chats = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(plan.requests)]
    sampling = {"max_tokens": plan.max_new_tokens, "temperature": 0}
    one = [{"model": "tuned", "messages": chat} | sampling for chat in chats]
    streamed = {"stream": True, "stream_options": {"include_usage": True}}
    return {
        "one": one,
        "one_stream": [body | streamed for body in one],
        "compare": [{"messages": chat} | sampling for chat in chats],
    }


def bench_phase(
    label: str,
    phase: str,
    send: Send,
    bodies: list[dict[str, Any]],
    plan: BenchPlan,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Warm up (not counted), then measure `bodies` at the plan's concurrency."""
    if plan.warmup:
        run_phase(send, bodies[: plan.warmup], min(plan.warmup, plan.concurrency))
    say(f"[{label}] {PHASES[phase]}: {len(bodies)} requests, {plan.concurrency} clients ...")
    stats = summarize(*run_phase(send, bodies, plan.concurrency))
    errors = f", {stats['errors']} errors (first: {stats['first_error']})" if stats["errors"] else ""
    say(f"[{label}] {PHASES[phase]}: {stats['answered']} answered in {stats['wall_s']:.1f} s{errors}")
    return stats


def compute_ratios(numbers: dict[str, Any], reference: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """phase -> metric -> numbers / reference, for the throughput and latency metrics."""
    return {
        phase: {
            key: ratio(numbers["phases"][phase][key], reference["phases"][phase][key]) for key in RATIO_KEYS
        }
        for phase in PHASES
    }


def _print(line: str) -> None:
    print(line, flush=True)
