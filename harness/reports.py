"""Reports from run records and profile files: every table and plot, traceable to its record file.

``python -m harness report RESULTS_DIR [--results DIR ...] --out reports/X`` reads every JSON file
under the given folders (recursively): run records of any task (``python -m harness run``; failed
ones are listed with their reasons) and profile files (``python -m harness profile --out X.json``
or ``python -m harness reproduce``: ``{"command", "rows"}`` with one row per method, context and
batch; rows of the older format, without ``context``, are skipped with a note). Nothing is typed in.
Into ``--out`` it writes:

* ``README.md`` — the index: each table in Markdown with links to its CSV and LaTeX copies and to
  its plots, the environment the records came from (devices, library versions, commits), the
  commands that made the records and the command that made the report;
* ``<table>.csv`` (one row per number, with a ``record`` column naming the record file it comes
  from) and ``<table>.tex`` (booktabs) for every table;
* ``<plot>.png`` and ``<plot>.svg`` for every plot;
* ``results.md`` and ``ppl_vs_bits.png`` as before (the compact table; kept for existing links).

Tables: WikiText-2 perplexity in the paper's layout (rows: FP16, INT-N, KIVI, KVQuant, QoQ, MiKV,
other methods, MoQAE by λ; columns: nominal bits, effective bits, PPL per model), the MoQAE paper's
published figures in a separate labelled block (``harness/published/moqae_acl2025.toml``; never
mixed with measured numbers), LongBench per dataset and average, lm-eval accuracies, profiling
(latency and memory, each with its ratio to fp16), MoQAE expert shares (overall and per layer) and
the MoQAE ablation. Plots: PPL against nominal bits with the Pareto frontier, KV memory and latency
against context length, the MoQAE λ trade-off, the expert-share heat map (layer × expert).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import tomllib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.runner import load_record, normalize_command, results_table, write_text_atomic

# method-name prefix -> family shown in the plot legend (longest prefix first)
FAMILIES = (
    ("moqae", "MoQAE"),
    ("kvquant", "KVQuant"),
    ("kivi", "KIVI"),
    ("qoq", "QoQ"),
    ("mikv", "MiKV"),
    ("fp16", "uniform"),
    ("full", "uniform"),
    ("int", "uniform"),
)

#: row order of the paper's tables: registered method name -> rank; other methods come before MoQAE
PAPER_ORDER = {"full": 0, "fp16": 1, "int": 2, "kivi": 3, "kvquant": 4, "qoq": 5, "mikv": 6, "moqae": 9}
OTHER_RANK = 7

#: MoQAE options that select a point of the λ sweep rather than an ablation variant
MOQAE_SWEEP_OPTIONS = ("lam", "ckpt", "seed")

PUBLISHED = Path(__file__).parent / "published" / "moqae_acl2025.toml"

MARKERS = {"MoQAE": "o", "KIVI": "s", "KVQuant": "D", "QoQ": "^", "MiKV": "v", "uniform": "X", "other": "P"}
COLORS = {"MoQAE": "C3", "KIVI": "C0", "KVQuant": "C1", "QoQ": "C4", "MiKV": "C2", "uniform": "C7", "other": "C5"}


# --------------------------------------------------------------------------------------------
# Reading records
# --------------------------------------------------------------------------------------------


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


def json_files(sources: Iterable[str | Path]) -> list[Path]:
    """Every ``*.json`` under the given folders (recursively, sorted) and the given files, once each."""
    seen: set[Path] = set()
    paths: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.json") if not any(part.startswith(".") for part in q.parts[-1:]))
        elif p.is_file():
            found = [p]
        else:
            raise ValueError(f"no results at {p}: give a folder of run records (python -m harness run --out DIR)")
        for q in found:
            if q.resolve() not in seen:
                seen.add(q.resolve())
                paths.append(q)
    return paths


def done_records(paths: Iterable[Path]) -> list[dict[str, Any]]:
    return [r for r in (load_record(p) for p in paths) if r and r.get("status") == "done"]


def _shown_path(path: Path) -> str:
    """The path as a reader finds it: relative to the working directory where possible."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@dataclass
class Results:
    records: list[dict[str, Any]] = field(default_factory=list)  # finished run records (+ "_file")
    failed: list[dict[str, Any]] = field(default_factory=list)  # failed run records (+ "_file")
    profile_rows: list[dict[str, Any]] = field(default_factory=list)  # (+ "_file", "_row")
    profile_commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # files read but not used, and why
    run_paths: list[Path] = field(default_factory=list)


def load_results(sources: Iterable[str | Path]) -> Results:
    """Classify every JSON file: run records (done / failed), profile files (new-format rows), others.

    A record whose key appears twice (the same cell copied into two folders) is used once."""
    res = Results()
    keys: set[str] = set()
    for path in json_files(sources):
        obj = load_record(path)
        shown = _shown_path(path)
        if isinstance(obj, dict) and "key" in obj and "status" in obj:
            key = json.dumps(obj["key"], sort_keys=True, default=str)
            if key in keys:
                continue
            keys.add(key)
            obj["_file"] = shown
            res.run_paths.append(path)
            (res.records if obj["status"] == "done" else res.failed).append(obj)
        elif isinstance(obj, dict) and isinstance(obj.get("rows"), list):
            rows = [(i, r) for i, r in enumerate(obj["rows"]) if isinstance(r, dict)]
            new = [(i, r) for i, r in rows if "context" in r and "batch" in r and "method" in r]
            if len(new) < len(rows):
                res.notes.append(
                    f"`{shown}`: {len(rows) - len(new)} profile row(s) of the older format (no context/batch) "
                    "skipped; re-run `python -m harness profile ... --out` to include them"
                )
            res.profile_rows += [{**r, "_file": shown, "_row": i} for i, r in new]
            if new and obj.get("command"):
                res.profile_commands.append(normalize_command(str(obj["command"])))
        else:
            res.notes.append(f"`{shown}`: not a run record or profile file; skipped")
    return res


# --------------------------------------------------------------------------------------------
# Method names and order
# --------------------------------------------------------------------------------------------


def family(method: str) -> str:
    for prefix, name in FAMILIES:
        if method.startswith(prefix):
            return name
    return "other"


def _strip_router_path(label: str) -> tuple[str, bool]:
    """``moqae:lam=0.5,ckpt=runs/x/router.pt`` -> (``moqae:lam=0.5``, True): a trained router's path
    is an implementation detail of the row, not its name."""
    name, sep, opts = label.partition(":")
    if not sep:
        return label, False
    kept, stripped = [], False
    for item in opts.split(","):
        if item.startswith("ckpt=") and item.endswith(".pt"):
            stripped = True
            continue
        kept.append(item)
    return (name + (":" + ",".join(kept) if kept else "")), stripped


