"""The documentation cannot drift from the repository: in README.md, CHANGELOG.md and docs/*.md,

* every relative link resolves to a file of the repository, and every ``#anchor`` to a heading of its
  target (GitHub's heading slugs);
* every Markdown table parses: a header, a ``|---|`` separator, and the header's cell count on each row
  (a blank line inside a table, or a stray ``|``, splits or breaks it on GitHub);
* every command in a fenced block that runs ``python -m harness``, ``python -m moqae`` or
  ``python -m baselines.kvtuner`` parses with that CLI's own argument parser, and the method and task
  specs it names build (registered names, known options, accepted values);
* README.md stays a front door (at most ``README_MAX_LINES`` lines), and README.md and docs/ name no
  tracker issue ("issue 16", ``results/issue2``): a reader cannot open those.

Each check is a function from a file or its text to a list of problems (empty: fine), so the tests
at the end can plant each kind of error in a temporary file and see it reported.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted(p for p in [README, ROOT / "CHANGELOG.md", *(ROOT / "docs").rglob("*.md")] if p.is_file())
FRONT = [p for p in DOCS if p.name != "CHANGELOG.md"]  # the pages that say what is true now
FENCE = re.compile(r"^(```|~~~)")
README_MAX_LINES = 300
ISSUE = re.compile(r"\bissue[\s_#-]*\d+|\bissues\s+#\d+", re.IGNORECASE)
CLIS = ("harness", "moqae", "baselines.kvtuner")


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


# --------------------------------------------------------------------------------------------
# The checks: a file or its text in, problems out
# --------------------------------------------------------------------------------------------


def link_problems(doc: Path) -> list[str]:
    """Relative links of ``doc`` whose file does not exist, or whose ``#anchor`` is no heading there."""
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
    return bad


def table_problems(text: str, name: str = "") -> list[str]:
    """Tables without a header and ``|---|`` separator, and rows whose cell count is not the header's."""
    lines = prose_lines(text)
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
            bad.append(f"{name}:{n}: table rows without a header and |---| separator (a blank line inside?)")
            continue
        width = len(split_cells(block[0][1]))
        for m, row in block[1:]:
            if len(split_cells(row)) != width:
                bad.append(f"{name}:{m}: {len(split_cells(row))} cells, the header has {width}")
    return bad


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


def command_problem(cli: str, argv: list[str]) -> str | None:
    """Why ``python -m <cli> <argv>`` would be refused (the parser's error line, or the spec that does not
    build), or None."""
    from harness.cli import split_specs
    from harness.evaluation import TASKS, build_task
    from harness.interface import METHODS, build_method

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = _parser(cli).parse_args(argv)
    except SystemExit as e:
        return f"{err.getvalue().strip()} (exit {e.code})"
    plugins = _example_plugins()
    try:
        for spec in split_specs(getattr(args, "methods", None) if cli == "harness" else None, METHODS):
            if spec != "..." and spec.partition(":")[0] not in plugins:
                build_method(spec)  # MethodSpecError: an unknown name, option or value
        for spec in split_specs(getattr(args, "tasks", None) if cli == "harness" else None, TASKS):
            if spec != "...":
                build_task(spec)
        if cli == "moqae" and getattr(args, "method", None):
            build_method(args.method)
    except Exception as e:  # noqa: BLE001 - any refusal of a spec is the problem to report
        return f"{type(e).__name__}: {e}"
    return None


def command_problems(text: str, name: str = "") -> list[str]:
    """Every documented command that its CLI would refuse, with its line and the reason."""
    bad = []
    for n, cli, argv in commands(text):
        why = command_problem(cli, argv)
        if why:
            bad.append(f"{name}:{n}: python -m {cli} {' '.join(argv)}\n  {why}")
    return bad


def issue_problems(text: str, name: str = "") -> list[str]:
    """Lines that name a tracker issue ("issue 16", "issue 18's targets", ``results/issue2``)."""
    return [f"{name}:{n}: {m.group(0)!r}" for n, line in enumerate(text.splitlines(), 1) for m in ISSUE.finditer(line)]


def length_problems(text: str, name: str = "", limit: int = README_MAX_LINES) -> list[str]:
    n = len(text.splitlines())
    return [f"{name}: {n} lines, more than {limit}"] if n > limit else []


# --------------------------------------------------------------------------------------------
# The repository's documents
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_relative_links_resolve(doc):
    bad = link_problems(doc)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_tables_parse(doc):
    bad = table_problems(doc.read_text(encoding="utf-8"), doc.name)
    assert not bad, "\n".join(bad)


ALL_COMMANDS = [(doc, n, cli, argv) for doc in DOCS for n, cli, argv in commands(doc.read_text(encoding="utf-8"))]


