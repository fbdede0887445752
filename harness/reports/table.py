"""Tables: one Markdown writer (``markdown_table``) for every table the harness prints or writes,
and ``Table``, one table of a report written as Markdown (README), CSV (one row per number, each
naming its record file) and LaTeX (booktabs)."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.files import write_text_atomic


def markdown_table(
    header: Sequence[str],
    rows: Sequence[Sequence[Any]],
    numeric_from: int | None = 1,
    align: Sequence[str] | None = None,
) -> str:
    """A GitHub Markdown table. Columns from ``numeric_from`` on are right-aligned (None: none is);
    ``align`` ("l" / "r" per column) overrides it. A ``|`` inside a cell is escaped."""
    n = len(header)
    if align is None:
        start = n if numeric_from is None else numeric_from
        align = ["l" if i < start else "r" for i in range(n)]
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def tex(text: Any) -> str:
    """``text`` with LaTeX's special characters escaped and ×, ±, λ, —, ≤, Δ, · as LaTeX."""
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
        return markdown_table(self.header, self.rows, self.numeric_from)

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
            " & ".join(tex(h) for h in self.header) + r" \\",
            r"\midrule",
        ]
        lines += [" & ".join(tex(c) for c in row) + r" \\" for row in self.rows]
        lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{tex(self.title)}}}", rf"\label{{tab:{label}}}"]
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