def display_name(rec: dict[str, Any]) -> str:
    """The method as a table row names it: its spec, a trained router marked, calibration noted
    where it differs from the default."""
    label, trained = _strip_router_path(rec["method"])
    if trained:
        label += " (own router)"
    if rec["key"].get("calibration_windows"):
        label += f" (calib. {_plural(rec['key']['calibration_windows'], 'window')})"
    return label


def _rank(name: str) -> int:
    return PAPER_ORDER.get(name, OTHER_RANK)


def _num(v: Any, default: float = 0.0) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def method_sort_key(rec: dict[str, Any]) -> tuple:
    """Paper order: families, then more bits first (KVQuant dense before outliers), MoQAE by λ."""
    key = rec["key"]
    name, cfg = key["method"], key.get("method_config") or {}
    rank = _rank(name)
    bits = 32 if name == "full" else _num(cfg.get("bits"), 16)
    return (
        rank,
        name if rank == OTHER_RANK else "",
        -bits,
        -_num(cfg.get("sparsity_threshold"), 1.0),
        _num(cfg.get("lam")),
        len(moqae_variant(rec)) if name == "moqae" else 0,
        display_name(rec),
    )


def label_sort_key(label: str, order: dict[str, int]) -> tuple:
    """Order of profile rows, which carry only the method label: family rank, then first appearance."""
    prefix = label.partition(":")[0]
    name = next((n for n in PAPER_ORDER if prefix == n or prefix.startswith(n)), prefix)
    return (_rank(name), order.get(label, 0))


def _moqae_defaults() -> dict[str, Any]:
    from moqae.method import MoQAEConfig

    return dataclasses.asdict(MoQAEConfig())


def moqae_variant(rec: dict[str, Any]) -> dict[str, Any]:
    """MoQAE options that differ from the defaults, apart from λ and the router file (ablation)."""
    if rec["key"]["method"] != "moqae":
        return {}
    defaults = _moqae_defaults()
    cfg = rec["key"].get("method_config") or {}
    return {k: v for k, v in cfg.items() if k not in MOQAE_SWEEP_OPTIONS and k in defaults and v != defaults[k]}


