"""The MoQAE paper's published figures (``moqae/published/moqae_acl2025.toml``): the TOML against the
transcription it was filled from (``shared/published/moqae-acl2025.md``), the relative change
against FP16, record-to-spec matching and the report block beside the measured figures."""

from __future__ import annotations

import csv
import dataclasses
import json
import tomllib
from pathlib import Path

import pytest

from harness.interface import METHODS
from harness.reports import write_report
from moqae.method import MoQAEConfig
from moqae.report import (
    PUBLISHED_FILE,
    canonical_spec,
    find_record,
    fmt_change,
    published_block,
    relative_change,
    spec_matches,
)

MD_FILE = Path(__file__).resolve().parents[2] / "shared" / "published" / "moqae-acl2025.md"
METHODS_IN_ORDER = ["FP16", "INT4", "KVQuant-4b", "QoQ-4b-gs128", "MiKV", "MoQAE-λ0.5"]
MODELS_IN_ORDER = ["LLaMA-7B", "LLaMA-13B", "LLaMA2-7B", "LLaMA2-13B"]
#: our mapping (paper method -> harness spec), as the issue states it
MAPPING = {"FP16": "fp16", "INT4": "int4", "KVQuant-4b": "kvquant-4b", "QoQ-4b-gs128": "qoq", "MiKV": "mikv",
           "MoQAE-λ0.5": "moqae:lam=0.5"}  # fmt: skip
WT_CFG = {"seqlen": 2048, "max_windows": 2, "prefill_chunk": 0}


def _toml() -> dict:
    return tomllib.loads(PUBLISHED_FILE.read_text())


def _record(label: str, name: str, cfg: dict, ppl: float, bits: float, *, model: str = "tiny",
            task_cfg: dict | None = None) -> dict:  # fmt: skip
    """A minimal finished WikiText-2 run record, built as ``tests/test_reports.py`` builds them."""
    key = {"model": model, "dtype": "float32", "device": "cpu", "method": name, "method_config": cfg,
           "task": "wikitext2", "task_config": WT_CFG if task_cfg is None else task_cfg}  # fmt: skip
    env = {"python": "3.11.7", "versions": {"torch": "2.13.0"}, "git_commit": "abc123",
           "hardware": {"device": "cpu", "cpu_count": 2, "torch_threads": 1, "platform": "Linux"}}  # fmt: skip
    return {"key": key, "model": model, "method": label, "task": "wikitext2", "status": "done",
            "created": "2026-01-01", "command": f"python -m harness run --methods {label}", "environment": env,
            "metrics": {"ppl": ppl, "nll": 2.3}, "kv": {"total_bytes": int(1000 * bits), "nominal_bits": bits,
            "effective_bits": bits + 0.5}, "windows": 2, "tokens": 4094,
            "_file": f"runs/{model}__{label.replace(':', '_')}.json"}  # fmt: skip


def _moqae(lam: float, **opts) -> dict:
    return dataclasses.asdict(MoQAEConfig(lam=lam, **opts))


def _records() -> list[dict]:
    """tiny: fp16, int4, qoq, MoQAE λ 0.5 (and an ablation variant, λ 0.1), no kvquant-4b, no mikv;
    tiny2: fp16 and int4; tiny3: int4 alone (no fp16: no columns)."""
    return [
        _record("fp16", "fp16", {}, 10.0, 16.0),
        _record("int4", "int", {"bits": 4}, 11.0, 4.0),
        _record("qoq", "qoq", {"bits": 4}, 10.5, 4.0),
        _record("moqae:lam=0.5", "moqae", _moqae(0.5), 10.3, 4.2),
        _record("moqae:lam=0.5,share=1", "moqae", _moqae(0.5, share=1), 10.2, 5.5),
        _record("moqae:lam=0.1", "moqae", _moqae(0.1), 10.8, 3.8),
        _record("fp16", "fp16", {}, 20.0, 16.0, model="tiny2"),
        _record("int4", "int", {"bits": 4}, 30.0, 4.0, model="tiny2"),
        _record("int4", "int", {"bits": 4}, 99.0, 4.0, model="tiny3"),
    ]


def _rows(table) -> dict[str, list[str]]:
    return {row[0]: row for row in table.rows}


