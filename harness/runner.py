"""Run methods x tasks on one model and write one JSON record per (model, method, task).

Records are keyed by the full configuration (model, dtype, device type, method options, task
options): re-running skips records that exist, a failed cell is recorded with its reason and the
sweep goes on, and every record is written atomically (no half-written file after a crash).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import sys
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from harness.data import MissingDataError, resolve_data_dir, wikitext2_calibration_text
from harness.data import calibration_windows as calibration_batches
from harness.env import environment
from harness.evaluation import Task, TaskContext, build_task
from harness.files import (  # re-exported: cli, reports, reproduce import them here
    check_writable_dir,
    claim,
    release,
    write_json_atomic,
    write_text_atomic,
)
from harness.integration import AttachedMethod, model_info
from harness.interface import KVCacheMethod, MethodSpecError, UnsupportedModelError, build_method
from harness.models import (
    ModelLoadError,
    check_fits_context,
    check_model_source,
    config_context_length,
    context_length,
    default_dtype,
    is_random_weights,
    load_model,
    model_id,
    parse_device,
    parse_dtype,
)

#: calibration windows (of the task's seqlen, from the calibration split) for methods that calibrate
#: (KVQuant, QoQ); ``run(calibration_windows=N)`` / ``--calibration-windows N`` changes it, and a
#: value other than this default enters the record key (``calibration_windows``).
CALIBRATION_WINDOWS = 16


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def invocation() -> str:
    """The command line that is running, as a user would type it (``python -m harness run ...``)."""
    return normalize_command(shlex.join(sys.argv))


def normalize_command(command: str) -> str:
    """``/path/to/harness/__main__.py run ...`` -> ``python -m harness run ...``."""
    head, sep, rest = command.partition(" ")
    if head.endswith(("harness/__main__.py", "harness\\__main__.py")):
        return "python -m harness" + sep + rest
    return command


def record_key(
    model: str,
    dtype: str,
    device: str,
    method: KVCacheMethod,
    task: Task,
    calibration_windows: int = CALIBRATION_WINDOWS,
) -> dict[str, Any]:
    key = {
        "model": model,
        "dtype": dtype,
        "device": device,
        "method": method.name,
        "method_config": method.options(),
        "task": task.name,
        "task_config": task.options(),
    }
    if method.needs_calibration and calibration_windows != CALIBRATION_WINDOWS:
        key["calibration_windows"] = calibration_windows  # the default keeps older records' keys
    return key


def record_path(out_dir: Path, key: dict[str, Any], method_label: str) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return out_dir / f"{_slug(key['model'])}__{_slug(method_label)}__{key['task']}__{digest}.json"


def load_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


#: what every finished record holds (``kv`` may be null for a task that kept no cache)
RECORD_FIELDS = {"key": dict, "model": str, "method": str, "task": str, "metrics": dict}


def is_complete(record: Any, key: dict[str, Any] | None = None) -> bool:
    """A finished record that parses as one: status done, every field of :data:`RECORD_FIELDS` with
    its type, ``kv`` a dict or null, and (given ``key``) the key of the cell it is filed under.
    Anything else (``{"status": "done"}``, a truncated or hand-edited file) is recomputed, never trusted."""
    if not isinstance(record, dict) or record.get("status") != "done":
        return False
    if not all(isinstance(record.get(f), t) for f, t in RECORD_FIELDS.items()):
        return False
    if not (record.get("kv") is None or isinstance(record["kv"], dict)):
        return False
    return key is None or _key_text(record["key"]) == _key_text(key)


def _key_text(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def check_out_dir(out: Path) -> None:
    """Refuse (one line) an ``--out`` that is a file or cannot be written (a read-only mount, ``/sys``),
    before any model is loaded; nothing is left behind (the folder is made when the first record is
    written; ``harness.files.check_writable_dir`` probes it with a file it removes)."""
    check_writable_dir(out, f"--out {out}", "give a writable folder for the records")


def preflight(methods: list[KVCacheMethod], tasks: list[Task], model: str, data_dir: Path | None) -> list[str]:
    """Everything a run needs that can be checked before a model is loaded: the model's source, every
    task's data, the calibration split where a method calibrates. Returns the problems (one line each)."""
    problems = []
    try:
        check_model_source(model)
    except ModelLoadError as e:
        problems.append(str(e))
    checks = [(t.label, lambda t=t: t.check_data(data_dir)) for t in tasks]
    if any(m.needs_calibration for m in methods):
        checks.append(("calibration", lambda: wikitext2_calibration_text(data_dir)))
    for _, check in checks:
        try:
            check()
        except (MissingDataError, MethodSpecError) as e:
            problems.append(" ".join(str(e).split()))
    return list(dict.fromkeys(problems))


