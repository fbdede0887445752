"""The report's RULER section: per model and task options, one table of RULER's average per length
(with the methods' nominal bits beside it), a plot of that average against nominal KV bits (one panel
per length, the methods' own markers and colours, the frontier of the best score at each number of bits
dashed), and one table per length of the score of every task. Declared by
``tasks.ruler.task.RULER.report_sections``.

Scores are RULER's ``string_match_all`` / ``string_match_part`` × 100 (``tasks.ruler.metrics``); the
average over tasks per length is RULER's own summary. The haystack is named in every table's intro
(``noise`` is RULER's noise haystack standing in for its Paul Graham essays where those are used).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.reports import (
    ReportData,
    Section,
    Table,
    display_name,
    family_styles,
    fmt,
    group_records,
    method_sort_key,
    method_style,
    pareto_front,
    place_labels,
    plural,
    pyplot,
    save_figure,
    suffix,
    task_config,
)

TASK = "ruler"


def _lengths(recs: list[dict[str, Any]]) -> list[int]:
    keys = {k for r in recs for k in r["metrics"]}
    return sorted({int(k.split("@")[1]) for k in keys if k.startswith("avg@")})


def _tasks(recs: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k.split("@")[0] for r in recs for k in r["metrics"] if "@" in k and k[:4] != "avg@"))


def plot_score_vs_bits(recs: list[dict[str, Any]], lengths: list[int], path: Path, title: str) -> Path | None:
    """RULER's average at each length against the record's nominal KV bits: one panel per length, one
    marker per method (its family's marker and colour, named beside it), the upper frontier (no method
    scores higher with fewer bits) dashed through ringed points."""
    recs = [r for r in recs if isinstance((r.get("kv") or {}).get("nominal_bits"), int | float)]
    if not recs or not lengths:
        return None
    plt = pyplot()
    styles = family_styles(recs)
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.2 * len(lengths), 4.4), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], lengths, strict=True):
        pts = [(r["kv"]["nominal_bits"], r["metrics"].get(f"avg@{n}"), display_name(r), method_style(r).family)
               for r in recs if r["metrics"].get(f"avg@{n}") is not None]  # fmt: skip
        for fam, style in styles.items():
            sel = [p for p in pts if p[3] == fam]
            if sel:
                ax.plot([p[0] for p in sel], [p[1] for p in sel], ls="", marker=style.marker, color=style.color,
                        markersize=7, label=fam, zorder=3)  # fmt: skip
        front = sorted((pts[i] for i in pareto_front([(p[0], -p[1]) for p in pts])), key=lambda p: p[0])
        ax.plot([p[0] for p in front], [p[1] for p in front], ls="--", color="0.25", lw=1, zorder=2, marker="o",
                markersize=13, markerfacecolor="none", markeredgecolor="k", label="frontier")  # fmt: skip
        ax.set_title(f"{n} tokens", fontsize=10)
        ax.set_xlabel("nominal KV bits per element")
        ax.set_ylim(-5, 105)
        ax.margins(x=0.15)
        ax.grid(True, alpha=0.3)
        place_labels(ax, [(p[0], p[1], p[2]) for p in pts], fontsize=7)
    axes[0][0].set_ylabel("RULER average score (× 100)")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, framealpha=0.9)
    fig.suptitle(f"RULER average against nominal KV bits: {title}", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def ruler_tables(data: ReportData) -> list[Table]:
    records = [r for r in data.records if r["key"]["task"] == TASK]
    tables = []
    for gi, ((model, cfg), recs) in enumerate(group_records(records, lambda r: (r["model"], task_config(r)))):
        recs = sorted(recs, key=method_sort_key)
        lengths, tasks = _lengths(recs), _tasks(recs)
        info = recs[0].get("ruler") or {}
        intro = (
            f"RULER's scores × 100 (string_match_all; string_match_part for qa), "
            f"{plural(info.get('samples', cfg.get('samples')), 'sample')} per task and length, seed "
            f"{info.get('seed', cfg.get('seed'))}, haystack `{info.get('haystack', cfg.get('haystack'))}`, "
            f"chat template {'on' if info.get('chat', cfg.get('chat')) else 'off'}; the same prompts for every "
            "method (`prompts_sha1` in each record)."
        )
        header = ["method", "nominal bits", *[f"avg@{n}" for n in lengths], "average"]
        rows, rows_csv = [], []
        for r in recs:
            m, kv = r["metrics"], r.get("kv") or {}
            rows.append([display_name(r), fmt(kv.get("nominal_bits")), *[fmt(m.get(f"avg@{n}")) for n in lengths],
                         fmt(m.get("average"))])  # fmt: skip
            for key, value in m.items():
                task, _, length = key.partition("@")
                rows_csv.append({"model": model, "method": display_name(r), "spec": r["method"], "task": task,
                                 "length": length, "score": value, "record": r["_file"]})  # fmt: skip
        t = Table("ruler" + suffix(gi), f"RULER ({cfg.get('tasks')}), {model}: average per length", header, rows,
                  rows_csv, numeric_from=1)  # fmt: skip
        t.intro = intro
        where = f"{model}, {cfg.get('tasks')}, haystack {info.get('haystack', cfg.get('haystack'))}"
        png = plot_score_vs_bits(recs, lengths, data.out / f"ruler_vs_bits{suffix(gi)}.png", where)
        if png is not None:
            t.plots.append((png, f"RULER average against nominal KV bits, one panel per length ({where})"))
        tables.append(t)
        for n in lengths:
            header = ["method", *tasks, "average"]
            rows = [[display_name(r), *[fmt(r["metrics"].get(f"{k}@{n}")) for k in tasks],
                     fmt(r["metrics"].get(f"avg@{n}"))] for r in recs]  # fmt: skip
            tables.append(Table(f"ruler{suffix(gi)}-{n}", f"RULER at {n} tokens, {model}", header, rows, []))
    return tables


RULER_SECTION = Section("RULER", lambda data: ("", ruler_tables(data)), order=33)
