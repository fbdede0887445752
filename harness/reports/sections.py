"""Report sections: what a task or a method adds to a report, and the core's own sections.

A ``Section`` has a title (its ``##`` heading), an order (sections are written by it: the core's
scorecard is 0 (``harness.reports.scorecard``), profiling 50, failed cells 90; the built-in tasks and
methods use 10-60) and a
``build(data)`` that returns ``(intro text, tables)`` from the report's ``ReportData``; a section
that returns neither is listed under "No records for". ``legacy`` (optional) returns Markdown for
the compact ``results.md``. A task or method class declares its sections by name::

    report_sections = ("mypackage.report:SECTION",)

and the report collects those of the tasks and methods present in the records (a name that does
not load is a note in the report, never a crash), plus the core ones, sorted by order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.reports.methods import label_sort_key, method_class, registry_name
from harness.reports.plots import plot_against_context
from harness.reports.records import Results, fmt, suffix
from harness.reports.table import Table, markdown_table


@dataclass
class ReportData:
    """What a section builds from: the records read, where its files go, the profiles' reference."""

    results: Results
    out: Path  # the report folder: tables and plots are written here
    reference: str  # the method profile ratios are taken against where a profile file does not say

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.results.records

    @property
    def failed(self) -> list[dict[str, Any]]:
        return self.results.failed

    @property
    def profile_rows(self) -> list[dict[str, Any]]:
        return self.results.profile_rows


@dataclass(frozen=True)
class Section:
    title: str
    build: Callable[[ReportData], tuple[str, list[Table]]]
    order: int = 50
    legacy: Callable[[ReportData], str] | None = None  # Markdown for results.md ("" for nothing)
    hide_empty: bool = False  # an empty section is left out silently (not under "No records for")


def collect_sections(res: Results) -> tuple[list[Section], list[str]]:
    """The sections the tasks and methods of the records declare, then the core ones, sorted by
    order; and one note per declared section that could not be loaded."""
    from harness.evaluation import TASKS
    from harness.registry import load_object

    declared: list[tuple[str, str]] = []  # (who, "module:object")
    runs = res.records + res.failed
    for name in dict.fromkeys(r["key"]["task"] for r in runs):
        try:
            cls = TASKS.entry(name).cls
        except Exception:  # noqa: BLE001 - a task not installed: its records get no section of their own
            continue
        declared += [(f"task {name}", target) for target in getattr(cls, "report_sections", ())]
    methods = [r["key"]["method"] for r in runs] + [registry_name(r["method"]) for r in res.profile_rows]
    for name in dict.fromkeys(methods):
        cls = method_class(name)
        declared += [(f"method {name}", target) for target in getattr(cls, "report_sections", ()) or ()]
    sections: list[Section] = []
    notes: list[str] = []
    seen: set[str] = set()
    for who, target in declared:
        if target in seen:
            continue
        seen.add(target)
        try:
            obj = load_object(target)
        except Exception as e:  # noqa: BLE001 - a broken plugin section is a note, not a crash
            notes.append(f"report section `{target}` of {who} could not be loaded: {type(e).__name__}: {e}")
            continue
        if not isinstance(obj, Section):
            notes.append(f"report section `{target}` of {who} is not a harness.reports.Section; skipped")
            continue
        if obj not in sections:
            sections.append(obj)
    sections += [s for s in CORE_SECTIONS if s not in sections]
    return sorted(sections, key=lambda s: s.order), notes


# --------------------------------------------------------------------------------------------
# Core sections: profiling, failed cells (the scorecard: harness.reports.scorecard)
# --------------------------------------------------------------------------------------------


def _profile_groups(rows: list[dict[str, Any]]) -> list[tuple[tuple, list[dict[str, Any]]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    seen: set[tuple] = set()
    for r in rows:  # one group per thread count too: `profile --threads 1,2` rows are compared within a count
        g = (r.get("model", "?"), r.get("device", "?"), r.get("dtype", "?"), r.get("torch_threads") or 0)
        cell = (*g, r["method"], r["context"], r["batch"])
        if cell in seen:  # the same setting in two files: the first file read wins
            continue
        seen.add(cell)
        groups.setdefault(g, []).append(dict(r))
    return sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))


