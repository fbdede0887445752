"""MoQAE's report sections (declared by ``moqae.method.MoQAE.report_sections``).

* ``PUBLISHED`` — the MoQAE paper's own figures (``moqae/published/moqae_acl2025.toml``) in a
  separate, labelled block, quoted beside our WikiText-2 figures of the harness specs we map them to
  (each with its change against FP16 on its own model), never mixed into the measured tables;
* ``ANALYSIS`` — expert shares (overall and per layer), the expert-share heat map (layer × expert),
  the λ trade-off plot and the ablation table; it also adds the share tables to ``results.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

from harness.interface import METHODS, MethodSpecError
from harness.reports import (
    ReportData,
    Section,
    Table,
    ablation_options,
    column,
    column_labels,
    display_name,
    fmt,
    group_records,
    markdown_table,
    method_sort_key,
    num,
    pyplot,
    save_figure,
    suffix,
    task_config,
)
from tasks.wikitext2_report import wikitext_protocol

PUBLISHED_FILE = Path(__file__).parent / "published" / "moqae_acl2025.toml"
#: the measured rows the ablation and the λ plot compare against
REFERENCE = "fp16"
PPL_TASK = "wikitext2"


# --------------------------------------------------------------------------------------------
# Published figures beside the measured ones
# --------------------------------------------------------------------------------------------


def relative_change(ppl: float, ppl_fp16: float) -> float:
    """(ppl / ppl_fp16 − 1) × 100: a perplexity's change against FP16 on the same model, in %."""
    return 100.0 * (ppl / ppl_fp16 - 1.0)


def fmt_change(pct: float | None) -> str:
    """``+30.3 %`` (signed, one decimal); ``—`` where there is no FP16 figure to compare with."""
    return fmt(pct, "{:+.1f} %")


def canonical_spec(spec: str) -> str:
    """The label a run gives ``spec``, i.e. its records' ``method`` (as ``harness.interface.build_method``
    writes it: options aliased, ``moqae:lambda=0.5`` -> ``moqae:lam=0.5``); ``spec`` where its method
    is not installed."""
    try:
        name, _, _, opts = METHODS.config(spec)
    except MethodSpecError:
        return spec.strip()
    return name if not opts else f"{name}:" + ",".join(f"{k}={v}" for k, v in opts.items())


def spec_matches(rec: dict[str, Any], spec: str) -> bool:
    """Whether ``rec`` is a run of ``spec``: its ``method`` is the spec's canonical label, or its
    class and options (defaults filled in) are the spec's (``moqae`` = ``moqae:lam=0.5``)."""
    if rec["method"] == canonical_spec(spec):
        return True
    try:
        _, entry, config, _ = METHODS.config(spec)
    except MethodSpecError:
        return False
    full = dataclasses.asdict(config)
    return rec["key"]["method"] == entry.cls.name and {**full, **(rec["key"].get("method_config") or {})} == full


def find_record(records: list[dict[str, Any]], spec: str) -> dict[str, Any] | None:
    """The record of ``spec`` among ``records`` (one calibrated on the default windows first)."""
    hits = [r for r in records if spec_matches(r, spec)]
    hits.sort(key=lambda r: bool(r["key"].get("calibration_windows")))
    return hits[0] if hits else None


def measured_groups(records: list[dict[str, Any]]) -> list[tuple[tuple, dict[str, Any], list, dict[str, Any]]]:
    """WikiText-2 records by (model column, task options), as ``tasks.wikitext2_report`` groups them;
    only groups with an fp16 record: ``(column, task config, records, fp16 record)``."""
    wt = [r for r in records if r["key"]["task"] == PPL_TASK and "ppl" in r.get("metrics", {})]
    groups = []
    for (col, cfg), recs in group_records(wt, lambda r: (column(r), task_config(r))):
        ref = find_record(recs, REFERENCE)
        if ref is not None:
            groups.append((tuple(col), cfg, recs, ref))
    return groups


