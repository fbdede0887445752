"""``reproduce``: profiles are TOML data; a tiny profile runs every stage and writes the report; an
interrupted run resumes without recomputing finished cells; failures are recorded and the sweep goes on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.reproduce import available_profiles, load_profile, parse_profile, reproduce

PAPER_METHODS = ("fp16", "int4", "int2", "kivi-4", "kivi-2", "kvquant-4b", "kvquant-2b-1%", "qoq", "mikv")


def test_shipped_profiles_parse():
    assert {"quick", "full", "smoke"} <= set(available_profiles())
    quick = load_profile("quick")
    wt = next(r for r in quick.runs if r.tasks == ["wikitext2"])
    assert quick.models == ["smollm2-135m"] and wt.options["max_windows"] >= 1
    assert set(PAPER_METHODS) <= set(wt.methods)
    assert {f"moqae:lam={x}" for x in (0.1, 0.3, 0.5, 0.7, 0.9)} <= set(wt.methods)
    tasks = {t.split(":")[0] for r in quick.runs for t in r.tasks}
    assert tasks == {"wikitext2", "longbench", "lmeval", "niah", "ruler"}
    retrieval = next(r for r in quick.runs if r.name == "retrieval")  # the seven methods
    assert set(retrieval.methods) == {"fp16", "int4", "kivi-2", "kvquant-4b", "qoq", "moqae:lam=0.5", "hf-quanto"}
    assert quick.profile is not None and max(quick.profile.contexts) <= 2048 and not quick.prepare
    full = load_profile("full")
    assert "meta-llama/Llama-2-7b-hf" in full.models and full.prepare["moqae"]["steps"] == 200
    assert max(full.profile.contexts) == 32768 and not any("limit" in r.options for r in full.runs)


def test_bad_profiles_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="unknown profile 'nosuch'; shipped: .*quick"):
        load_profile("nosuch")
    with pytest.raises(ValueError, match=r"unknown key\(s\) windows; accepted: .*max_windows"):
        parse_profile({"models": ["m"], "run": [{"tasks": ["wikitext2"], "methods": ["fp16"], "windows": 1}]})
    with pytest.raises(ValueError, match="nothing to reproduce"):
        parse_profile({"models": ["m"]})
    run = [{"tasks": ["wikitext2"], "methods": ["fp16"]}]
    with pytest.raises(ValueError, match=r"\[prepare.moqae\]: .*unknown key\(s\) stepz; accepted: steps"):
        parse_profile({"models": ["m"], "run": run, "prepare": {"moqae": {"stepz": 2}}})
    with pytest.raises(ValueError, match=r"\[prepare.fp16\]: fp16: has no prepare step"):
        parse_profile({"models": ["m"], "run": run, "prepare": {"fp16": {"steps": 2}}})
    with pytest.raises(ValueError, match=r"unknown method 'nosuch'"):
        parse_profile({"models": ["m"], "run": run, "prepare": {"nosuch": {}}})
    with pytest.raises(ValueError, match=r"\[\[run\]\] #1: option minutes=soon is not a number >= 0, or none"):
        parse_profile({"models": ["m"], "run": [{"tasks": ["wikitext2"], "methods": ["fp16"], "minutes": "soon"}]})
    bad = tmp_path / "bad.toml"
    bad.write_text("models = [")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_profile(bad)


def _profile(tmp_path: Path, stories_dir: Path, methods: list[str], train: bool = False) -> Path:
    text = f"""
name = "tiny"
models = [{json.dumps(str(stories_dir))}]
calibration_windows = 1

[[run]]
name = "wikitext2"
tasks = ["wikitext2"]
seqlen = 128
max_windows = 1
methods = {json.dumps(methods)}

