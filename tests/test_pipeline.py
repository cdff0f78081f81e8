"""The Ray Data pipeline on a real local Ray: accounting of every row, determinism, failure modes,
the prepared-data cache, and every source kind."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from dpo_cluster.config import load_config
from dpo_cluster.data import sources
from dpo_cluster.data.pipeline import QUARANTINE_FILE, REPORT_FILE, PreparedData, prepare
from dpo_cluster.data.records import DataError
from dpo_cluster.data.samples import SAMPLE_FILE, generate_title_pairs, write_jsonl

pytestmark = pytest.mark.slow


def make_config(tmp_path: Path, tokenizer: Path, train: Any, *extra: str, name: str = "out") -> Any:
    overrides = [
        f"output_dir={tmp_path / name}",
        f"model.name_or_path={tokenizer}",
        "data.train=later",
        *extra,
    ]
    config = load_config(None, overrides)
    config.data.train = (
        sources.SourceConfig(**train) if isinstance(train, dict) else sources.SourceConfig(path=str(train))
    )
    config.check()
    return config


def kept_rows(prepared: PreparedData) -> dict[str, tuple[str, list[int], list[int], list[int]]]:
    """row_id -> (split, prompt_ids, chosen_ids, rejected_ids) of every kept row."""
    rows = {}
    for split in ("train", "eval"):
        path = prepared.split_dir(split)
        if path is None:
            continue
        for f in sorted(path.glob("*.parquet")):
            for r in pq.read_table(f).to_pylist():
                rows[r["row_id"]] = (split, r["prompt_ids"], r["chosen_ids"], r["rejected_ids"])
    return rows


def quarantine(prepared: PreparedData) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (prepared.output_dir / QUARANTINE_FILE).read_text().splitlines()]


def totals(report: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for stats in report["splits"].values():
        for reason, count in stats["dropped"].items():
            out[reason] = out.get(reason, 0) + count
    return out


# ----------------------------------------------------------------------------------------------
# A hostile corpus: >= 1000 rows, good ones mixed with planted defects of every kind.

LONG = "word " * 600  # about 600+ tokens: longer than max_length 256


def _defects() -> list[tuple[str, bytes]]:
    good = generate_title_pairs(1, seed=99)[0]

    def row(**changes: Any) -> bytes:
        r = {**good, **changes}
        return json.dumps({k: v for k, v in r.items() if v is not ...}, ensure_ascii=False).encode()

    user = [{"role": "user", "content": "Name my video about tea."}]
    return [
        ("invalid_json", b'{"prompt": [{"role": "user", "content": "x"}], "chosen": '),
        ("invalid_json", b"{'prompt': 'single quotes'}"),
        ("undecodable_text", b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'),
        ("not_an_object", b"[1, 2, 3]"),
        ("not_an_object", b"42"),
        ("missing_field", row(chosen=...)),
        ("missing_field", row(rejected=None)),
        ("wrong_type", row(chosen=5)),
        ("wrong_type", row(prompt="a string where messages are expected")),
        ("invalid_messages", row(prompt=[{"role": "bot", "content": "hi"}])),
        ("invalid_messages", row(prompt=[{"role": "user"}])),
        ("invalid_messages", row(chosen=[{"role": "user", "content": "not an answer"}])),
        ("empty_prompt", row(prompt=[{"role": "user", "content": "   "}])),
        ("empty_chosen", row(chosen=[{"role": "assistant", "content": ""}])),
        ("chosen_equals_rejected", row(prompt=user, chosen=good["chosen"], rejected=good["chosen"])),
        ("prompt_too_long", row(prompt=[{"role": "user", "content": LONG}])),
    ]


def write_hostile_corpus(path: Path, n_good: int = 1000, seed: int = 0) -> dict[str, str]:
    """Write good rows with every defect planted ~8 times at random lines, plus blank lines
    (which are not rows). Returns {row_id: expected reason} for the planted rows."""
    rng = random.Random(seed)
    lines: list[bytes | None] = [
        json.dumps(r, ensure_ascii=False).encode() for r in generate_title_pairs(n_good, seed=seed)
    ]
    for _, line in _defects() * 8:
        lines.insert(rng.randrange(len(lines) + 1), line)
    for _ in range(5):
        lines.insert(rng.randrange(len(lines) + 1), None)
    expected: dict[str, str] = {}
    defect_by_line = {line: reason for reason, line in _defects()}
    with open(path, "wb") as f:
        for number, line in enumerate(lines, start=1):
            if line is None:
                f.write(b"   \n")
                continue
            f.write(line + b"\n")
            if line in defect_by_line:
                expected[f"{path}:{number}"] = defect_by_line[line]
    return expected


def test_hostile_corpus_every_row_accounted(
    tmp_path: Path, ray_local: None, tiny_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = tmp_path / "hostile.jsonl"
    planted = write_hostile_corpus(corpus)
    n_rows = sum(1 for line in corpus.read_bytes().splitlines() if line.strip())
    assert n_rows >= 1000 and len(planted) == 16 * 8
    # Cut the file into many small read units so line numbering across units is exercised.
    monkeypatch.setattr(sources, "MIN_CHUNK_BYTES", 16 << 10)
    assert len(sources.plan_local_reads([(str(corpus), "jsonl")], 4)) >= 4

    config = make_config(
        tmp_path,
        tiny_tokenizer_dir,
        corpus,
        "data.max_length=256",
        "data.eval_fraction=0.1",
        "data.max_bad_fraction=1.0",
        "data.format=conversational",
    )
    prepared = prepare(config)
    report = json.loads((prepared.output_dir / REPORT_FILE).read_text())
    assert report == prepared.report

    rows_in = sum(s["rows_in"] for s in report["splits"].values())
    rows_kept = sum(s["rows_kept"] for s in report["splits"].values())
    assert rows_in == n_rows
    for stats in report["splits"].values():
        assert stats["rows_in"] == stats["rows_kept"] + sum(stats["dropped"].values())
    expected_counts: dict[str, int] = {}
    for reason in planted.values():
        expected_counts[reason] = expected_counts.get(reason, 0) + 1
    assert totals(report) == expected_counts
    assert rows_kept == n_rows - len(planted)

    # Every dropped row is in the quarantine with its exact file:line and reason.
    q = quarantine(prepared)
    assert {r["row_id"]: r["reason"] for r in q} == planted
    assert all(r["detail"] for r in q)
    undecodable = next(r for r in q if r["reason"] == "undecodable_text")
    assert "\\xe9" in undecodable["raw"]

    kept = kept_rows(prepared)
    assert len(kept) == rows_kept
    assert not set(kept) & set(planted)
    datasets = prepared.datasets()
    assert sum(ds.count() for ds in datasets.values()) == rows_kept
    assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(datasets["train"].columns())


def test_kept_row_tokens_match_the_chat_template(
    tmp_path: Path, ray_local: None, tiny_tokenizer_dir: Path
) -> None:
    from transformers import AutoTokenizer

    rows = generate_title_pairs(40, seed=3)
    path = write_jsonl(rows, tmp_path / "t.jsonl")
    prepared = prepare(make_config(tmp_path, tiny_tokenizer_dir, path))
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    kept = kept_rows(prepared)
    for line in (1, 17, 40):
        row = rows[line - 1]
        _, prompt_ids, chosen_ids, rejected_ids = kept[f"{path}:{line}"]
        assert tok.decode(prompt_ids) == tok.apply_chat_template(
            row["prompt"], tokenize=False, add_generation_prompt=True
        )
        assert tok.decode(prompt_ids + chosen_ids) == tok.apply_chat_template(
            row["prompt"] + row["chosen"], tokenize=False
        )
        assert tok.decode(prompt_ids + rejected_ids) == tok.apply_chat_template(
            row["prompt"] + row["rejected"], tokenize=False
        )


def test_split_and_ids_identical_across_runs_and_cpu_counts(
    tmp_path: Path, ray_local: None, tiny_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "MIN_CHUNK_BYTES", 8 << 10)
    results = []
    for name, cpus in (("one", 1), ("two", 2), ("again", 2)):
        config = make_config(
            tmp_path,
            tiny_tokenizer_dir,
            SAMPLE_FILE,
            "data.eval_fraction=0.2",
            f"data.num_cpus={cpus}",
            name=name,
        )
        results.append(kept_rows(prepare(config)))
    assert results[0] == results[1] == results[2]
    splits = [split for split, *_ in results[0].values()]
    assert 0 < splits.count("eval") < len(splits)
    # Pairs sharing a prompt share a split: no eval prompt is seen in training.
    by_prompt: dict[tuple[int, ...], set[str]] = {}
    for split, prompt_ids, _, _ in results[0].values():
        by_prompt.setdefault(tuple(prompt_ids), set()).add(split)
    assert all(len(s) == 1 for s in by_prompt.values())


def test_on_bad_row_fail_names_file_line_and_field(
    tmp_path: Path, ray_local: None, tiny_tokenizer_dir: Path
) -> None:
    rows: list[Any] = generate_title_pairs(20, seed=1)
    del rows[6]["chosen"]
    path = write_jsonl(rows, tmp_path / "bad.jsonl")
    config = make_config(tmp_path, tiny_tokenizer_dir, path, "data.on_bad_row=fail")
    with pytest.raises(DataError) as e:
        prepare(config)
    assert f"{path}:7: missing_field: field 'chosen'" in str(e.value)
    assert not (tmp_path / "out" / "prepared").exists()


def test_on_bad_row_fail_ignores_length_policy_drops(
    tmp_path: Path, ray_local: None, tiny_tokenizer_dir: Path
) -> None:
    rows: list[Any] = generate_title_pairs(20, seed=1)
    rows[3]["prompt"] = [{"role": "user", "content": LONG}]
    path = write_jsonl(rows, tmp_path / "long.jsonl")
    prepared = prepare(
        make_config(tmp_path, tiny_tokenizer_dir, path, "data.on_bad_row=fail", "data.max_length=256")
    )
    assert totals(prepared.report) == {"prompt_too_long": 1}


def test_max_bad_fraction_fails_with_worst_reasons(
    tmp_path: Path, ray_local: None, tiny_tokenizer_dir: Path
) -> None:
    lines = (
        [json.dumps(r) for r in generate_title_pairs(70, seed=2)] + ["not json"] * 20 + ['{"chosen": 1}'] * 10
    )
    path = tmp_path / "mostly_bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    config = make_config(
        tmp_path, tiny_tokenizer_dir, path, "data.max_bad_fraction=0.2", "data.format=conversational"
    )
    with pytest.raises(DataError) as e:
        prepare(config)
    message = str(e.value)
    assert "30 of 100 rows (30.0%) are defective" in message
    assert f"invalid_json x20 (e.g. {path}:71, {path}:72, {path}:73)" in message
    assert "missing_field x10" in message
    # The report and quarantine are still written so the user can look; no prepared data is.
    assert (tmp_path / "out" / REPORT_FILE).exists()
    assert len(quarantine(PreparedData(tmp_path / "out", {}, False))) == 30
    assert not (tmp_path / "out" / "prepared").exists()


def test_no_row_kept_is_an_error(tmp_path: Path, ray_local: None, tiny_tokenizer_dir: Path) -> None:
    path = tmp_path / "junk.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "b"}\n' * 3)
    config = make_config(tmp_path, tiny_tokenizer_dir, path, "data.max_bad_fraction=1.0")
    with pytest.raises(DataError, match="no rows were kept"):
        prepare(config)


def test_cache_reused_only_when_key_matches(
    tmp_path: Path, ray_local: None, tiny_tokenizer_dir: Path
) -> None:
    path = write_jsonl(generate_title_pairs(30, seed=4), tmp_path / "c.jsonl")
    first = prepare(make_config(tmp_path, tiny_tokenizer_dir, path))
    assert not first.cache_hit
    assert prepare(make_config(tmp_path, tiny_tokenizer_dir, path)).cache_hit
    assert not prepare(make_config(tmp_path, tiny_tokenizer_dir, path, "data.max_length=128")).cache_hit
    assert not prepare(make_config(tmp_path, tiny_tokenizer_dir, path, "data.cache=false")).cache_hit
    write_jsonl(generate_title_pairs(31, seed=4), path)  # the data changed
    rerun = prepare(make_config(tmp_path, tiny_tokenizer_dir, path))
    assert not rerun.cache_hit and rerun.report["splits"]["train"]["rows_in"] == 31
    # An interrupted run leaves no manifest, so nothing half-written is reused.
    (tmp_path / "out" / "prepared" / "manifest.json").unlink()
    assert not prepare(make_config(tmp_path, tiny_tokenizer_dir, path)).cache_hit


def test_explicit_eval_source(tmp_path: Path, ray_local: None, tiny_tokenizer_dir: Path) -> None:
    train = write_jsonl(generate_title_pairs(30, seed=5), tmp_path / "train.jsonl")
    evals = write_jsonl(generate_title_pairs(7, seed=6), tmp_path / "eval.jsonl")
    config = make_config(tmp_path, tiny_tokenizer_dir, train)
    config.data.eval = sources.SourceConfig(path=str(evals))
    prepared = prepare(config)
    assert prepared.report["splits"]["train"]["rows_kept"] == 30
    assert prepared.report["splits"]["eval"]["rows_kept"] == 7
    assert {rid for rid, (split, *_) in kept_rows(prepared).items() if split == "eval"} == {
        f"{evals}:{i}" for i in range(1, 8)
    }


# ----------------------------------------------------------------------------------------------
# Source kinds


def _standard_rows(n: int) -> list[dict[str, str]]:
    return generate_title_pairs(n, seed=7, conversational=False)


def test_parquet_row_groups_csv_json_dir_glob_and_inline(
    tmp_path: Path, ray_local: None, tiny_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow as pa

    rows = _standard_rows(120)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=10)
    monkeypatch.setattr(sources, "MIN_CHUNK_BYTES", 1)  # one unit per few row groups
    assert len(sources.plan_local_reads([(str(tmp_path / "d.parquet"), "parquet")], 4)) >= 4
    prepared = prepare(make_config(tmp_path, tiny_tokenizer_dir, tmp_path / "d.parquet", name="pq"))
    assert set(kept_rows(prepared)) == {f"{tmp_path / 'd.parquet'}#{i}" for i in range(120)}

    import csv

    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "good", "bad"])
        writer.writeheader()
        for r in rows[:15]:
            writer.writerow({"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]})
    prepared = prepare(
        make_config(
            tmp_path,
            tiny_tokenizer_dir,
            tmp_path / "d.csv",
            "data.columns={prompt: question, chosen: good, rejected: bad}",
            name="csv",
        )
    )
    assert prepared.report["splits"]["train"]["rows_kept"] == 15
    assert prepared.report["sources"]["train"]["format"] == "standard"

    (tmp_path / "d.json").write_text(json.dumps(rows[:9], ensure_ascii=False))
    assert (
        prepare(make_config(tmp_path, tiny_tokenizer_dir, tmp_path / "d.json", name="json")).report["splits"][
            "train"
        ]["rows_kept"]
        == 9
    )

    folder = tmp_path / "folder"
    write_jsonl(rows[:5], folder / "a.jsonl")
    write_jsonl(rows[5:12], folder / "sub" / "b.jsonl")
    (folder / "README.txt").write_text("not data")
    assert (
        prepare(make_config(tmp_path, tiny_tokenizer_dir, folder, name="dir")).report["splits"]["train"][
            "rows_kept"
        ]
        == 12
    )
    assert (
        prepare(make_config(tmp_path, tiny_tokenizer_dir, f"{folder}/**/*.jsonl", name="glob")).report[
            "splits"
        ]["train"]["rows_kept"]
        == 12
    )

    inline = prepare(
        make_config(
            tmp_path,
            tiny_tokenizer_dir,
            {"rows": rows[:200] + [{"x": 1}]},
            "data.max_bad_fraction=0.5",
            name="inline",
        )
    )
    assert inline.report["splits"]["train"]["rows_kept"] == 120
    assert inline.report["splits"]["train"]["dropped"] == {"missing_field": 1}
    assert quarantine(inline)[0]["row_id"] == "rows[120]"


def test_saved_dataset_and_hub_loading_code(
    tmp_path: Path, ray_local: None, tiny_tokenizer_dir: Path
) -> None:
    import datasets

    rows = _standard_rows(25)
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:5])}
    ).save_to_disk(str(tmp_path / "saved"))
    prepared = prepare(
        make_config(tmp_path, tiny_tokenizer_dir, {"path": str(tmp_path / "saved"), "split": "test"})
    )
    assert set(kept_rows(prepared)) == {f"{tmp_path / 'saved'}#{i}" for i in range(5)}

    # The hub path is `datasets.load_dataset(id, name=, data_dir=, split=, revision=)`; here it is
    # exercised on a local dataset folder with a data_dir, the way stack-exchange-paired uses one.
    write_jsonl(rows, tmp_path / "repo" / "data" / "rl" / "train.jsonl")
    write_jsonl(rows[:3], tmp_path / "repo" / "data" / "evaluation" / "train.jsonl")
    loaded = sources.load_hf_dataset(
        sources.SourceConfig(path=str(tmp_path / "repo"), data_dir="data/evaluation")
    )
    assert loaded.to_list() == rows[:3]

    with pytest.raises(
        DataError, match="some-org/no-such-dataset: could not load it as a local path or a Hugging Face"
    ):
        prepare(make_config(tmp_path, tiny_tokenizer_dir, {"path": "some-org/no-such-dataset"}, name="hub"))


def test_file_level_errors(tmp_path: Path, ray_local: None, tiny_tokenizer_dir: Path) -> None:
    path = tmp_path / "utf16.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n', encoding="utf-16")
    with pytest.raises(DataError, match=r"utf16.jsonl: line 1: the file is UTF-16/UTF-32 encoded"):
        prepare(make_config(tmp_path, tiny_tokenizer_dir, path))
    (tmp_path / "broken.json").write_text('[{"prompt": "a",\n "chosen": }]')
    with pytest.raises(DataError, match=r"broken.json: line 2 column 12: invalid JSON"):
        prepare(make_config(tmp_path, tiny_tokenizer_dir, tmp_path / "broken.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files found"):
        prepare(make_config(tmp_path, tiny_tokenizer_dir, tmp_path / "empty"))
    (tmp_path / "no-tokenizer").mkdir()  # a directory with no tokenizer files in it
    with pytest.raises(DataError, match="cannot load the tokenizer from"):
        prepare(make_config(tmp_path, tmp_path / "no-tokenizer", SAMPLE_FILE))


def test_jsonl_read_units_cover_the_file_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pure planning: units are contiguous, line-aligned, and numbered like `enumerate(f, 1)`."""
    path = tmp_path / "u.jsonl"
    lines = [json.dumps({"i": i, "pad": "x" * (i % 37)}) for i in range(500)]
    path.write_bytes(("\n".join(lines[:250]) + "\n\n" + "\n".join(lines[250:])).encode())  # no final newline
    monkeypatch.setattr(sources, "MIN_CHUNK_BYTES", 1000)
    units = sources.plan_local_reads([(str(path), "jsonl")], 10)
    assert len(units) > 5
    assert units[0].start == 0 and units[-1].stop == path.stat().st_size
    assert all(a.stop == b.start for a, b in zip(units, units[1:]))
    got = [
        (rid, raw)
        for u in units
        for batch in sources.read_unit(u)
        for rid, raw in zip(batch["row_id"], batch["raw"])
    ]
    want = [(f"{path}:{n}", line) for n, line in enumerate(path.read_bytes().split(b"\n"), 1) if line.strip()]
    assert got == want