def published_block(
    records: list[dict[str, Any]] | None = None, path: Path = PUBLISHED_FILE
) -> tuple[str, Table | None]:
    """The MoQAE paper's figures (``moqae/published/moqae_acl2025.toml``), each with its change
    against the paper's FP16, beside our PPL of the mapped harness spec and its change against our
    fp16 (one block of columns per measured model and WikiText-2 protocol); the paper's table alone
    where no WikiText-2 record with an fp16 reference was read."""
    data: dict[str, Any] = tomllib.loads(path.read_text()) if path.exists() else {}
    source = data.get("source", "Tao et al., MoQAE, ACL 2025 (arXiv:2506.07533)")
    rows = data.get("rows") or []
    head = f"**Published figures, not measured here** — {source}."
    if not rows:
        text = (
            f"{head}\n\n*(empty)* {data.get('status', 'No published figures are recorded.')} They belong in "
            f"`moqae/published/{path.name}` (`[[rows]]` with model, method, bits, PPL and where in the paper)."
        )
        return text, None
    spec_of: dict[str, str] = data.get("harness_method") or {}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    paper = {(r["method"], r["model"]): r for r in rows}
    fp16 = next((m for m, s in spec_of.items() if s == REFERENCE), "FP16")  # the paper's FP16 row
    groups = measured_groups(records or [])
    labels = column_labels([g[0] for g in groups])
    n_col = Counter(g[0] for g in groups)
    seen: Counter = Counter()
    names = []
    for col, _, _, _ in groups:
        seen[col] += 1
        names.append(labels[col] + (f" [{seen[col]}]" if n_col[col] > 1 else ""))

    header = ["paper method", "harness spec (our mapping)", "AvgBit (paper)", *[f"{m} (paper)" for m in models]]
    for name in names:
        header += [f"nominal bits ({name})", f"PPL ({name})", f"vs fp16 ({name})"]
    table_rows, rows_csv = [], []
    trace = f"published: {source}"
    for method in methods:
        spec = spec_of.get(method, "")
        bits = next((paper[method, m].get("avg_bits") for m in models if (method, m) in paper), None)
        row = [method, f"`{spec}`" if spec else "—", fmt(bits)]
        for m in models:
            r, ref = paper.get((method, m)), paper.get((fp16, m))
            if r is None:
                row.append("—")
                continue
            change = relative_change(r["ppl"], ref["ppl"]) if ref else None
            row.append(f"{r['ppl']:.2f}" + (f" ({fmt_change(change)})" if ref else ""))
            rows_csv.append({"source": "published", "model": m, "method": method, "harness_method": spec,
                             "avg_bits": r.get("avg_bits"), "dataset": r.get("dataset"), "ppl": r["ppl"],
                             "ppl_fp16": ref["ppl"] if ref else None, "ppl_vs_fp16_percent": change,
                             "where": r.get("where"), "record": trace})  # fmt: skip
        for (col, _, recs, ref), name in zip(groups, names, strict=True):
            rec = find_record(recs, spec) if spec else None
            if rec is None:
                row += ["—", "—", "—"]
                continue
            ppl = rec["metrics"]["ppl"]
            change = relative_change(ppl, ref["metrics"]["ppl"])
            row += [fmt(rec["kv"]["nominal_bits"]), fmt(ppl, "{:.4f}"), fmt_change(change)]
            rows_csv.append({"source": "measured", "model": rec["model"], "dtype": col[1], "device": col[2],
                             "columns": name, "method": method, "harness_method": spec, "spec": rec["method"],
                             "nominal_bits": rec["kv"]["nominal_bits"], "dataset": "WikiText-2", "ppl": ppl,
                             "ppl_fp16": ref["metrics"]["ppl"], "ppl_vs_fp16_percent": change,
                             "fp16_record": ref["_file"], "record": rec["_file"]})  # fmt: skip
        table_rows.append(row)

    where = str(rows[0].get("where", "the paper"))
    intro = [
        f"Every figure under *(paper)* is quoted, not measured here: {source}, {where}, copied into "
        f"`moqae/published/{path.name}`. The paper's models (LLaMA-7B/13B, "
        "Llama-2-7B/13B) are not the model measured here, so compare the relative change against FP16 on "
        "the same model (in parentheses, and *vs fp16*: (PPL / PPL of FP16 − 1) × 100), not the absolute "
        "perplexity. The *harness spec* column is our mapping of each paper method to a harness method, "
        "not the paper's. " + str(data.get("mapping_note", "")),
    ]
    if groups:
        for (_, cfg, recs, _), name in zip(groups, names, strict=True):
            intro.append(f"Measured columns *{name}*: {wikitext_protocol(cfg, recs)}; nominal bits as run; "
                         "— where no record of that spec was read.")  # fmt: skip
    else:
        intro.append("No WikiText-2 record with an fp16 reference was read: the paper's table is shown alone.")
    if data.get("notes"):
        intro.append(f"Known disagreements with the baselines' own papers: {data['notes']}")
    table = Table(
        "published-moqae-paper",
        "Published figures: MoQAE paper (quoted, not measured here) beside our measurements",
        header,
        table_rows,
        rows_csv,
        intro=" ".join(intro),
        numeric_from=2,
    )
    return head, table