LATENCY_KEYS = ("prefill_s", "prefill_s_ratio", "decode_step_s", "decode_step_s_ratio", "decode_tokens_per_s",
                "decode_tokens_per_s_ratio", "own_prefill_s", "own_decode_step_s", "new_tokens", "repeats")  # fmt: skip
MEMORY_KEYS = ("kv_bytes", "kv_bytes_ratio", "kv_read_bytes_per_step", "kv_read_bytes_per_step_ratio", "peak_bytes",
               "peak_bytes_ratio", "peak_kind", "nominal_bits", "effective_bits", "method_parameters",
               "model_parameters")  # fmt: skip


def profile_tables(rows: list[dict[str, Any]], out: Path, reference: str) -> list[Table]:
    """Latency and memory tables per (model, device, dtype), each figure with its ratio to the
    reference method of its profile file (``reference`` where the file does not say)."""
    from harness.profiling import add_ratios

    tables = []
    groups = _profile_groups(rows)
    by_threads = len({g[3] for g, _ in groups}) > 1
    for gi, ((model, device, dtype, threads), grp) in enumerate(groups):
        ref = next((r["_reference"] for r in grp if r.get("_reference")), None) or reference
        add_ratios(grp, ref)
        first_seen = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in grp))}
        grp.sort(key=lambda r: (*label_sort_key(r["method"], first_seen), r["context"], r["batch"]))
        where = f"{model}, {device}, {dtype}" + (f", {threads} torch thread(s)" if by_threads else "")
        steps = sorted({r.get("new_tokens") for r in grp if r.get("new_tokens") is not None})
        reps = sorted({r.get("repeats") for r in grp if r.get("repeats") is not None})
        conditions = (
            f"Medians over {'/'.join(map(str, reps))} timed round(s) after an untimed warm-up round, "
            f"{'/'.join(map(str, steps))} greedy decode steps per round, attention "
            f"{', '.join(sorted({str(r.get('attention')) for r in grp}))}. Each × column is the ratio to "
            f"{ref} at the same context and batch, measured in the same process."
        )

        def status_row(r: dict[str, Any], n: int) -> list[str] | None:
            if r.get("status") == "done":
                return None
            return [r["method"], str(r["context"]), str(r["batch"]), f"**{r.get('status')}**"] + ["—"] * (n - 4)

        lat_head = ["method", "context", "batch", "prefill ms", f"× {ref}", "decode ms/step", f"× {ref}",
                    "tokens/s", f"× {ref}", "own ms (prefill / step)"]  # fmt: skip
        mem_head = ["method", "context", "batch", "KV MiB", f"× {ref}", "read MiB/step", f"× {ref}",
                    "peak MiB", f"× {ref}", "nominal bits", "effective bits", "added params"]  # fmt: skip
        lat, mem, lat_csv, mem_csv = [], [], [], []
        for r in grp:
            base = {"model": model, "device": device, "dtype": dtype, "method": r["method"],
                    "context": r["context"], "batch": r["batch"], "status": r.get("status")}  # fmt: skip
            trace = {"record": r["_file"], "row": r["_row"]}
            lat_csv.append({**base, **{k: r.get(k) for k in LATENCY_KEYS}, **trace})
            mem_csv.append({**base, **{k: r.get(k) for k in MEMORY_KEYS}, **trace})
            bad = status_row(r, len(lat_head))
            if bad:
                lat.append(bad)
                mem.append(status_row(r, len(mem_head)))
                continue
            own = r.get("own_prefill_s")
            lat.append([
                r["method"], str(r["context"]), str(r["batch"]),
                fmt(r.get("prefill_s"), "{:.1f}", 1e3), fmt(r.get("prefill_s_ratio"), "{:.3f}"),
                fmt(r.get("decode_step_s"), "{:.2f}", 1e3), fmt(r.get("decode_step_s_ratio"), "{:.3f}"),
                fmt(r.get("decode_tokens_per_s"), "{:.1f}"), fmt(r.get("decode_tokens_per_s_ratio"), "{:.3f}"),
                "—" if own is None else f"{1e3 * own:.1f} / {1e3 * (r.get('own_decode_step_s') or 0):.2f}",
            ])  # fmt: skip
            params, total = r.get("method_parameters") or 0, r.get("model_parameters") or 0
            mem.append([
                r["method"], str(r["context"]), str(r["batch"]),
                fmt(r.get("kv_bytes"), "{:.2f}", 2**-20), fmt(r.get("kv_bytes_ratio"), "{:.3f}"),
                fmt(r.get("kv_read_bytes_per_step"), "{:.2f}", 2**-20),
                fmt(r.get("kv_read_bytes_per_step_ratio"), "{:.3f}"),
                fmt(r.get("peak_bytes"), "{:.1f}", 2**-20), fmt(r.get("peak_bytes_ratio"), "{:.3f}"),
                fmt(r.get("nominal_bits")), fmt(r.get("effective_bits")),
                f"{params:,} ({100 * params / total:.3f} %)" if params and total else "0",
            ])  # fmt: skip
        sfx = suffix(gi)
        t_lat = Table("profile-latency" + sfx, f"Profile, latency: {where}", lat_head, lat, lat_csv, numeric_from=1)
        t_lat.intro = (
            conditions + " *own ms*: time inside the method's own parts where it times them (a router), "
            "included in the figures."
        )
        t_mem = Table("profile-memory" + sfx, f"Profile, memory: {where}", mem_head, mem, mem_csv, numeric_from=1)
        peak = ", ".join(sorted({str(r.get("peak_kind")) for r in grp if r.get("peak_kind")}))
        t_mem.intro = (
            "*KV MiB*: bytes the cache held after prefill and decode; *read MiB/step*: bytes the last decode "
            f"step read from it; *peak MiB*: peak memory above the weights ({peak}); *added params*: "
            "parameters the method adds to the model (a router's weights)."
        )
        done = [r for r in grp if r.get("status") == "done"]
        if len({r["context"] for r in done}) > 1:
            p = plot_against_context(done, out / f"kv_memory_vs_context{sfx}.png", ["kv_bytes"],
                                     "KV memory against context length", where)  # fmt: skip
            t_mem.plots.append((p, f"KV cache memory against context length ({where})"))
            p = plot_against_context(done, out / f"latency_vs_context{sfx}.png", ["prefill_s", "decode_step_s"],
                                     "Latency against context length", where)  # fmt: skip
            t_lat.plots.append((p, f"Prefill and decode latency against context length ({where})"))
        else:
            t_mem.notes.append("One context length only: no plot against context length.")
        tables += [t_lat, t_mem]
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


def _profiling(data: ReportData) -> tuple[str, list[Table]]:
    return "", profile_tables(data.profile_rows, data.out, data.reference)


def _failed(data: ReportData) -> tuple[str, list[Table]]:
    table = failed_table(data.failed)
    return ("Cells that ran and failed, with the reason recorded.", [table]) if table else ("", [])


PROFILING = Section("Profiling", _profiling, order=50)
FAILED = Section("Failed cells", _failed, order=90, hide_empty=True)

from harness.reports.scorecard import SCORECARD  # noqa: E402 - it builds on Section and _profile_groups above

CORE_SECTIONS = (SCORECARD, PROFILING, FAILED)


# --------------------------------------------------------------------------------------------
# The environment the records came from (always written, after the sections)
# --------------------------------------------------------------------------------------------


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
        rows = [[pkg, ", ".join(f"{v or '—'} ({n})" for v, n in cnt.most_common())] for pkg, cnt in versions.items()]
        lines += ["", markdown_table(["package", "version (records)"], rows, numeric_from=None)]
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
