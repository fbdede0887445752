"""``--executor ray``: the cells of a sweep as Ray tasks, on a local cluster or an existing one.

Ray (https://docs.ray.io, PyPI ``ray``, the optional extra ``[ray]``) runs on a laptop, on a Slurm
allocation, on Kubernetes (KubeRay) and on cloud clusters; the harness only submits tasks to it.

* **Driver** (this process): plans the cells exactly as the serial runner keys them, skips the
  finished ones before anything is submitted, claims each record file (``harness.files.claim``, so two
  drivers on one results folder never compute a cell twice), submits one Ray task per (model, method,
  task) cell with the declared resources, and writes each record atomically when its task returns.
  Workers write nothing into the results folder: they need no shared file system.
* **Workers**: :func:`cell_worker` loads the model once per worker process (kept for the next cell of
  the same model), attaches the method, calibrates, evaluates the task through the same
  ``harness.runner.evaluate_cell`` as the serial runner and returns the record.
* **Calibration**: where two or more cells need one method's calibration on one model (several tasks,
  or the shards of one cell), it is a Ray task of its own (:func:`calibration_worker`) that the cells
  depend on; it returns the calibration artefacts it saved or loaded (``harness.files`` cache) and
  each cell installs them into its worker's cache before calibrating, so the costly pass (KVQuant's
  Fisher information, KVmix's gradients) runs once. A method that keeps no artefact on disk (QoQ)
  recalibrates in each cell. A single cell calibrates itself.
* **Failures**: a worker that raises or dies (out of memory, ``kill -9``) becomes a failed-cell record
  with its reason once its retries (``retries``, Ray's ``max_retries``) are spent; the sweep goes on;
  a re-run computes only the cells without a finished record. Ctrl-C cancels the outstanding tasks;
  the finished records stay.
* **Shards** (``shard_samples`` = N > 1): a cell whose task is ``shardable`` (WikiText-2's windows,
  LongBench's samples) runs as N tasks (fewer where its options bound the units: one window, one
  task) whose parts ``Task.merge_shards`` joins, in order, into the record one pass writes.
  Oracle methods, which may carry state from one window to the next, are never sharded.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RAY_MISSING = "--executor ray needs Ray, an optional extra: pip install 'moqae-harness[ray]' (or 'ray>=2.40')"


def parse_executor(text: str) -> str | None:
    """``local`` -> None; ``ray`` -> ``""`` (start a local cluster); ``ray:ADDRESS`` -> the address
    (``auto``, ``HOST:6379``, ``ray://HOST:10001``). Raises ``ValueError`` (one line) otherwise or
    when Ray is not installed; imports nothing heavy."""
    kind, _, address = text.strip().partition(":")
    if kind == "local" and not address:
        return None
    if kind != "ray":
        raise ValueError(f"--executor {text!r}: use local, ray (a local cluster) or ray:ADDRESS (an existing one)")
    if importlib.util.find_spec("ray") is None:
        raise ValueError(RAY_MISSING)
    return address


# --------------------------------------------------------------------------------------------
# Workers (module-level functions: Ray imports this module in the worker process)
# --------------------------------------------------------------------------------------------

#: the model this worker process holds: (model, device, dtype) -> (model, tokenizer, load seconds)
_LOADED: dict[tuple[str, str | None, str | None], tuple[Any, Any, float]] = {}


def _arrive(job: dict[str, Any]) -> None:
    """Make the worker see files as the driver does: its working directory where that folder exists
    here (a local cluster, a shared file system), and the artefacts of prepare steps where missing."""
    from harness.files import install_artefacts

    if Path(job["cwd"]).is_dir():
        os.chdir(job["cwd"])
    install_artefacts(job["artefacts"])  # routers trained by a prepare step on another machine


def _model(job: dict[str, Any]) -> tuple[Any, Any, float, bool]:
    """The job's model, loaded once per worker process; True when this call loaded it."""
    import torch

    from harness.models import load_model

    torch.set_num_threads(job["threads"])
    key = (job["model"], job["device"], job["dtype"])
    if key in _LOADED:
        return (*_LOADED[key], False)
    _LOADED.clear()  # one model per worker: cells are submitted model by model
    gc.collect()
    t0 = time.perf_counter()
    lm, tokenizer = load_model(job["model"], device=job["device"], dtype=job["dtype"])
    _LOADED[key] = (lm, tokenizer, time.perf_counter() - t0)
    return (*_LOADED[key], True)


def _calibration_batches(job: dict[str, Any], tokenizer: Any) -> list[Any]:
    from harness.data import calibration_windows

    return calibration_windows(tokenizer, job["data_dir"], job["calibration_seqlen"], job["calibration_windows"])


def calibration_worker(job: dict[str, Any]) -> dict[str, Any]:
    """One method's calibration on one model: the artefacts it saved or loaded (file name -> bytes)
    and its seconds, for the cells that depend on it."""
    from harness.files import recording_calibration
    from harness.integration import AttachedMethod

    _arrive(job)
    lm, tokenizer, _, _ = _model(job)
    t0 = time.perf_counter()
    with AttachedMethod(lm, job["method"]) as attached, recording_calibration() as files:
        attached.calibrate(_calibration_batches(job, tokenizer))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "files": {p.name: p.read_bytes() for p in dict.fromkeys(files) if p.is_file()}}