def _variant_order(variant: dict[str, Any]) -> list[tuple[str, float, str]]:
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


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (at most as many bits and at most the PPL,
    one of them strictly fewer), ordered by bits: the frontier of the bits-vs-PPL trade-off."""
    front = []
    for i, (b, p) in enumerate(points):
        if not any(b2 <= b and p2 <= p and (b2 < b or p2 < p) for j, (b2, p2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i])


# --------------------------------------------------------------------------------------------
# Tables: one object, written as Markdown (README), CSV and LaTeX
# --------------------------------------------------------------------------------------------


def _tex(text: Any) -> str:
    s = str(text)
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                 ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}")):  # fmt: skip
        s = s.replace(a, b)
    s = s.replace(r"\textbackslash\{\}", r"\textbackslash{}").replace(r"\textasciitilde\{\}", r"\textasciitilde{}")
    for a, b in (("×", r"$\times$"), ("±", r"$\pm$"), ("λ", r"$\lambda$"), ("—", "---"), ("≤", r"$\le$"),
                 ("Δ", r"$\Delta$"), ("·", r"$\cdot$")):  # fmt: skip
        s = s.replace(a, b)
    return s


@dataclass
class Table:
    stem: str  # file name of the CSV / LaTeX copies
    title: str  # section heading
    header: list[str]
    rows: list[list[str]]
    csv: list[dict[str, Any]]  # one row per number, each naming its record file
    intro: str = ""
    notes: list[str] = field(default_factory=list)
    plots: list[tuple[Path, str]] = field(default_factory=list)  # (PNG path, caption); SVG beside it
    numeric_from: int = 1  # columns from here on are right-aligned

    def markdown(self) -> str:
        align = ["---" if i < self.numeric_from else "---:" for i in range(len(self.header))]
        lines = ["| " + " | ".join(self.header) + " |", "|" + "|".join(align) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def latex(self) -> str:
        cols = "".join("l" if i < self.numeric_from else "r" for i in range(len(self.header)))
        label = re.sub(r"[^a-z0-9-]+", "-", self.stem.lower())
        lines = [
            f"% {self.title} -- written by python -m harness report; numbers traceable via {self.stem}.csv",
            r"\begin{table}[t]",
            r"\centering",
            r"\small",
            rf"\begin{{tabular}}{{{cols}}}",
            r"\toprule",
            " & ".join(_tex(h) for h in self.header) + r" \\",
            r"\midrule",
        ]
        lines += [" & ".join(_tex(c) for c in row) + r" \\" for row in self.rows]
        lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_tex(self.title)}}}", rf"\label{{tab:{label}}}"]
        lines += [r"\end{table}", ""]
        return "\n".join(lines)

    def csv_text(self) -> str:
        fields: list[str] = []
        for row in self.csv:
            fields += [k for k in row if k not in fields]
        if "record" in fields:  # the trace column last, where a reader looks for it
            fields = [f for f in fields if f != "record"] + ["record"]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        for row in self.csv:
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
        return buf.getvalue()

    def write(self, out: Path) -> list[Path]:
        paths = [out / f"{self.stem}.csv", out / f"{self.stem}.tex"]
        write_text_atomic(paths[0], self.csv_text())
        write_text_atomic(paths[1], self.latex())
        return paths

    def section(self, level: str = "###") -> str:
        parts = [f"{level} {self.title}", ""]
        if self.intro:
            parts += [self.intro, ""]
        parts += [self.markdown(), ""]
        parts += [f"CSV: [{self.stem}.csv]({self.stem}.csv) · LaTeX: [{self.stem}.tex]({self.stem}.tex)", ""]
        for note in self.notes:
            parts += [note, ""]
        for png, caption in self.plots:
            parts += [f"![{caption}]({png.name})", "", f"{caption} ([PNG]({png.name}), [SVG]({png.stem}.svg))", ""]
        return "\n".join(parts)


def _fmt(v: Any, spec: str = "{:.2f}", scale: float = 1.0) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "—"
    try:
        return spec.format(v * scale)
    except (TypeError, ValueError):
        return str(v)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def _suffix(i: int) -> str:
    return "" if i == 0 else f"-{i + 1}"


def _group(records: Iterable[dict[str, Any]], key) -> list[tuple[Any, list[dict[str, Any]]]]:
    """Records grouped by ``key(record)``, biggest group first (ties in a fixed order)."""
    groups: dict[str, tuple[Any, list]] = {}
    for r in records:
        k = key(r)
        groups.setdefault(json.dumps(k, sort_keys=True, default=str), (k, []))[1].append(r)
    return [groups[s] for s in sorted(groups, key=lambda s: (-len(groups[s][1]), s))]


_TASK_DEFAULTS: dict[str, dict[str, Any]] = {}


def task_config(rec: dict[str, Any]) -> dict[str, Any]:
    """The record's task options with the task's current defaults filled in, so that a record
    written before an option existed groups with those written after (``prefill_chunk``: 0)."""
    name = rec["key"]["task"]
    if name not in _TASK_DEFAULTS:
        try:
            from harness.evaluation import TASKS

            _TASK_DEFAULTS[name] = dataclasses.asdict(TASKS.entry(name).cls.config_class())
        except Exception:  # noqa: BLE001 - a task this checkout does not know: its options as written
            _TASK_DEFAULTS[name] = {}
    cfg = rec["key"].get("task_config") or {}
    return {**{k: v for k, v in _TASK_DEFAULTS[name].items() if k not in cfg}, **cfg}


def _column(rec: dict[str, Any]) -> tuple[str, str, str]:
    return (rec["model"], rec["key"].get("dtype", ""), rec["key"].get("device", ""))


def _column_labels(cols: list[tuple[str, str, str]]) -> dict[tuple[str, str, str], str]:
    models = Counter(c[0] for c in cols)
    return {c: c[0] if models[c[0]] == 1 else f"{c[0]} ({c[1]}, {c[2]})" for c in cols}


def _wikitext_protocol(cfg: dict[str, Any], recs: list[dict[str, Any]]) -> str:
    windows = cfg.get("max_windows")
    n = max((r.get("windows") or 0) for r in recs)
    tokens = max((r.get("tokens") or 0) for r in recs)
    text = f"WikiText-2 (raw) test, windows of {cfg.get('seqlen', 2048)} tokens"
    text += (", the first window" if windows == 1 else f", first {windows} windows") if windows else ", all windows"
    if n:
        text += f" ({_plural(n, 'window')}, {tokens:,} predicted tokens)"
    if cfg.get("prefill_chunk"):
        text += f", streamed in pieces of {cfg['prefill_chunk']} tokens"
    return text


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def perplexity_tables(records: list[dict[str, Any]], out: Path) -> list[Table]:
    """The paper's layout, one table per WikiText-2 protocol; MoQAE ablation variants go to the
    ablation table. One PPL-vs-bits plot per model, Pareto frontier marked."""
    wt = [r for r in records if r["key"]["task"] == "wikitext2" and "ppl" in r.get("metrics", {})]
    tables = []
    for gi, (cfg, recs) in enumerate(_group(wt, task_config)):
        main = sorted((r for r in recs if not moqae_variant(r)), key=method_sort_key)
        if not main:
            continue
        cols = list(dict.fromkeys(_column(r) for r in sorted(main, key=lambda r: r["model"])))
        col_label = _column_labels(cols)
        names = list(dict.fromkeys(display_name(r) for r in main))
        cell = {(display_name(r), _column(r)): r for r in main}
        fronts = {}
        for c in cols:
            pts = [(r["kv"]["nominal_bits"], r["metrics"]["ppl"], display_name(r)) for r in main if _column(r) == c]
            pts = [p for p in pts if p[0] <= 16]
            fronts[c] = {pts[i][2] for i in pareto_front([(b, p) for b, p, _ in pts])}
        stem = "ppl" + _suffix(gi)
        rows, rows_csv = [], []
        for name in names:
            present = [cell.get((name, c)) for c in cols]
            nominal = [f"{r['kv']['nominal_bits']:.2f}" for r in present if r]
            effective = [f"{r['kv']['effective_bits']:.2f}" for r in present if r]
            row = [name, " / ".join(dict.fromkeys(nominal)), " / ".join(dict.fromkeys(effective))]
            row += [_fmt(r["metrics"]["ppl"], "{:.4f}") if r else "—" for r in present]
            rows.append(row)
            for c, r in zip(cols, present, strict=True):
                if r is None:
                    continue
                rows_csv.append(
                    {
                        "model": r["model"], "dtype": c[1], "device": c[2], "method": name, "spec": r["method"],
                        "nominal_bits": r["kv"]["nominal_bits"], "effective_bits": r["kv"]["effective_bits"],
                        "kv_bytes": r["kv"].get("total_bytes"), "ppl": r["metrics"]["ppl"],
                        "nll": r["metrics"].get("nll"), "windows": r.get("windows"), "tokens": r.get("tokens"),
                        "on_pareto_front": name in fronts[c], "record": r["_file"],
                    }
                )  # fmt: skip
        header = ["method", "nominal bits", "effective bits"] + [f"PPL {col_label[c]}" for c in cols]
        t = Table(stem, f"Perplexity: {_wikitext_protocol(cfg, recs)}", header, rows, rows_csv)
        t.intro = (
            "Rows in the paper's order (uniform, KIVI, KVQuant, QoQ, MiKV, other methods, MoQAE by λ). "
            "*Nominal bits*: payload bits per K/V element; *effective bits*: all bytes the cache held × 8 "
            "per element (scales, zero points, full-precision tokens, outliers included). Where the models "
            "differ, the bits are given per model, in column order."
        )
        for c in cols:
            ordered = [n for n in names if n in fronts[c]]
            t.notes.append(f"Pareto frontier (nominal bits vs PPL, {col_label[c]}): " + ", ".join(ordered) + ".")
        for c in cols:
            png = out / (("ppl_vs_bits" + _suffix(gi)) + ("" if len(cols) == 1 else f"-{_slug(col_label[c])}") + ".png")
            sel = [r for r in main if _column(r) == c]
            if plot_ppl_vs_bits(sel, png, col_label[c], names=display_name):
                t.plots.append((png, f"WikiText-2 perplexity against nominal KV bits, {col_label[c]}"))
        tables.append(t)
    return tables


def published_block() -> tuple[str, Table | None]:
    """The MoQAE paper's own figures, from ``harness/published/moqae_acl2025.toml``, as a separate
    labelled block (Markdown text, and a table when the file holds figures)."""
    data: dict[str, Any] = {}
    if PUBLISHED.exists():
        data = tomllib.loads(PUBLISHED.read_text())
    source = data.get("source", "Tao et al., MoQAE, ACL 2025 (arXiv:2506.07533)")
    rows = data.get("rows") or []
    head = (
        f"**Published figures, not measured here** — {source}. These are the paper's own numbers for "
        "its Llama models, quoted for comparison only: they come from another model, hardware and "
        "code, and are never mixed into the measured tables above."
    )
    if not rows:
        text = (
            f"{head}\n\n*(empty)* {data.get('status', 'No published figures are recorded.')} "
            f"They belong in `harness/published/{PUBLISHED.name}` (`[[rows]]` with model, method, "
            "nominal bits, PPL and where in the paper each number is printed); this block shows them "
            "once they are there."
        )
        return text, None
    cols = ["model", "method", "nominal_bits", "dataset", "ppl", "where"]
    table = Table(
        "published-moqae-paper",
        "Published figures: MoQAE paper (not measured here)",
        ["model", "method", "nominal bits", "dataset", "PPL", "where in the paper"],
        [[str(r.get(k, "—")) for k in cols] for r in rows],
        [{**{k: r.get(k) for k in cols}, "record": f"published: {source}"} for r in rows],
        intro=head,
        numeric_from=2,
    )
    return head, table


def longbench_tables(records: list[dict[str, Any]]) -> list[Table]:
    lb = [r for r in records if r["key"]["task"] == "longbench"]
    tables = []
    for gi, ((model, cfg), recs) in enumerate(_group(lb, lambda r: (r["model"], task_config(r)))):
        recs = sorted(recs, key=method_sort_key)
        datasets = list(dict.fromkeys(k for r in recs for k in r["metrics"] if k != "average"))
        header = ["method", *datasets, "average"]
        rows, rows_csv = [], []
        for r in recs:
            m = r["metrics"]
            rows.append([display_name(r), *[_fmt(m.get(d)) for d in datasets], _fmt(m.get("average"))])
            for d in [*datasets, "average"]:
                if d in m:
                    n = (
                        (r.get("n_samples") or {}).get(d)
                        if d != "average"
                        else sum((r.get("n_samples") or {}).values())
                    )
                    rows_csv.append({"model": model, "method": display_name(r), "spec": r["method"], "dataset": d,
                                     "score": m[d], "samples": n, "record": r["_file"]})  # fmt: skip
        n_samples = recs[0].get("n_samples") or {}
        limit = cfg.get("limit")
        t = Table(
            "longbench" + _suffix(gi),
            f"LongBench ({cfg.get('tasks')}), {model}",
            header,
            rows,
            rows_csv,
        )
        budget = cfg.get("max_length") or "the model's window"
        t.intro = (
            "Scores × 100 with each dataset's official metric (F1, ROUGE-L, accuracy, edit similarity); "
            f"*average* is the mean over the datasets. Prompts cut in the middle to {budget} tokens"
            + (f"; the first {_plural(limit, 'sample')} of each dataset" if limit else "; every sample")
            + ". Samples per dataset: "
            + ", ".join(f"{d} {n}" for d, n in n_samples.items())
            + "."
        )
        tables.append(t)
    return tables


def lmeval_tables(records: list[dict[str, Any]]) -> list[Table]:
    lm = [r for r in records if r["key"]["task"] == "lmeval"]
    tables = []
    for gi, ((model, cfg), recs) in enumerate(_group(lm, lambda r: (r["model"], task_config(r)))):
        recs = sorted(recs, key=method_sort_key)
        tasks = [t.strip() for t in str(cfg.get("tasks", "")).split(",") if t.strip()]
        tasks = tasks or list(dict.fromkeys(k.split("/")[0] for r in recs for k in r["metrics"]))
        metrics = [(t, m) for t in tasks for m in ("acc", "acc_norm") if any(f"{t}/{m}" in r["metrics"] for r in recs)]
        header = ["method", *[f"{t} {m}" for t, m in metrics], "mean acc"]
        rows, rows_csv = [], []
        for r in recs:
            m = r["metrics"]
            row = [display_name(r)]
            for t, name in metrics:
                v, se = m.get(f"{t}/{name}"), m.get(f"{t}/{name}_stderr")
                row.append("—" if v is None else f"{100 * v:.1f}" + ("" if se is None else f" ± {100 * se:.1f}"))
                if v is not None:
                    rows_csv.append({"model": model, "method": display_name(r), "spec": r["method"], "task": t,
                                     "metric": name, "value": v, "stderr": se,
                                     "documents": (r.get("documents") or {}).get(t), "record": r["_file"]})  # fmt: skip
            accs = [m[f"{t}/acc"] for t in tasks if f"{t}/acc" in m]
            row.append(_fmt(sum(accs) / len(accs), "{:.1f}", 100) if accs else "—")
            rows.append(row)
        docs = recs[0].get("documents") or {}
        t = Table("lmeval" + _suffix(gi), f"lm-eval ({', '.join(tasks)}), {model}", header, rows, rows_csv)
        t.intro = (
            f"Accuracy in % ± lm-eval's standard error, {cfg.get('num_fewshot', 0)}-shot; *mean acc* averages acc "
            "over the tasks. Documents per task: "
            + ", ".join(f"{k} {v}" for k, v in docs.items())
            + (f" (the first {cfg['limit']} of each)" if cfg.get("limit") else "")
            + "."
        )
        tables.append(t)
    return tables


def _profile_groups(rows: list[dict[str, Any]]) -> list[tuple[tuple, list[dict[str, Any]]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    seen: set[tuple] = set()
    for r in rows:
        g = (r.get("model", "?"), r.get("device", "?"), r.get("dtype", "?"))
        cell = (*g, r["method"], r["context"], r["batch"])
        if cell in seen:  # the same setting in two files: the first file read wins
            continue
        seen.add(cell)
        groups.setdefault(g, []).append(dict(r))
    return sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))


def profile_tables(rows: list[dict[str, Any]], out: Path, reference: str = "fp16") -> list[Table]:
    from harness.profiling import add_ratios

    tables = []
    for gi, ((model, device, dtype), grp) in enumerate(_profile_groups(rows)):
        add_ratios(grp, reference)
        first_seen = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in grp))}
        grp.sort(key=lambda r: (*label_sort_key(r["method"], first_seen), r["context"], r["batch"]))
        where = f"{model}, {device}, {dtype}"
        steps = sorted({r.get("new_tokens") for r in grp if r.get("new_tokens") is not None})
        reps = sorted({r.get("repeats") for r in grp if r.get("repeats") is not None})
        conditions = (
            f"Medians over {'/'.join(map(str, reps))} timed round(s) after an untimed warm-up round, "
            f"{'/'.join(map(str, steps))} greedy decode steps per round, attention "
            f"{', '.join(sorted({str(r.get('attention')) for r in grp}))}. Each × column is the ratio to "
            f"{reference} at the same context and batch, measured in the same process."
        )

        def status_row(r: dict[str, Any], n: int) -> list[str] | None:
            if r.get("status") == "done":
                return None
            return [r["method"], str(r["context"]), str(r["batch"]), f"**{r.get('status')}**"] + ["—"] * (n - 4)

        lat_head = ["method", "context", "batch", "prefill ms", f"× {reference}", "decode ms/step",
                    f"× {reference}", "tokens/s", f"× {reference}", "router ms (prefill / step)"]  # fmt: skip
        mem_head = ["method", "context", "batch", "KV MiB", f"× {reference}", "read MiB/step", f"× {reference}",
                    "peak MiB", f"× {reference}", "nominal bits", "effective bits", "added params"]  # fmt: skip
        lat, mem, lat_csv, mem_csv = [], [], [], []
        for r in grp:
            base = {"model": model, "device": device, "dtype": dtype, "method": r["method"],
                    "context": r["context"], "batch": r["batch"], "status": r.get("status")}  # fmt: skip
            trace = {"record": r["_file"], "row": r["_row"]}
            lat_csv.append({**base, **{k: r.get(k) for k in ("prefill_s", "prefill_s_ratio", "decode_step_s",
                           "decode_step_s_ratio", "decode_tokens_per_s", "decode_tokens_per_s_ratio",
                           "own_prefill_s", "own_decode_step_s", "new_tokens", "repeats")}, **trace})  # fmt: skip
            mem_csv.append({**base, **{k: r.get(k) for k in ("kv_bytes", "kv_bytes_ratio", "kv_read_bytes_per_step",
                           "kv_read_bytes_per_step_ratio", "peak_bytes", "peak_bytes_ratio", "peak_kind",
                           "nominal_bits", "effective_bits", "method_parameters", "model_parameters")},
                            **trace})  # fmt: skip
            bad = status_row(r, len(lat_head))
            if bad:
                lat.append(bad)
                mem.append(status_row(r, len(mem_head)))
                continue
            own = r.get("own_prefill_s")
            lat.append([
                r["method"], str(r["context"]), str(r["batch"]),
                _fmt(r.get("prefill_s"), "{:.1f}", 1e3), _fmt(r.get("prefill_s_ratio"), "{:.3f}"),
                _fmt(r.get("decode_step_s"), "{:.2f}", 1e3), _fmt(r.get("decode_step_s_ratio"), "{:.3f}"),
                _fmt(r.get("decode_tokens_per_s"), "{:.1f}"), _fmt(r.get("decode_tokens_per_s_ratio"), "{:.3f}"),
                "—" if own is None else f"{1e3 * own:.1f} / {1e3 * (r.get('own_decode_step_s') or 0):.2f}",
            ])  # fmt: skip
            params, total = r.get("method_parameters") or 0, r.get("model_parameters") or 0
            mem.append([
                r["method"], str(r["context"]), str(r["batch"]),
                _fmt(r.get("kv_bytes"), "{:.2f}", 2**-20), _fmt(r.get("kv_bytes_ratio"), "{:.3f}"),
                _fmt(r.get("kv_read_bytes_per_step"), "{:.2f}", 2**-20),
                _fmt(r.get("kv_read_bytes_per_step_ratio"), "{:.3f}"),
                _fmt(r.get("peak_bytes"), "{:.1f}", 2**-20), _fmt(r.get("peak_bytes_ratio"), "{:.3f}"),
                _fmt(r.get("nominal_bits")), _fmt(r.get("effective_bits")),
                f"{params:,} ({100 * params / total:.3f} %)" if params and total else "0",
            ])  # fmt: skip
        sfx = _suffix(gi)
        t_lat = Table("profile-latency" + sfx, f"Profile, latency: {where}", lat_head, lat, lat_csv, numeric_from=1)
        t_lat.intro = conditions + " *router ms*: time inside MoQAE's routers (included in the figures)."
        t_mem = Table("profile-memory" + sfx, f"Profile, memory: {where}", mem_head, mem, mem_csv, numeric_from=1)
        peak = ", ".join(sorted({str(r.get("peak_kind")) for r in grp if r.get("peak_kind")}))
        t_mem.intro = (
            "*KV MiB*: bytes the cache held after prefill and decode; *read MiB/step*: bytes the last decode "
            f"step read from it; *peak MiB*: peak memory above the weights ({peak}); *added params*: "
            "parameters the method adds to the model (MoQAE's routers)."
        )
        done = [r for r in grp if r.get("status") == "done"]
        if len({r["context"] for r in done}) > 1:
            title = f"{model}, {device}, {dtype}"
            p = plot_kv_memory(done, out / f"kv_memory_vs_context{sfx}.png", title)
            t_mem.plots.append((p, f"KV cache memory against context length ({title})"))
            p = plot_latency(done, out / f"latency_vs_context{sfx}.png", title)
            t_lat.plots.append((p, f"Prefill and decode latency against context length ({title})"))
        else:
            t_mem.notes.append("One context length only: no plot against context length.")
        tables += [t_lat, t_mem]
    return tables


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
        rows.append([r["model"], display_name(r), r["task"], _fmt(lam, "{:g}"), _fmt(r["kv"]["nominal_bits"]),
                     *[_fmt(s, "{:.1f} %", 100) for s in shares]])  # fmt: skip
        for e, s in zip(expert_labels(r), shares, strict=False):
            rows_csv.append({"model": r["model"], "method": display_name(r), "spec": r["method"], "task": r["task"],
                             "lambda": lam, "expert": e, "share": s, "record": r["_file"]})  # fmt: skip
    t = Table("moqae-shares", "MoQAE: share of chunks per expert (all layers)", head, rows, rows_csv, numeric_from=3)
    t.intro = "The share of all routed and frozen chunks of all layers that each expert stored."
    tables.append(t)

    wt = [r for r in moq if r["key"]["task"] == "wikitext2"]
    groups = _group(wt, lambda r: (_column(r), task_config(r)))
    fp16 = {
        (_column(r), json.dumps(task_config(r), sort_keys=True)): r
        for r in records
        if r["key"]["method"] == "fp16" and r["key"]["task"] == "wikitext2"
    }
    for gi, ((col, cfg), recs) in enumerate(groups):
        sfx = _suffix(gi)
        where = f"{col[0]}, {_wikitext_protocol(cfg, recs)}"
        # per-layer shares: one column per record
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
        heat = plot_expert_heatmap(recs, out / f"expert_share_heatmap{sfx}.png", col[0])
        t.plots.append((heat, f"MoQAE expert share per layer ({col[0]})"))
        sweep = sorted((r for r in recs if not moqae_variant(r)), key=method_sort_key)
        if len(sweep) >= 2:
            ref = fp16.get((col, json.dumps(cfg, sort_keys=True)))
            p = plot_lambda_tradeoff(sweep, ref, out / f"moqae_lambda_tradeoff{sfx}.png", col[0])
            t.plots.append((p, f"MoQAE λ trade-off: perplexity and KV bits against λ ({col[0]})"))
        tables.append(t)

        # ablation: variants of one λ beside the default configuration of that λ
        ref = fp16.get((col, json.dumps(cfg, sort_keys=True)))
        by_lam: dict[float, list[dict[str, Any]]] = {}
        for r in recs:
            by_lam.setdefault(_num((r["key"].get("method_config") or {}).get("lam")), []).append(r)
        rows, rows_csv = [], []
        for lam, group in sorted(by_lam.items()):
            if not any(moqae_variant(r) for r in group):
                continue
            group.sort(key=lambda r: (bool(moqae_variant(r)), _variant_order(moqae_variant(r))))
            for r in group:
                variant = moqae_variant(r)
                what = describe_variant(variant) if variant else "full MoQAE (chunk 32, RF, RS = 3)"
                ppl = r["metrics"]["ppl"]
                delta = 100 * (ppl / ref["metrics"]["ppl"] - 1) if ref else None
                shares = expert_shares(r) or []
                rows.append([f"{lam:g}", what, display_name(r), _fmt(ppl, "{:.4f}"), _fmt(delta, "{:+.1f} %"),
                             _fmt(r["kv"]["nominal_bits"]), _fmt(r["kv"]["effective_bits"]),
                             f"{r['kv']['total_bytes']:,}", " / ".join(f"{100 * s:.1f}" for s in shares)])  # fmt: skip
                rows_csv.append({"model": r["model"], "lambda": lam, "variant": what, "method": display_name(r),
                                 "spec": r["method"], "ppl": ppl, "ppl_vs_fp16_percent": delta,
                                 "nominal_bits": r["kv"]["nominal_bits"], "effective_bits": r["kv"]["effective_bits"],
                                 "kv_bytes": r["kv"]["total_bytes"], "shares": " / ".join(f"{s:.4f}" for s in shares),
                                 "record": r["_file"]})  # fmt: skip
        if rows:
            head = ["λ", "variant", "method", "PPL", "vs fp16", "nominal bits", "effective bits", "KV bytes",
                    f"shares % {' / '.join(labels)}"]  # fmt: skip
            t = Table(f"moqae-ablation{sfx}", f"MoQAE ablation ({where})", head, rows, rows_csv, numeric_from=3)
            t.intro = (
                "Each variant changes one part of MoQAE at the same λ: routing freezing (RF: the first chunk "
                "kept FP16), routing sharing (RS: layers in groups reuse the leader's decision), the chunk size."
                + ("" if ref else " No fp16 record with this protocol: no *vs fp16* column.")
            )
            tables.append(t)
    return tables


def failed_table(failed: list[dict[str, Any]]) -> Table | None:
    if not failed:
        return None
    rows, rows_csv = [], []
    for r in sorted(failed, key=lambda r: (r.get("model", ""), r.get("task", ""), r.get("method", ""))):
        reason = " ".join(str(r.get("reason", "")).split())
        rows.append([r.get("model", "?"), r.get("method", "?"), r.get("task", "?"), reason[:200]])
        rows_csv.append({"model": r.get("model"), "method": r.get("method"), "task": r.get("task"),
                         "reason": reason, "record": r["_file"]})  # fmt: skip
    return Table("failed", "Failed cells", ["model", "method", "task", "reason"], rows, rows_csv, numeric_from=4)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # SVG text stays text: smaller, searchable, faster to write
    return plt


def _save(fig, path: Path) -> Path:
    """PNG and SVG beside it; returns the PNG path."""
    png = path.with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=130, bbox_inches="tight")
    fig.savefig(png.with_suffix(".svg"), bbox_inches="tight")
    _plt().close(fig)
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
    merged: dict[tuple[float, float], list[str]] = {}  # coincident points (e.g. fp16 and alignedkv): one label
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
    records: list[dict[str, Any]], path: Path, title: str = "", names=lambda r: r["method"]
) -> Path | None:
    """Perplexity against nominal KV bits, one marker per record, MoQAE points joined by bits, the
    Pareto frontier (dashed, ringed points) marked.

    Left: every point (log PPL), the zoomed region outlined. Right: a zoom on the points within 20 %
    of the best PPL at <= 8 bits, where the 4-bit methods crowd together."""
    plt = _plt()
    pts = [
        (r["kv"]["nominal_bits"], r["metrics"]["ppl"], names(r), family(r["method"]))
        for r in records
        if "ppl" in r.get("metrics", {}) and r["kv"]["nominal_bits"] <= 16
    ]
    if not pts:
        return None
    best = min(p[1] for p in pts)
    zoom = [p for p in pts if p[1] <= 1.2 * best and p[0] <= 8]
    front = [pts[i] for i in pareto_front([(p[0], p[1]) for p in pts])]
    panels = 2 if len(zoom) >= 2 and len(zoom) < len(pts) else 1
    fig, axes = plt.subplots(1, panels, figsize=(7.2 * panels, 5.4), squeeze=False)
    axes = axes[0]
    for i, ax in enumerate(axes):
        sel_pts = pts if i == 0 else zoom
        for fam in [f for f in MARKERS if any(p[3] == f for p in sel_pts)]:
            sel = sorted((p for p in sel_pts if p[3] == fam), key=lambda p: p[0])
            ax.plot([p[0] for p in sel], [p[1] for p in sel], linestyle="-" if fam == "MoQAE" else "",
                    marker=MARKERS[fam], color=COLORS[fam], markersize=7, label=fam, zorder=3)  # fmt: skip
        fr = [p for p in front if p in sel_pts]
        ring = {"marker": "o", "markersize": 13, "markerfacecolor": "none", "markeredgecolor": "k"}
        ax.plot([p[0] for p in fr], [p[1] for p in fr], ls="--", color="0.25", lw=1, zorder=2, label="Pareto frontier",
                **ring)  # fmt: skip
        ax.set_xlabel("nominal KV bits per element (bits)")
        ax.grid(True, which="both", alpha=0.3)
        ax.margins(x=0.12, y=0.12)
        if i == 0:
            ax.margins(x=0.2)  # room for the names of the points at the edges (fp16 at 16 bits)
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_ylabel("WikiText-2 perplexity (log scale)")
            ax.set_title("all methods", fontsize=10)
        else:
            ax.set_ylabel("WikiText-2 perplexity")
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
    return _save(fig, path)


def _context_axis(ax, contexts: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.grid(alpha=0.3)


def _method_lines(ax, rows: list[dict[str, Any]], key: str, scale: float) -> None:
    batch = min(r["batch"] for r in rows)
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["context"], r[key] * scale) for r in rows if r["method"] == m and r["batch"] == batch
                     and r.get(key) is not None)  # fmt: skip
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=MARKERS[family(m)], color=None, label=m)


def plot_kv_memory(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    _method_lines(ax, rows, "kv_bytes", 2**-20)
    _context_axis(ax, sorted({r["context"] for r in rows}))
    ax.set_ylim(bottom=0)
    ax.set_ylabel("KV cache held (MiB)")
    batch = min(r["batch"] for r in rows)
    ax.set_title(f"KV memory against context length ({title}, batch {batch})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return _save(fig, path)


def plot_latency(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    contexts = sorted({r["context"] for r in rows})
    panels = (("prefill_s", "prefill latency (ms)"), ("decode_step_s", "decode latency (ms / step)"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        _method_lines(ax, rows, key, 1e3)
        _context_axis(ax, contexts)
        ax.set_ylim(bottom=0)
        ax.set_ylabel(label)
    batch = min(r["batch"] for r in rows)
    fig.suptitle(f"Latency against context length ({title}, batch {batch})", fontsize=10)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return _save(fig, path)


def plot_lambda_tradeoff(sweep: list[dict[str, Any]], fp16: dict[str, Any] | None, path: Path, title: str) -> Path:
    """PPL (left axis) and nominal / effective KV bits (right axis) against the router's λ."""
    plt = _plt()
    sweep = sorted(sweep, key=lambda r: _num(r["key"]["method_config"].get("lam")))
    lam = [_num(r["key"]["method_config"].get("lam")) for r in sweep]
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    h = ax.plot(lam, [r["metrics"]["ppl"] for r in sweep], marker="o", color="C3", label="MoQAE perplexity")
    if fp16:
        h += [ax.axhline(fp16["metrics"]["ppl"], ls="--", color="C3", alpha=0.5, lw=1, label="fp16 perplexity")]
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
    return _save(fig, path)


