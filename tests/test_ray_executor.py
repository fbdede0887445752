"""``--executor ray`` on a real local Ray cluster (127.0.0.1 only, 2 CPUs): records identical in metrics
to the serial executor, shards merged to the same record, a worker killed with ``kill -9`` mid-cell
leaves a failed or a retried cell (never a torn record) and a re-run computes only what is missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.ray_executor import RAY_MISSING, RayExecutor
from harness.runner import is_complete, load_record, run

ray = pytest.importorskip("ray", reason="the Ray executor's tests need the [ray] extra (nox -s tests installs it)")

ROOT = Path(__file__).resolve().parents[1]
TASK = "wikitext2:seqlen=128,max_windows=4"
QUIET = {"progress": False, "log": lambda *_: None}


@pytest.fixture(scope="module")
def cluster():
    """A real local cluster: 2 worker CPUs, bound to 127.0.0.1, stopped at the end of the module."""
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def metrics(out: Path) -> dict[str, dict]:
    recs = [load_record(p) for p in sorted(out.glob("*.json"))]
    return {r["method"]: r["metrics"] for r in recs if is_complete(r)}


def assert_no_torn_files(out: Path) -> None:
    for p in out.iterdir():
        assert not p.name.endswith((".tmp", ".claim")), p.name  # no temporary, no claim left behind
        if p.suffix == ".json":
            assert isinstance(json.loads(p.read_text()), dict)  # every record parses


def test_records_identical_to_serial_and_shards_merge_to_the_same_record(cluster, tmp_path, stories_dir, data_dir):
    import torch

    # KVQuant calibrates: with 2 shards its calibration is a Ray task of its own the shards depend on
    methods = ["fp16", "int4", "kivi:bits=2,group=4,residual=8", "kvquant-4b"]
    serial, whole, sharded = tmp_path / "serial", tmp_path / "ray", tmp_path / "sharded"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count (--cpus-per-cell 1)
    try:
        run(methods, [TASK], str(stories_dir), serial, data_dir=data_dir, calibration_windows=2, **QUIET)
    finally:
        torch.set_num_threads(threads)
    with RayExecutor(progress=False) as ex:
        s = run(methods, [TASK], str(stories_dir), whole, data_dir=data_dir, calibration_windows=2, executor=ex,
                **QUIET)  # fmt: skip
    assert len(s.done) == 4 and not s.failed
    workers = [load_record(p)["worker"] for p in s.done]
    pids = {w["pid"] for w in workers}
    assert len(pids) <= 2 and all(w["threads"] == 1 for w in workers)
    assert sum(w["model_loaded_by_this_cell"] for w in workers) <= len(pids)  # once per worker process at most
    with RayExecutor(shard_samples=2, progress=False) as ex:
        run(methods, [TASK], str(stories_dir), sharded, data_dir=data_dir, calibration_windows=2, executor=ex, **QUIET)
    want = metrics(serial)
    assert len(want) == 4
    assert metrics(whole) == want  # to the last digit
    assert metrics(sharded) == want
    for p in sorted(sharded.glob("*.json")):
        rec, ref = load_record(p), load_record(serial / p.name)  # the same file names: the same keys
        assert rec["shards"] == 2 and rec["windows"] == ref["windows"] == 4
        assert rec["kv"] == ref["kv"] and rec["kv_windows_mean"] == ref["kv_windows_mean"]
        assert rec["layer_stats"] == ref["layer_stats"]
        assert {w["shard"][0] for w in rec["worker"]} == {0, 1}
    assert_no_torn_files(sharded)
    # a re-run submits nothing
    with RayExecutor(progress=False) as ex:
        again = run(methods, [TASK], str(stories_dir), whole, data_dir=data_dir, calibration_windows=2, executor=ex,
                    **QUIET)  # fmt: skip
    assert not again.done and len(again.skipped) == 4


def test_longbench_shards_merge_to_the_serial_record(cluster, tmp_path, stories_dir, data_dir):
    """3 shards over 4 samples of 2 datasets (one shard straddles the datasets): metrics, the per-sample
    file (but for the seconds each took) and the KV accounting equal the serial run's."""
    import torch

    task = "longbench:trec,samsum"
    opts = {"limit": 2, "max_length": 300, **QUIET}
    serial, sharded = tmp_path / "serial", tmp_path / "sharded"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(["int4"], [task], str(stories_dir), serial, data_dir=data_dir, **opts)
    finally:
        torch.set_num_threads(threads)
    with RayExecutor(shard_samples=3, progress=False) as ex:
        run(["int4"], [task], str(stories_dir), sharded, data_dir=data_dir, executor=ex, **opts)
    (path,) = serial.glob("*.json")
    ref, rec = load_record(path), load_record(sharded / path.name)
    assert rec["shards"] == 3 and rec["metrics"] == ref["metrics"] and rec["kv"] == ref["kv"]
    assert rec["n_samples"] == ref["n_samples"] == {"trec": 2, "samsum": 2}

    def samples(folder: Path) -> list[dict]:
        lines = (folder / ref["samples_file"]).read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]

    assert samples(sharded) == samples(serial) and len(samples(serial)) == 4
    assert_no_torn_files(sharded)


