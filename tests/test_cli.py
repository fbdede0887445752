"""CLI: bad input exits 2 with one line; a run writes a valid record; a second run skips it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness.cli import main, split_specs
from harness.interface import MethodSpecError, build_method


def test_split_specs_keeps_options_together():
    assert split_specs(["fp16,int:bits=2,group=8,int4", "int8"]) == ["fp16", "int:bits=2,group=8", "int4", "int8"]
    # an option value may hold a ':' (a Windows path): still an option of the spec before it
    assert split_specs(["moqae:lam=0.5,ckpt=C:/r/router.safetensors,int4"]) == [
        "moqae:lam=0.5,ckpt=C:/r/router.safetensors", "int4"]  # fmt: skip


def test_names_are_checked_before_anything_is_imported():
    from harness.registry import METHODS, TASKS

    METHODS.check_names(["fp16,moqae:lam=0.5,ckpt=C:/r/router.safetensors,int:bits=2,group=8"])
    TASKS.check_names(["wikitext2:seqlen=64,longbench:trec,samsum,lmeval:piqa,arc_easy,limit=5"], bare_items=True)
    with pytest.raises(MethodSpecError, match="unknown method 'int5'; accepted: .*int4"):
        METHODS.check_names(["kivi:bits=2,group=32,int5"])
    with pytest.raises(MethodSpecError, match="unknown task 'wikitxt2'"):
        TASKS.check_names(["longbench:trec,wikitxt2:seqlen=64"], bare_items=True)


def test_build_method_options_and_variants():
    m = build_method("int:bits=2,group=8")
    assert (m.config.bits, m.config.group) == (2, 8)
    assert m.label == "int:bits=2,group=8"
    assert build_method("int4").config.bits == 4
    with pytest.raises(MethodSpecError, match="accepted: .*fp16"):
        build_method("nosuch")
    with pytest.raises(MethodSpecError, match="bits=3 is not one of 2, 4, 8"):
        build_method("int:bits=3")
    with pytest.raises(MethodSpecError, match="unknown option"):
        build_method("int4:chunk=3")
    with pytest.raises(MethodSpecError, match="bits=four is not one of 2, 4, 8"):
        build_method("int:bits=four")


def _run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["run", "--methods", "nosuch"], "unknown method 'nosuch'; accepted:"),
        (["run", "--methods", "int:bits=3"], "bits=3 is not one of 2, 4, 8"),
        (["run", "--methods", "fp16", "--tasks", "nosuch"], "unknown task 'nosuch'"),
        (["run", "--methods", "fp16", "--seqlen", "1"], "seqlen=1 is not an integer >= 2"),
        (["run", "--methods", "fp16", "--model", "./no/such/model"], "no/such/model"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, argv, needle):
    code, out, err = _run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0]
    assert "Traceback" not in err


def test_group_not_dividing_head_dim_exits_2(capsys, stories_dir, data_dir, tmp_path):
    # stories260K has head_dim 8
    code, out, err = _run_cli(
        capsys,
        "run",
        "--methods",
        "int:group=3",
        "--model",
        str(stories_dir),
        "--seqlen",
        "256",
        "--data-dir",
        str(data_dir),
        "--out",
        str(tmp_path),
    )
    assert code == 2
    assert err.count("\n") == 1 and "does not divide head_dim=8" in err


def test_missing_data_exits_2_naming_both_ways(capsys, stories_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = _run_cli(
        capsys,
        "run",
        "--methods",
        "fp16",
        "--model",
        str(stories_dir),
        "--data-dir",
        str(empty),
        "--out",
        str(tmp_path),
    )
    assert code == 2 and err.count("\n") == 1
    assert "--data-dir" in err and "hub" in err


def test_run_writes_record_and_skips_it_next_time(capsys, stories_dir, data_dir, tmp_path):
    args = ["run", "--methods", "fp16,int4", "--model", str(stories_dir), "--data-dir", str(data_dir)]
    args += ["--seqlen", "256", "--max-windows", "2", "--out", str(tmp_path), "--no-progress"]
    code, out, err = _run_cli(capsys, *args)
    assert code == 0, err
    records = sorted(tmp_path.glob("*.json"))
    assert len(records) == 2
    rec = json.loads(records[0].read_text())
    assert rec["status"] == "done" and rec["windows"] == 2 and rec["key"]["task_config"]["seqlen"] == 256
    assert rec["metrics"]["ppl"] > 1
    for field in ("kv", "method", "model", "environment", "wall_seconds"):
        assert field in rec
    assert rec["environment"]["versions"]["torch"]
    assert "summary: 2 done, 0 skipped, 0 failed" in out
    mtimes = [p.stat().st_mtime_ns for p in records]
    code, out, err = _run_cli(capsys, *args)
    assert code == 0 and "summary: 0 done, 2 skipped, 0 failed" in out
    assert [p.stat().st_mtime_ns for p in records] == mtimes

    # the report reads those records: the table holds their numbers, the plot is a real PNG
    code, out, err = _run_cli(capsys, "report", "--results", str(tmp_path), "--out", str(tmp_path / "rep"))
    assert code == 0, err
    md = (tmp_path / "rep" / "results.md").read_text()
    ppl = {json.loads(p.read_text())["method"]: json.loads(p.read_text())["metrics"]["ppl"] for p in records}
    for method, value in ppl.items():
        assert f"| {method} |" in md and f"{value:.4f}" in md
    assert (tmp_path / "rep" / "ppl_vs_bits.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = _run_cli(capsys, "report", "--results", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2"))
    assert code == 2 and err.startswith("error: no results at")


def test_list_and_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "harness", "list"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("fp16", "int8", "int4", "int2", "wikitext2", "smollm2-135m"):
        assert name in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "run", "--methods", "nosuch"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown method")


def test_bare_items_follow_the_positional_option_in_the_order_written():
    from harness.registry import parse_spec

    opts = parse_spec("niah:lengths=1024,2048,4096,depths=5", "lengths")[1]
    assert opts == {"lengths": "1024,2048,4096", "depths": "5"}
    assert parse_spec("longbench:trec,samsum,limit=2", "tasks")[1] == {"tasks": "trec,samsum", "limit": "2"}
