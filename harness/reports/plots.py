"""Plots (PNG and SVG beside it): PPL against nominal KV bits with the Pareto frontier, and the one
profile plotter (figures against context length, one line per method) that both the report's
profiling section and ``harness.profiling.plot_profile`` use. Families, markers and colours come
from each method's ``ReportStyle`` (``harness.reports.methods``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from harness.reports.methods import family_styles, method_style, registry_name
from harness.reports.records import pareto_front


def pyplot():
    """matplotlib's pyplot on the Agg backend, SVG text kept as text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # SVG text stays text: smaller, searchable, faster to write
    return plt


def save_figure(fig, path: Path) -> Path:
    """PNG and SVG beside it; returns the PNG path."""
    png = path.with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=130, bbox_inches="tight")
    fig.savefig(png.with_suffix(".svg"), bbox_inches="tight")
    pyplot().close(fig)
    return png


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def place_labels(
    ax,
    points: list[tuple[float, float, str]],
    fontsize: float = 7.5,
    avoid: Sequence = (),
    unlabelled: Sequence[tuple[float, float]] = (),
) -> list:
    """Name each point beside its marker where the name overlaps no other name, marker (``unlabelled``
    markers included), legend or the axes' edge: the first free spot among positions around the
    marker, then further out with a leader line; failing all, the least-overlapping spot. Points at
    the same place share one label. Returns the text artists."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    ax.autoscale_view()  # final limits (what a draw would settle), without drawing the figure
    ax.set_xlim(ax.get_xlim())
    ax.set_ylim(ax.get_ylim())
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed = [a.get_window_extent(renderer) for a in avoid if a is not None]
    near = [(6, 2, "left", "bottom"), (6, -2, "left", "top"), (-6, 2, "right", "bottom"), (-6, -2, "right", "top"),
            (0, 7, "center", "bottom"), (0, -7, "center", "top")]  # fmt: skip
    far = [(dx, dy, "left" if dx > 0 else "right" if dx < 0 else "center", "bottom" if dy > 0 else "top")
           for r in (14, 24, 36) for dx, dy in ((r, r), (r, -r), (-r, r), (-r, -r), (0, 1.3 * r), (0, -1.3 * r),
                                                 (1.5 * r, 0), (-1.5 * r, 0))]  # fmt: skip
    texts = []
    merged: dict[tuple[float, float], list[str]] = {}  # coincident points (two methods, one result): one label
    for x, y, name in points:
        merged.setdefault((x, y), []).append(name)
    points = [(x, y, ", ".join(names)) for (x, y), names in merged.items()]
    xy = [ax.transData.transform((x, y)) for x, y, _ in points]
    box = 16  # px: the marker with its Pareto ring
    markers = [Bbox.from_bounds(px - box / 2, py - box / 2, box, box) for px, py in xy]
    others = [ax.transData.transform(p) for p in unlabelled]
    placed += [Bbox.from_bounds(px - box / 2, py - box / 2, box, box) for px, py in others]
    for i in sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1])):
        x, y, name = points[i]
        best = None
        for dx, dy, ha, va in near + far:
            leader = (dx, dy) not in {(c[0], c[1]) for c in near}
            t = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                            fontsize=fontsize, zorder=5)  # fmt: skip
            bb = t.get_window_extent(renderer).expanded(1.04, 1.15)
            score = sum(_overlap(bb, o) for o in placed) + sum(_overlap(bb, m) for j, m in enumerate(markers) if j != i)
            inside = frame.x0 <= bb.x0 and bb.x1 <= frame.x1 and frame.y0 <= bb.y0 and bb.y1 <= frame.y1
            score += 0 if inside else bb.width * bb.height
            t.remove()
            if best is None or score < best[0]:
                best = (score, dx, dy, ha, va, leader, bb)
            if score == 0:
                break
        _, dx, dy, ha, va, leader, bb = best
        arrow = {"arrowstyle": "-", "color": "0.5", "lw": 0.6} if leader else None
        t = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=fontsize,
                        zorder=5, arrowprops=arrow)  # fmt: skip
        placed.append(bb)
        texts.append(t)
    return texts


def plot_ppl_vs_bits(
    records: list[dict[str, Any]],
    path: Path,
    title: str = "",
    names: Callable[[dict[str, Any]], str] = lambda r: r["method"],
    ylabel: str = "perplexity",
) -> Path | None:
    """Perplexity against nominal KV bits, one marker per record (its method's family marker and
    colour), the points of a family that are all one method's settings joined by bits, the Pareto
    frontier (dashed, ringed points) marked.

    Left: every point (log PPL), the zoomed region outlined. Right: a zoom on the points within 20 %
    of the best PPL at <= 8 bits, where the 4-bit methods crowd together."""
    plt = pyplot()
    recs = [r for r in records if "ppl" in r.get("metrics", {}) and r["kv"]["nominal_bits"] <= 16]
    pts = [(r["kv"]["nominal_bits"], r["metrics"]["ppl"], names(r), method_style(r).family) for r in recs]
    if not pts:
        return None
    styles = family_styles(recs)
    methods_of: dict[str, set[str]] = {}
    for r in recs:
        methods_of.setdefault(method_style(r).family, set()).add(registry_name(r["key"]["method"]))
    best = min(p[1] for p in pts)
    zoom = [p for p in pts if p[1] <= 1.2 * best and p[0] <= 8]
    front = [pts[i] for i in pareto_front([(p[0], p[1]) for p in pts])]
    panels = 2 if len(zoom) >= 2 and len(zoom) < len(pts) else 1
    fig, axes = plt.subplots(1, panels, figsize=(7.2 * panels, 5.4), squeeze=False)
    axes = axes[0]
    for i, ax in enumerate(axes):
        sel_pts = pts if i == 0 else zoom
        for fam, style in styles.items():
            sel = sorted((p for p in sel_pts if p[3] == fam), key=lambda p: p[0])
            if not sel:
                continue
            joined = len(methods_of[fam]) == 1 and len(sel) >= 2  # one method's sweep: a line
            ax.plot([p[0] for p in sel], [p[1] for p in sel], linestyle="-" if joined else "",
                    marker=style.marker, color=style.color, markersize=7, label=fam, zorder=3)  # fmt: skip
        fr = [p for p in front if p in sel_pts]
        ring = {"marker": "o", "markersize": 13, "markerfacecolor": "none", "markeredgecolor": "k"}
        ax.plot([p[0] for p in fr], [p[1] for p in fr], ls="--", color="0.25", lw=1, zorder=2, label="Pareto frontier",
                **ring)  # fmt: skip
        ax.set_xlabel("nominal KV bits per element (bits)")
        ax.grid(True, which="both", alpha=0.3)
        ax.margins(x=0.12, y=0.12)
        if i == 0:
            ax.margins(x=0.2)  # room for the names of the points at the edges (16 bits)
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_ylabel(f"{ylabel} (log scale)")
            ax.set_title("all methods", fontsize=10)
        else:
            ax.set_ylabel(ylabel)
            ax.set_title("zoom: within 20 % of the best PPL, ≤ 8 bits", fontsize=10)
    legend = axes[0].legend(loc="upper right", fontsize=8, framealpha=0.9)
    if title:
        fig.suptitle(f"PPL against nominal KV bits: {title}", fontsize=11)
    fig.tight_layout()
    if panels == 2:  # outline the zoomed region on the overview
        from matplotlib.patches import Rectangle

        x0, x1 = axes[1].get_xlim()
        y0, y1 = axes[1].get_ylim()
        axes[0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ls=":", color="0.4", lw=1, zorder=1))
        place_labels(axes[0], [(p[0], p[1], p[2]) for p in pts if p not in zoom], avoid=[legend],
                     unlabelled=[(p[0], p[1]) for p in zoom])  # fmt: skip
        place_labels(axes[1], [(p[0], p[1], p[2]) for p in zoom])
        axes[0].text(0.01, 0.01, "dotted box: zoom on the right", transform=axes[0].transAxes, fontsize=7,
                     color="0.35", va="bottom")  # fmt: skip
    else:
        place_labels(axes[0], [(p[0], p[1], p[2]) for p in pts], avoid=[legend])
    return save_figure(fig, path)


#: profile row key -> (axis label, scale) of a panel against context length
PROFILE_PANELS: dict[str, tuple[str, float]] = {
    "kv_bytes": ("KV cache held (MiB)", 2**-20),
    "kv_read_bytes_per_step": ("KV read per decode step (MiB)", 2**-20),
    "peak_bytes": ("peak memory above the weights (MiB)", 2**-20),
    "prefill_s": ("prefill latency (ms)", 1e3),
    "decode_step_s": ("decode latency (ms / step)", 1e3),
    "decode_tokens_per_s": ("decode throughput (tokens/s)", 1.0),
}


def plot_against_context(
    rows: list[dict[str, Any]], path: Path, keys: Sequence[str], title: str, where: str = ""
) -> Path | None:
    """Profile rows against context length, one panel per key of ``PROFILE_PANELS``, one line per
    method (the smallest batch; each method with its family's marker), the legend at the right.
    ``title`` is the figure's heading, ``where`` (model, device, dtype) follows it with the batch."""
    done = [r for r in rows if r.get("status", "done") == "done"]
    if not done:
        return None
    plt = pyplot()
    batch = min(r["batch"] for r in done)
    contexts = sorted({r["context"] for r in done})
    fig, axes = plt.subplots(1, len(keys), figsize=(7.5 if len(keys) == 1 else 6.0 * len(keys), 4.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        label, scale = PROFILE_PANELS[key]
        for m in dict.fromkeys(r["method"] for r in done):
            pts = sorted((r["context"], r[key] * scale) for r in done if r["method"] == m and r["batch"] == batch
                         and r.get(key) is not None)  # fmt: skip
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=method_style(m).marker, label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.minorticks_off()
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.set_ylabel(label)
    fig.suptitle(f"{title} ({where + ', ' if where else ''}batch {batch})", fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save_figure(fig, path)
