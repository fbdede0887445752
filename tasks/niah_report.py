"""The report's needle-in-a-haystack section: one depth × length heat map of exact match per method, side
by side in one figure on one colour scale (0–100 %), and a table of each method's means and its worst
cell, one per model and task options. Declared by ``tasks.niah.NIAH.report_sections``.

Rows and panels follow the methods' own order, names and families (``harness.reports.methods``: the
method class's ``ReportStyle``, ``report_label``, ``report_sort_key``), so a plugin method is drawn like
a built-in one; each panel's title is coloured with its family's colour. The colour map is the one of
the usual needle plots (KVCache-Factory ``scripts/scripts_needle/visualize.py``: red, yellow, green).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from harness.reports import (
    ReportData,
    Section,
    Table,
    display_name,
    family,
    fmt,
    group_records,
    method_sort_key,
    method_style,
    plural,
    pyplot,
    save_figure,
    suffix,
    task_config,
)

TASK = "niah"
COLORS = ("#F0496E", "#EBB839", "#0CD79F")  # 0 % -> 100 %


def grid_of(rec: dict[str, Any]) -> dict[tuple[int, float], dict[str, Any]]:
    """(length, depth) -> the record's cell."""
    return {(int(c["length"]), float(c["depth"])): c for c in rec.get("grid") or []}


def worst_cell(rec: dict[str, Any]) -> dict[str, Any] | None:
    """The cell of lowest exact match (then lowest partial; then the shortest length, shallowest depth)."""
    cells = rec.get("grid") or []
    return min(cells, key=lambda c: (c["exact"], c["partial"], c["length"], c["depth"])) if cells else None


def _length_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def plot_heatmaps(recs: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """One depth × length heat map of exact match per record (in the given order), one shared colour
    bar from 0 to 100 %; the cells' values written in them where the grid is small enough to read."""
    recs = [r for r in recs if r.get("grid")]
    if not recs:
        return None
    plt = pyplot()
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap, is_color_like

    lengths = sorted({length for r in recs for length, _ in grid_of(r)})
    depths = sorted({depth for r in recs for _, depth in grid_of(r)})
    cmap = LinearSegmentedColormap.from_list("needle", list(COLORS)).with_extremes(bad="0.85")  # bad: no cell
    n = len(recs)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    w = max(2.4, 0.55 * len(lengths) + 1.4)
    h = max(2.2, 0.32 * len(depths) + 1.3)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols + 1.2, h * rows + 0.6), squeeze=False)
    write_values = len(lengths) * len(depths) <= 144
    image = None
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        r = recs[i]
        cells = grid_of(r)
        values = np.array(
            [[cells[(ln, d)]["exact"] if (ln, d) in cells else np.nan for ln in lengths] for d in depths], dtype=float
        )
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=100, aspect="auto")
        if write_values:
            for y in range(len(depths)):
                for x in range(len(lengths)):
                    if not np.isnan(values[y, x]):
                        ax.text(x, y, f"{values[y, x]:.0f}", ha="center", va="center", fontsize=6.5, color="0.1")
        ax.set_xticks(range(len(lengths)), [_length_label(v) for v in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        if i % cols == 0:
            ax.set_ylabel("needle depth (%)", fontsize=8)
        if i // cols == rows - 1 or i + cols >= n:
            ax.set_xlabel("prompt length (tokens)", fontsize=8)
        style = method_style(r)
        mean = (r.get("metrics") or {}).get("exact")
        ax.set_title(f"{display_name(r)}\n{style.family} · mean {fmt(mean, '{:.1f}')} %", fontsize=8.5,
                     color=style.color if is_color_like(style.color) else "black")  # fmt: skip
    fig.suptitle(f"Passkey exact match by depth and length: {title}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    cax = fig.add_axes((0.945, 0.15, 0.015, 0.7))
    bar = fig.colorbar(image, cax=cax)
    bar.set_label("exact match (%)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return save_figure(fig, path)


def niah_tables(data: ReportData) -> list[Table]:
    recs_all = [r for r in data.records if r["key"]["task"] == TASK and r.get("grid")]
    tables = []
    for gi, ((model, cfg), recs) in enumerate(group_records(recs_all, lambda r: (r["model"], task_config(r)))):
        recs = sorted(recs, key=method_sort_key)
        lengths = sorted({int(c["length"]) for r in recs for c in r["grid"]})
        depths = sorted({float(c["depth"]) for r in recs for c in r["grid"]})
        header = ["method", "family", "exact", "partial", *[f"exact@{_length_label(n)}" for n in lengths],
                  "worst cell (exact, length, depth)"]  # fmt: skip
        rows, rows_csv = [], []
        for r in recs:
            m, name = r["metrics"], display_name(r)
            worst = worst_cell(r)
            shown = "—" if worst is None else f"{worst['exact']:.1f} at {worst['length']} tokens, {worst['depth']:g} %"
            rows.append([name, family(r), fmt(m.get("exact"), "{:.1f}"), fmt(m.get("partial"), "{:.1f}"),
                         *[fmt(m.get(f"exact@{n}"), "{:.1f}") for n in lengths], shown])  # fmt: skip
            base = {"model": model, "method": name, "spec": r["method"], "family": family(r)}
            for metric in ("exact", "partial"):
                rows_csv.append({**base, "metric": metric, "length": "all", "depth": "all", "score": m.get(metric),
                                 "samples": r.get("n_samples"), "record": r["_file"]})  # fmt: skip
            for c in r["grid"]:
                for metric in ("exact", "partial"):
                    cell = {"length": c["length"], "depth": c["depth"], "score": c[metric], "samples": c.get("repeats")}
                    rows_csv.append({**base, "metric": metric, **cell, "record": r["_file"]})
        where = f"{model}, haystack {cfg.get('haystack', 'noise')}"
        t = Table(
            "niah" + suffix(gi), f"Needle in a haystack (passkey), {model}", header, rows, rows_csv, numeric_from=2
        )
        repeats = cfg.get("repeats")
        chat = sorted({bool(r.get("chat_template")) for r in recs})
        t.intro = (
            "The passkey test of longctx_bench: a "
            f"{cfg.get('digits')}-digit key hidden at {plural(len(depths), 'depth')} "
            f"({', '.join(f'{d:g}' for d in depths)} %) of a {cfg.get('haystack', 'noise')} background, prompts of "
            f"{', '.join(map(str, lengths))} tokens in the model's tokenizer, {plural(repeats or 0, 'key')} per cell"
            + (", chat template" if chat == [True] else ", no chat template" if chat == [False] else "")
            + ". Scores × 100: *exact*, the key found in the answer; *partial*, the longest unbroken run of the "
            "key's digits in the answer over its length; *exact@N*, the mean at prompts of N tokens; the worst "
            "cell is the (length, depth) of lowest exact match."
        )
        shas = {r.get("prompts_sha1") for r in recs}
        if len(shas) > 1:
            t.notes.append("The records' prompts differ (prompts_sha1): compare their rows with care.")
        png = plot_heatmaps(recs, data.out / f"niah_heatmap{suffix(gi)}.png", where)
        if png is not None:
            t.plots.append((png, f"Exact match by needle depth and prompt length, one map per method ({where})"))
        tables.append(t)
    return tables


NEEDLE = Section("Needle in a haystack", lambda data: ("", niah_tables(data)), order=35)
