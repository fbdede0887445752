"""``reports/README.md``: the index of every report under a ``reports/`` folder."""

from __future__ import annotations

from pathlib import Path

from harness.files import write_text_atomic
from harness.reports.table import markdown_table

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
        link = f"[{p.parent.relative_to(root).as_posix()}/]({p.relative_to(root).as_posix()})"
        rows.append([link, title, f"`{command}`" if command else ""])
    others = []
    for d in sorted(q for q in root.rglob("*") if q.is_dir()):
        if d in report_dirs or any(r in d.parents for r in report_dirs):
            continue
        files = sorted(f for f in d.iterdir() if f.is_file())
        if files:
            links = ", ".join(f"[{f.name}]({f.relative_to(root).as_posix()})" for f in files)
            others.append([f"{d.relative_to(root).as_posix()}/", links])
    parts = [
        "# Reports",
        "",
        "The index of the reports in this folder, rewritten by every `python -m harness report` / "
        "`reproduce` that writes under it (`harness.reports.write_index`). Each report's README.md "
        "names the records its numbers come from; `nox -s reproduce` writes `reproduce/<profile>/`.",
        "",
        markdown_table(["report", "title", "made by"], rows, numeric_from=None),
        "",
    ]
    if others:
        parts += ["Other outputs (benchmark logs, scripts, reports in the earlier format):", "",
                  markdown_table(["folder", "files"], others, numeric_from=None), ""]  # fmt: skip
    index = root / "README.md"
    write_text_atomic(index, "\n".join(parts))
    return index