def plot_expert_heatmap(records: list[dict[str, Any]], path: Path, title: str) -> Path:
    """One panel per MoQAE record: layers along x, experts along y, colour = share of the layer's
    chunks that expert stored."""
    plt = _plt()
    import numpy as np

    recs = sorted(records, key=lambda r: (bool(moqae_variant(r)), method_sort_key(r)))  # the λ sweep first
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
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _where(sources: list[str | Path]) -> str:
    """The folders read: given folders as they are, given files by their folder (with a count)."""
    dirs: dict[str, int] = {}
    for src in sources:
        p = Path(src)
        key = _shown_path(p) if p.is_dir() else _shown_path(p.parent)
        dirs[key] = dirs.get(key, 0) + (0 if p.is_dir() else 1)
    return ", ".join(f"`{d}`" + (f" ({n} files)" if n > 1 else "") for d, n in dirs.items())


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def environment_section(res: Results) -> str:
    from harness.env import git_commit

    recs = res.records + res.failed
    lines = ["## Environment", ""]
    if recs:
        devices = Counter()
        for r in recs:
            hw = (r.get("environment") or {}).get("hardware") or {}
            dev = hw.get("gpu") if str(hw.get("device", "")).startswith("cuda") else "CPU"
            devices[f"{hw.get('device', '?')}: {dev}, {hw.get('cpu_count', '?')} CPU cores, "
                    f"{hw.get('torch_threads', '?')} torch threads, {hw.get('platform', '?')}"] += 1  # fmt: skip
        lines += ["Devices of the run records:", ""]
        lines += [f"- {d} ({n} records)" for d, n in devices.most_common()]
        versions: dict[str, Counter] = {}
        for r in recs:
            env = r.get("environment") or {}
            versions.setdefault("python", Counter())[env.get("python")] += 1
            for pkg, v in (env.get("versions") or {}).items():
                versions.setdefault(pkg, Counter())[v] += 1
        lines += ["", "| package | version (records) |", "|---|---|"]
        for pkg, cnt in versions.items():
            lines.append(f"| {pkg} | " + ", ".join(f"{v or '—'} ({n})" for v, n in cnt.most_common()) + " |")
        commits = Counter((r.get("environment") or {}).get("git_commit", "?") for r in recs)
        lines += ["", "Commits of the harness that made the records: "
                  + ", ".join(f"`{c}` ({n})" for c, n in commits.most_common()) + "."]  # fmt: skip
    prof = Counter(f"{r.get('device', '?')}, {r.get('dtype', '?')}" for r in res.profile_rows)
    if prof:
        lines += [
            "",
            "Devices of the profile rows: " + "; ".join(f"{d} ({n} rows)" for d, n in prof.most_common()) + ".",
        ]
    lines += ["", f"This report: written {datetime.now(UTC).isoformat(timespec='seconds')} by harness commit "
              f"`{git_commit()}`.", ""]  # fmt: skip
    return "\n".join(lines)