[profile]
models = ["tiny-llama"]
methods = ["fp16", "int4"]
contexts = [16, 32]
new_tokens = 2
repeats = 1
"""
    if train:
        text += "\n[prepare.moqae]\nsteps = 2\nseqlen = 64\nwindows = 2\n"
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


def _cells(summary, status: str, stage: str) -> list[str]:
    return sorted(o.cell for o in summary.outcomes if o.status == status and o.stage == stage)


def test_tiny_profile_end_to_end_with_failures_and_training(tmp_path, stories_dir, data_dir):
    # int:group=3 cannot run on head_dim 8: recorded as failed, the sweep goes on; MoQAE has no
    # router for stories260K: [prepare.moqae] trains one (2 steps) and the run uses it
    prof = _profile(tmp_path, stories_dir, ["fp16", "int:group=3", "moqae:lam=0.5"], train=True)
    out, rep = tmp_path / "results", tmp_path / "report"
    s = reproduce(prof, out=out, report=rep, data_dir=data_dir, progress=False, log=lambda *_: None)
    assert _cells(s, "done", "prepare") == ["router moqae λ=0.5"]
    assert (out / "routers").is_dir() and list((out / "routers").rglob("router.safetensors"))
    done = _cells(s, "done", "wikitext2")
    assert "fp16" in done and any(c.startswith("moqae:lam=0.5,ckpt=") for c in done)
    (failed,) = [o for o in s.failed]
    assert failed.cell == "int:group=3" and "does not divide head_dim=8" in failed.reason
    assert json.loads(failed.path.read_text())["status"] == "failed"
    assert _cells(s, "done", "profile") == ["fp16", "int4"]
    text = s.text()
    assert "5 done, 0 skipped, 1 failed" in text.splitlines()[0] and "FAILED wikitext2" in text
    md = (rep / "README.md").read_text()
    assert "| moqae:lam=0.5 (own router) |" in md and "### Profile, latency: tiny-llama" in md
    assert "| stories260K | int:group=3 | wikitext2 | MethodSpecError:" in md  # the failed cells, with reasons
    assert (rep / "ppl.csv").exists() and (rep / "kv_memory_vs_context.png").exists()
    # a second run trains nothing and recomputes nothing but the failed cell
    s2 = reproduce(prof, out=out, report=rep, data_dir=data_dir, progress=False, log=lambda *_: None)
    assert not s2.done and _cells(s2, "skipped", "prepare") == ["router moqae λ=0.5"]
    assert [o.cell for o in s2.failed] == ["int:group=3"]


def test_interrupted_run_resumes_without_recomputing(tmp_path, stories_dir, data_dir, monkeypatch):
    import harness.profiling
    from harness.evaluation import TASKS

    prof = _profile(tmp_path, stories_dir, ["fp16", "int4", "int2"])
    out, rep = tmp_path / "results", tmp_path / "report"
    wikitext = TASKS.entry("wikitext2").cls
    real_evaluate = wikitext.evaluate
    calls = []

    def interrupt_second(self, ctx):
        calls.append(ctx.attached.method.label)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C half way through the sweep
        return real_evaluate(self, ctx)

    monkeypatch.setattr(wikitext, "evaluate", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        reproduce(prof, out=out, report=rep, data_dir=data_dir, progress=False, log=lambda *_: None)
    (first,) = list(out.glob("*.json"))  # the finished cell, nothing half-written
    assert json.loads(first.read_text())["status"] == "done" and not list(out.glob("*.tmp"))
    stamp = (first.stat().st_mtime_ns, json.loads(first.read_text())["created"])
    monkeypatch.setattr(wikitext, "evaluate", real_evaluate)

    # the profile stage is interrupted too, after its first method
    real_profile = harness.profiling.profile_method

    def interrupt_int4(model, method, *a, **k):
        if method.label == "int4":
            raise KeyboardInterrupt
        return real_profile(model, method, *a, **k)

    monkeypatch.setattr(harness.profiling, "profile_method", interrupt_int4)
    with pytest.raises(KeyboardInterrupt):
        reproduce(prof, out=out, report=rep, data_dir=data_dir, progress=False, log=lambda *_: None)
    assert (first.stat().st_mtime_ns, json.loads(first.read_text())["created"]) == stamp
    rows = json.loads((out / "profile__tiny-llama.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"fp16"}
    profile_stamp = [r["prefill_s"] for r in rows]
    monkeypatch.setattr(harness.profiling, "profile_method", real_profile)

    s = reproduce(prof, out=out, report=rep, data_dir=data_dir, progress=False, log=lambda *_: None)
    assert (first.stat().st_mtime_ns, json.loads(first.read_text())["created"]) == stamp  # not recomputed
    assert _cells(s, "skipped", "wikitext2") == ["fp16", "int2", "int4"] and not s.failed
    assert _cells(s, "skipped", "profile") == ["fp16"] and _cells(s, "done", "profile") == ["int4"]
    rows = json.loads((out / "profile__tiny-llama.json").read_text())["rows"]
    assert [r["prefill_s"] for r in rows if r["method"] == "fp16"] == profile_stamp
    assert sorted((r["method"], r["context"]) for r in rows) == [("fp16", 16), ("fp16", 32), ("int4", 16), ("int4", 32)]
    assert s.text().startswith("summary (profile tiny") and "skipped" in s.text()
    md = (rep / "README.md").read_text()
    assert all(f"| {m} |" in md for m in ("fp16", "int4", "int2"))


def test_dry_run_estimates_the_cost_left_from_the_profiles_minutes(tmp_path, stories_dir, data_dir):
    """``--dry-run``: each stage's measured ``minutes`` times its share of cells still to do."""
    text = _profile(tmp_path, stories_dir, ["fp16", "int4"]).read_text()
    text = text.replace("max_windows = 1\n", "max_windows = 1\nminutes = 4.0\n", 1).replace(
        "repeats = 1", "repeats = 1\nminutes = 1.0"
    )
    prof = tmp_path / "timed.toml"
    prof.write_text(text.replace('name = "tiny"', 'name = "tiny"\nestimate_machine = "here"'))
    out, lines = tmp_path / "results", []
    reproduce(prof, out=out, report=tmp_path / "rep", data_dir=data_dir, progress=False, log=lines.append, dry_run=True)
    assert lines[-1] == "cost estimate: ~5.0 min left of ~5.0 min for the whole profile measured on here"
    assert not out.exists() or not any(out.rglob("*.json"))  # nothing computed
    from harness.runner import run

    run(["fp16"], ["wikitext2:seqlen=128,max_windows=1"], str(stories_dir), out, data_dir=data_dir, progress=False,
        log=lambda *_: None)  # fmt: skip
    lines.clear()
    s = reproduce(prof, out=out, report=tmp_path / "rep", data_dir=data_dir, progress=False, log=lines.append,
                  dry_run=True)  # fmt: skip
    assert ["__fp16__" in o.cell for o in s.outcomes if o.status == "skipped"] == [True]
    assert lines[-1].startswith("cost estimate: ~3.0 min left of ~5.0 min")  # half of wikitext2 (2.0) + profile (1.0)
    prof.write_text(text.replace("repeats = 1\nminutes = 1.0", "repeats = 1"))  # no minutes: said, not free
    lines.clear()
    reproduce(prof, out=out, report=tmp_path / "rep", data_dir=data_dir, progress=False, log=lines.append, dry_run=True)
    assert "no estimate for profile" in lines[-1]


def test_offline_profile_needs_no_data(tmp_path, capsys):
    """Every stage of `offline` is generated or embedded: its dry run passes the preflight with no data."""
    from harness.cli import main

    prof = load_profile("offline")
    assert {t.split(":")[0] for r in prof.runs for t in r.tasks} == {"niah", "ruler"} and prof.profile is not None
    argv = ["reproduce", "--profile", "offline", "--data-dir", str(tmp_path / "nodata"), "--dry-run"]
    assert main([*argv, "--out", str(tmp_path / "o"), "--report", str(tmp_path / "r")]) == 0, capsys.readouterr()
    assert "6 to compute (dry run)" in capsys.readouterr().out  # 3 methods x (niah, ruler)
