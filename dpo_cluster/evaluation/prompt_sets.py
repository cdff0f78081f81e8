"""The prompts a win-rate evaluation asks both models: from a file, or from the data's eval split.

The first N distinct prompts are taken in source order, since preference data often holds several
pairs per prompt and asking one twice would count it twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from dpo_cluster.config import Config, SourceConfig
from dpo_cluster.data import sources
from dpo_cluster.data.formats import normalize_row
from dpo_cluster.data.pipeline import PreparedData, parse_raw
from dpo_cluster.data.records import DataError, DropRow
from dpo_cluster.evaluation.judges import Prompt


def check_prompt(value: Any, where: str) -> Prompt:
    """`value` as a prompt: a non-empty string, or a non-empty list of messages with string role
    and content. Raises DataError naming `where` otherwise."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field 'prompt' is empty")
        return value
    if isinstance(value, list) and value:
        for i, message in enumerate(value):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise DataError(
                    f"{where}: field 'prompt'[{i}]: expected a message {{role: str, content: str}}, "
                    f"got {json.dumps(message, ensure_ascii=False)[:80]}"
                )
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(
        f"{where}: field 'prompt': expected a string or a non-empty list of messages, "
        f"got {type(value).__name__ if value is not None else 'null'}"
    )


def prompt_key(prompt: Prompt) -> str:
    """A prompt's identity for deduplication: its canonical JSON (sorted keys, unicode kept)."""
    return json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def _file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, row) of a .jsonl/.ndjson or .json file; `where` names file and line or index."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{number}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: invalid JSON: {e.msg}") from None
        return
    if suffix != ".json":
        raise DataError(f"{path}: unsupported prompt file type {path.suffix!r}; use .jsonl or .json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of rows (or JSON Lines), got {type(data).__name__}")
    for index, row in enumerate(data):
        yield f"{path}#{index}", row


def load_prompt_file(path: str | Path, limit: int) -> list[Prompt]:
    """The first `limit` distinct prompts of a prompt file: JSON Lines or a JSON array of rows with
    a "prompt" (text, or a chat as a list of {"role", "content"}); preference rows fit as they are.
    Raises DataError naming file and row for a row without a usable "prompt", and when the file
    holds no prompt at all."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such prompt file")
    prompts: dict[str, Prompt] = {}
    for where, row in _file_rows(path):
        if len(prompts) >= limit:
            break
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with a 'prompt' field, got {type(row).__name__}")
        prompt = check_prompt(row.get("prompt"), where)
        prompts.setdefault(prompt_key(prompt), prompt)
    if not prompts:
        raise DataError(f"{path}: no prompts in the file")
    return list(prompts.values())


def _source_rows(source: SourceConfig) -> Iterator[tuple[str, bytes]]:
    """(row_id, raw) of every row of a source, with the row ids the pipeline gives them."""
    if source.rows is not None:
        batch = sources.inline_batches(source.rows)
        yield from zip(batch["row_id"], batch["raw"])
        return
    if sources.is_local(source) and not sources.is_saved_dataset(source.path or ""):
        files = sources.list_local_files(source)
        for unit in sources.plan_local_reads(files, 1):
            for batch in sources.read_unit(unit):
                yield from zip(batch["row_id"], batch["raw"])
        return
    dataset = sources.load_hf_dataset(source)
    for index, row in enumerate(dataset):
        yield f"{source.describe()}#{index}", sources.encode_row(row)


def eval_split_prompts(config: Config, prepared: PreparedData, limit: int) -> list[Prompt]:
    """The first `limit` distinct prompts of the kept rows of the eval split (`split_prompts`)."""
    return split_prompts(config, prepared, "eval", limit)


def split_prompts(config: Config, prepared: PreparedData, split: str, limit: int) -> list[Prompt]:
    """The first `limit` distinct prompts of the kept rows of `split` ("train" or "eval") that
    `prepared` holds (prepared from `config`). Raises DataError when the split is empty.

    They are read back from the data source (matched by row id, normalized as the pipeline
    normalized them) rather than decoded from token ids, so they keep their chat structure and
    render exactly as a request to the serve app would.
    """
    split_dir = prepared.split_dir(split)
    if split_dir is None:
        fix = (
            "hold out rows with data.eval or data.eval_fraction, or set evaluation.prompts"
            if split == "eval"
            else "check data.train and its data_report.json, or set rounds.prompts"
        )
        raise DataError(f"the {split} split is empty: no prompts to take ({fix})")
    kept = {
        row_id
        for f in sorted(split_dir.glob("*.parquet"))
        for row_id in pq.read_table(f, columns=["row_id"]).column("row_id").to_pylist()
    }
    role = "eval" if split == "eval" and config.data.eval is not None else "train"
    listed = config.data.sources(role)
    reported = prepared.report["sources"][role]
    # One format per source: the mix lists them in source order; a single source has its own.
    formats = [entry["format"] for entry in reported["mix"]] if "mix" in reported else [reported["format"]]
    prompts: dict[str, Prompt] = {}
    for (_, source), fmt in zip(listed, formats, strict=True):
        spec = config.data.format_spec(source)
        for row_id, raw in _source_rows(source):
            if len(prompts) >= limit:
                return list(prompts.values())
            if row_id not in kept:
                continue
            try:
                pair = normalize_row(parse_raw(raw), fmt, spec)
            except DropRow as drop:  # kept by the pipeline, so the source changed since it ran
                raise DataError(
                    f"{row_id}: {drop.reason}: {drop.detail} (the source changed after it was prepared?)"
                ) from None
            prompts.setdefault(prompt_key(pair.prompt), pair.prompt)
    if not prompts:
        names = ", ".join(source.describe() for _, source in listed)
        raise DataError(
            f"none of the {len(kept)} {split} rows in {split_dir} were found in {names} "
            "(was it changed or moved after it was prepared?)"
        )
    return list(prompts.values())
