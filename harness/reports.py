"""Reports from run records: the comparison table, MoQAE expert shares and the PPL-vs-bits plot.

Everything here reads the JSON records ``harness.runner`` wrote (real runs); nothing is typed in.
``python -m harness report --results results/smollm2 --out reports/smollm2`` writes
``results.md`` and ``ppl_vs_bits.png`` into ``--out``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from harness.runner import load_record, normalize_command, results_table

# method-name prefix -> family shown in the plot legend (longest prefix first)
FAMILIES = (
    ("moqae", "MoQAE"),
    ("kvquant", "KVQuant"),
    ("kivi", "KIVI"),
    ("qoq", "QoQ"),
    ("mikv", "MiKV"),
    ("fp16", "uniform"),
    ("int", "uniform"),
)


def record_paths(sources: Iterable[str | Path]) -> list[Path]:
    """JSON records in the given folders (sorted) or the given files."""
    paths: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            paths += sorted(p.glob("*.json"))
        elif p.is_file():
            paths.append(p)
        else:
            raise ValueError(f"no results at {p}: give a folder of run records (python -m harness run --out DIR)")
    return paths


def done_records(paths: Iterable[Path]) -> list[dict[str, Any]]:
    return [r for r in (load_record(p) for p in paths) if r and r.get("status") == "done"]


def family(method: str) -> str:
    for prefix, name in FAMILIES:
        if method.startswith(prefix):
            return name
    return "other"


def expert_shares(record: dict[str, Any]) -> list[float] | None:
    """Share of chunks per expert over all layers (MoQAE records), experts in config order."""
    stats = record.get("layer_stats") or []
    counts = [layer["expert_chunks"] for layer in stats if "expert_chunks" in layer]
    if not counts:
        return None
    totals = [sum(c[e] for c in counts) for e in range(len(counts[0]))]
    n = sum(totals)
    return [t / n for t in totals] if n else None


def shares_table(records: list[dict[str, Any]]) -> str:
    """Markdown: MoQAE records with their experts and the share of chunks each received."""
    lines = ["| method | experts (bits) | chunk share per expert |", "|---|---|---|"]
    for r in records:
        shares = expert_shares(r)
        if shares is None:
            continue
        experts = str(r["key"]["method_config"].get("experts", ""))
        lines.append(f"| {r['method']} | {experts} | {' / '.join(f'{100 * s:.1f} %' for s in shares)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def layer_shares_table(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per layer, one column per MoQAE record, cells = chunk shares per expert (%)."""
    cols = [(r["method"], r["layer_stats"]) for r in records if expert_shares(r) is not None]
    if not cols:
        return ""
    n_layers = max(len(stats) for _, stats in cols)
    lines = ["| layer | " + " | ".join(name for name, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    for i in range(n_layers):
        cells = []
        for _, stats in cols:
            counts = stats[i]["expert_chunks"] if i < len(stats) else []
            total = sum(counts)
            cells.append(" / ".join(f"{100 * c / total:.0f}" for c in counts) if total else "—")
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_ppl_vs_bits(records: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Perplexity against nominal KV bits, one marker per record, MoQAE points joined by bits.

    Left: every point (log PPL). Right: a zoom on the points within 20 % of the best PPL at <= 8 bits,
    where the 4-bit methods crowd together.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [
        (r["kv"]["nominal_bits"], r["metrics"]["ppl"], r["method"], family(r["method"]))
        for r in records
        if "ppl" in r.get("metrics", {}) and r["kv"]["nominal_bits"] <= 16
    ]
    if not pts:
        raise ValueError("no perplexity records to plot")
    best = min(p[1] for p in pts)
    zoom = [p for p in pts if p[1] <= 1.2 * best and p[0] <= 8]
    panels = 2 if len(zoom) >= 2 else 1
    fig, axes = plt.subplots(1, panels, figsize=(7.5 * panels, 5), squeeze=False)
    markers = {"MoQAE": "o", "KIVI": "s", "KVQuant": "D", "QoQ": "^", "MiKV": "v", "uniform": "x", "other": "+"}
    colors = dict(zip(markers, ("C3", "C0", "C1", "C4", "C2", "C5", "C7"), strict=True))
    for i, (ax, sel_pts) in enumerate(zip(axes[0], (pts, zoom), strict=False)):
        for fam in sorted({p[3] for p in sel_pts}):
            sel = sorted((p for p in sel_pts if p[3] == fam), key=lambda p: p[0])
            xs, ys = [p[0] for p in sel], [p[1] for p in sel]
            style = {"marker": markers.get(fam, "+"), "color": colors.get(fam, "C7")}
            ax.plot(xs, ys, linestyle="-" if fam == "MoQAE" else "", label=fam, **style)
            for j, (x, y, name, _) in enumerate(sel):
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3 if j % 2 else -9), fontsize=7)
        ax.set_xlabel("nominal KV bits per element")
        ax.grid(True, which="both", alpha=0.3)
        if i == 0:
            ax.set_ylabel("WikiText-2 perplexity (log scale)")
            ax.set_yscale("log")
            ax.legend()
        else:
            ax.set_ylabel("WikiText-2 perplexity")
            ax.set_title("zoom: within 20 % of the best, <= 8 bits", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(sources: Iterable[str | Path], out_dir: str | Path, title: str = "") -> list[Path]:
    """results.md (table + MoQAE shares + the commands that made the records) and ppl_vs_bits.png."""
    paths = record_paths(sources)
    records = done_records(paths)
    if not records:
        raise ValueError(f"no finished run records in {', '.join(map(str, sources))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    commands = sorted({normalize_command(r.get("command", "")) for r in records} - {""})
    parts = [f"# {title or 'Results'}", "", results_table(paths), ""]
    shares = shares_table(records)
    if shares:
        parts += ["## MoQAE: share of chunks per expert (all layers)", "", shares, ""]
        parts += ["## MoQAE: share of chunks per expert per layer (%, experts in config order)", ""]
        parts += [layer_shares_table(records), ""]
    parts += ["## Commands that made these records", "", *[f"    {c}" for c in commands], ""]
    md = out / "results.md"
    md.write_text("\n".join(parts))
    written = [md]
    if any("ppl" in r.get("metrics", {}) for r in records):
        written.append(plot_ppl_vs_bits(records, out / "ppl_vs_bits.png", title))
    return written
