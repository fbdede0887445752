"""Bad input is refused fast, in one line, before any model load; a run is right or refuses.

Table-driven: every case runs ``harness.cli.main`` and asserts exit code 2, one ``error:`` line on
stderr, no traceback and nothing written under ``--out``. Argument-level errors also run in a fresh
process, timed (nothing heavy is imported before argparse). The run-level cases (a window longer
than the model's context, one configuration spelled twice, a record that is not a complete one, a
method that fails to attach) use stories260K where the shared mirror has it, else the embedded
SmolLM2, and a WikiText-shaped file the test writes: no ``../shared`` needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cli import main

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture
def world(tmp_path, stories_dir) -> dict[str, Path]:
    """Files the cases point at: a plain file, a folder without config.json, a WikiText-shaped mirror."""
    (tmp_path / "afile.txt").write_text("not a folder")
    (tmp_path / "empty_model").mkdir()
    data = tmp_path / "data"
    lines = [" = A Small Test Article = ", ""]
    for i in range(80):
        lines += [f" The little robot number {i} walked to the park and saw a red ball under the old tree . ", ""]
    (data / "wikitext-2-raw").mkdir(parents=True)
    (data / "wikitext-2-raw" / "wiki.test.raw").write_text("\n".join(lines))
    (data / "wikitext-2").mkdir()
    (data / "wikitext-2" / "valid.txt").write_text("\n".join(lines))
    return {"tmp": tmp_path, "file": tmp_path / "afile.txt", "nomodel": tmp_path / "empty_model", "data": data,
            "model": stories_dir}  # fmt: skip


# (id, argv with {tmp} {file} {nomodel} {data} placeholders, a fragment the one line must contain)
CASES = [
    ("no-command", [], "required"),
    ("bad-command", ["frob"], "invalid choice"),
    ("run-no-methods", ["run"], "--methods"),
    ("limit-abc", ["run", "--methods", "fp16", "--limit", "abc"], "'abc' is not an integer"),
    ("limit-0", ["run", "--methods", "fp16", "--limit", "0"], "must be >= 1"),
    ("limit-neg", ["run", "--methods", "fp16", "--limit", "-3"], "must be >= 1"),
    ("seqlen-0", ["run", "--methods", "fp16", "--seqlen", "0"], "must be >= 1"),
    ("seqlen-text", ["run", "--methods", "fp16", "--seqlen", "long"], "not an integer"),
    ("max-windows-0", ["run", "--methods", "fp16", "--max-windows", "0"], "must be >= 1"),
    ("calib-0", ["run", "--methods", "fp16", "--calibration-windows", "0"], "must be >= 1"),
    ("max-length-text", ["run", "--methods", "fp16", "--max-length", "x"], "invalid int value"),
    ("profile-repeats-0", ["profile", "--methods", "fp16", "--repeats", "0"], "must be >= 1"),
    ("profile-new-tokens-0", ["profile", "--methods", "fp16", "--new-tokens", "0"], "must be >= 1"),
    ("profile-context-text", ["profile", "--methods", "fp16", "--context", "a,b", "--out", "{tmp}/p"], "integers"),
    ("reproduce-calib-0", ["reproduce", "--calibration-windows", "0"], "must be >= 1"),
    ("unknown-option-flag", ["run", "--methods", "fp16", "--bogus"], "unrecognized arguments"),
    ("unknown-method", ["run", "--methods", "nosuch", "--out", "{tmp}/o"], "unknown method 'nosuch'"),
    ("unknown-method-2nd", ["run", "--methods", "fp16,nosuch", "--out", "{tmp}/o"], "unknown method 'nosuch'"),
    ("empty-methods", ["run", "--methods", ",", "--out", "{tmp}/o"], "no method given"),
    ("unknown-task", ["run", "--methods", "fp16", "--tasks", "nosuch", "--out", "{tmp}/o"], "nosuch"),
    ("unknown-option", ["run", "--methods", "int:nbits=4", "--out", "{tmp}/o"], "unknown option(s) nbits"),
    ("bad-option-item", ["run", "--methods", "int:4", "--out", "{tmp}/o"], "bad option"),
    ("bits-text", ["run", "--methods", "int:bits=four", "--out", "{tmp}/o"], "bits"),
    ("bits-unsupported", ["run", "--methods", "int:bits=3", "--out", "{tmp}/o"], "bits"),
    ("bits-zero", ["run", "--methods", "int:bits=0", "--out", "{tmp}/o"], "bits"),
    ("dup-option", ["run", "--methods", "int:bits=2,bits=8", "--out", "{tmp}/o"], "given twice"),
    ("dup-option-same", ["run", "--methods", "kivi:bits=2,bits=2", "--out", "{tmp}/o"], "given twice"),
    ("alias-clash", ["run", "--methods", "moqae:lambda=0.5,lam=0.3", "--out", "{tmp}/o"], "given twice"),
    ("kivi-bits-text", ["run", "--methods", "kivi:bits=x", "--out", "{tmp}/o"], "bits"),
    ("kivi-group-0", ["run", "--methods", "kivi:group=0", "--out", "{tmp}/o"], "group"),
    ("moqae-lam-text", ["run", "--methods", "moqae:lam=high", "--out", "{tmp}/o"], "lam"),
    ("task-option", ["run", "--methods", "fp16", "--tasks", "wikitext2:seqlen=abc", "--out", "{tmp}/o"], "seqlen"),
    ("task-unknown-option", ["run", "--methods", "fp16", "--tasks", "wikitext2:foo=1", "--out", "{tmp}/o"], "foo"),
    (
        "task-dup",
        ["run", "--methods", "fp16", "--tasks", "wikitext2:seqlen=8,seqlen=9", "--out", "{tmp}/o"],
        "given twice",
    ),  # fmt: skip
    (
        "lmeval-fewshot-neg",
        ["run", "--methods", "fp16", "--tasks", "lmeval:piqa,num_fewshot=-1", "--out", "{tmp}/o"],
        "num_fewshot",
    ),  # fmt: skip
    ("lmeval-limit-0", ["run", "--methods", "fp16", "--tasks", "lmeval:piqa,limit=0", "--out", "{tmp}/o"], "limit"),
    ("longbench-unknown", ["run", "--methods", "fp16", "--tasks", "longbench:nosuch", "--out", "{tmp}/o"], "nosuch"),
    ("device-tpu", ["run", "--methods", "fp16", "--device", "tpu", "--out", "{tmp}/o"], "--device tpu"),
    ("device-garbage", ["run", "--methods", "fp16", "--device", "cuda:x", "--out", "{tmp}/o"], "--device cuda:x"),
    ("device-cuda", ["run", "--methods", "fp16", "--device", "cuda", "--out", "{tmp}/o"], "--device cuda"),
    ("out-is-file", ["run", "--methods", "fp16", "--out", "{file}"], "is a file"),
    ("out-under-file", ["run", "--methods", "fp16", "--out", "{file}/sub"], "is a file"),
    (
        "model-missing-dir",
        ["run", "--methods", "fp16", "--model", "{tmp}/nothing", "--data-dir", "{data}", "--out", "{tmp}/o"],
        "no such local model folder",
    ),  # fmt: skip
    (
        "model-no-config",
        ["run", "--methods", "fp16", "--model", "{nomodel}", "--data-dir", "{data}", "--out", "{tmp}/o"],
        "no config.json",
    ),  # fmt: skip
    (
        "model-file",
        ["run", "--methods", "fp16", "--model", "{file}", "--data-dir", "{data}", "--out", "{tmp}/o"],
        "a file, not a model folder",
    ),  # fmt: skip
    (
        "model-gguf-missing",
        ["run", "--methods", "fp16", "--model", "{tmp}/x.gguf", "--data-dir", "{data}", "--out", "{tmp}/o"],
        "no such .gguf file",
    ),  # fmt: skip
    (
        "model-hub-offline",
        ["run", "--methods", "fp16", "--model", "nobody-xyz/not-a-model", "--data-dir", "{data}", "--out", "{tmp}/o"],
        "HF_HUB_OFFLINE",
    ),  # fmt: skip
    ("data-missing", ["run", "--methods", "fp16", "--data-dir", "{tmp}/nodata", "--out", "{tmp}/o"], "not found at"),
    (
        "data-calibration-missing",
        ["run", "--methods", "kvquant-4b", "--data-dir", "{tmp}/nodata", "--out", "{tmp}/o"],
        "calibration split",
    ),  # fmt: skip
    (
        "data-longbench-missing",
        ["run", "--methods", "fp16", "--tasks", "longbench:trec", "--data-dir", "{data}", "--out", "{tmp}/o"],
        "LongBench trec",
    ),  # fmt: skip
    (
        "lmeval-unknown-task",
        ["run", "--methods", "fp16", "--tasks", "lmeval:nosuch_task_xyz", "--data-dir", "{data}", "--out", "{tmp}/o"],
        "not an lm-eval task",
    ),  # fmt: skip
    (
        "lmeval-group",
        ["run", "--methods", "fp16", "--tasks", "lmeval:mmlu", "--data-dir", "{data}", "--out", "{tmp}/o"],
        "is a group",
    ),  # fmt: skip
    (
        "lmeval-no-local-data",
        ["run", "--methods", "fp16", "--tasks", "lmeval:lambada_openai", "--data-dir", "{data}", "--out", "{tmp}/o"],
        "no local data",
    ),  # fmt: skip
    (
        "random-weights-ppl",
        ["run", "--methods", "fp16", "--model", "llama-2-7b-shape", "--out", "{tmp}/o"],
        "random weights",
    ),  # fmt: skip
    ("report-nothing", ["report", "--out", "{tmp}/r"], "give the results"),
    (
        "reproduce-bad-profile",
        ["reproduce", "--profile", "nosuch", "--out", "{tmp}/o", "--report", "{tmp}/r"],
        "nosuch",
    ),  # fmt: skip
    (
        "reproduce-no-data",
        ["reproduce", "--profile", "smoke", "--data-dir", "{tmp}/nodata", "--out", "{tmp}/o", "--report", "{tmp}/r"],
        "the offline profile runs: MOQAE_PROFILE=offline nox -s reproduce",
    ),  # fmt: skip
    ("reproduce-out-file", ["reproduce", "--profile", "smoke", "--out", "{file}", "--report", "{tmp}/r"], "is a file"),
    (
        "reproduce-device",
        ["reproduce", "--profile", "smoke", "--device", "tpu", "--out", "{tmp}/o", "--report", "{tmp}/r"],
        "--device tpu",
    ),  # fmt: skip
    ("profile-out-under-file", ["profile", "--methods", "fp16", "--out", "{file}/p"], "is a file"),
    ("profile-unknown-method", ["profile", "--methods", "nosuch", "--out", "{tmp}/p"], "unknown method"),
]


def _argv(argv: list[str], world: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in world.items()}) for a in argv]


@pytest.mark.parametrize("argv,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(argv, fragment, world, capsys, monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MOQAE_DATA_DIR", raising=False)
    before = sorted(p.relative_to(world["tmp"]) for p in world["tmp"].rglob("*"))
    try:
        code = main(_argv(argv, world))
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err
    assert sorted(p.relative_to(world["tmp"]) for p in world["tmp"].rglob("*")) == before  # nothing written


def test_at_least_sixty_cases():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv", [["run", "--methods", "fp16", "--limit", "abc"], ["frob"],
                                  ["profile", "--methods", "fp16", "--repeats", "0"],
                                  ["run", "--methods", "fp16,kivi:bits=2,kvquant-4bit"],
                                  ["run", "--methods", "fp16", "--tasks", "longbench:trec,samsum,wikitxt2:seqlen=64"],
                                  ["profile", "--methods", "int4", "--reference", "fp61"]])  # fmt: skip
def test_argument_errors_are_fast_in_a_fresh_process(argv):
    """Argument errors, and unknown method / task names, are refused before torch or transformers are
    imported (< 3 s)."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "harness", *argv], capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - t0
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    code = "import sys, harness.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert imported.stdout.split() == ["False", "False"]  # the CLI module imports neither
    assert seconds < 3.0, f"{seconds:.1f} s"