def check_context(tasks: list[Task], context: int | None, model: str) -> None:
    """Refuse a task whose windows / prompts are longer than the model's context (one line)."""
    for task in tasks:
        check_fits_context(task.label, task.tokens_needed(), context, model, "use --seqlen / max_length")


@dataclass
class RunSummary:
    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    claimed: list[Path] = field(default_factory=list)  # being computed by another process
    planned: list[Path] = field(default_factory=list)  # --dry-run: cells a run would compute


def build_all(methods: list[str], tasks: list[str], **task_overrides: Any) -> tuple[list[KVCacheMethod], list[Task]]:
    """Parse every spec before any model is loaded, so bad input fails fast."""
    if not methods:
        raise MethodSpecError("no method given; use --methods fp16,int4,...")
    if not tasks:
        raise MethodSpecError("no task given; use --tasks wikitext2")
    return _distinct([build_method(m) for m in methods]), _distinct([build_task(t, **task_overrides) for t in tasks])


def _distinct(items: list[Any]) -> list[Any]:
    """Items of the same configuration (``int4`` and ``int:bits=4``) once: the first spelling wins."""
    seen: dict[str, Any] = {}
    for item in items:
        ident = _key_text({"name": item.name, "options": item.options()})
        if ident in seen:
            print(f"note: {item.label} is the same configuration as {seen[ident].label}: computed once",
                  file=sys.stderr)  # fmt: skip
            continue
        seen[ident] = item
    return list(seen.values())


@dataclass
class Cell:
    """One (method, task) cell of a run on one model: its record key and the file it is written to."""

    method: KVCacheMethod
    task: Task
    key: dict[str, Any]
    path: Path


def check_run(
    methods: list[str], tasks: list[str], model: str, out: Path, data_dir: str | Path | None, device: str | None,
    calibration_windows: int, **task_overrides: Any,
) -> tuple[list[KVCacheMethod], list[Task], Path | None, torch.device]:  # fmt: skip
    """Everything ``run`` checks before a model is loaded (specs, random weights, oracles, the device,
    ``--out``, data); returns the method and task objects, the data folder and the device."""
    if calibration_windows < 1:
        raise MethodSpecError(f"calibration_windows={calibration_windows} must be >= 1")
    method_objs, task_objs = build_all(methods, tasks, **task_overrides)
    data = resolve_data_dir(data_dir)
    refused = [t.name for t in task_objs if t.refuses_random_weights]
    if is_random_weights(model) and refused:
        raise MethodSpecError(f"{model} has random weights: {', '.join(refused)} is never reported for it")
    oracles, blind = [m.label for m in method_objs if m.oracle], [t.name for t in task_objs if not t.supports_oracles]
    if oracles and blind:
        raise MethodSpecError(
            f"{oracles[0]} is an oracle (it sees the evaluation window: an upper bound); "
            f"{blind[0]} does not run oracles; run it on a task that does (wikitext2)"
        )
    dev = parse_device(device)
    check_out_dir(out)
    problems = preflight(method_objs, task_objs, model, data)
    if problems:
        raise MissingDataError(" | ".join(problems))
    check_context(task_objs, config_context_length(model), model)  # from the config; the loaded model's again
    return method_objs, task_objs, data, dev


def plan_cells(
    method_objs: list[KVCacheMethod], task_objs: list[Task], model: str, out: Path, dev: torch.device,
    dtype: str | None, calibration_windows: int,
) -> list[Cell]:  # fmt: skip
    """The cells of a run, method by method, keyed as the runner keys them once the model is loaded
    (the dtype is the one asked for, else the device's default)."""
    dtype_name = str(parse_dtype(dtype) or default_dtype(dev)).removeprefix("torch.")
    cells = []
    for method in method_objs:
        for task in task_objs:
            key = record_key(model_id(model), dtype_name, dev.type, method, task, calibration_windows)
            cells.append(Cell(method, task, key, record_path(out, key, method.label)))
    return cells


