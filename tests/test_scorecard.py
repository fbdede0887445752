"""The report's scorecard (``harness.reports.scorecard``): one row per method in the methods' own order,
each column from the records of its protocol (the most common option set), "—" where none, the
"nothing quantized" note, the profile ratios at the largest common context, the quantized share."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from harness.evaluation import Task
from harness.interface import KVCacheMethod, MemoryReport, MethodConfig, ReportStyle
from harness.reports import ReportData, load_results, write_report
from harness.reports.scorecard import SCORECARD, ScorecardColumn, quantized_share, scorecard_tables
from harness.reports.sections import CORE_SECTIONS

N = 1000  # K/V elements of every hand-made cache
WT = {"seqlen": 2048, "max_windows": 1, "prefill_chunk": 0}
WT_SHORT = {"seqlen": 64, "max_windows": 1, "prefill_chunk": 0}
LB = {"tasks": "trec,samsum", "limit": 2, "max_length": 1024}
RULER = {"tasks": "niah_single_1,vt", "lengths": "1024,2048", "samples": 2}
NIAH = {"lengths": "256", "depths": "0,50,100", "repeats": 1, "digits": 5}


def _kv(nominal: float, effective: float, quantized: int | None, codes: int | None = None) -> dict:
    """A record's ``kv`` as ``MemoryReport.as_dict`` writes it: ``quantized`` of N elements held as codes
    (None: a store that does not count them)."""
    fp = None if quantized is None else N - quantized
    codes = (quantized or 0) if codes is None else codes
    return {"bytes": {"codes": codes, "scales": 0, "fp_tokens": 2 * (fp or 0), "outliers": 0, "router": 0},
            "total_bytes": int(N * effective / 8), "elements": N, "nominal_bits": nominal, "effective_bits": effective,
            "nonfinite_kv": 0, "reserved_bytes": 0, "quantized_elements": quantized, "fp_elements": fp}  # fmt: skip


def _record(label: str, name: str, cfg: dict, task: str, task_cfg: dict, metrics: dict, kv: dict, **extra) -> dict:
    key = {"model": "tiny", "dtype": "float32", "device": "cpu", "method": name, "method_config": cfg,
           "task": task, "task_config": task_cfg}  # fmt: skip
    rec = {"key": key, "model": "tiny", "method": label, "task": task, "status": "done", "created": "2026-01-01",
           "command": f"python -m harness run --methods {label} --tasks {task}", "metrics": metrics, "kv": kv,
           "environment": {"python": "3.11", "versions": {}, "git_commit": "abc"}}  # fmt: skip
    rec.update(extra)
    return rec


@dataclasses.dataclass
class _PlugConfig(MethodConfig):
    bits: int = 3


class _Plug(KVCacheMethod):
    """A plugin-like method: its own family, rank and row label."""

    config_class = _PlugConfig
    report = ReportStyle("Plug family", "d", "#123456", rank=35)

    @classmethod
    def report_label(cls, label: str, config: dict) -> str:
        return f"plug {config.get('bits')}-bit"

    def new_layer_store(self, layer_idx, info):
        raise NotImplementedError


@pytest.fixture(scope="module")
def plug():
    from harness.interface import METHODS

    METHODS.register("plug-sc")(_Plug)
    try:
        yield _Plug
    finally:
        METHODS.unregister("plug-sc")


def _records() -> list[dict]:
    kivi = {"bits": 2, "group": 32, "residual": 128}
    recs = [
        # WikiText-2, the common protocol: fp16, int4, kivi-2, the plugin, an oracle
        _record("fp16", "fp16", {}, "wikitext2", WT, {"ppl": 10.0}, _kv(16, 16, 0), windows=1),
        _record("int4", "int", {"bits": 4}, "wikitext2", WT, {"ppl": 11.0}, _kv(4, 4.5, N), windows=1),
        _record("kivi-2", "kivi", kivi, "wikitext2", WT, {"ppl": 12.5}, _kv(2.5, 3.0, 900), windows=1),
        _record(
            "plug-sc", "plug-sc", {"bits": 3}, "wikitext2", WT, {"ppl": 10.5}, _kv(3, 3.5, None, codes=375), windows=1
        ),  # fmt: skip
        _record(
            "moqae-oracle", "moqae-oracle", {}, "wikitext2", WT, {"ppl": 10.2}, _kv(4.1, 4.6, N), windows=1, oracle=True
        ),  # fmt: skip
        # another WikiText-2 protocol (fewer records): left out, and said so
        _record("fp16", "fp16", {}, "wikitext2", WT_SHORT, {"ppl": 30.0}, _kv(16, 16, 0), windows=1),
        # LongBench: no int4 record
        _record("fp16", "fp16", {}, "longbench", LB, {"trec": 50.0, "samsum": 30.0, "average": 40.0}, _kv(16, 16, 0)),
        _record(
            "kivi-2", "kivi", kivi, "longbench", LB, {"trec": 45.0, "samsum": 31.0, "average": 38.0}, _kv(2.4, 2.9, 950)
        ),  # fmt: skip
        # RULER at two lengths
        _record(
            "fp16", "fp16", {}, "ruler", RULER, {"avg@1024": 90.0, "avg@2048": 80.0, "average": 85.0}, _kv(16, 16, 0)
        ),  # fmt: skip
        _record(
            "kivi-2",
            "kivi",
            kivi,
            "ruler",
            RULER,
            {"avg@1024": 88.0, "avg@2048": 70.0, "average": 79.0},
            _kv(2.3, 2.8, 940),
        ),  # fmt: skip
        # the needle test on prompts shorter than KIVI's fp16 residual: nothing quantized
        _record("fp16", "fp16", {}, "niah", NIAH, {"exact": 100.0, "partial": 100.0}, _kv(16, 16, 0)),
        _record("kivi-2", "kivi", kivi, "niah", NIAH, {"exact": 100.0, "partial": 100.0}, _kv(16, 16, 0)),
    ]
    return recs


def _profile_rows() -> list[dict]:
    rows = []
    for method, kv, step in (("dynamic", 4.0, 0.010), ("fp16", 4.0, 0.012), ("int4", 1.0, 0.030),
                             ("kivi-2", 1.0, 0.040)):  # fmt: skip
        for ctx in (512, 1024):
            rows.append({"method": method, "model": "tiny", "device": "cpu", "dtype": "float32", "context": ctx,
                         "batch": 1, "status": "done", "decode_step_s": step * ctx / 512,
                         "kv_bytes": kv * ctx, "nominal_bits": 4.0 * kv, "effective_bits": 4.0 * kv})  # fmt: skip
    rows[-1] = {**rows[-1], "status": "oom", "decode_step_s": None, "kv_bytes": None}  # kivi-2 at 1024: no row
    return rows


def _write(folder: Path, recs: list[dict], rows: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(recs):
        (folder / f"r{i:02d}_{r['method'].replace(':', '_')}_{r['task']}.json").write_text(json.dumps(r))
    if rows:
        (folder / "profile.json").write_text(json.dumps({"command": "python -m harness profile", "rows": rows}))
    return folder


def _table(folder: Path, out: Path):
    tables = scorecard_tables(ReportData(load_results([folder]), out, "fp16"))
    assert len(tables) == 1
    t = tables[0]
    return t, {row[0]: dict(zip(t.header, row, strict=True)) for row in t.rows}


@pytest.fixture(scope="module")
def card(plug, tmp_path_factory):
    root = tmp_path_factory.mktemp("sc")
    return _table(_write(root / "runs", _records(), _profile_rows()), root / "out")


def test_rows_in_the_methods_order_with_names_and_families(card):
    t, rows = card
    names = [r[0] for r in t.rows]
    # ranks: dynamic (transformers 1), fp16 (10), int4 (20), kivi (30), the plugin (35), the oracle (91)
    assert names == ["dynamic", "fp16", "int4", "kivi-2", "plug 3-bit", "moqae-oracle [oracle: upper bound]"]
    assert rows["plug 3-bit"]["family"] == "Plug family" and rows["kivi-2"]["family"] == "KIVI"
    assert rows["dynamic"]["family"] == "transformers"
    assert t.title == "Scorecard: tiny" and t.stem == "scorecard"


def test_bits_and_ppl_change_from_the_common_protocol(card):
    t, rows = card
    assert rows["int4"]["nominal bits"] == "4.00" and rows["int4"]["effective bits"] == "4.50"
    assert rows["dynamic"]["nominal bits"] == "16.00 (profile)"  # profile-only: its profile row's bits
    ppl = "WikiText-2 PPL Δ vs fp16"
    assert rows["fp16"][ppl] == "+0.00 %" and rows["int4"][ppl] == "+10.00 %" and rows["kivi-2"][ppl] == "+25.00 %"
    assert rows["moqae-oracle [oracle: upper bound]"][ppl] == "+2.00 %"
    assert rows["dynamic"][ppl] == "—"
    # the protocol is named, the option set left out too
    assert "`wikitext2:" in t.intro and "seqlen=2048" in t.intro and "(float32, cpu)" in t.intro
    assert "fp16's (10.0000)" in t.intro
    assert "left out: `wikitext2:" in t.intro and "seqlen=64" in t.intro and "(1 record)" in t.intro


def test_task_columns_and_dash_where_no_record(card):
    _, rows = card
    assert rows["fp16"]["LongBench average"] == "40.00" and rows["kivi-2"]["LongBench average"] == "38.00"
    assert rows["int4"]["LongBench average"] == "—"  # no int4 LongBench record
    assert rows["kivi-2"]["RULER avg@1024"] == "88.00" and rows["kivi-2"]["RULER avg@2048"] == "70.00"
    assert rows["int4"]["RULER avg@2048"] == "—" and rows["plug 3-bit"]["needle exact"] == "—"
    assert rows["fp16"]["needle exact"] == "100.0"


def test_nothing_quantized_is_said_in_the_cell(card):
    t, rows = card
    assert rows["kivi-2"]["needle exact"] == "100.0 = fp16 (nothing quantized)"
    assert "nothing quantized" not in rows["fp16"]["needle exact"]  # the reference quantizes nothing by design
    assert "nothing quantized" not in rows["kivi-2"]["nominal bits"]  # its WikiText-2 cache held codes
    held = next(h for h in t.header if h.startswith("held quantized"))
    assert held == "held quantized % (WikiText-2 / LongBench / RULER / needle)"
    assert rows["kivi-2"][held] == "90.0 / 95.0 / 94.0 / 0.0"
    assert rows["int4"][held] == "100.0 / — / — / —"
    assert rows["plug 3-bit"][held] == "— / — / — / —"  # its store does not count them, and it held codes
    assert rows["fp16"][held] == "0.0 / 0.0 / 0.0 / 0.0"


def test_profile_ratios_at_the_largest_common_context(card):
    t, rows = card
    dec, kv = "decode step × dynamic (512 tokens)", "KV bytes × fp16 (512 tokens)"
    assert dec in t.header and kv in t.header  # kivi-2 ran out of memory at 1024: 512 is the common one
    assert rows["int4"][dec] == "3.000" and rows["int4"][kv] == "0.250"
    assert rows["dynamic"][dec] == "1.000" and rows["fp16"][dec] == "1.200" and rows["fp16"][kv] == "1.000"
    assert rows["plug 3-bit"][dec] == "—" and rows["moqae-oracle [oracle: upper bound]"][kv] == "—"
    assert "at 512 tokens of context, batch 1: the largest context every profiled method has" in t.intro


def test_csv_names_each_number_and_its_record(card, tmp_path):
    t, _ = card
    path = t.write(tmp_path)[0]
    with path.open() as f:
        rows = list(csv.DictReader(f))
    ppl = [r for r in rows if r["column"] == "ppl_change_pct" and r["method"] == "int4"]
    assert len(ppl) == 1 and float(ppl[0]["value"]) == pytest.approx(10.0)
    assert ppl[0]["record"].endswith("_int4_wikitext2.json") and ppl[0]["protocol"].startswith("wikitext2:")
    dec = next(r for r in rows if r["column"] == "decode_step_s × dynamic" and r["method"] == "int4")
    assert dec["record"].endswith("profile.json") and dec["row"] == "4" and float(dec["value"]) == pytest.approx(3.0)
    share = next(r for r in rows if r["column"] == "niah held quantized" and r["method"] == "kivi-2")
    assert float(share["value"]) == 0.0


def test_without_profile_kv_bytes_come_from_the_records(plug, tmp_path):
    t, rows = _table(_write(tmp_path / "runs", _records()), tmp_path / "out")
    assert not any(h.startswith("decode step") for h in t.header)
    assert rows["int4"]["KV bytes × fp16 (WikiText-2)"] == f"{4.5 / 16:.3f}"
    assert [r[0] for r in t.rows][0] == "fp16"  # no profile: no dynamic row


def test_a_method_quantizing_nothing_anywhere_is_not_passed_as_low_bit(tmp_path):
    recs = [
        _record("fp16", "fp16", {}, "wikitext2", WT_SHORT, {"ppl": 30.0}, _kv(16, 16, 0)),
        _record("kivi-2", "kivi", {"bits": 2}, "wikitext2", WT_SHORT, {"ppl": 30.0}, _kv(16, 16, 0)),
    ]
    _, rows = _table(_write(tmp_path / "runs", recs), tmp_path / "out")
    assert rows["kivi-2"]["nominal bits"] == "16.00 = fp16 (nothing quantized)"
    assert rows["kivi-2"]["WikiText-2 PPL Δ vs fp16"] == "+0.00 % = fp16 (nothing quantized)"
    assert rows["fp16"]["nominal bits"] == "16.00"


class _PlugTask(Task):
    """A plugin-like task: the report reads its registry name and its declared column."""

    name = "plug-task-sc"
    description = "a plugin task"
    scorecard = ScorecardColumn("plug score", "hits", "{:.1f}", means="hits per 100 probes", order=35)

    def evaluate(self, ctx):
        raise NotImplementedError


def test_a_task_declares_its_column_and_the_core_names_none(plug, tmp_path):
    from harness.evaluation import TASKS
    from harness.reports import scorecard

    source = Path(scorecard.__file__).read_text()
    for task in ("wikitext2", "longbench", "ruler", "niah", "needle", "RULER"):
        assert f'"{task}"' not in source  # the columns come from the task classes
    TASKS.register("plug-task-sc")(_PlugTask)
    try:
        recs = [r for r in _records() if r["task"] in ("longbench", "niah")]
        recs += [
            _record("fp16", "fp16", {}, "plug-task-sc", {"n": 4}, {"hits": 75.0}, _kv(16, 16, 0)),
            _record("int4", "int", {"bits": 4}, "plug-task-sc", {"n": 4}, {"hits": 50.0}, _kv(4, 4.5, N)),
        ]
        t, rows = _table(_write(tmp_path / "runs", recs), tmp_path / "out")
    finally:
        TASKS.unregister("plug-task-sc")
    # ordered by the declared order: LongBench (20), the plugin's (35), needle (40)
    assert [h for h in t.header if h.split()[0] in ("LongBench", "plug", "needle")] == [
        "LongBench average", "plug score hits", "needle exact"]  # fmt: skip
    assert rows["int4"]["plug score hits"] == "50.0" and rows["kivi-2"]["plug score hits"] == "—"
    assert "- *plug score*: `plug-task-sc:n=4` (float32, cpu), 2 records: hits per 100 probes." in t.intro
    assert rows["int4"]["nominal bits"] == "4.00 (plug score)"  # its first task with a record


def test_scorecard_comes_first_in_the_report(plug, tmp_path):
    assert SCORECARD in CORE_SECTIONS and SCORECARD.order < min(s.order for s in CORE_SECTIONS if s is not SCORECARD)
    recs = [r for r in _records() if r["task"] in ("longbench", "niah")]  # no plots to draw: fast
    out = tmp_path / "report"
    write_report([_write(tmp_path / "runs", recs)], out, "t", command="python -m harness report X --out Y")
    text = (out / "README.md").read_text()
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections[:2] == ["## Contents", "## Scorecard"]
    assert (out / "scorecard.csv").exists() and (out / "scorecard.tex").exists()


def test_memory_report_counts_quantized_and_fp_elements():
    import torch

    from harness.quant import quantize
    from harness.storage import held_memory

    r = held_memory(quantize(torch.randn(1, 2, 32, 8), 4, 8, -1))
    r += held_memory(torch.randn(1, 2, 16, 8, dtype=torch.float16))
    d = r.as_dict()
    assert (d["quantized_elements"], d["fp_elements"], d["elements"]) == (512, 256, 768)
    assert quantized_share(d) == pytest.approx(512 / 768)
    own = MemoryReport()  # a store counting its elements itself: the split is unknown, not made up
    own.elements = 100
    r += own
    assert r.as_dict()["quantized_elements"] is None and r.as_dict()["fp_elements"] is None
    assert r.nominal_bits == pytest.approx((512 * 4 + 256 * 16) / 868)  # the existing numbers are unchanged