def write_report(
    sources: Iterable[str | Path], out_dir: str | Path, title: str = "", command: str | None = None
) -> list[Path]:
    """Every table and plot of the records and profile files under ``sources`` into ``out_dir``
    (see the module docstring); returns the files written, ``README.md`` first."""
    from harness.runner import invocation

    sources = list(sources)
    res = load_results(sources)
    if not res.records and not res.profile_rows:
        raise ValueError(f"no finished run records or profile rows in {', '.join(map(str, sources))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = command or invocation()
    written: list[Path] = []

    ppl = perplexity_tables(res.records, out)
    published_text, published = published_block()
    sections: list[tuple[str, list[Table], str]] = [
        ("Perplexity (WikiText-2)", ppl, ""),
        ("Published figures: MoQAE paper", [published] if published else [], published_text),
        ("LongBench", longbench_tables(res.records), ""),
        ("lm-eval", lmeval_tables(res.records), ""),
        ("Profiling", profile_tables(res.profile_rows, out), ""),
        ("MoQAE: expert shares, λ trade-off, ablation", moqae_tables(res.records, out), ""),
    ]
    failed = failed_table(res.failed)
    if failed:
        sections.append(("Failed cells", [failed], "Cells that ran and failed, with the reason recorded."))

    n_profile_files = len({r["_file"] for r in res.profile_rows})
    parts = [
        f"# {title or 'Results'}",
        "",
        f"Written by the command below from {len(res.records)} finished run records"
        + (f", {len(res.failed)} failed ones" if res.failed else "")
        + (
            f" and {len(res.profile_rows)} profile rows ({_plural(n_profile_files, 'file')})"
            if res.profile_rows
            else ""
        )
        + f" under {_where(sources)}. Do not edit by hand: re-run "
        "the command. Every number is in a CSV file whose `record` column names the record it comes from.",
        "",
        "    " + command,
        "",
        "## Contents",
        "",
    ]
    for name, tables, text in sections:
        if tables or text:
            parts.append(f"- [{name}](#{_anchor(name)})")
            parts += [f"  - [{t.title}](#{_anchor(t.title)})" for t in tables]
    parts += ["- [Environment](#environment)", "- [Records and commands](#records-and-commands)", ""]
    for name, tables, text in sections:
        if not tables and not text:
            continue
        parts += [f"## {name}", ""]
        if text:
            parts += [text, ""]
        for t in tables:
            parts += [t.section(), ""]
            written += t.write(out)
            written += [p for png, _ in t.plots for p in (png, png.with_suffix(".svg"))]
    missing = [n for n, tables, text in sections if not tables and not text]
    if missing:
        parts += ["No records for: " + ", ".join(missing) + ".", ""]
    parts.append(environment_section(res))
    commands = sorted({normalize_command(r.get("command", "")) for r in res.records + res.failed} - {""})
    parts += ["## Records and commands", "", "Commands that made the run records:", ""]
    parts += [f"    {c}" for c in commands] + [""]
    if res.profile_commands:
        parts += ["Commands that made the profile files:", ""]
        parts += [f"    {c}" for c in sorted(set(res.profile_commands))] + [""]
    if res.notes:
        parts += ["Files read but not used:", ""] + [f"- {n}" for n in res.notes] + [""]
    readme = out / "README.md"
    write_text_atomic(readme, "\n".join(parts))

    # the earlier compact report, kept for existing links
    run_paths = [p for p in res.run_paths if (load_record(p) or {}).get("status") == "done"]
    legacy = [f"# {title or 'Results'}", "", results_table(run_paths), ""]
    shares = shares_table(res.records)
    if shares:
        legacy += ["## MoQAE: share of chunks per expert (all layers)", "", shares, ""]
        legacy += ["## MoQAE: share of chunks per expert per layer (%, experts in config order)", ""]
        legacy += [layer_shares_table(res.records), ""]
    legacy += ["## Commands that made these records", "", *[f"    {c}" for c in commands], ""]
    write_text_atomic(out / "results.md", "\n".join(legacy))
    root = reports_root(out)
    if root is not None:
        write_index(root)
    return [readme, out / "results.md", *dict.fromkeys(written)]


# --------------------------------------------------------------------------------------------
# reports/README.md: the index of every report under a reports/ folder
# --------------------------------------------------------------------------------------------

INDEX_FIRST = "reproduce"  # the reproduce reports come first: what `nox -s reproduce` made


def reports_root(out: Path) -> Path | None:
    """The nearest folder named ``reports`` above ``out`` (``out`` excluded), or None."""
    for parent in Path(out).resolve().parents:
        if parent.name == "reports":
            return parent
    return None


def _report_summary(readme: Path) -> tuple[str, str]:
    """(title, command) of a report's README.md: its first heading and the first indented
    ``python -m harness`` line after "Written by" (else the first such line anywhere)."""
    title, command, after = "", "", False
    for line in readme.read_text(encoding="utf-8").splitlines():
        if not title and line.startswith("# "):
            title = line[2:].strip()
        if line.startswith("Written by"):
            after = True
        if line.startswith("    python -m harness") and (after or not command):
            command = line.strip()
            if after:
                break
    return title, command


def write_index(root: str | Path) -> Path:
    """``root/README.md``: one row per report folder under ``root`` (its title, link and the
    command that made it; the reproduce reports first) and one per folder of other outputs (its
    files). Rewritten whenever a report is written under ``root``; nothing in it is typed in."""
    root = Path(root)
    readmes = sorted(p for p in root.rglob("README.md") if p.parent != root)
    readmes.sort(key=lambda p: (p.relative_to(root).parts[0] != INDEX_FIRST, str(p)))
    report_dirs = {p.parent for p in readmes}
    rows = []
    for p in readmes:
        title, command = _report_summary(p)
        rel = p.relative_to(root).as_posix()
        rows.append(f"| [{p.parent.relative_to(root).as_posix()}/]({rel}) | {title} | `{command}` |" if command
                    else f"| [{p.parent.relative_to(root).as_posix()}/]({rel}) | {title} | |")  # fmt: skip
    others = []
    for d in sorted(q for q in root.rglob("*") if q.is_dir()):
        if d in report_dirs or any(r in d.parents for r in report_dirs):
            continue
        files = sorted(f for f in d.iterdir() if f.is_file())
        if files:
            links = ", ".join(f"[{f.name}]({f.relative_to(root).as_posix()})" for f in files)
            others.append(f"| {d.relative_to(root).as_posix()}/ | {links} |")
    parts = [
        "# Reports",
        "",
        "The index of the reports in this folder, rewritten by every `python -m harness report` / "
        "`reproduce` that writes under it (`harness.reports.write_index`). Each report's README.md "
        "names the records its numbers come from; `nox -s reproduce` writes `reproduce/<profile>/`.",
        "",
        "| report | title | made by |",
        "|---|---|---|",
        *rows,
        "",
    ]
    if others:
        parts += ["Other outputs (benchmark logs, scripts, reports in the earlier format):", "",
                  "| folder | files |", "|---|---|", *others, ""]  # fmt: skip
    index = root / "README.md"
    write_text_atomic(index, "\n".join(parts))
    return index