def test_relative_change_hand_computed():
    assert relative_change(7.40, 5.68) == pytest.approx(30.2817, abs=1e-4)  # INT4, LLaMA-7B: 7.40/5.68 - 1
    assert fmt_change(relative_change(7.40, 5.68)) == "+30.3 %"
    assert fmt_change(relative_change(5.22, 5.11)) == "+2.2 %"  # MoQAE-λ0.5, LLaMA2-7B: +2.15 %
    assert fmt_change(relative_change(9.0, 10.0)) == "-10.0 %"  # better than FP16: negative
    assert fmt_change(relative_change(5.68, 5.68)) == "+0.0 %"
    assert fmt_change(None) == "—"


@pytest.mark.skipif(not MD_FILE.exists(), reason=f"the transcription {MD_FILE} is not in this checkout's shared/")
def test_toml_holds_every_figure_of_the_md_table():
    lines = [ln.strip() for ln in MD_FILE.read_text().splitlines() if ln.strip().startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:2] == ["method", "AvgBit"]
    models = header[2:]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]  # lines[1]: the rule
    data = _toml()
    by_cell = {(r["method"], r["model"]): r for r in data["rows"]}
    assert len(data["rows"]) == len(by_cell) == len(cells) * len(models) == 24
    assert list(dict.fromkeys(r["method"] for r in data["rows"])) == [c[0] for c in cells]
    assert list(dict.fromkeys(r["model"] for r in data["rows"])) == models
    for method, bits, *ppls in cells:
        for model, ppl in zip(models, ppls, strict=True):
            r = by_cell[method, model]
            assert r["ppl"] == float(ppl) and f"{r['ppl']:.2f}" == ppl, (method, model)
            assert r["avg_bits"] == float(bits) and f"{r['avg_bits']:.2f}" == bits, (method, model)


def test_toml_structure_and_mapping():
    data = _toml()
    rows = data["rows"]
    assert [r["method"] for r in rows[::4]] == METHODS_IN_ORDER
    assert [r["model"] for r in rows[:4]] == MODELS_IN_ORDER
    assert {(r["method"], r["model"]) for r in rows} == {(a, m) for a in METHODS_IN_ORDER for m in MODELS_IN_ORDER}
    for r in rows:
        assert set(r) == {"model", "method", "avg_bits", "dataset", "ppl", "where"}
        assert r["dataset"] == "WikiText-2" and r["where"].startswith("main WikiText-2 perplexity table")
        assert "Table " not in r["where"]  # the transcription gives no table number
        assert isinstance(r["ppl"], float) and r["ppl"] > 1 and isinstance(r["avg_bits"], float)
    assert data["harness_method"] == MAPPING and list(data["harness_method"]) == METHODS_IN_ORDER
    for spec in MAPPING.values():
        METHODS.config(spec)  # every mapped spec is a valid harness spec
    assert "KVQuant" in data["notes"] and "QServe" in data["notes"] and "0.1" in data["notes"]
    assert "not available offline" not in data["status"]


def test_spec_matching_uses_the_canonical_spec():
    assert canonical_spec("moqae:lambda=0.5") == "moqae:lam=0.5"
    lam05, lam01, share1 = (_record(lb, "moqae", cfg, 10.0, 4.0) for lb, cfg in
                            (("moqae:lam=0.5", _moqae(0.5)), ("moqae:lam=0.1", _moqae(0.1)),
                             ("moqae:lam=0.5,share=1", _moqae(0.5, share=1))))  # fmt: skip
    assert spec_matches(lam05, "moqae:lam=0.5") and spec_matches(lam05, "moqae:lambda=0.5")
    assert not spec_matches(lam01, "moqae:lam=0.5") and not spec_matches(share1, "moqae:lam=0.5")
    plain = _record("moqae", "moqae", _moqae(0.5), 10.0, 4.0)  # the same config under its default spec
    assert spec_matches(plain, "moqae:lam=0.5")
    kvq = _record("kvquant-4b", "kvquant", dataclasses.asdict(METHODS.config("kvquant-4b")[2]), 12.0, 4.0)
    assert spec_matches(kvq, "kvquant-4b") and not spec_matches(kvq, "kvquant-4b-1%")
    int4 = _record("int4", "int", {"bits": 4}, 11.0, 4.0)
    assert spec_matches(int4, "int4") and not spec_matches(int4, "int2") and not spec_matches(int4, "fp16")
    assert find_record([lam01, share1, lam05], "moqae:lam=0.5") is lam05