def _published(data: ReportData) -> tuple[str, list[Table]]:
    text, table = published_block(data.records)
    return text, [table] if table else []


# --------------------------------------------------------------------------------------------
# Expert shares
# --------------------------------------------------------------------------------------------


def expert_labels(rec: dict[str, Any]) -> list[str]:
    experts = str((rec["key"].get("method_config") or {}).get("experts", "16/4/2"))
    bits = [b for b in experts.replace(",", "/").split("/") if b.strip()]
    return ["FP16" if b.strip() == "16" else f"INT{b.strip()}" for b in bits]


def expert_shares(record: dict[str, Any]) -> list[float] | None:
    """Share of chunks per expert over all layers (MoQAE records), experts in config order."""
    stats = record.get("layer_stats") or []
    counts = [layer["expert_chunks"] for layer in stats if "expert_chunks" in layer]
    if not counts:
        return None
    totals = [sum(c[e] for c in counts) for e in range(len(counts[0]))]
    n = sum(totals)
    return [t / n for t in totals] if n else None


def layer_shares(record: dict[str, Any]) -> list[list[float] | None]:
    """Per layer: share of its chunks per expert (None where the layer stored no chunk)."""
    out = []
    for layer in record.get("layer_stats") or []:
        counts = layer.get("expert_chunks") or []
        total = sum(counts)
        out.append([c / total for c in counts] if total else None)
    return out


def shares_table(records: list[dict[str, Any]]) -> str:
    """Markdown: MoQAE records with their experts and the share of chunks each received."""
    rows = []
    for r in records:
        shares = expert_shares(r)
        if shares is None:
            continue
        experts = str(r["key"]["method_config"].get("experts", ""))
        rows.append([r["method"], experts, " / ".join(f"{100 * s:.1f} %" for s in shares)])
    header = ["method", "experts (bits)", "chunk share per expert"]
    return markdown_table(header, rows, numeric_from=None) if rows else ""