# --------------------------------------------------------------------------------------------
# Run-level: right or refused, and the sweep goes on
# --------------------------------------------------------------------------------------------


def _run(world, out: Path, *methods: str, seqlen: int = 64, **kw):
    from harness.runner import run

    return run(list(methods), [f"wikitext2:seqlen={seqlen},max_windows=2"], str(world["model"]), out,
               data_dir=world["data"], progress=False, log=lambda *_: None, **kw)  # fmt: skip


@pytest.mark.slow
def test_window_longer_than_context_is_refused(world, monkeypatch):
    """Refused from the model's config, before its weights load (and again once loaded, for a hub id)."""
    import harness.runner
    from harness.interface import MethodSpecError
    from harness.models import context_length, load_model

    context = context_length(load_model(str(world["model"]))[0])
    monkeypatch.setattr(harness.runner, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(MethodSpecError, match=f"longer than the context .* \\({context}\\)"):
        _run(world, world["tmp"] / "o", "fp16", seqlen=context + 1)
    assert not list((world["tmp"] / "o").glob("*.json")) if (world["tmp"] / "o").exists() else True


@pytest.mark.slow
def test_same_configuration_runs_once_and_incomplete_records_are_recomputed(world):
    out = world["tmp"] / "o"
    s = _run(world, out, "int4", "int:bits=4", "fp16")
    assert len(s.done) == 2 and not s.failed  # int4 == int:bits=4: one record
    (path,) = [p for p in s.done if "__int4__" in p.name]
    good = json.loads(path.read_text())
    path.write_text(json.dumps({"status": "done"}))  # a record replaced by garbage is not trusted
    s2 = _run(world, out, "int4", "fp16")
    assert path in s2.done and len(s2.skipped) == 1
    redone = json.loads(path.read_text())
    assert redone["metrics"] == good["metrics"]
    from harness.reports.records import load_results

    path.write_text(json.dumps({**good, "metrics": None}))
    res = load_results([out])
    assert len(res.records) == 1 and any("not a complete record" in n for n in res.notes)


@pytest.mark.slow
def test_a_method_that_fails_to_attach_fails_its_cells_only(world):
    """fp16, a method whose attach raises, int4: the failure is a failed-cell record, int4 still runs."""
    from baselines.uniform import Uniform
    from harness.interface import METHODS

    @METHODS.register("breaks-on-attach")
    class BreaksOnAttach(Uniform):
        def attach(self, model, info):
            raise OSError("router file is not a checkpoint")

    try:
        s = _run(world, world["tmp"] / "o", "fp16", "breaks-on-attach", "int4")
    finally:
        METHODS.unregister("breaks-on-attach")
    assert len(s.done) == 2 and len(s.failed) == 1
    path, reason = s.failed[0]
    assert "router file is not a checkpoint" in reason
    rec = json.loads(path.read_text())
    assert rec["status"] == "failed" and "OSError" in rec["reason"]


def test_cli_module_keeps_heavy_imports_lazy():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    code = "import sys, harness.cli, harness.registry, harness.builtins; print(sorted(m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules))"  # noqa: E501
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


@pytest.mark.slow
def test_a_cell_claimed_by_a_live_process_is_left_to_it(world):
    """Two processes on one --out: a cell another live process claimed is skipped, a dead process's
    claim is taken over, and no claim file is left behind."""
    import socket

    out = world["tmp"] / "o"
    first = _run(world, out, "fp16", "int4")
    assert len(first.done) == 2
    fp16, int4 = sorted(first.done, key=lambda p: "__int4__" in p.name)
    for p in first.done:
        p.unlink()
    host = socket.gethostname()
    (fp16.parent / (fp16.name + ".claim")).write_text(json.dumps({"host": host, "pid": 1, "time": time.time()}))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (int4.parent / (int4.name + ".claim")).write_text(json.dumps({"host": host, "pid": int(dead.stdout), "time": 0}))
    s = _run(world, out, "fp16", "int4")
    assert s.claimed == [fp16] and s.done == [int4]  # pid 1 lives: its cell is left to it
    assert not fp16.exists() and int4.exists()
    assert (fp16.parent / (fp16.name + ".claim")).exists()  # not ours: kept
    assert not (int4.parent / (int4.name + ".claim")).exists()  # ours: released


@pytest.mark.slow
def test_dry_run_lists_the_cells_and_computes_nothing(world):
    out = world["tmp"] / "o"
    (done,) = _run(world, out, "fp16").done
    before = sorted(out.iterdir())
    s = _run(world, out, "fp16", "int4", dry_run=True)
    assert s.skipped == [done] and len(s.planned) == 1 and "__int4__" in s.planned[0].name
    assert not s.done and sorted(out.iterdir()) == before  # nothing loaded, nothing written
