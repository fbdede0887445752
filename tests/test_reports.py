"""The report: every table (Markdown, CSV naming its records, LaTeX) and plot (PNG + SVG) from
hand-made records of each kind, the paper's row order, the Pareto frontier."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from harness.cli import main
from harness.interface import KVCacheMethod, MethodConfig, ReportStyle
from harness.reports import Section, load_results, method_sort_key, pareto_front, place_labels, write_report
from moqae.method import MoQAEConfig

WT_CFG = {"seqlen": 2048, "max_windows": 2, "prefill_chunk": 0}


def _write(folder: Path, name: str, obj: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(obj))
    return path


def _record(method: str, name: str, cfg: dict, *, task: str = "wikitext2", task_cfg: dict | None = None,
            metrics: dict, bits: tuple = (16.0, 16.0), status: str = "done", **extra) -> dict:  # fmt: skip
    key = {"model": "tiny", "dtype": "float32", "device": "cpu", "method": name, "method_config": cfg,
           "task": task, "task_config": WT_CFG if task_cfg is None else task_cfg}  # fmt: skip
    env = {"python": "3.11.7", "versions": {"torch": "2.13.0"}, "git_commit": "abc123",
           "hardware": {"device": "cpu", "cpu_count": 2, "torch_threads": 1, "platform": "Linux"}}  # fmt: skip
    rec = {"key": key, "model": "tiny", "method": method, "task": task, "status": status, "created": "2026-01-01",
           "command": f"python -m harness run --methods {method}", "environment": env, "metrics": metrics,
           "kv": {"total_bytes": int(1000 * bits[1]), "nominal_bits": bits[0], "effective_bits": bits[1]}}  # fmt: skip
    rec.update(extra)
    return rec


def _moqae(lam: float, **opts) -> dict:
    return dataclasses.asdict(MoQAEConfig(lam=lam, **opts))


def _layers(*shares: tuple[int, int, int]) -> list[dict]:
    return [{"expert_chunks": list(s)} for s in shares]


#: (label, registered name, config, nominal bits, effective bits, PPL)
PPL = [
    ("int2", "int", {"bits": 2}, 2.0, 2.5, 50.0),
    ("moqae:lam=0.5", "moqae", _moqae(0.5), 4.2, 4.9, 10.3),
    ("kivi-2", "kivi", {"bits": 2}, 2.44, 3.41, 14.0),
    ("fp16", "fp16", {}, 16.0, 16.0, 10.0),
    ("qoq", "qoq", {"bits": 4}, 4.0, 4.5, 10.9),
    ("kvquant-2b-1%", "kvquant", {"bits": 2, "sparsity_threshold": 0.99}, 2.16, 2.62, 12.0),
    ("moqae:lam=0.1", "moqae", _moqae(0.1), 3.8, 4.5, 10.8),
    ("int4", "int", {"bits": 4}, 4.0, 4.5, 11.0),
    ("moqae:lam=0.5,share=1", "moqae", _moqae(0.5, share=1), 5.5, 6.1, 10.4),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results")
    runs = root / "runs"
    for label, name, cfg, nominal, effective, ppl in PPL:
        extra = {"windows": 2, "tokens": 4094}
        if name == "moqae":
            extra["layer_stats"] = _layers((2, 30, 0), (2, 20, 10), (32, 0, 0), (1, 31, 0))
        rec = _record(label, name, cfg, metrics={"ppl": ppl, "nll": 2.3}, bits=(nominal, effective), **extra)
        _write(runs, f"tiny__{label.replace(':', '_')}__wikitext2.json", rec)
    lb_cfg = {"tasks": "trec,samsum", "limit": 1, "max_length": 1024, "chat_template": True}
    for label, name, cfg, trec in (("fp16", "fp16", {}, 50.0), ("kivi-2", "kivi", {"bits": 2}, 25.0)):
        rec = _record(label, name, cfg, task="longbench", task_cfg=lb_cfg, n_samples={"trec": 1, "samsum": 1},
                      metrics={"trec": trec, "samsum": 20.0, "average": (trec + 20.0) / 2})  # fmt: skip
        _write(runs / "longbench", f"tiny__{label}__longbench.json", rec)
    lm_cfg = {"tasks": "piqa,arc_easy", "limit": 5, "num_fewshot": 0}
    for label, name, cfg, acc in (("fp16", "fp16", {}, 0.6), ("int2", "int", {"bits": 2}, 0.4)):
        metrics = {"piqa/acc": acc, "piqa/acc_stderr": 0.1, "piqa/acc_norm": acc + 0.1, "arc_easy/acc": acc / 2}
        rec = _record(label, name, cfg, task="lmeval", task_cfg=lm_cfg, metrics=metrics,
                      documents={"piqa": 5, "arc_easy": 5})  # fmt: skip
        _write(runs / "lmeval", f"tiny__{label}__lmeval.json", rec)
    failed = _record("kvquant-4b", "kvquant", {"bits": 4}, metrics={}, status="failed", reason="RuntimeError: boom")
    _write(runs, "tiny__kvquant-4b__wikitext2.json", failed)
    rows = []
    for method, kv, step in (("fp16", 4.0, 0.010), ("int4", 1.0, 0.020), ("moqae:lam=0.5", 1.2, 0.030)):
        for ctx in (512, 1024):
            rows.append({"method": method, "model": "tiny", "device": "cpu", "dtype": "float32", "attention": "sdpa",
                         "context": ctx, "batch": 1, "new_tokens": 4, "repeats": 1, "status": "done",
                         "prefill_s": ctx * 1e-4, "decode_step_s": step, "decode_tokens_per_s": 1 / step,
                         "kv_bytes": kv * ctx * 2**10, "kv_read_bytes_per_step": kv * ctx * 2**10,
                         "peak_bytes": 2**22, "peak_kind": "cpu_rss", "nominal_bits": 16.0 / kv * 1.0,
                         "effective_bits": 16.0 / kv, "method_parameters": 10 if "moqae" in method else 0,
                         "model_parameters": 1000})  # fmt: skip
    rows.append({**rows[0], "method": "kivi-2", "context": 1024, "status": "oom", "reason": "out of memory"})
    _write(root / "profiles", "profile.json", {"command": "python -m harness profile --methods fp16", "rows": rows})
    _write(root / "profiles", "old.json", {"command": "old", "rows": [{"method": "fp16", "prompt_len": 2048}]})
    return root


@pytest.fixture(scope="module")
def report(results, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    write_report([results], out, "tiny report", command="python -m harness report RESULTS --out OUT")
    return out


def _csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_pareto_front():
    pts = [(2, 50), (2.16, 12), (2.44, 14), (4, 11), (3.8, 10.8), (4.2, 10.3), (16, 10), (4, 10.9), (16, 10.5)]
    assert pareto_front(pts) == [0, 1, 4, 5, 6]
    assert pareto_front([(4, 10), (4, 10)]) == [0, 1]  # equal points dominate neither
    assert pareto_front([(4, 10), (4, 9), (3, 12)]) == [2, 1]
    assert pareto_front([]) == []


def test_place_labels_merges_coincident_points_and_avoids_markers():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    pts = [(16.0, 15.1, "fp16"), (16.0, 15.1, "alignedkv"), (4.0, 20.0, "int4")]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o")
    texts = place_labels(ax, pts, unlabelled=[(4.3, 20.0)])
    assert sorted(t.get_text() for t in texts) == ["fp16, alignedkv", "int4"]
    renderer = fig.canvas.get_renderer()
    other = ax.transData.transform((4.3, 20.0))
    int4 = next(t for t in texts if t.get_text() == "int4").get_window_extent(renderer)
    assert not (int4.x0 - 8 <= other[0] <= int4.x1 + 8 and int4.y0 - 8 <= other[1] <= int4.y1 + 8)
    plt.close(fig)


def test_paper_order(results):
    res = load_results([results])
    wt = sorted((r for r in res.records if r["task"] == "wikitext2"), key=method_sort_key)
    assert [r["method"] for r in wt] == ["fp16", "int4", "int2", "kivi-2", "kvquant-2b-1%", "qoq", "moqae:lam=0.1",
                                         "moqae:lam=0.5", "moqae:lam=0.5,share=1"]  # fmt: skip
    assert len(res.failed) == 1 and len(res.profile_rows) == 7
    assert any("old.json" in n and "older format" in n for n in res.notes)


def test_perplexity_table_csv_tex_and_plot(report, results):
    md = (report / "README.md").read_text()
    assert "| method | nominal bits | effective bits | PPL tiny |" in md
    assert "| fp16 | 16.00 | 16.00 | 10.0000 |" in md and "| moqae:lam=0.1 | 3.80 | 4.50 | 10.8000 |" in md
    ppl_section = md[md.index("## Perplexity") : md.index("## Published")]
    assert "moqae:lam=0.5,share=1" not in ppl_section  # an ablation variant, not a λ-sweep row
    assert ppl_section.index("| int4 |") < ppl_section.index("| kivi-2 |") < ppl_section.index("| moqae:lam=0.1 |")
    assert "Pareto frontier (nominal bits vs PPL, tiny): fp16, int2, kvquant-2b-1%, moqae:lam=0.1, moqae:lam=0.5." in md
    rows = {r["method"]: r for r in _csv(report / "ppl.csv")}
    assert float(rows["int4"]["ppl"]) == 11.0 and rows["int4"]["on_pareto_front"] == "False"
    assert rows["int2"]["on_pareto_front"] == "True"
    for r in rows.values():  # every number names the record file it comes from
        assert r["record"].endswith(".json") and json.loads(Path(r["record"]).read_text())["method"] == r["spec"]
    tex = (report / "ppl.tex").read_text()
    assert r"\toprule" in tex and r"kvquant-2b-1\%" in tex and r"\end{tabular}" in tex
    for stem in ("ppl_vs_bits", "moqae_lambda_tradeoff", "expert_share_heatmap", "kv_memory_vs_context",
                 "latency_vs_context"):  # fmt: skip
        assert (report / f"{stem}.png").read_bytes()[:4] == b"\x89PNG", stem
        assert (report / f"{stem}.svg").read_text().lstrip().startswith("<?xml"), stem
        assert f"({stem}.png)" in md and f"({stem}.svg)" in md


def test_published_block_is_separate_and_labelled(report):
    md = (report / "README.md").read_text()
    block = md[md.index("## Published figures") :]
    block = block[: block.index("\n## ", 5)]
    assert "not measured here" in block and "moqae_acl2025.toml" in block


def test_longbench_lmeval_tables(report):
    md = (report / "README.md").read_text()
    assert "| method | trec | samsum | average |" in md
    assert "| fp16 | 50.00 | 20.00 | 35.00 |" in md and "| kivi-2 | 25.00 | 20.00 | 22.50 |" in md
    assert "| fp16 | 60.0 ± 10.0 | 70.0 | 30.0 | 45.0 |" in md  # piqa acc ± stderr, acc_norm, arc_easy, mean
    lb = _csv(report / "longbench.csv")
    assert {r["dataset"] for r in lb} == {"trec", "samsum", "average"}
    assert all(r["record"].endswith("__longbench.json") for r in lb)
    assert all(r["record"].endswith("__lmeval.json") for r in _csv(report / "lmeval.csv"))
    assert (report / "longbench.tex").exists() and (report / "lmeval.tex").exists()


def test_profile_tables(report):
    md = (report / "README.md").read_text()
    lat = md[md.index("### Profile, latency") :]
    assert "| fp16 | 512 | 1 | 51.2 | 1.000 | 10.00 | 1.000 |" in lat
    assert "| int4 | 512 | 1 | 51.2 | 1.000 | 20.00 | 2.000 |" in lat
    assert "| kivi-2 | 1024 | 1 | **oom** |" in lat
    mem = md[md.index("### Profile, memory") :]
    assert "| int4 | 1024 | 1 | 1.00 | 0.250 |" in mem and "10 (1.000 %)" in mem
    rows = _csv(report / "profile-memory.csv")
    assert all(r["record"].endswith("profiles/profile.json") for r in rows)
    assert [r["row"] for r in rows if r["method"] == "fp16"] == ["0", "1"]


def test_moqae_shares_ablation_failed_environment(report):
    md = (report / "README.md").read_text()
    assert "| tiny | moqae:lam=0.1 | wikitext2 | 0.1 | 3.80 | 28.9 % | 63.3 % | 7.8 % |" in md
    assert "| 1 | 6 / 62 / 31 | 6 / 62 / 31 | 6 / 62 / 31 |" in md  # layer 1, three MoQAE records
    abl = md[md.index("### MoQAE ablation") :]
    assert "full MoQAE (chunk 32, RF, RS = 3)" in abl and "without routing sharing (share=1)" in abl
    assert "| 0.5 | without routing sharing (share=1) | moqae:lam=0.5,share=1 | 10.4000 | +4.0 % |" in abl
    layer = _csv(report / "moqae-layer-shares.csv")
    assert {r["chunks"] for r in layer if r["layer"] == "2" and r["expert"] == "FP16"} == {"32"}
    assert "| tiny | kvquant-4b | wikitext2 | RuntimeError: boom |" in md
    assert "tiny__kvquant-4b__wikitext2.json" in (report / "failed.csv").read_text()
    assert "torch | 2.13.0" in md and "`abc123`" in md
    assert "python -m harness report RESULTS --out OUT" in md
    assert "older format" in md


def test_report_cli_positional_and_flag(results, tmp_path, capsys):
    assert main(["report", str(results / "runs"), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "README.md").exists() and (tmp_path / "a" / "results.md").exists()
    assert main(["report", "--results", str(results / "profiles"), "--out", str(tmp_path / "b")]) == 0
    md = (tmp_path / "b" / "README.md").read_text()
    assert "### Profile, latency" in md and "## Perplexity" not in md
    assert main(["report", "--out", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.startswith("error: give the results")


def test_reports_index_lists_every_report_reproduce_first(results, tmp_path):
    root = tmp_path / "reports"
    write_report([results / "runs"], root / "zeta", "zeta report", command="python -m harness report R --out Z")
    assert not (root / "README.md").exists() or "zeta" in (root / "README.md").read_text()
    (root / "bench").mkdir()
    (root / "bench" / "log.txt").write_text("x")
    quick = root / "reproduce" / "quick"
    write_report([results / "runs"], quick, "quick report", command="python -m harness reproduce Q")
    index = (root / "README.md").read_text()
    rows = [line for line in index.splitlines() if line.startswith("| [")]
    assert rows[0].startswith("| [reproduce/quick/](reproduce/quick/README.md) | quick report | `python -m harness re")
    assert rows[1].startswith("| [zeta/](zeta/README.md) | zeta report | `python -m harness report R --out Z`")
    assert "| bench/ | [log.txt](bench/log.txt) |" in index
    # a report outside any reports/ folder writes no index
    write_report([results / "runs"], tmp_path / "elsewhere", "x", command="c")
    assert not (tmp_path / "README.md").exists()


# --------------------------------------------------------------------------------------------
# A method-agnostic core: a plugin's style, rank, label and sections; a method not installed
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _MineConfig(MethodConfig):
    bits: int = 3


class _Mine(KVCacheMethod):
    """A plugin-like method registered at run time."""

    config_class = _MineConfig
    report = ReportStyle("Mine family", "d", "#123456", rank=15)
    report_sections = (f"{__name__}:MINE_SECTION", "no_such_module_here:SECTION")

    @classmethod
    def report_label(cls, label: str, config: dict) -> str:
        return f"mine {config.get('bits')}-bit"

    @classmethod
    def ablation_options(cls, config: dict) -> dict:
        return {"bits": 2} if config.get("bits") == 2 else {}

    def new_layer_store(self, layer_idx, info):
        raise NotImplementedError


MINE_SECTION = Section("Mine's own section", lambda data: (f"{len(data.records)} records seen.", []), order=35,
                       legacy=lambda data: "## Mine in results.md")  # fmt: skip


@pytest.fixture
def mine():
    from harness.interface import METHODS

    METHODS.register("mine")(_Mine)
    try:
        yield _Mine
    finally:
        METHODS.unregister("mine")


PROFILED = ["int4", "gone-plugin:x=1", "mine:bits=3", "int4 [dequantize]"]


@pytest.fixture
def plugin_results(tmp_path) -> Path:
    runs = tmp_path / "runs"
    for label, name, cfg, bits, ppl in (("fp16", "fp16", {}, 16.0, 10.0), ("int4", "int", {"bits": 4}, 4.0, 11.0),
                                        ("mine", "mine", {"bits": 3}, 3.0, 10.5),
                                        ("mine:bits=2", "mine", {"bits": 2}, 2.0, 12.0),
                                        ("gone:x=1", "gone-plugin", {"x": 1}, 5.0, 10.7)):  # fmt: skip
        rec = _record(label, name, cfg, metrics={"ppl": ppl}, bits=(bits, bits + 1), windows=2, tokens=4094)
        _write(runs, f"tiny__{label.replace(':', '_')}__wikitext2.json", rec)
    rows = [{"method": m, "model": "tiny", "device": "cpu", "dtype": "float32", "attention": "sdpa", "context": c,
             "batch": 1, "new_tokens": 4, "repeats": 1, "status": "done", "prefill_s": 0.01 * (i + 1),
             "decode_step_s": 0.001 * (i + 1), "decode_tokens_per_s": 1000 / (i + 1), "kv_bytes": 2**20 * (i + 1),
             "kv_read_bytes_per_step": 2**20, "peak_bytes": 2**21, "peak_kind": "cpu_rss", "nominal_bits": 4.0,
             "effective_bits": 4.5, "method_parameters": 0, "model_parameters": 1000}
            for i, m in enumerate(PROFILED) for c in (64, 128)]  # fmt: skip
    _write(tmp_path / "prof", "p.json", {"command": "python -m harness reproduce", "settings": {"reference": "int4"},
                                         "rows": rows})  # fmt: skip
    return tmp_path


def test_plugin_style_rank_label_and_sections(mine, plugin_results, tmp_path):
    from harness.reports import family_styles, load_results, method_style

    assert method_style("mine:bits=3") == mine.report and method_style("gone-plugin:x=1") == ReportStyle()
    res = load_results([plugin_results / "runs"])
    assert [r["method"] for r in sorted(res.records, key=method_sort_key)] == [
        "fp16", "mine", "mine:bits=2", "int4", "gone:x=1"]  # fmt: skip
    assert family_styles(res.records)["Mine family"].marker == "d"
    out = tmp_path / "report"
    write_report([plugin_results], out, "plugin report", command="c")
    md = (out / "README.md").read_text()
    ppl = md[md.index("## Perplexity") : md.index("## Mine's own section")]
    assert ppl.index("| fp16 |") < ppl.index("| mine 3-bit |") < ppl.index("| int4 |") < ppl.index("| gone:x=1 |")
    assert "mine 2-bit" not in ppl  # an ablation variant (ablation_options non-empty): not in the main table
    assert "by method family (uniform, Mine family, other)" in ppl
    assert "## Mine's own section\n\n5 records seen." in md  # declared by the class, ordered by its order
    assert md.index("## Mine's own section") < md.index("## Profiling")
    assert "no_such_module_here:SECTION` of method mine could not be loaded" in md
    assert "## Mine in results.md" in (out / "results.md").read_text()
    assert {r["method"] for r in _csv(out / "ppl.csv")} == {"fp16", "mine 3-bit", "int4", "gone:x=1"}
    # the profile file's own reference, the plugin's rank for its rows, "[dequantize]" rows as their method
    lat = md[md.index("### Profile, latency") : md.index("### Profile, memory")]
    assert "| prefill ms | × int4 |" in lat and "ratio to int4" in lat
    order = [line.split(" | ")[0][2:] for line in lat.splitlines() if line.startswith("| ") and "| 64 |" in line]
    assert order == ["mine:bits=3", "int4", "int4 [dequantize]", "gone-plugin:x=1"]


def test_plugin_family_drawn_with_its_marker(mine, plugin_results, tmp_path, monkeypatch):
    import harness.reports.plots as plots

    figs = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figs.append(fig) or path)
    recs = load_results([plugin_results / "runs"]).records
    assert plots.plot_ppl_vs_bits(recs, tmp_path / "p.png", "tiny") == tmp_path / "p.png"
    lines = {ln.get_label(): ln for ln in figs[0].axes[0].get_lines()}
    assert lines["Mine family"].get_marker() == "d" and lines["Mine family"].get_color() == "#123456"
    assert lines["other"].get_marker() == ReportStyle().marker  # the method that is not installed
    assert lines["Mine family"].get_linestyle() == "-"  # one method's settings: joined by bits
    assert lines["uniform"].get_linestyle() == "None"  # fp16 and int4: two methods, not joined
    assert list(lines)[:3] == ["uniform", "Mine family", "other"]  # legend in rank order


def test_record_of_a_method_not_installed_renders_as_other(plugin_results, tmp_path):
    """Without the ``mine`` registration, its records are rows like any other (plain label, "other")."""
    from harness.reports import display_name, family

    res = load_results([plugin_results / "runs"])
    gone = [r for r in res.records if r["key"]["method"] in ("mine", "gone-plugin")]
    assert {family(r) for r in gone} == {"other"} and {display_name(r) for r in gone} == {"mine", "mine:bits=2",
                                                                                           "gone:x=1"}  # fmt: skip
    write_report([plugin_results], tmp_path / "r", command="c")
    md = (tmp_path / "r" / "README.md").read_text()
    assert "| mine:bits=2 |" in md and "| gone:x=1 |" in md and "Mine's own section" not in md


def test_markdown_table_alignment_and_escaping():
    from harness.reports import markdown_table

    assert markdown_table(["a", "b", "c"], [["x|y", 1, 2]], numeric_from=2) == (
        "| a | b | c |\n|---|---|---:|\n| x\\|y | 1 | 2 |"
    )
    assert markdown_table(["a", "b"], [], numeric_from=None).splitlines()[1] == "|---|---|"
    assert markdown_table(["a", "b"], [], align="rl").splitlines()[1] == "|---:|---|"
