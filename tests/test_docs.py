"""The documentation cannot drift from the repository: in README.md, CHANGELOG.md and docs/*.md,

* every relative link resolves to a file of the repository, and every ``#anchor`` to a heading of its
  target (GitHub's heading slugs);
* every Markdown table parses: a header, a ``|---|`` separator, and the header's cell count on each row
  (a blank line inside a table, or a stray ``|``, splits or breaks it on GitHub);
* every command in a fenced block that runs ``python -m harness``, ``python -m moqae`` or
  ``python -m baselines.kvtuner`` parses with that CLI's own argument parser, and the method and task
  specs it names build (registered names, known options, accepted values).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted(p for p in [ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").rglob("*.md")] if p.is_file())
FENCE = re.compile(r"^(```|~~~)")


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, line))
    return out


def fenced_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of each fenced code block."""
    blocks, current, start = [], None, 0
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.strip()):
            if current is None:
                current, start = [], n + 1
            else:
                blocks.append((start, current))
                current = None
            continue
        if current is not None:
            current.append(line)
    return blocks


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but ``-`` and ``_`` dropped, blanks -> ``-``."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.add(base if k == 0 else f"{base}-{k}")
    return out


def split_cells(row: str) -> list[str]:
    """A table row's cells: split at every ``|`` not escaped with a backslash (as GitHub does, code spans
    included), the outer pipes dropped."""
    row = row.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return re.split(r"(?<!\\)\|", row)


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_relative_links_resolve(doc):
    bad = []
    for n, line in prose_lines(doc.read_text(encoding="utf-8")):
        line = re.sub(r"`[^`]*`", "", line)  # code spans hold no links
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            dest = (doc.parent / path_part).resolve() if path_part else doc
            if not dest.exists():
                bad.append(f"{doc.name}:{n}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{doc.name}:{n}: {target} (no heading #{anchor} in {dest.name})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_tables_parse(doc):
    lines = prose_lines(doc.read_text(encoding="utf-8"))
    bad = []
    i = 0
    while i < len(lines):
        n, line = lines[i]
        if not line.lstrip().startswith("|"):
            i += 1
            continue
        block = []
        while i < len(lines) and lines[i][1].lstrip().startswith("|") and lines[i][0] == n + len(block):
            block.append(lines[i])
            i += 1
        if len(block) < 2 or not re.fullmatch(r"\s*\|?(\s*:?-{3,}:?\s*\|)+\s*:?-{0,}:?\s*\|?\s*", block[1][1]):
            bad.append(f"{doc.name}:{n}: table rows without a header and |---| separator (a blank line inside?)")
            continue
        width = len(split_cells(block[0][1]))
        for m, row in block[1:]:
            if len(split_cells(row)) != width:
                bad.append(f"{doc.name}:{m}: {len(split_cells(row))} cells, the header has {width}")
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------

CLIS = ("harness", "moqae", "baselines.kvtuner")


def commands(text: str) -> list[tuple[int, str, list[str]]]:
    """(line, CLI module, argv) of every ``python -m <cli> ...`` in the fenced blocks (continuation
    lines joined; environment assignments before it and shell operators after it left out)."""
    out = []
    for start, block in fenced_blocks(text):
        joined, first = "", None
        for k, line in enumerate(block):
            if first is None:
                first = start + k
            joined += line.rstrip()
            if joined.endswith("\\"):  # bash drops backslash-newline: the next line's own blanks separate
                joined = joined[:-1]
                continue
            try:
                words = shlex.split(joined, comments=True)
            except ValueError:
                words = []
            joined, line_no, first = "", first, None
            for i in range(len(words) - 2):
                if words[i] in ("python", "python3") and words[i + 1] == "-m" and words[i + 2] in CLIS:
                    argv = []
                    for w in words[i + 3 :]:
                        if w in ("|", "||", "&&", ";", ">", ">>", "2>&1") or w.startswith((">", "2>")):
                            break
                        if w != "...":  # an abbreviated command: what is written must parse
                            argv.append(w)
                    out.append((line_no, words[i + 2], argv))
                    break
    return out


ALL_COMMANDS = [(doc, n, cli, argv) for doc in DOCS for n, cli, argv in commands(doc.read_text(encoding="utf-8"))]


def _example_plugins() -> set[str]:
    """Method and task names the plugin examples under examples/ declare (installed by their users)."""
    names = set()
    for toml in ROOT.glob("examples/*/pyproject.toml"):
        names |= set(re.findall(r"^([\w.%-]+)\s*=\s*\"[\w.]+:\w+\"", toml.read_text(), flags=re.M))
    return names


def _parser(cli: str):
    if cli == "harness":
        from harness.cli import build_parser
    elif cli == "moqae":
        from moqae.__main__ import build_parser
    else:
        from baselines.kvtuner import build_parser
    return build_parser()


def test_the_docs_hold_commands():
    assert len(ALL_COMMANDS) >= 10 and {cli for _, _, cli, _ in ALL_COMMANDS} >= {"harness", "moqae"}


@pytest.mark.parametrize(
    ("doc", "line", "cli", "argv"),
    ALL_COMMANDS,
    ids=[f"{d.relative_to(ROOT)}:{n}" for d, n, _, _ in ALL_COMMANDS],
)
def test_command_parses_and_its_specs_build(doc, line, cli, argv, capsys):
    from harness.cli import split_specs
    from harness.evaluation import TASKS, build_task
    from harness.interface import METHODS, build_method

    where = f"{doc.name}:{line}: python -m {cli} {' '.join(argv)}"
    try:
        args = _parser(cli).parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}\n{capsys.readouterr().err.strip()} (exit {e.code})")
    plugins = _example_plugins()
    for spec in split_specs(getattr(args, "methods", None) if cli == "harness" else None, METHODS):
        if spec != "..." and spec.partition(":")[0] not in plugins:
            build_method(spec)  # MethodSpecError: an unknown name, option or value
    for spec in split_specs(getattr(args, "tasks", None) if cli == "harness" else None, TASKS):
        if spec != "...":
            build_task(spec)
    if cli == "moqae" and getattr(args, "method", None):
        build_method(args.method)