def layer_shares_table(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per layer, one column per MoQAE record, cells = chunk shares per expert (%)."""
    cols = [(r["method"], r["layer_stats"]) for r in records if expert_shares(r) is not None]
    if not cols:
        return ""
    n_layers = max(len(stats) for _, stats in cols)
    rows = []
    for i in range(n_layers):
        cells = [str(i)]
        for _, stats in cols:
            counts = stats[i]["expert_chunks"] if i < len(stats) else []
            total = sum(counts)
            cells.append(" / ".join(f"{100 * c / total:.0f}" for c in counts) if total else "—")
        rows.append(cells)
    return markdown_table(["layer", *[name for name, _ in cols]], rows, numeric_from=None)


def _legacy(data: ReportData) -> str:
    """The share tables of the compact ``results.md``."""
    shares = shares_table(data.records)
    if not shares:
        return ""
    parts = ["## MoQAE: share of chunks per expert (all layers)", "", shares, ""]
    parts += ["## MoQAE: share of chunks per expert per layer (%, experts in config order)", ""]
    parts += [layer_shares_table(data.records)]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Ablation variants
# --------------------------------------------------------------------------------------------


def variant_order(variant: dict[str, Any]) -> list[tuple[str, float, str]]:
    return [(k, float(v) if isinstance(v, int | float) else 0.0, str(v)) for k, v in sorted(variant.items())]


def describe_variant(variant: dict[str, Any]) -> str:
    parts = []
    for k, v in variant.items():
        if k == "freeze_first" and not v:
            parts.append("without routing freezing (freeze_first=false)")
        elif k == "share" and v == 1:
            parts.append("without routing sharing (share=1)")
        elif k == "share":
            parts.append(f"routing sharing over {v} layers (share={v})")
        elif k == "chunk":
            parts.append(f"chunk {v} tokens")
        else:
            parts.append(f"{k}={v}")
    return ", ".join(parts) or "default"


# --------------------------------------------------------------------------------------------
# Tables and plots
# --------------------------------------------------------------------------------------------


def moqae_tables(records: list[dict[str, Any]], out: Path) -> list[Table]:
    """Expert shares (overall, per layer), the ablation, the λ trade-off and the heat map."""
    moq = sorted((r for r in records if expert_shares(r) is not None), key=lambda r: (r["model"], method_sort_key(r)))
    if not moq:
        return []
    tables: list[Table] = []
    n_exp = max(len(expert_labels(r)) for r in moq)
    labels = expert_labels(moq[0])
    head = ["model", "method", "task", "λ", "nominal bits", *[f"share {e}" for e in labels[:n_exp]]]
    rows, rows_csv = [], []
    for r in moq:
        shares = expert_shares(r) or []
        lam = (r["key"].get("method_config") or {}).get("lam")
        rows.append([r["model"], display_name(r), r["task"], fmt(lam, "{:g}"), fmt(r["kv"]["nominal_bits"]),
                     *[fmt(s, "{:.1f} %", 100) for s in shares]])  # fmt: skip
        for e, s in zip(expert_labels(r), shares, strict=False):
            rows_csv.append({"model": r["model"], "method": display_name(r), "spec": r["method"], "task": r["task"],
                             "lambda": lam, "expert": e, "share": s, "record": r["_file"]})  # fmt: skip
    t = Table("moqae-shares", "MoQAE: share of chunks per expert (all layers)", head, rows, rows_csv, numeric_from=3)
    t.intro = "The share of all routed and frozen chunks of all layers that each expert stored."
    tables.append(t)

    wt = [r for r in moq if r["key"]["task"] == PPL_TASK]
    groups = group_records(wt, lambda r: (column(r), task_config(r)))
    refs = {
        (column(r), json.dumps(task_config(r), sort_keys=True)): r
        for r in records
        if r["key"]["method"] == REFERENCE and r["key"]["task"] == PPL_TASK
    }
    for gi, ((col, cfg), recs) in enumerate(groups):
        sfx = suffix(gi)
        where = f"{col[0]}, {wikitext_protocol(cfg, recs)}"
        ref = refs.get((tuple(col), json.dumps(cfg, sort_keys=True)))
        tables.append(_layer_table(recs, labels, where, col[0], ref, out, sfx))
        routed = [r for r in recs if r["key"]["method"] != ORACLE]
        ablation = _ablation_table(routed, labels, where, ref, sfx)
        if ablation:
            tables.append(ablation)
        if any(r["key"]["method"] == ORACLE for r in recs):
            t = _oracle_table(recs, where, ref, sfx)
            peers = [r for r in records if r["key"]["task"] == PPL_TASK and column(r) == col and task_config(r) == cfg
                     and expert_shares(r) is None and "ppl" in r.get("metrics", {})]  # fmt: skip
            png = plot_oracle_curve(recs, peers, out / f"moqae_oracle_curve{sfx}.png", col[0])
            t.plots.append(
                (png, f"PPL against nominal bits: MoQAE's routers, the oracle (upper bound), baselines ({col[0]})")
            )
            tables.append(t)
    tables.append(_variation_table(moq))
    return tables


# --------------------------------------------------------------------------------------------
# Per-chunk mixing: how much the expert varies within a layer, and the oracle bound
# --------------------------------------------------------------------------------------------

ORACLE = "moqae-oracle"


def layer_variation(record: dict[str, Any]) -> list[tuple[float, float]]:
    """Per layer: (share of its routed chunks whose expert differs from the layer's majority expert,
    entropy of its routed chunks' experts in bits). With routing freezing the first chunk of each
    window is left out (it is FP16 by rule, not by choice)."""
    cfg = record["key"].get("method_config") or {}
    frozen = (record.get("windows") or 0) if cfg.get("freeze_first", True) else 0
    top = max(range(len(expert_labels(record))), key=lambda i: _bits(expert_labels(record)[i]))
    out = []
    for layer in record.get("layer_stats") or []:
        counts = list(layer.get("expert_chunks") or [])
        if not counts:
            continue
        counts[top] = max(0, counts[top] - frozen)
        total = sum(counts)
        if not total:
            continue
        p = [c / total for c in counts if c]
        out.append((1 - max(counts) / total, -sum(x * math.log2(x) for x in p)))
    return out


def mean_bits(r: dict[str, Any]) -> float:
    """Nominal KV bits, the mean over the record's windows where it has it (``kv_windows_mean``: routers and
    oracles vary by window), else its last window's."""
    return (r.get("kv_windows_mean") or r["kv"])["nominal_bits"]


def _bits(label: str) -> int:
    digits = "".join(ch for ch in label if ch.isdigit())
    return int(digits) if digits else 0


def _variation_table(records: list[dict[str, Any]]) -> Table:
    head = ["model", "method", "nominal bits (mean)", "chunks off the layer's majority", "max over layers",
            "entropy (bits)", "layers"]  # fmt: skip
    rows, rows_csv = [], []
    for r in records:
        var = layer_variation(r)
        if not var:
            continue
        off, ent = [v[0] for v in var], [v[1] for v in var]
        mean_off = sum(off) / len(off)
        rows.append([r["model"], display_name(r), fmt(mean_bits(r)), fmt(mean_off, "{:.1f} %", 100),
                     fmt(max(off), "{:.1f} %", 100), fmt(sum(ent) / len(ent), "{:.3f}"), str(len(var))])  # fmt: skip
        rows_csv.append({"model": r["model"], "method": display_name(r), "spec": r["method"],
                         "nominal_bits": mean_bits(r), "mean_off_majority": sum(off) / len(off),
                         "max_off_majority": max(off), "mean_entropy_bits": sum(ent) / len(ent),
                         "record": r["_file"]})  # fmt: skip
    t = Table("moqae-chunk-variation", "MoQAE: does the expert vary from chunk to chunk within a layer?", head, rows,
              rows_csv, numeric_from=2)  # fmt: skip
    t.intro = (
        "Per layer, over all windows: the share of its routed chunks (the frozen first chunk left out) whose "
        "expert is not the layer's majority expert, and the entropy of its chunks' experts; averaged over "
        "layers (and the largest share over layers). 0 % means a per-layer constant: no per-chunk mixing."
    )
    return t


def _oracle_table(recs: list[dict[str, Any]], where: str, ref: dict[str, Any] | None, sfx: str) -> Table:
    """MoQAE's routers against the oracle allocation (upper bound) and the uniform base in MoQAE's layout."""
    uniform = [r for r in recs if r["key"]["method"] == ORACLE and not r.get("oracle")]
    base = uniform[0] if uniform else None

    rows_in = sorted((r for r in recs if not ablation_options(r)), key=lambda r: (mean_bits(r), r["method"]))
    head = ["method", "kind", "nominal bits (mean over windows)", "PPL", f"vs {REFERENCE}", "vs uniform in layout"]
    rows, rows_csv = [], []
    for r in rows_in:
        kind = "uniform in MoQAE's layout" if r in uniform else "router"
        if r.get("oracle"):
            transfer = (r["key"].get("method_config") or {}).get("transfer")
            kind = "oracle, previous window's allocation" if transfer else "oracle (upper bound)"
        ppl = r["metrics"]["ppl"]
        d_ref = 100 * (ppl / ref["metrics"]["ppl"] - 1) if ref else None
        d_base = 100 * (ppl / base["metrics"]["ppl"] - 1) if base else None
        rows.append([display_name(r), kind, fmt(mean_bits(r)), fmt(ppl, "{:.4f}"), fmt(d_ref, "{:+.1f} %"),
                     fmt(d_base, "{:+.1f} %")])  # fmt: skip
        rows_csv.append({"method": display_name(r), "spec": r["method"], "kind": kind, "nominal_bits": mean_bits(r),
                         "ppl": ppl, f"ppl_vs_{REFERENCE}_percent": d_ref,
                         "ppl_vs_uniform_in_layout_percent": d_base, "record": r["_file"]})  # fmt: skip
    t = Table(f"moqae-oracle{sfx}", f"MoQAE routers against the oracle allocation ({where})", head, rows, rows_csv,
              numeric_from=2)  # fmt: skip
    t.intro = (
        "The oracle (`moqae-oracle:budget=B`) allocates MoQAE's experts per chunk and layer group from the "
        "evaluation window's own NLL: an upper bound on any chunk router of this layout, never a method. "
        "*Uniform in layout* (`passes=0`): every routed chunk at the base expert, the first chunk FP16 (RF). "
        "*Previous window's allocation* (`transfer=true`): each window runs the allocation the oracle made for "
        "the window before it (the first window the uniform base): the part of the gain that carries to other "
        "text. Nominal bits are the mean over the windows (the allocation varies by window). Sorted by bits."
    )
    return t


def plot_oracle_curve(recs: list[dict[str, Any]], peers: list[dict[str, Any]], path: Path, title: str) -> Path:
    """PPL against mean nominal bits: the λ sweep of the routers, the oracle (own window; previous window's
    allocation), the uniform base in MoQAE's layout, and the other methods of the protocol as grey points."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))

    def series(sel: list[dict[str, Any]], label: str, **kw: Any) -> None:
        sel = sorted(sel, key=mean_bits)
        if sel:
            ax.plot([mean_bits(r) for r in sel], [r["metrics"]["ppl"] for r in sel], label=label, **kw)

    routers = [r for r in recs if r["key"]["method"] != ORACLE and not ablation_options(r)]
    oracles = [r for r in recs if r.get("oracle")]
    moved = [r for r in oracles if (r["key"].get("method_config") or {}).get("transfer")]
    own = [r for r in oracles if r not in moved]
    series(routers, "MoQAE routers (λ sweep)", marker="o", color="C3")
    for est, ls in (("first", ":"), ("measured", "-")):
        mine = [r for r in own if (r["key"].get("method_config") or {}).get("estimate", "first") == est]
        series(mine, f"oracle, {est} estimate (upper bound)", marker="*", ls=ls, color="C9", markersize=9)
    series(moved, "oracle's allocation on the next window", marker="x", ls="--", color="C2")
    series([r for r in recs if r["key"]["method"] == ORACLE and not r.get("oracle")], "uniform in MoQAE's layout",
           marker="D", ls="", color="k")  # fmt: skip
    for r in peers:
        b, ppl = r["kv"]["nominal_bits"], r["metrics"]["ppl"]
        if b <= 16:
            ax.plot([b], [ppl], marker=".", color="0.55", ls="")
            ax.annotate(display_name(r), (b, ppl), fontsize=6, color="0.4", xytext=(3, 2), textcoords="offset points")
    pts = [r["metrics"]["ppl"] for r in recs]
    ax.set_ylim(min(pts) * 0.97, max(pts) * 1.05)
    ax.set_xlabel("nominal KV bits (mean over windows)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(f"Does per-chunk mixing pay? ({title})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _layer_table(recs, labels, where, model, ref, out: Path, sfx: str) -> Table:
    """Per-layer shares, one column per record; the heat map and the λ trade-off plot."""
    n_layers = max(len(r.get("layer_stats") or []) for r in recs)
    head = ["layer", *[display_name(r) for r in recs]]
    rows, rows_csv = [], []
    for i in range(n_layers):
        row = [str(i)]
        for r in recs:
            ls = layer_shares(r)
            s = ls[i] if i < len(ls) else None
            row.append("—" if s is None else " / ".join(f"{100 * x:.0f}" for x in s))
            counts = (r["layer_stats"][i].get("expert_chunks") or []) if i < len(r["layer_stats"]) else []
            for e, (lab, c) in enumerate(zip(expert_labels(r), counts, strict=False)):
                share = None if s is None else s[e]
                rows_csv.append({"model": r["model"], "method": display_name(r), "layer": i, "expert": lab,
                                 "chunks": c, "share": share, "record": r["_file"]})  # fmt: skip
        rows.append(row)
    t = Table(f"moqae-layer-shares{sfx}", f"MoQAE: share of chunks per expert per layer ({where})", head, rows,
              rows_csv)  # fmt: skip
    t.intro = f"Cells: % of the layer's chunks stored by {' / '.join(labels)} (experts in config order)."
    heat = plot_expert_heatmap(recs, out / f"expert_share_heatmap{sfx}.png", model)
    t.plots.append((heat, f"MoQAE expert share per layer ({model})"))
    sweep = sorted((r for r in recs if not ablation_options(r) and r["key"]["method"] != ORACLE), key=method_sort_key)
    if len(sweep) >= 2:
        p = plot_lambda_tradeoff(sweep, ref, out / f"moqae_lambda_tradeoff{sfx}.png", model)
        t.plots.append((p, f"MoQAE λ trade-off: perplexity and KV bits against λ ({model})"))
    return t


def _ablation_table(recs, labels, where, ref, sfx: str) -> Table | None:
    """Ablation: the variants of one λ beside the default configuration of that λ."""
    by_lam: dict[float, list[dict[str, Any]]] = {}
    for r in recs:
        by_lam.setdefault(num((r["key"].get("method_config") or {}).get("lam")), []).append(r)
    rows, rows_csv = [], []
    for lam, group in sorted(by_lam.items()):
        if not any(ablation_options(r) for r in group):
            continue
        group.sort(key=lambda r: (bool(ablation_options(r)), variant_order(ablation_options(r))))
        for r in group:
            variant = ablation_options(r)
            what = describe_variant(variant) if variant else "full MoQAE (chunk 32, RF, RS = 3)"
            ppl = r["metrics"]["ppl"]
            delta = 100 * (ppl / ref["metrics"]["ppl"] - 1) if ref else None
            shares = expert_shares(r) or []
            rows.append([f"{lam:g}", what, display_name(r), fmt(ppl, "{:.4f}"), fmt(delta, "{:+.1f} %"),
                         fmt(r["kv"]["nominal_bits"]), fmt(r["kv"]["effective_bits"]),
                         f"{r['kv']['total_bytes']:,}", " / ".join(f"{100 * s:.1f}" for s in shares)])  # fmt: skip
            rows_csv.append({"model": r["model"], "lambda": lam, "variant": what, "method": display_name(r),
                             "spec": r["method"], "ppl": ppl, f"ppl_vs_{REFERENCE}_percent": delta,
                             "nominal_bits": r["kv"]["nominal_bits"], "effective_bits": r["kv"]["effective_bits"],
                             "kv_bytes": r["kv"]["total_bytes"], "shares": " / ".join(f"{s:.4f}" for s in shares),
                             "record": r["_file"]})  # fmt: skip
    if not rows:
        return None
    head = ["λ", "variant", "method", "PPL", f"vs {REFERENCE}", "nominal bits", "effective bits", "KV bytes",
            f"shares % {' / '.join(labels)}"]  # fmt: skip
    t = Table(f"moqae-ablation{sfx}", f"MoQAE ablation ({where})", head, rows, rows_csv, numeric_from=3)
    t.intro = (
        "Each variant changes one part of MoQAE at the same λ: routing freezing (RF: the first chunk "
        "kept FP16), routing sharing (RS: layers in groups reuse the leader's decision), the chunk size."
        + ("" if ref else f" No {REFERENCE} record with this protocol: no *vs {REFERENCE}* column.")
    )
    return t


def plot_lambda_tradeoff(sweep: list[dict[str, Any]], ref: dict[str, Any] | None, path: Path, title: str) -> Path:
    """PPL (left axis) and nominal / effective KV bits (right axis) against the router's λ."""
    plt = pyplot()
    sweep = sorted(sweep, key=lambda r: num(r["key"]["method_config"].get("lam")))
    lam = [num(r["key"]["method_config"].get("lam")) for r in sweep]
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    h = ax.plot(lam, [r["metrics"]["ppl"] for r in sweep], marker="o", color="C3", label="MoQAE perplexity")
    if ref:
        h += [ax.axhline(ref["metrics"]["ppl"], ls="--", color="C3", alpha=0.5, lw=1, label=f"{REFERENCE} perplexity")]
    ax.set_xlabel("router λ (weight of the model loss in training)")
    ax.set_ylabel("WikiText-2 perplexity", color="C3")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    h += ax2.plot(lam, [r["kv"]["nominal_bits"] for r in sweep], marker="s", color="C0", label="nominal bits")
    h += ax2.plot(lam, [r["kv"]["effective_bits"] for r in sweep], marker="^", ls=":", color="C0",
                  label="effective bits")  # fmt: skip
    ax2.set_ylabel("KV bits per element (bits)", color="C0")
    ax2.set_ylim(0, 17)
    ax.set_xticks(lam, [f"{x:g}" for x in lam])
    ax.legend(h, [x.get_label() for x in h], fontsize=8, loc="upper left", bbox_to_anchor=(1.12, 1.0),
              borderaxespad=0)  # fmt: skip
    ax.set_title(f"MoQAE λ trade-off ({title})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_expert_heatmap(records: list[dict[str, Any]], path: Path, title: str) -> Path:
    """One panel per MoQAE record: layers along x, experts along y, colour = share of the layer's
    chunks that expert stored."""
    plt = pyplot()
    import numpy as np

    recs = sorted(records, key=lambda r: (bool(ablation_options(r)), method_sort_key(r)))  # the λ sweep first
    n_layers = max(len(r.get("layer_stats") or []) for r in recs)
    n_exp = max(len(expert_labels(r)) for r in recs)
    fig, axes = plt.subplots(len(recs), 1, figsize=(max(7.0, 0.27 * n_layers + 3), 0.42 * n_exp * len(recs) + 1.6),
                             squeeze=False, sharex=True)  # fmt: skip
    im = None
    for ax, r in zip(axes[:, 0], recs, strict=True):
        grid = np.full((n_exp, n_layers), np.nan)
        for i, s in enumerate(layer_shares(r)):
            if s is not None:
                grid[: len(s), i] = [100 * x for x in s]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=100, interpolation="nearest")
        if n_layers <= 16:  # few layers: the numbers fit in the cells
            for (e, i), v in np.ndenumerate(grid):
                if v == v:
                    ax.text(i, e, f"{v:.0f}", ha="center", va="center", fontsize=7, color="k" if v > 60 else "w")
        ax.set_yticks(range(n_exp), expert_labels(r) + [""] * (n_exp - len(expert_labels(r))), fontsize=7)
        ax.set_title(display_name(r), fontsize=8, loc="left", pad=2)
    step = 1 if n_layers <= 16 else 2
    axes[-1, 0].set_xticks(range(0, n_layers, step))
    axes[-1, 0].tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel("layer")
    fig.suptitle(f"MoQAE: share of each layer's chunks per expert ({title})", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    cax = fig.add_axes((0.915, 0.15, 0.018, 0.7))
    fig.colorbar(im, cax=cax).set_label("share of the layer's chunks (%)", fontsize=8)
    return save_figure(fig, path)


PUBLISHED = Section("Published figures: MoQAE paper", _published, order=20)
ANALYSIS = Section(
    "MoQAE: expert shares, λ trade-off, ablation",
    lambda data: ("", moqae_tables(data.records, data.out)),
    order=60,
    legacy=_legacy,
)
