"""The report's WikiText-2 section: perplexity in the paper's layout, one table per protocol.

Rows: every method's records in rank order (``harness.reports.methods``), ablation variants (a
record whose method's ``ablation_options`` is non-empty) left to their method's own section;
columns: nominal bits, effective bits, PPL per model. One PPL-vs-bits plot per model, the Pareto
frontier marked. Declared by ``tasks.wikitext2.WikiText2.report_sections``.
"""

from __future__ import annotations

from typing import Any

from harness.reports import (
    ReportData,
    Section,
    Table,
    ablation_options,
    column,
    column_labels,
    display_name,
    families_in_order,
    fmt,
    group_records,
    method_sort_key,
    pareto_front,
    plot_ppl_vs_bits,
    plural,
    slug,
    suffix,
    task_config,
)

TASK = "wikitext2"


def wikitext_protocol(cfg: dict[str, Any], recs: list[dict[str, Any]]) -> str:
    """``WikiText-2 (raw) test, windows of 2048 tokens, first 8 windows (8 windows, ... tokens)``."""
    windows = cfg.get("max_windows")
    n = max((r.get("windows") or 0) for r in recs)
    tokens = max((r.get("tokens") or 0) for r in recs)
    text = f"WikiText-2 (raw) test, windows of {cfg.get('seqlen', 2048)} tokens"
    text += (", the first window" if windows == 1 else f", first {windows} windows") if windows else ", all windows"
    if n:
        text += f" ({plural(n, 'window')}, {tokens:,} predicted tokens)"
    if cfg.get("prefill_chunk"):
        text += f", streamed in pieces of {cfg['prefill_chunk']} tokens"
    if cfg.get("decode_from"):
        text += f", teacher-forced decode steps from token {cfg['decode_from']}"
    return text


def perplexity_tables(data: ReportData) -> list[Table]:
    out = data.out
    wt = [r for r in data.records if r["key"]["task"] == TASK and "ppl" in r.get("metrics", {})]
    tables = []
    for gi, (cfg, recs) in enumerate(group_records(wt, task_config)):
        main = sorted((r for r in recs if not ablation_options(r)), key=method_sort_key)
        if not main:
            continue
        cols = list(dict.fromkeys(column(r) for r in sorted(main, key=lambda r: r["model"])))
        col_label = column_labels(cols)
        names = list(dict.fromkeys(display_name(r) for r in main))
        decode = all("decode_ppl" in r["metrics"] for r in main)
        cell = {(display_name(r), column(r)): r for r in main}
        fronts = {}
        for c in cols:
            pts = [(r["kv"]["nominal_bits"], r["metrics"]["ppl"], display_name(r)) for r in main if column(r) == c]
            pts = [p for p in pts if p[0] <= 16]
            fronts[c] = {pts[i][2] for i in pareto_front([(b, p) for b, p, _ in pts])}
        rows, rows_csv = [], []
        for name in names:
            present = [cell.get((name, c)) for c in cols]
            nominal = [f"{r['kv']['nominal_bits']:.2f}" for r in present if r]
            effective = [f"{r['kv']['effective_bits']:.2f}" for r in present if r]
            row = [name, " / ".join(dict.fromkeys(nominal)), " / ".join(dict.fromkeys(effective))]
            row += [fmt(r["metrics"]["ppl"], "{:.4f}") if r else "—" for r in present]
            if decode:  # teacher-forced decode: the decode steps' own PPL beside the whole window's
                row += [fmt(r["metrics"]["decode_ppl"], "{:.4f}") if r else "—" for r in present]
            rows.append(row)
            for c, r in zip(cols, present, strict=True):
                if r is None:
                    continue
                rows_csv.append(
                    {
                        "model": r["model"], "dtype": c[1], "device": c[2], "method": name, "spec": r["method"],
                        "nominal_bits": r["kv"]["nominal_bits"], "effective_bits": r["kv"]["effective_bits"],
                        "kv_bytes": r["kv"].get("total_bytes"), "ppl": r["metrics"]["ppl"],
                        "nll": r["metrics"].get("nll"), "decode_ppl": r["metrics"].get("decode_ppl"),
                        "windows": r.get("windows"), "tokens": r.get("tokens"),
                        "on_pareto_front": name in fronts[c], "record": r["_file"],
                    }
                )  # fmt: skip
        header = ["method", "nominal bits", "effective bits"] + [f"PPL {col_label[c]}" for c in cols]
        if decode:
            header += [f"decode steps' PPL {col_label[c]}" for c in cols]
        t = Table("ppl" + suffix(gi), f"Perplexity: {wikitext_protocol(cfg, recs)}", header, rows, rows_csv)
        t.intro = (
            f"Rows in the paper's order, by method family ({', '.join(families_in_order(main))}), each "
            "family's rows in its method's own order. *Nominal bits*: payload bits per K/V element; "
            "*effective bits*: all bytes the cache held × 8 per element (scales, zero points, full-precision "
            "tokens, outliers included). Where the models differ, the bits are given per model, in column order."
        )
        for c in cols:
            ordered = [n for n in names if n in fronts[c]]
            t.notes.append(f"Pareto frontier (nominal bits vs PPL, {col_label[c]}): " + ", ".join(ordered) + ".")
        for c in cols:
            png = out / (("ppl_vs_bits" + suffix(gi)) + ("" if len(cols) == 1 else f"-{slug(col_label[c])}") + ".png")
            sel = [r for r in main if column(r) == c]
            if plot_ppl_vs_bits(sel, png, col_label[c], names=display_name, ylabel="WikiText-2 perplexity"):
                t.plots.append((png, f"WikiText-2 perplexity against nominal KV bits, {col_label[c]}"))
        tables.append(t)
    return tables


PERPLEXITY = Section("Perplexity (WikiText-2)", lambda data: ("", perplexity_tables(data)), order=10)
