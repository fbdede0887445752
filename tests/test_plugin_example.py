"""The example plugin (examples/keep64-int3): a method in a package of its own, with zero edits to the
harness, installs with ``pip install -e``, is listed with its source, runs, and is drawn in the report
with its own family, name and marker. Also: a plugin that fails to import is one line and breaks nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "keep64-int3"
PACKAGE = "keep64-int3"


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def _harness(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ""}  # the installed packages only, as a user's shell has them
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "-q", "--disable-pip-version-check"], check=True,
                   timeout=600, capture_output=True)  # fmt: skip


@pytest.fixture(scope="module")
def example_installed():
    """``pip install -e examples/keep64-int3`` into this environment, removed afterwards (unless it was
    installed before the tests). No network: its one dependency, moqae-harness, is already here."""
    before = _installed(PACKAGE)
    if not before:
        _pip("install", "--no-deps", "--no-build-isolation", "-e", str(EXAMPLE))
    yield
    if not before:
        _pip("uninstall", "-y", PACKAGE)


def _wikitext_dir(tmp: Path) -> Path:
    """A WikiText-2-shaped mirror written by the test (own text): the run needs no ../shared."""
    lines = [" = A Small Test Article = ", ""]
    for i in range(60):
        lines.append(f" The little robot number {i} walked to the park and saw a red ball under the old tree . ")
        lines.append("")
    (tmp / "wikitext-2-raw").mkdir(parents=True)
    (tmp / "wikitext-2-raw" / "wiki.test.raw").write_text("\n".join(lines))
    return tmp


@pytest.mark.slow
def test_example_plugin_lists_runs_and_reports(example_installed, tmp_path, stories_dir):
    listed = _harness("list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    i = next(i for i, line in enumerate(lines) if line.split()[:1] == ["keep64-int3"])
    assert "first 64 tokens fp16" in lines[i]
    assert "entry point of keep64-int3 (keep64_int3:Keep64Int3)" in " ".join(lines[i : i + 3])
    assert any(line.split()[:1] == ["kivi-2"] for line in lines)  # the built-ins are still there

    # its options are typed and checked as the built-ins' are: one line, exit 2, before any model loads
    bad = _harness("run", "--methods", "keep64-int3:bits=5", "--out", str(tmp_path / "bad"), cwd=tmp_path)
    assert (bad.returncode, bad.stderr.strip()) == (2, "error: keep64-int3: option bits=5 is not one of 2, 3, 4, 8")
    code = ("from harness.interface import METHODS; from harness.options import untyped_options; "
            "print(untyped_options(METHODS.entry('keep64-int3').cls.config_class))")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ""}
    typed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert typed.stdout.strip() == "[]", typed.stderr[-2000:]

    data, out, rep = _wikitext_dir(tmp_path / "data"), tmp_path / "results", tmp_path / "report"
    run = _harness("run", "--methods", "fp16,keep64-int3,keep64-int3:keep=8,bits=2", "--tasks", "wikitext2",
                   "--seqlen", "64", "--max-windows", "2", "--model", str(stories_dir), "--data-dir", str(data),
                   "--out", str(out), "--no-progress", cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    records = {r["method"]: r for r in (json.loads(p.read_text()) for p in out.glob("*.json"))}
    assert set(records) == {"fp16", "keep64-int3", "keep64-int3:keep=8,bits=2"}
    assert all(r["status"] == "done" for r in records.values())
    plugin, small = records["keep64-int3"], records["keep64-int3:keep=8,bits=2"]
    # 64-token windows: all 64 tokens are inside the fp16 sink -> fp16's numbers exactly
    assert plugin["metrics"]["ppl"] == records["fp16"]["metrics"]["ppl"]
    assert plugin["kv"]["nominal_bits"] == 16
    assert small["kv"]["nominal_bits"] == pytest.approx((8 * 16 + 56 * 2) / 64)
    assert small["metrics"]["ppl"] != records["fp16"]["metrics"]["ppl"]

    report = _harness("report", str(out), "--out", str(rep), cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-2000:]
    md = (rep / "README.md").read_text()
    assert "| 64 fp16 + INT3 (keep64-int3) |" in md and "| 8 fp16 + INT2 (keep64-int3:keep=8,bits=2) |" in md
    rows = md[md.index("| 64 fp16 + INT3") - 400 :]
    assert rows.index("| fp16 |") < rows.index("| 64 fp16 + INT3")  # rank 65: after the uniform rows


@pytest.mark.slow
def test_example_plugin_style_reaches_the_report(example_installed, tmp_path):
    """In a fresh process (an editable install is visible only to processes started after it): the
    registry finds the class through its entry point and the report draws it with its own style."""
    code = textwrap.dedent(
        """
        from harness.interface import METHODS
        from harness.reports import method_style
        cls = METHODS.entry("keep64-int3").cls
        assert METHODS.source("keep64-int3").origin == "entry point"
        assert (cls.report.family, cls.report.marker, cls.report.rank) == ("Sink+INT3", "d", 65)
        assert method_style("keep64-int3") == cls.report
        assert method_style("keep64-int3:keep=8").family == "Sink+INT3"
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_broken_plugin_is_one_line_and_breaks_nothing(tmp_path):
    """An installed entry point whose module fails to import: ``list`` names it in one line, every
    other method still lists and builds, and using it is a one-line error (exit 2)."""
    site = tmp_path / "site"
    dist = site / "broken_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[moqae_harness.methods]\nbroken = broken_plugin:Broken\n")
    (site / "broken_plugin.py").write_text(textwrap.dedent("import no_such_dependency_here\n"))
    env = {**os.environ, "PYTHONPATH": str(site)}
    listed = subprocess.run([sys.executable, "-m", "harness", "list"], env=env, capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    broken = [line for line in listed.stdout.splitlines() if line.split()[:1] == ["broken"]]
    assert len(broken) == 1 and "NOT AVAILABLE" in broken[0] and "broken-plugin" in broken[0]
    assert "ModuleNotFoundError: No module named 'no_such_dependency_here'" in broken[0]
    assert any(line.split()[:1] == ["kivi-2"] for line in listed.stdout.splitlines())
    used = subprocess.run([sys.executable, "-m", "harness", "run", "--methods", "fp16,broken"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert used.returncode == 2 and "Traceback" not in used.stderr
    (line,) = used.stderr.strip().splitlines()
    assert line.startswith("error: method 'broken' (entry point of package broken-plugin") and "failed to load" in line
