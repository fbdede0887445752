"""Reports from run records and profile files: every table and plot, traceable to its record file.

``python -m harness report RESULTS_DIR [--results DIR ...] --out reports/X`` reads every JSON file
under the given folders (recursively): run records of any task (``python -m harness run``; failed
ones are listed with their reasons) and profile files (``python -m harness profile --out X.json``
or ``python -m harness reproduce``: ``{"command", "rows"}`` with one row per method, context and
batch; rows of the older format, without ``context``, are skipped with a note). Nothing is typed in.
Into ``--out`` it writes:

* ``README.md`` — the index: each section's tables in Markdown with links to their CSV and LaTeX
  copies and to their plots, the environment the records came from (devices, library versions,
  commits), the commands that made the records and the command that made the report;
* ``<table>.csv`` (one row per number, with a ``record`` column naming the record file it comes
  from) and ``<table>.tex`` (booktabs) for every table;
* ``<plot>.png`` and ``<plot>.svg`` for every plot;
* ``results.md`` (the compact table of every record, and what sections add to it; kept for
  existing links).

The core names no method and no task. Its own sections are profiling (latency and memory, each
figure with its ratio to the profile's reference method) and failed cells; every other section is
declared by the task and method classes of the records (``report_sections``, see
``harness.reports.sections``), and rows are named, ordered and drawn as their method's class says
(``harness.reports.methods``). Modules: ``records`` (reading, grouping), ``table`` (``Table``,
``markdown_table``), ``plots``, ``methods``, ``sections``, ``index`` (``reports/README.md``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from harness.files import write_text_atomic
from harness.reports.index import reports_root, write_index
from harness.reports.methods import (
    ablation_options,
    display_name,
    families_in_order,
    family,
    family_styles,
    label_sort_key,
    method_class,
    method_sort_key,
    method_style,
    registry_name,
)
from harness.reports.plots import place_labels, plot_against_context, plot_ppl_vs_bits, pyplot, save_figure
from harness.reports.records import (
    Results,
    column,
    column_labels,
    done_records,
    fmt,
    group_records,
    json_files,
    load_results,
    num,
    pareto_front,
    plural,
    record_paths,
    shown_path,
    slug,
    suffix,
    task_config,
)
from harness.reports.sections import (
    CORE_SECTIONS,
    ReportData,
    Section,
    collect_sections,
    environment_section,
    failed_table,
    profile_tables,
)
from harness.reports.table import Table, markdown_table
from harness.runner import load_record, normalize_command

__all__ = [
    "CORE_SECTIONS", "ReportData", "Results", "Section", "Table", "ablation_options", "collect_sections", "column",
    "column_labels", "display_name", "done_records", "environment_section", "failed_table", "families_in_order",
    "family", "family_styles", "fmt", "group_records", "json_files", "label_sort_key", "load_results",
    "markdown_table", "method_class", "method_sort_key", "method_style", "num", "pareto_front", "place_labels",
    "plot_against_context", "plot_ppl_vs_bits", "plural", "profile_tables", "pyplot", "record_paths",
    "registry_name", "reports_root", "save_figure", "shown_path", "slug", "suffix", "task_config", "write_index",
    "write_report",
]  # fmt: skip


def _where(sources: list[str | Path]) -> str:
    """The folders read: given folders as they are, given files by their folder (with a count)."""
    dirs: dict[str, int] = {}
    for src in sources:
        p = Path(src)
        key = shown_path(p) if p.is_dir() else shown_path(p.parent)
        dirs[key] = dirs.get(key, 0) + (0 if p.is_dir() else 1)
    return ", ".join(f"`{d}`" + (f" ({n} files)" if n > 1 else "") for d, n in dirs.items())


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def write_report(
    sources: Iterable[str | Path],
    out_dir: str | Path,
    title: str = "",
    command: str | None = None,
    reference: str | None = None,
) -> list[Path]:
    """Every section's tables and plots of the records and profile files under ``sources`` into
    ``out_dir`` (see the module docstring); returns the files written, ``README.md`` first.
    ``reference``: the method profile ratios are taken against where a profile file does not
    name one (default ``harness.builtins.REFERENCE_METHOD``)."""
    from harness.builtins import REFERENCE_METHOD
    from harness.runner import invocation, results_table

    sources = list(sources)
    res = load_results(sources)
    if not res.records and not res.profile_rows:
        raise ValueError(f"no finished run records or profile rows in {', '.join(map(str, sources))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = command or invocation()
    data = ReportData(res, out, reference or REFERENCE_METHOD)
    written: list[Path] = []

    declared, section_notes = collect_sections(res)
    res.notes += section_notes
    built: list[tuple[Section, str, list[Table]]] = []
    for s in declared:
        text, tables = s.build(data)
        built.append((s, text, list(tables)))

    n_profile_files = len({r["_file"] for r in res.profile_rows})
    parts = [
        f"# {title or 'Results'}",
        "",
        f"Written by the command below from {len(res.records)} finished run records"
        + (f", {len(res.failed)} failed ones" if res.failed else "")
        + (f" and {len(res.profile_rows)} profile rows ({plural(n_profile_files, 'file')})" if res.profile_rows else "")
        + f" under {_where(sources)}. Do not edit by hand: re-run "
        "the command. Every number is in a CSV file whose `record` column names the record it comes from.",
        "",
        "    " + command,
        "",
        "## Contents",
        "",
    ]
    for s, text, tables in built:
        if tables or text:
            parts.append(f"- [{s.title}](#{_anchor(s.title)})")
            parts += [f"  - [{t.title}](#{_anchor(t.title)})" for t in tables]
    parts += ["- [Environment](#environment)", "- [Records and commands](#records-and-commands)", ""]
    for s, text, tables in built:
        if not tables and not text:
            continue
        parts += [f"## {s.title}", ""]
        if text:
            parts += [text, ""]
        for t in tables:
            parts += [t.section(), ""]
            written += t.write(out)
            written += [p for png, _ in t.plots for p in (png, png.with_suffix(".svg"))]
    missing = [s.title for s, text, tables in built if not tables and not text and not s.hide_empty]
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

    # the earlier compact report, kept for existing links; sections may add to it
    run_paths = [p for p in res.run_paths if (load_record(p) or {}).get("status") == "done"]
    legacy = [f"# {title or 'Results'}", "", results_table(run_paths), ""]
    for s in declared:
        extra = s.legacy(data) if s.legacy else ""
        if extra:
            legacy += [extra, ""]
    legacy += ["## Commands that made these records", "", *[f"    {c}" for c in commands], ""]
    write_text_atomic(out / "results.md", "\n".join(legacy))
    root = reports_root(out)
    if root is not None:
        write_index(root)
    return [readme, out / "results.md", *dict.fromkeys(written)]
