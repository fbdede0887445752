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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from harness.data import MissingDataError, resolve_data_dir
from harness.data import calibration_windows as calibration_batches
from harness.env import environment
from harness.evaluation import Task, TaskContext, build_task
from harness.files import write_json_atomic, write_text_atomic  # re-exported: cli, reports, reproduce import them here
from harness.integration import AttachedMethod, model_info
from harness.interface import KVCacheMethod, MethodSpecError, UnsupportedModelError, build_method
from harness.models import is_random_weights, load_model, model_id

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
    except (OSError, json.JSONDecodeError):
        return None


@dataclass
class RunSummary:
    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def build_all(methods: list[str], tasks: list[str], **task_overrides: Any) -> tuple[list[KVCacheMethod], list[Task]]:
    """Parse every spec before any model is loaded, so bad input fails fast."""
    if not methods:
        raise MethodSpecError("no method given; use --methods fp16,int4,...")
    if not tasks:
        raise MethodSpecError("no task given; use --tasks wikitext2")
    return [build_method(m) for m in methods], [build_task(t, **task_overrides) for t in tasks]


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
    **task_overrides: Any,
) -> RunSummary:
    """``skip_unsupported``: a method the model cannot run (``check_model`` fails: a group that does
    not divide head_dim, no MoQAE router for this model) gets failed records with the reason and the
    sweep goes on with the others; without it (the CLI) the whole run stops before any work."""
    if calibration_windows < 1:
        raise MethodSpecError(f"calibration_windows={calibration_windows} must be >= 1")
    out = Path(out_dir)
    method_objs, task_objs = build_all(methods, tasks, **task_overrides)
    data = resolve_data_dir(data_dir)
    refused = [t.name for t in task_objs if t.refuses_random_weights]
    if is_random_weights(model) and refused:
        raise MethodSpecError(f"{model} has random weights: {', '.join(refused)} is never reported for it")
    t0 = time.perf_counter()
    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    load_seconds = time.perf_counter() - t0
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
                if not force and (load_record(path) or {}).get("status") == "done":
                    summary.skipped.append(path)
                    continue
                failed = {"key": key, "model": name, "method": method.label, "task": task.label,
                          "created": datetime.now(UTC).isoformat(timespec="seconds"), "command": invocation(),
                          "environment": env, "status": "failed", "reason": reason}  # fmt: skip
                write_json_atomic(path, failed)
                summary.failed.append((path, reason))
                log(f"FAILED {method.label} / {task.label}: {reason}")
            continue
        todo = []
        for task, key, path in cells:
            rec = None if force else load_record(path)
            if rec is not None and rec.get("status") == "done":
                summary.skipped.append(path)
                log(f"skip {path.name} (exists)")
            else:
                todo.append((task, key, path))
        if not todo:
            continue
        calib_seconds = 0.0
        with AttachedMethod(lm, method) as attached:
            if method.needs_calibration:
                c0 = time.perf_counter()
                seqlen = getattr(todo[0][0].config, "seqlen", 2048)
                attached.calibrate(calibration_batches(tokenizer, data, seqlen, calibration_windows))
                calib_seconds = time.perf_counter() - c0
            for task, key, path in todo:
                record: dict[str, Any] = {
                    "key": key,
                    "model": name,
                    "method": method.label,
                    "task": task.label,
                    "created": datetime.now(UTC).isoformat(timespec="seconds"),
                    "command": invocation(),
                    "environment": env,
                    "model_load_seconds": load_seconds,
                    "calibration_seconds": calib_seconds,
                }
                if method.needs_calibration:
                    record["calibration_windows"] = calibration_windows
                w0 = time.perf_counter()
                try:
                    checkpoint = path.with_suffix(".partial.jsonl")
                    ctx = TaskContext(lm, tokenizer, attached, data, progress=progress, checkpoint=checkpoint)
                    result = task.evaluate(ctx)
                except MissingDataError:
                    raise
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as e:  # a failed cell is recorded and the sweep goes on
                    if isinstance(e, torch.OutOfMemoryError):
                        reason = "out of memory: " + str(e).splitlines()[0]
                    else:
                        reason = f"{type(e).__name__}: {e}"
                    record.update(status="failed", reason=reason, traceback=traceback.format_exc())
                    write_json_atomic(path, record)
                    summary.failed.append((path, reason))
                    log(f"FAILED {method.label} / {task.label}: {reason}")
                    continue
                samples = result.pop("samples", None)
                if samples is not None:  # per-sample detail (inputs' lengths, outputs, scores) in a side file
                    side = path.with_suffix(".samples.jsonl")
                    write_text_atomic(side, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
                    record["samples_file"] = side.name
                record.update(status="done", wall_seconds=time.perf_counter() - w0, **result)
                write_json_atomic(path, record)
                checkpoint.unlink(missing_ok=True)  # the record now holds every sample
                summary.done.append(path)
                log(f"done {method.label} / {task.label}: {_fmt_metrics(result['metrics'])} -> {path.name}")
    return summary


def _fmt_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def results_table(paths: list[Path], reference: str | None = None) -> str:
    """A Markdown table of records; KV byte ratios are against the ``reference`` method's record of
    the same model and task options (default ``harness.builtins.REFERENCE_METHOD``)."""
    from harness.builtins import REFERENCE_METHOD
    from harness.reports.table import markdown_table

    reference = reference or REFERENCE_METHOD
    recs = [r for r in (load_record(p) for p in paths) if r and r.get("status") == "done"]
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