def base_record(key: dict[str, Any], method: KVCacheMethod, task: Task, env: dict[str, Any], **extra: Any) -> dict:
    """The fields every record of a cell starts with (finished or failed)."""
    return {"key": key, "model": key["model"], "method": method.label, "task": task.label,
            "created": datetime.now(UTC).isoformat(timespec="seconds"), "command": invocation(), "environment": env,
            **extra}  # fmt: skip


def one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def evaluate_cell(task: Task, ctx: TaskContext, record: dict[str, Any]) -> tuple[dict[str, Any], list | None]:
    """Run ``task`` in ``ctx``: the finished record and its per-sample detail, or the failed record
    (with its reason) when the task raises. Both executors compute a cell through this."""
    w0 = time.perf_counter()
    try:
        result = task.evaluate(ctx)
    except (MissingDataError, KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # a failed cell is recorded and the sweep goes on
        if isinstance(e, torch.OutOfMemoryError):
            reason = "out of memory: " + str(e).splitlines()[0]
        else:
            reason = f"{type(e).__name__}: {e}"
        return {**record, "status": "failed", "reason": reason, "traceback": traceback.format_exc()}, None
    samples = result.pop("samples", None)
    return {**record, "status": "done", "wall_seconds": time.perf_counter() - w0, **result}, samples


def write_cell(path: Path, record: dict[str, Any], samples: list | None = None) -> None:
    """Write a cell's record atomically; per-sample detail (inputs' lengths, outputs, scores) goes to a
    side file first, named in the record, so that a record never points at a missing file."""
    if samples is not None:
        side = path.with_suffix(".samples.jsonl")
        write_text_atomic(side, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        record = {**record, "samples_file": side.name}
    write_json_atomic(path, record)


def run(
    methods: list[str],
    tasks: list[str],
    model: str,
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = True,
    log: Any = print,
    calibration_windows: int = CALIBRATION_WINDOWS,
    skip_unsupported: bool = False,
    dry_run: bool = False,
    executor: Any = None,
    **task_overrides: Any,
) -> RunSummary:
    """``dry_run``: check everything, list the cells (done / todo), load and compute nothing.
    ``skip_unsupported``: a method the model cannot run (``check_model`` fails: a group that does
    not divide head_dim, no MoQAE router for this model) gets failed records with the reason and the
    sweep goes on with the others; without it (the CLI) the whole run stops before any work.
    ``executor``: None computes the cells here, one after another; an executor object (e.g.
    ``harness.ray_executor.RayExecutor``) gets the cells still to do and computes them elsewhere."""
    out = Path(out_dir)
    method_objs, task_objs, data, dev = check_run(
        methods, tasks, model, out, data_dir, device, calibration_windows, **task_overrides
    )
    if dry_run or executor is not None:  # the cells and what is already there; no model is loaded here
        summary = RunSummary()
        todo = []
        for cell in plan_cells(method_objs, task_objs, model, out, dev, dtype, calibration_windows):
            done = not force and is_complete(load_record(cell.path), cell.key)
            (summary.skipped if done else summary.planned).append(cell.path)
            if dry_run:
                log(f"{'done' if done else 'todo'}  {cell.method.label} / {cell.task.label} -> {cell.path}")
            elif done:
                log(f"skip {cell.path.name} (exists)")
            else:
                todo.append(cell)
        if executor is not None and not dry_run:
            summary.planned = []
            executor.run_cells(model, todo, data, device=device, dtype=dtype, calibration_windows=calibration_windows,
                               summary=summary, log=log)  # fmt: skip
        return summary
    t0 = time.perf_counter()
    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    load_seconds = time.perf_counter() - t0
    check_context(task_objs, context_length(lm), model)
    info = model_info(lm)
    unsupported: dict[int, str] = {}
    for m in method_objs:  # group sizes, bits vs head_dim etc., before any work
        try:
            m.check_model(info)
        except (MethodSpecError, UnsupportedModelError) as e:
            if not skip_unsupported:
                raise
            unsupported[id(m)] = " ".join(f"{type(e).__name__}: {e}".split())
    name, dev = model_id(model), info.device.type
    dtype_name = str(info.dtype).removeprefix("torch.")
    env = environment(info.device)
    summary = RunSummary()
    for method in method_objs:
        cells = [(t, record_key(name, dtype_name, dev, method, t, calibration_windows)) for t in task_objs]
        cells = [(t, k, record_path(out, k, method.label)) for t, k in cells]
        if id(method) in unsupported:
            reason = unsupported[id(method)]
            for task, key, path in cells:
                if not force and is_complete(load_record(path), key):
                    summary.skipped.append(path)
                    continue
                write_json_atomic(path, base_record(key, method, task, env, status="failed", reason=reason))
                summary.failed.append((path, reason))
                log(f"FAILED {method.label} / {task.label}: {reason}")
            continue
        todo = []
        for task, key, path in cells:
            rec = None if force else load_record(path)
            if is_complete(rec, key):
                summary.skipped.append(path)
                log(f"skip {path.name} (exists)")
            elif not claim(path):  # another process on this results folder computes it right now
                summary.claimed.append(path)
                log(f"skip {path.name} (claimed by another process)")
            else:
                if rec is not None and rec.get("status") == "done":
                    log(f"recompute {path.name}: not a complete record of this cell")
                todo.append((task, key, path))
        if not todo:
            continue
        calib_seconds = 0.0
        with ExitStack() as stack:
            for _, _, path in todo:  # claims end with the method, however it ends
                stack.callback(release, path)
            try:  # a method that cannot attach or calibrate (a bad router file...) fails its cells only
                attached = stack.enter_context(AttachedMethod(lm, method))
                if method.needs_calibration:
                    c0 = time.perf_counter()
                    seqlen = getattr(todo[0][0].config, "seqlen", 2048)
                    attached.calibrate(calibration_batches(tokenizer, data, seqlen, calibration_windows))
                    calib_seconds = time.perf_counter() - c0
            except (MissingDataError, KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:
                reason = one_line(e)
                for task, key, path in todo:
                    failed = base_record(key, method, task, env, status="failed", reason=reason,
                                         traceback=traceback.format_exc())  # fmt: skip
                    write_json_atomic(path, failed)
                    summary.failed.append((path, reason))
                    log(f"FAILED {method.label} / {task.label}: {reason}")
                continue
            for task, key, path in todo:
                record = base_record(key, method, task, env, model_load_seconds=load_seconds,
                                     calibration_seconds=calib_seconds)  # fmt: skip
                if method.needs_calibration:
                    record["calibration_windows"] = calibration_windows
                if method.oracle:
                    record["oracle"] = True  # it saw the evaluation windows: an upper bound
                checkpoint = path.with_suffix(".partial.jsonl")
                ctx = TaskContext(lm, tokenizer, attached, data, progress=progress, checkpoint=checkpoint)
                record, samples = evaluate_cell(task, ctx, record)
                write_cell(path, record, samples)
                if record["status"] != "done":
                    summary.failed.append((path, record["reason"]))
                    log(f"FAILED {method.label} / {task.label}: {record['reason']}")
                    continue
                checkpoint.unlink(missing_ok=True)  # the record now holds every sample
                summary.done.append(path)
                log(f"done {method.label} / {task.label}: {_fmt_metrics(record['metrics'])} -> {path.name}")
    return summary


def _fmt_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def results_table(paths: list[Path], reference: str | None = None) -> str:
    """A Markdown table of records; KV byte ratios are against the ``reference`` method's record of
    the same model and task options (default ``harness.builtins.REFERENCE_METHOD``)."""
    from harness.builtins import REFERENCE_METHOD
    from harness.reports.table import markdown_table

    reference = reference or REFERENCE_METHOD
    recs = [r for r in (load_record(p) for p in paths) if is_complete(r)]
    ref = {
        (r["model"], json.dumps(r["key"]["task_config"], sort_keys=True)): r["kv"]["total_bytes"]
        for r in recs
        if r["key"]["method"] == reference
    }
    header = ["model", "method", "task", "metric", "nominal bits", "effective bits", "KV bytes", f"× {reference} bytes"]
    rows = []
    for r in recs:
        base = ref.get((r["model"], json.dumps(r["key"]["task_config"], sort_keys=True)))
        kv = r["kv"]
        ratio = f"{kv['total_bytes'] / base:.3f}" if base else "—"
        rows.append([r["model"], r["method"], r["task"], _fmt_metrics(r["metrics"]), f"{kv['nominal_bits']:.2f}",
                     f"{kv['effective_bits']:.2f}", f"{kv['total_bytes']:,}", ratio])  # fmt: skip
    return markdown_table(header, rows, numeric_from=4)