def test_block_beside_measured_records():
    text, table = published_block(_records())
    assert "not measured here" in text and table is not None
    assert table.header[:7] == ["paper method", "harness spec (our mapping)", "AvgBit (paper)",
                                *[f"{m} (paper)" for m in MODELS_IN_ORDER]]  # fmt: skip
    # tiny3 has no fp16 record: no columns of its own
    assert table.header[7:] == ["nominal bits (tiny)", "PPL (tiny)", "vs fp16 (tiny)", "nominal bits (tiny2)",
                                "PPL (tiny2)", "vs fp16 (tiny2)"]  # fmt: skip
    rows = _rows(table)
    assert list(rows) == METHODS_IN_ORDER
    assert rows["FP16"] == ["FP16", "`fp16`", "16.00", "5.68 (+0.0 %)", "5.09 (+0.0 %)", "5.11 (+0.0 %)",
                            "4.57 (+0.0 %)", "16.00", "10.0000", "+0.0 %", "16.00", "20.0000", "+0.0 %"]  # fmt: skip
    assert rows["INT4"][1:4] == ["`int4`", "4.00", "7.40 (+30.3 %)"]
    assert rows["INT4"][7:] == ["4.00", "11.0000", "+10.0 %", "4.00", "30.0000", "+50.0 %"]
    assert rows["MoQAE-λ0.5"][7:10] == ["4.20", "10.3000", "+3.0 %"]  # not the share=1 variant (10.2)
    assert rows["MoQAE-λ0.5"][10:] == ["—", "—", "—"]
    assert rows["QoQ-4b-gs128"][7:10] == ["4.00", "10.5000", "+5.0 %"]
    assert rows["KVQuant-4b"][7:] == ["—"] * 6 and rows["MiKV"][7:] == ["—"] * 6
    intro = table.intro
    for words in ("not the model measured here", "relative change against FP16", "our mapping", "not measured here",
                  "KVQuant", "QServe", "WikiText-2 (raw) test, windows of 2048 tokens",
                  "moqae_acl2025.toml"):  # fmt: skip
        assert words in intro, words
    measured = [r for r in table.csv if r["source"] == "measured"]
    published = [r for r in table.csv if r["source"] == "published"]
    assert len(published) == 24 and all(r["record"].startswith("published: Tao et al.") for r in published)
    assert {(r["model"], r["method"], r["record"]) for r in measured} == {
        ("tiny", "FP16", "runs/tiny__fp16.json"), ("tiny", "INT4", "runs/tiny__int4.json"),
        ("tiny", "QoQ-4b-gs128", "runs/tiny__qoq.json"), ("tiny", "MoQAE-λ0.5", "runs/tiny__moqae_lam=0.5.json"),
        ("tiny2", "FP16", "runs/tiny2__fp16.json"), ("tiny2", "INT4", "runs/tiny2__int4.json"),
    }  # fmt: skip
    int4 = next(r for r in measured if r["model"] == "tiny" and r["method"] == "INT4")
    assert int4["ppl_vs_fp16_percent"] == pytest.approx(10.0) and int4["fp16_record"] == "runs/tiny__fp16.json"
    int4_paper = next(r for r in published if r["model"] == "LLaMA-7B" and r["method"] == "INT4")
    assert int4_paper["ppl"] == 7.40 and int4_paper["ppl_vs_fp16_percent"] == pytest.approx(30.2817, abs=1e-4)


def test_block_without_records_shows_the_paper_table():
    for records in (None, [], [_record("int4", "int", {"bits": 4}, 11.0, 4.0)]):  # no fp16: no measured columns
        _, table = published_block(records)
        assert table is not None and len(table.header) == 7 and len(table.rows) == 6
        assert _rows(table)["INT4"][3:] == ["7.40 (+30.3 %)", "6.82 (+34.0 %)", "7.31 (+43.1 %)", "6.59 (+44.2 %)"]
        assert "shown alone" in table.intro
        assert all(r["record"].startswith("published: ") for r in table.csv) and len(table.csv) == 24


def test_empty_file_says_so(tmp_path):
    text, table = published_block([], tmp_path / "none.toml")
    assert table is None and "*(empty)*" in text


def test_report_writes_the_block_and_its_csv(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for r in _records()[:4]:
        rec = {k: v for k, v in r.items() if k != "_file"}
        (runs / Path(r["_file"]).name).write_text(json.dumps(rec))
    out = tmp_path / "report"
    write_report([runs], out, "tiny", command="python -m harness report RUNS --out OUT")
    md = (out / "README.md").read_text()
    block = md[md.index("## Published figures") :]
    assert "| INT4 | `int4` | 4.00 | 7.40 (+30.3 %) |" in block and "| 4.00 | 11.0000 | +10.0 % |" in block
    with (out / "published-moqae-paper.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 + 4
    for r in rows:
        assert r["record"].startswith("published: ") or Path(r["record"]).name in {p.name for p in runs.iterdir()}