# ----------------------------------------------------------------------------------------------
# Several sources mixed by weight


def _mix_config(tmp_path: Path, tokenizer: Path, train: str, *extra: str, name: str = "mix") -> Any:
    return load_config(
        None,
        [f"output_dir={tmp_path / name}", f"model.name_or_path={tokenizer}", f"data.train={train}", *extra],
    )


def _source_ids(prepared: PreparedData) -> list[str]:
    return [rid for rid in kept_rows(prepared)]


def test_weighted_sources_sample_copy_and_account_per_source(
    tmp_path: Path, ray_local: None, tiny_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights 0.25 and 1.5 over 2000 rows each: about 500 rows of the first (binomial, sigma 19)
    and 2000 + about 1000 copies of the second (sigma 22); the 1500 rows left out are not_sampled,
    which is no defect; the draw is a function of the seed alone."""
    monkeypatch.setattr(sources, "MIN_CHUNK_BYTES", 1 << 16)  # several read units per file
    a = write_jsonl(generate_title_pairs(2000, seed=21), tmp_path / "a.jsonl")
    b = write_jsonl(generate_title_pairs(2000, seed=22), tmp_path / "b.jsonl")
    train = f"[{{path: {a}, weight: 0.25}}, {{path: {b}, weight: 1.5}}]"
    first = prepare(
        _mix_config(tmp_path, tiny_tokenizer_dir, train, "data.max_bad_fraction=0.01", name="one")
    )
    again = prepare(
        _mix_config(tmp_path, tiny_tokenizer_dir, train, "data.max_bad_fraction=0.01", name="two")
    )
    other = prepare(_mix_config(tmp_path, tiny_tokenizer_dir, train, "data.split_seed=7", name="three"))

    mix = first.report["sources"]["train"]["mix"]
    assert [(m["key"], m["source"], m["format"], m["weight"]) for m in mix] == [
        ("data.train[0]", str(a), "conversational", 0.25),
        ("data.train[1]", str(b), "conversational", 1.5),
    ]
    for m in mix:
        assert m["rows_in"] == 2000 == m["rows_kept"] + sum(m["dropped"].values())
    assert abs(mix[0]["rows_kept"] - 500) < 4 * 19.4 and mix[0]["copies"] == 0
    assert mix[0]["dropped"]["not_sampled"] == 2000 - mix[0]["rows_kept"] - sum(
        n for r, n in mix[0]["dropped"].items() if r != "not_sampled"
    )
    assert "not_sampled" not in mix[1]["dropped"]
    assert abs(mix[1]["rows_kept"] + mix[1]["copies"] - 3000) < 4 * 22.4

    ids = _source_ids(first)
    assert len(ids) == len(set(ids))  # copies have ids of their own
    copies = [i for i in ids if "~" in i]
    assert len(copies) == mix[1]["copies"] and all(i.startswith(f"{b}:") and i.endswith("~1") for i in copies)
    stats = first.report["splits"]["train"]
    assert stats["copies"] == mix[1]["copies"]
    assert stats["rows_kept"] == len(ids) == mix[0]["rows_kept"] + mix[1]["rows_kept"] + mix[1]["copies"]
    assert stats["rows_in"] == stats["rows_kept"] + sum(stats["dropped"].values())
    assert "not_sampled" in stats["examples"] and len(stats["examples"]["not_sampled"]) == 5
    assert all(q["reason"] != "not_sampled" for q in quarantine(first))  # counted, not quarantined

    assert _source_ids(again) == ids  # same seed: the same rows, in the same order
    assert set(_source_ids(other)) != set(ids)  # another seed draws another sample
    # Files alternate between the sources (read units interleaved), each task's copies right
    # after its originals: the order training reads them in.
    files = sorted(first.split_dir("train").glob("*.parquet"))  # type: ignore[union-attr]
    labels = [re.search(r"-(train-\d(?:-copies)?)\.parquet$", f.name).group(1) for f in files]  # type: ignore[union-attr]
    assert labels.index("train-1") < len(labels) - 1 - labels[::-1].index("train-0")
    assert all(labels[i - 1] == "train-1" for i, label in enumerate(labels) if label == "train-1-copies")


def test_per_source_format_and_columns(tmp_path: Path, ray_local: None, tiny_tokenizer_dir: Path) -> None:
    """One standard source with its own column names, one conversational, data.format forced to
    standard: each source is read with its own settings."""
    std = [
        {"question": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
        for r in _standard_rows(40)
    ]
    a = write_jsonl(std, tmp_path / "std.jsonl")
    b = write_jsonl(generate_title_pairs(30, seed=8), tmp_path / "conv.jsonl")
    train = f"[{{path: {a}, columns: {{prompt: question}}}}, {{path: {b}, format: conversational}}]"
    prepared = prepare(_mix_config(tmp_path, tiny_tokenizer_dir, train, "data.format=standard"))
    mix = prepared.report["sources"]["train"]["mix"]
    assert [(m["format"], m["rows_kept"], m["dropped"]) for m in mix] == [
        ("standard", 40, {}),
        ("conversational", 30, {}),
    ]
    assert prepared.report["sources"]["train"]["format"] == "standard, conversational"
    assert "copies" in prepared.report["splits"]["train"]
    # Without the override the conversational rows are defects of the standard format.
    with pytest.raises(DataError, match="defective"):
        prepare(
            _mix_config(
                tmp_path,
                tiny_tokenizer_dir,
                f"[{a}, {b}]",
                "data.format=standard",
                "data.columns={prompt: question}",
                name="bad",
            )
        )


def test_single_source_report_keeps_its_shape(
    tmp_path: Path, ray_local: None, tiny_tokenizer_dir: Path
) -> None:
    data = write_jsonl(generate_title_pairs(30, seed=9), tmp_path / "one.jsonl")
    prepared = prepare(_mix_config(tmp_path, tiny_tokenizer_dir, str(data)))
    assert prepared.report["sources"] == {"train": {"source": str(data), "format": "conversational"}}
    assert "copies" not in prepared.report["splits"]["train"]
    assert sorted(kept_rows(prepared)) == sorted(f"{data}:{i}" for i in range(1, 31))