def prepare_worker(job: dict[str, Any]) -> dict[str, Any]:
    """One method's ``prepare`` step (MoQAE: train a router where none ships) on a worker:
    ``{"prepared": None}`` when nothing was needed, else the ``Prepared`` fields and the artefact's bytes
    (the driver writes them into its results folder and hands them to the cells that run the spec)."""
    from harness.interface import PrepareContext, build_method

    _arrive(job)
    method = build_method(job["spec"])
    ctx = PrepareContext(job["model"], Path(job["out"]), job["data_dir"], job["options"],
                         lambda: _model(job)[:2], progress=False, log=lambda *_: None)  # fmt: skip
    done = method.prepare(job["spec"], ctx)
    if done is None:
        return {"prepared": None}
    fields = {"spec": done.spec, "cell": done.cell, "path": str(done.path), "reused": done.reused}
    return {"prepared": fields, "bytes": done.path.read_bytes()}


def cell_worker(job: dict[str, Any], calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """One cell (or one shard of it): ``{"record": ..., "samples": ...}`` (a shard: ``"part"`` too)."""
    import traceback

    import torch

    from harness.env import environment
    from harness.evaluation import TaskContext
    from harness.files import install_calibration
    from harness.integration import AttachedMethod, model_info
    from harness.runner import base_record, evaluate_cell, one_line, record_key

    _arrive(job)
    lm, tokenizer, load_seconds, loaded_now = _model(job)
    info = model_info(lm)
    method, task = job["method"], job["task"]
    dtype_name = str(info.dtype).removeprefix("torch.")
    key = record_key(job["key"]["model"], dtype_name, info.device.type, method, task, job["calibration_windows"])
    where = {"executor": "ray", "host": os.uname().nodename, "pid": os.getpid(), "threads": torch.get_num_threads(),
             "model_loaded_by_this_cell": loaded_now}  # fmt: skip
    if job["shard"]:
        where["shard"] = list(job["shard"])
    record = base_record(job["key"], method, task, environment(info.device), command=job["command"],
                         model_load_seconds=load_seconds, calibration_seconds=0.0, worker=where)  # fmt: skip
    if method.needs_calibration:
        record["calibration_windows"] = job["calibration_windows"]
    if method.oracle:
        record["oracle"] = True  # it saw the evaluation windows: an upper bound

    def failed(reason: str, tb: str | None = None) -> dict[str, Any]:
        return {"record": {**record, "status": "failed", "reason": reason, "traceback": tb}, "samples": None}

    if key != job["key"]:
        return failed(f"this worker keys the cell as {key}, the driver planned {job['key']} (another dtype or device)")
    try:
        method.check_model(info)
        attached = AttachedMethod(lm, method)
    except Exception as e:  # noqa: BLE001 - the model cannot run the method: a failed cell
        return failed(one_line(e), traceback.format_exc())
    try:
        if method.needs_calibration:
            c0 = time.perf_counter()
            install_calibration((calibration or {}).get("files", {}))
            attached.calibrate(_calibration_batches(job, tokenizer))
            record["calibration_seconds"] = (calibration or {}).get("seconds", time.perf_counter() - c0)
        part = f".shard{job['shard'][0]}of{job['shard'][1]}" if job["shard"] else ""
        checkpoint = Path(tempfile.gettempdir()) / "moqae-harness-cells" / f"{job['path_name']}{part}.partial.jsonl"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)  # this worker's own: a retry here resumes from it
        ctx = TaskContext(lm, tokenizer, attached, job["data_dir"], progress=False, checkpoint=checkpoint)
        if job["shard"]:
            w0 = time.perf_counter()
            result = task.evaluate_shard(ctx, *job["shard"])
            checkpoint.unlink(missing_ok=True)
            return {"record": {**record, "wall_seconds": time.perf_counter() - w0}, "part": result, "samples": None}
        record, samples = evaluate_cell(task, ctx, record)
        checkpoint.unlink(missing_ok=True)
        return {"record": record, "samples": samples}
    except Exception as e:  # noqa: BLE001 - calibration or data failed in the worker: a failed cell
        return failed(one_line(e), traceback.format_exc())
    finally:
        attached.detach()


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def _absolute(path: Path | None) -> Path | None:
    """A path as workers must read it: absolute (a worker's working directory is not the driver's)."""
    return None if path is None else Path(path).expanduser().resolve()