def long_context_copy(stories_dir: Path, folder: Path) -> Path:
    """stories260K with a config that declares 1024 positions, as tests/test_ruler.py's ``long_stories``:
    RULER's shortest length does not fit its 512 (RoPE runs past 512; quality is irrelevant)."""
    import shutil

    shutil.copytree(stories_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["max_position_embeddings"] = 1024
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize(
    ("task", "shards", "fits"),
    [("niah:lengths=256,depths=3,repeats=1,digits=3,chat=false", 2, 256),  # 3 prompts: shards of 1 and 2
     ("ruler:niah_single_1,fwe,lengths=1024,samples=1", 2, 1024)],  # a sample of each generator: a shard each
)  # fmt: skip
def test_generated_long_context_tasks_shard_to_the_serial_record(cluster, tmp_path, stories_dir, task, shards, fits):
    """niah and RULER generate their prompts on the worker: ``--shard-samples`` cells give the serial
    run's metrics, per-sample outputs (but for the seconds each took), prompt SHA-1s and KV accounting."""
    import torch

    from harness.cli import main

    model = stories_dir if task.startswith("niah") else long_context_copy(stories_dir, tmp_path / "stories1k")
    serial, sharded = tmp_path / "serial", tmp_path / "sharded"
    argv = ["run", "--methods", "int4", "--tasks", task, "--model", str(model), "--device", "cpu", "--no-progress"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count (--cpus-per-cell 1)
    try:
        assert main([*argv, "--out", str(serial)]) == 0
    finally:
        torch.set_num_threads(threads)
    # the module's cluster is running: the executor joins it (and leaves it running)
    assert main([*argv, "--out", str(sharded), "--executor", "ray", "--shard-samples", str(shards)]) == 0
    (path,) = serial.glob("*.json")
    ref, rec = load_record(path), load_record(sharded / path.name)  # the same file name: the same key
    assert ref["status"] == rec["status"] == "done" and "shards" not in ref
    assert rec["shards"] == shards and sorted(w["shard"][0] for w in rec["worker"]) == list(range(shards))
    assert rec["metrics"] == ref["metrics"] and rec["kv"] == ref["kv"] and rec["n_samples"] == ref["n_samples"]
    if task.startswith("niah"):  # the prompts' SHA-1: niah's at the top of the record, RULER's in its info
        assert rec["prompts_sha1"] == ref["prompts_sha1"] and rec["grid"] == ref["grid"]
    else:
        assert rec["ruler"]["prompts_sha1"] == ref["ruler"]["prompts_sha1"] and rec["ruler"] == ref["ruler"]

    def samples(folder: Path) -> list[dict]:
        lines = (folder / ref["samples_file"]).read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]

    want = samples(serial)
    assert samples(sharded) == want and len(want) == (3 if task.startswith("niah") else 2)
    assert all(s["input_tokens"] <= fits and "output" in s for s in want)  # the prompts fit the model
    assert len({s["prompt_sha1"] for s in want}) == len(want)
    assert_no_torn_files(sharded)


def test_reproduce_trains_the_router_as_a_ray_task_and_ships_it_to_the_cells(cluster, tmp_path, stories_dir,
                                                                             data_dir):  # fmt: skip
    """``reproduce`` with the executor: ``[prepare.moqae]`` trains stories260K's router in a Ray task, the
    driver writes it into the results folder and the MoQAE cell runs with it; a worker that lacks the
    driver's file system gets the router shipped with its job (simulated: the file is removed)."""
    from harness.reproduce import reproduce

    prof = tmp_path / "tiny.toml"
    prof.write_text(f"""
name = "tiny"
models = [{json.dumps(str(stories_dir))}]
[[run]]
name = "wikitext2"
tasks = ["wikitext2"]
seqlen = 128
max_windows = 1
methods = ["fp16", "moqae:lam=0.5"]
[prepare.moqae]
steps = 2
seqlen = 64
windows = 2
""")  # fmt: skip
    out, rep = tmp_path / "results", tmp_path / "report"
    with RayExecutor(progress=False) as ex:
        s = reproduce(prof, out=out, report=rep, data_dir=data_dir, progress=False, log=lambda *_: None, executor=ex)
        (router,) = (out / "routers").rglob("router.safetensors")
        assert [o.cell for o in s.outcomes if o.stage == "prepare" and o.status == "done"] == ["router moqae λ=0.5"]
        assert len(s.done) == 3 and not s.failed  # the router, fp16, moqae
        (cell,) = [p for p in out.glob("*moqae*.json")]
        assert load_record(cell)["key"]["method_config"]["ckpt"] == str(router)
        assert str(router) in ex._artefacts and ex._artefacts[str(router)] == router.read_bytes()
        # a worker without the driver's files: the cell's job carries the router and installs it
        data = router.read_bytes()
        router.unlink()
        cell.unlink()
        again = run([f"moqae:lam=0.5,ckpt={router}"], ["wikitext2:seqlen=128,max_windows=1"], str(stories_dir), out,
                    data_dir=data_dir, executor=ex, **QUIET)  # fmt: skip
    assert again.done == [cell] and router.read_bytes() == data, (again.failed, again.skipped)
    assert_no_torn_files(out)


def test_install_artefacts_writes_only_missing_files(tmp_path, monkeypatch):
    from harness.files import install_artefacts

    monkeypatch.chdir(tmp_path)  # a relative name is relative to the worker's working directory
    kept = tmp_path / "kept.bin"
    kept.write_bytes(b"mine")
    new = tmp_path / "deep" / "router.safetensors"
    install_artefacts({str(kept): b"theirs", str(new): b"router", "results/r.bin": b"x"})
    assert kept.read_bytes() == b"mine" and new.read_bytes() == b"router"
    assert (tmp_path / "results" / "r.bin").read_bytes() == b"x"


class SlowFP16:
    """fp16 (same name, options and record key) whose first try writes its worker's pid where the test
    waits for it and sleeps, so that the test kills the worker mid-cell; a retry (the marker is there)
    runs as plain fp16."""

    marker: str = ""

    def attach(self, model, info):
        marker = Path(self.marker)
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            time.sleep(60)
        return super().attach(model, info)


def kill_when_started(marker: Path, timeout: float = 120) -> int:
    t0 = time.monotonic()
    while not (marker.exists() and marker.read_text()):
        assert time.monotonic() - t0 < timeout, "the slow cell never started"
        time.sleep(0.05)
    pid = int(marker.read_text())
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.mark.parametrize("retries", [0, 1])
def test_worker_killed_mid_cell_leaves_a_failed_or_retried_cell_and_a_rerun_completes_it(
    cluster, tmp_path, stories_dir, data_dir, retries
):
    import threading

    import ray.cloudpickle
    import torch

    from baselines.uniform import FP16
    from harness.evaluation import build_task
    from harness.interface import build_method
    from harness.runner import RunSummary, plan_cells

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this file
    out, marker = tmp_path / "out", tmp_path / "started"
    slow = type("SlowFP16", (SlowFP16, FP16), {"marker": str(marker)})()
    cells = plan_cells([slow, build_method("int4")], [build_task(TASK)], str(stories_dir), out, torch.device("cpu"),
                       None, 16)  # fmt: skip
    fp16_path, int4_path = (c.path for c in cells)
    assert fp16_path.name == run(["fp16"], [TASK], str(stories_dir), out, data_dir=data_dir, dry_run=True,
                                 **QUIET).planned[0].name  # the slow method keys its cell as fp16  # fmt: skip
    killed: list[int] = []
    killer = threading.Thread(target=lambda: killed.append(kill_when_started(marker)), daemon=True)
    killer.start()
    summary = RunSummary()
    with RayExecutor(retries=retries, progress=False) as ex:
        ex.run_cells(str(stories_dir), cells, data_dir, None, None, 16, summary, QUIET["log"])
    killer.join(timeout=5)
    assert killed, "the worker was not killed"
    assert_no_torn_files(out)
    assert summary.done[-1:] == [int4_path] or int4_path in summary.done
    rec = load_record(fp16_path)
    if retries:  # Ray retried the cell on another worker: finished, same key
        assert is_complete(rec, cells[0].key) and rec["worker"]["pid"] != killed[0]
        return
    assert rec["status"] == "failed" and "died" in rec["reason"].lower(), rec["reason"]
    assert [p for p, _ in summary.failed] == [fp16_path]
    with RayExecutor(progress=False) as ex:  # the re-run computes only the missing cell
        again = run(["fp16", "int4"], [TASK], str(stories_dir), out, data_dir=data_dir, executor=ex, **QUIET)
    assert again.done == [fp16_path] and again.skipped == [int4_path]
    assert is_complete(load_record(fp16_path), cells[0].key)
    assert_no_torn_files(out)


def test_cli_run_on_a_local_cluster(tmp_path, stories_dir, data_dir):
    """``python -m harness run --executor ray`` starts its own local cluster, writes the records, stops."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "harness", "run", "--methods", "fp16,int2", "--tasks", TASK, "--model",
           str(stories_dir), "--data-dir", str(data_dir), "--out", str(out), "--executor", "ray", "--num-cpus", "2",
           "--no-progress"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "summary: 2 done, 0 skipped, 0 failed" in p.stdout
    assert set(metrics(out)) == {"fp16", "int2"}


def test_without_ray_one_line_exit_2_before_torch(tmp_path):
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from harness.cli import main\n"
        "rc = main(['run', '--methods', 'fp16', '--executor', 'ray', '--out', sys.argv[1]])\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(rc)\n"
    )
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)  # fmt: skip
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"error: {RAY_MISSING}"]
    assert p.stdout.strip() == "no torch"


@pytest.mark.parametrize(
    ("task", "method", "want"),
    [("wikitext2:max_windows=1", "int4", 1), ("wikitext2:max_windows=2", "int4", 2), ("wikitext2", "int4", 3),
     ("longbench:trec,samsum,limit=1", "int4", 2), ("longbench:kivi8,limit=1", "int4", 3),
     ("lmeval:piqa", "int4", 1), ("wikitext2", "moqae-oracle", 1)],
)  # fmt: skip
def test_shards_per_cell_never_more_than_the_units(task, method, want):
    """No empty shard is submitted (1 window: 1 task); tasks that do not split and oracles: 1."""
    from harness.evaluation import build_task
    from harness.interface import build_method
    from harness.runner import Cell

    cell = Cell(build_method(method), build_task(task), {}, Path("x.json"))
    assert RayExecutor(shard_samples=3)._shards(cell) == want


def test_bad_executor_and_shards_without_ray_are_one_line_errors(tmp_path):
    from harness.cli import main

    assert main(["run", "--methods", "fp16", "--executor", "dask", "--out", str(tmp_path)]) == 2
    assert main(["run", "--methods", "fp16", "--shard-samples", "2", "--out", str(tmp_path), "--model",
                 "no/such"]) == 2  # fmt: skip