def test_the_docs_hold_commands():
    assert len(ALL_COMMANDS) >= 10 and {cli for _, _, cli, _ in ALL_COMMANDS} >= {"harness", "moqae"}
    assert {d.name for d, _, _, _ in ALL_COMMANDS} >= {"README.md", "results.md", "methods.md"}


@pytest.mark.parametrize(
    ("doc", "line", "cli", "argv"),
    ALL_COMMANDS,
    ids=[f"{d.relative_to(ROOT)}:{n}" for d, n, _, _ in ALL_COMMANDS],
)
def test_command_parses_and_its_specs_build(doc, line, cli, argv):
    why = command_problem(cli, argv)
    assert why is None, f"{doc.name}:{line}: python -m {cli} {' '.join(argv)}\n{why}"


def test_readme_is_a_front_door():
    bad = length_problems(README.read_text(encoding="utf-8"), README.name)
    assert not bad, "\n".join(bad) + " (move depth into docs/)"


@pytest.mark.parametrize("doc", FRONT, ids=_ids(FRONT))
def test_no_tracker_issue_numbers(doc):
    bad = issue_problems(doc.read_text(encoding="utf-8"), doc.name)
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------------------------
# The checks fail on planted errors
# --------------------------------------------------------------------------------------------

PLANTED = """# Planted

See [the design](docs/design.md) and [a missing page](docs/no-such-page.md), and
[a missing heading](docs/design.md#no-such-heading).

| method | PPL | bits |
|---|---:|---:|
| fp16 | 19.13 | 16 |
| int4 | 21.56 |

```bash
python -m harness run --methods fp16 --tasks wikitext2 --no-such-option 3
python -m harness run --methods no-such-method --tasks wikitext2
python -m harness run --methods int:bits=abc
```

As measured in issue 16, see `results/issue2`.
"""


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A Markdown file at the repository's root level (so ``docs/design.md`` resolves) with one error of
    each kind the checks look for."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "design.md").write_text((ROOT / "docs" / "design.md").read_text(encoding="utf-8"))
    doc = tmp_path / "PLANTED.md"
    doc.write_text(PLANTED, encoding="utf-8")
    return doc


def test_a_broken_link_is_reported(planted):
    bad = link_problems(planted)
    assert len(bad) == 2, bad
    assert "PLANTED.md:3: docs/no-such-page.md (no such file)" in bad[0]
    assert bad[1].startswith("PLANTED.md:4:") and "no heading #no-such-heading in design.md" in bad[1]


def test_a_ragged_table_is_reported(planted):
    bad = table_problems(planted.read_text(encoding="utf-8"), planted.name)
    assert bad == ["PLANTED.md:9: 2 cells, the header has 3"]
    split = "| a | b |\n|---|---|\n| 1 | 2 |\n\n| 3 | 4 |\n"  # a blank line inside a table
    assert table_problems(split, "split") == [
        "split:5: table rows without a header and |---| separator (a blank line inside?)"
    ]


def test_an_unknown_cli_option_is_reported(planted):
    bad = command_problems(planted.read_text(encoding="utf-8"), planted.name)
    assert len(bad) == 3, bad
    assert bad[0].startswith("PLANTED.md:12: python -m harness run") and "--no-such-option" in bad[0]
    assert "unrecognized arguments" in bad[0] and "(exit 2)" in bad[0]
    assert bad[1].startswith("PLANTED.md:13:") and "no-such-method" in bad[1]
    assert bad[2].startswith("PLANTED.md:14:") and "bits=abc" in bad[2]


def test_issue_numbers_and_length_are_reported(planted):
    text = planted.read_text(encoding="utf-8")
    assert issue_problems(text, "p") == ["p:17: 'issue 16'", "p:17: 'issue2'"]
    assert issue_problems("int4 issues 15.8k op calls per step", "p") == []  # the verb is no issue number
    assert length_problems("x\n" * (README_MAX_LINES + 1), "R") == [f"R: {README_MAX_LINES + 1} lines, more than 300"]
    assert length_problems("x\n" * README_MAX_LINES, "R") == []


def test_a_clean_file_has_no_problems(tmp_path):
    doc = tmp_path / "CLEAN.md"
    doc.write_text(
        "# Clean\n\n[up](#clean)\n\n| a | b |\n|---|---|\n| `x\\|y` | 2 |\n\n"
        "```bash\npython -m harness run --methods fp16,int4 --tasks wikitext2 --max-windows 1 ...\n```\n",
        encoding="utf-8",
    )
    text = doc.read_text(encoding="utf-8")
    assert link_problems(doc) == [] and table_problems(text) == [] and command_problems(text) == []
    assert issue_problems(text) == []