def _absolute_model(model: str) -> str:
    """A local model folder or file as an absolute path; aliases and hub ids as they are."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


@dataclass
class _Pending:
    """A submitted cell: its Ray object refs (one per shard) and where its record goes."""

    cell: Any  # harness.runner.Cell
    refs: list[Any]
    summary: Any  # harness.runner.RunSummary
    log: Callable[[str], None]
    task_env: dict[str, Any]
    parts: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass
class RayExecutor:
    """Computes a run's cells as Ray tasks; use as a context manager (``ray.init`` / ``shutdown``).

    ``address``: "" starts a local cluster bound to 127.0.0.1 with ``num_cpus`` CPUs (default: this
    machine's); else the address of a running cluster (``auto``, ``HOST:6379``, ``ray://HOST:10001``).
    ``cpus_per_cell`` is also each worker's torch thread count; ``memory_per_cell`` is in GiB.
    ``defer``: ``run_cells`` only submits; ``drain`` waits for everything submitted (``reproduce``
    submits every stage's cells before waiting on any)."""

    address: str = ""
    num_cpus: int | None = None
    cpus_per_cell: float = 1.0
    gpus_per_cell: float = 0.0
    memory_per_cell: float | None = None
    retries: int = 1
    shard_samples: int = 1
    progress: bool = True
    defer: bool = False
    _pending: list[_Pending] = field(default_factory=list)
    _started: bool = False
    #: what the prepare steps made (path as the driver names it -> bytes): shipped with every cell
    _artefacts: dict[str, bytes] = field(default_factory=dict)
    _remotes: dict[Callable[..., Any], Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cpus_per_cell <= 0 or self.gpus_per_cell < 0 or self.retries < 0 or self.shard_samples < 1:
            raise ValueError("--cpus-per-cell must be > 0, --gpus-per-cell and --retries >= 0, --shard-samples >= 1")
        if self.memory_per_cell is not None and self.memory_per_cell <= 0:
            raise ValueError(f"--memory-per-cell {self.memory_per_cell}: give GiB > 0")

    def __enter__(self) -> RayExecutor:
        self._start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.idle()

    def _start(self) -> None:
        """Join the cluster, or start a local one (then this executor stops it again)."""
        import ray

        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:  # a local cluster on this machine only
                ray.init(num_cpus=self.num_cpus or os.cpu_count(), include_dashboard=False,
                         _node_ip_address="127.0.0.1", log_to_driver=False)  # fmt: skip
            self._started = True

    def idle(self) -> None:
        """Nothing is to run for now: stop the local cluster this executor started, with its workers
        and the models they hold (``reproduce`` calls it before its profile stage, so that no Ray
        process shares the machine with the timings). The next submission starts it again."""
        import ray

        if self._started:
            ray.shutdown()
            self._started = False
            self._remotes.clear()

    def _remote(self, fn: Callable[..., Any]) -> Any:
        """``ray.remote(fn)``, made once per executor, so that every cell of a sweep (all of
        ``reproduce``'s stages) has one Ray scheduling class (resources and function) and the cells
        queue in the order they were submitted. Made anew per stage (until this was changed), the quick profile's
        stages ran as separate queues: one worker ran all 4 shards of a LongBench cell in a row
        while the other sat idle for 90 s at the end (measured; see docs/cluster.md)."""
        if fn not in self._remotes:
            import ray

            self._remotes[fn] = ray.remote(fn)
        return self._remotes[fn]

    def _options(self, remote: Any, name: str) -> Any:
        opts: dict[str, Any] = {"num_cpus": self.cpus_per_cell, "num_gpus": self.gpus_per_cell,
                                "max_retries": self.retries, "name": name}  # fmt: skip
        if self.memory_per_cell:
            opts["memory"] = int(self.memory_per_cell * 2**30)
        return remote.options(**opts)

    def prepare(
        self, model: str, steps: list[tuple[str, dict[str, Any]]], out: Path, data_dir: Path | None,
        device: str | None, dtype: str | None,
    ) -> list[Any]:  # fmt: skip
        """Run ``prepare`` steps ((spec, the profile's ``[prepare.<name>]`` options) each) as Ray tasks
        at once and wait for them; per step its ``Prepared`` (its artefact written into ``out`` here,
        and shipped with every later cell), None (nothing needed) or the exception that failed it."""
        import ray

        from harness.files import replace_atomic
        from harness.interface import Prepared

        self._start()
        remote = self._remote(prepare_worker)
        base = {"model": _absolute_model(model), "device": device, "dtype": dtype, "out": str(Path(out).resolve()),
                "data_dir": _absolute(data_dir), "threads": max(1, int(self.cpus_per_cell)), "cwd": os.getcwd(),
                "artefacts": self._artefacts}  # fmt: skip
        refs = [self._options(remote, f"prepare {spec}").remote({**base, "spec": spec, "options": options})
                for spec, options in steps]  # fmt: skip
        results: list[Any] = []
        try:
            for ref in refs:
                try:
                    got = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # the step raised: its own exception
                    results.append(e.cause if isinstance(e.cause, Exception) else e)
                    continue
                except ray.exceptions.RayError as e:  # the worker died
                    results.append(e)
                    continue
                if got["prepared"] is None:
                    results.append(None)
                    continue
                done = Prepared(**{**got["prepared"], "path": Path(got["prepared"]["path"])})
                if done.path.is_relative_to(base["out"]):  # name it as the serial runner does: same record keys
                    path = Path(out) / done.path.relative_to(base["out"])
                    done = Prepared(done.spec.replace(str(done.path), str(path)), done.cell, path, done.reused)
                if not done.path.exists():  # trained on a worker without this file system
                    replace_atomic(done.path, lambda f, data=got["bytes"]: f.write(data))
                self._artefacts[str(done.path)] = got["bytes"]
                results.append(done)
        except KeyboardInterrupt:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
        return results

    def run_cells(
        self, model: str, cells: list[Any], data_dir: Path | None, device: str | None, dtype: str | None,
        calibration_windows: int, summary: Any, log: Callable[[str], None] = print,
    ) -> None:  # fmt: skip
        """Submit ``cells`` (``harness.runner.Cell``, none finished) and, unless ``defer``, wait for them."""

        from harness.env import environment
        from harness.files import claim
        from harness.runner import invocation

        self._start()
        cell_remote, calib_remote = self._remote(cell_worker), self._remote(calibration_worker)
        threads = max(1, int(self.cpus_per_cell))
        base = {"model": _absolute_model(model), "device": device, "dtype": dtype, "data_dir": _absolute(data_dir),
                "threads": threads, "calibration_windows": calibration_windows, "command": invocation(),
                "artefacts": self._artefacts, "cwd": os.getcwd()}  # fmt: skip
        claimed = []
        for cell in cells:
            if claim(cell.path):
                claimed.append(cell)
            else:
                summary.claimed.append(cell.path)
                log(f"skip {cell.path.name} (claimed by another process)")
        # the serial runner calibrates a method once, with the seqlen of its first task: so do we
        seqlen: dict[int, int] = {}
        for cell in claimed:
            seqlen.setdefault(id(cell.method), getattr(cell.task.config, "seqlen", 2048))
        shards = {id(c): self._shards(c) for c in claimed}
        uses: dict[int, int] = {}
        for cell in claimed:
            if cell.method.needs_calibration:
                uses[id(cell.method)] = uses.get(id(cell.method), 0) + shards[id(cell)]
        calibration: dict[int, Any] = {}
        env = environment(None)
        for cell in claimed:
            job = {**base, "method": cell.method, "task": cell.task, "key": cell.key, "path_name": cell.path.name,
                   "calibration_seqlen": seqlen[id(cell.method)], "shard": None}  # fmt: skip
            mid = id(cell.method)
            if uses.get(mid, 0) > 1 and mid not in calibration:  # a step of its own, shared by the cells
                calibration[mid] = self._options(calib_remote, f"calibrate {cell.method.label}").remote(job)
            calib = calibration.get(mid)
            n = shards[id(cell)]
            name = f"{cell.method.label} / {cell.task.label}"
            refs = [
                self._options(cell_remote, name + (f" [{i + 1}/{n}]" if n > 1 else ""))
                .remote({**job, "shard": (i, n) if n > 1 else None}, calib)
                for i in range(n)
            ]  # fmt: skip
            self._pending.append(_Pending(cell, refs, summary, log, env))
        if not self.defer:
            self.drain()

    def _shards(self, cell: Any) -> int:
        """How many tasks compute the cell: ``shard_samples``, at most one per unit the task's options
        bound (1 window: 1 shard), 1 for tasks that do not split and for oracles."""
        if not cell.task.shardable or cell.method.oracle:
            return 1
        return max(1, min(self.shard_samples, cell.task.shard_units() or self.shard_samples))

    def drain(self) -> None:
        """Wait for every submitted cell, writing each record as its last task returns; Ctrl-C cancels
        the outstanding tasks (finished records stay) and re-raises."""
        import ray
        from tqdm.auto import tqdm

        from harness.files import release

        by_ref = {ref: (p, i) for p in self._pending for i, ref in enumerate(p.refs)}
        open_cells = {id(p): p for p in self._pending}
        slots = max(1, int(ray.cluster_resources().get("CPU", 1) // self.cpus_per_cell))
        failed = 0
        bar = tqdm(total=len(open_cells), desc="cells", unit="cell", disable=not self.progress)
        waiting = list(by_ref)
        try:
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1)
                for ref in ready:
                    p, i = by_ref[ref]
                    try:
                        p.parts[i] = ray.get(ref)
                    except ray.exceptions.RayError as e:  # the worker died or the task was cancelled
                        reason = " ".join(f"{type(e).__name__}: {e}".split())[:500]
                        p.parts[i] = {"record": None, "error": reason}
                    if len(p.parts) < len(p.refs):
                        continue
                    failed += not self._finish(p)
                    release(p.cell.path)
                    del open_cells[id(p)]
                    bar.update(1)
                    running = min(len(open_cells), slots)
                    bar.set_postfix(running=running, queued=len(open_cells) - running, failed=failed)
        except KeyboardInterrupt:
            for ref in waiting:
                ray.cancel(ref, force=True)
            raise
        finally:
            bar.close()
            for p in open_cells.values():
                release(p.cell.path)
            self._pending = []

    def _finish(self, p: _Pending) -> bool:
        """Write the cell's record from its parts; True when it is finished (done)."""
        from harness.runner import _fmt_metrics, base_record, write_cell

        cell, parts = p.cell, [p.parts[i] for i in range(len(p.refs))]
        errors = [q.get("error") or (q["record"].get("status") == "failed" and q["record"]["reason"]) for q in parts]
        errors = [e for e in errors if e]
        samples = None
        if errors:
            first = next((q["record"] for q in parts if q.get("record")), None)
            record = {**(first or base_record(cell.key, cell.method, cell.task, p.task_env)),
                      "status": "failed", "reason": errors[0]}  # fmt: skip
        elif len(parts) == 1:
            record, samples = parts[0]["record"], parts[0]["samples"]
        else:  # shards: one record, as one pass writes it
            merged = cell.task.merge_shards([q["part"] for q in parts])
            samples = merged.pop("samples", None)
            head = parts[0]["record"]
            record = {**head, "status": "done", "wall_seconds": sum(q["record"]["wall_seconds"] for q in parts),
                      **merged, "shards": len(parts), "worker": [q["record"]["worker"] for q in parts]}  # fmt: skip
        write_cell(cell.path, record, samples)
        label = f"{cell.method.label} / {cell.task.label}"
        if record["status"] != "done":
            p.summary.failed.append((cell.path, record["reason"]))
            p.log(f"FAILED {label}: {record['reason']}")
            return False
        p.summary.done.append(cell.path)
        p.log(f"done {label}: {_fmt_metrics(record['metrics'])} -> {cell.path.name}")
        return True
