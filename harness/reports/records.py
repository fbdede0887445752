"""Reading what a report is made of: run records and profile files, and the small helpers that
group and name them (used by the core's sections and by the sections tasks and methods declare).

``load_results`` classifies every JSON file under the given folders: run records (done / failed,
each with ``_file``: the path a reader finds it at), profile files (``{"command", "rows"}``, rows of
the current format only, each with ``_file``, ``_row`` and ``_reference``: the ``settings.reference``
the file was profiled against, where it says) and other files (a note each).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.runner import is_complete, load_record, normalize_command


def record_paths(sources: Iterable[str | Path]) -> list[Path]:
    """JSON records in the given folders (sorted) or the given files."""
    paths: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            paths += sorted(p.glob("*.json"))
        elif p.is_file():
            paths.append(p)
        else:
            raise ValueError(f"no results at {p}: give a folder of run records (python -m harness run --out DIR)")
    return paths


def json_files(sources: Iterable[str | Path]) -> list[Path]:
    """Every ``*.json`` under the given folders (recursively, sorted) and the given files, once each."""
    seen: set[Path] = set()
    paths: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.json") if not any(part.startswith(".") for part in q.parts[-1:]))
        elif p.is_file():
            found = [p]
        else:
            raise ValueError(f"no results at {p}: give a folder of run records (python -m harness run --out DIR)")
        for q in found:
            if q.resolve() not in seen:
                seen.add(q.resolve())
                paths.append(q)
    return paths


def done_records(paths: Iterable[Path]) -> list[dict[str, Any]]:
    return [r for r in (load_record(p) for p in paths) if is_complete(r)]


def shown_path(path: Path) -> str:
    """The path as a reader finds it: relative to the working directory where possible."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@dataclass
class Results:
    records: list[dict[str, Any]] = field(default_factory=list)  # finished run records (+ "_file")
    failed: list[dict[str, Any]] = field(default_factory=list)  # failed run records (+ "_file")
    profile_rows: list[dict[str, Any]] = field(default_factory=list)  # (+ "_file", "_row", "_reference")
    profile_commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # files read but not used, and why
    run_paths: list[Path] = field(default_factory=list)


def load_results(sources: Iterable[str | Path]) -> Results:
    """Classify every JSON file: run records (done / failed), profile files (new-format rows), others.

    A record whose key appears twice (the same cell copied into two folders) is used once."""
    res = Results()
    keys: set[str] = set()
    for path in json_files(sources):
        obj = load_record(path)
        shown = shown_path(path)
        if isinstance(obj, dict) and "key" in obj and "status" in obj:
            if obj["status"] == "done" and not is_complete(obj):
                res.notes.append(f"`{shown}`: says done but is not a complete record; skipped (re-run the cell)")
                continue
            key = json.dumps(obj["key"], sort_keys=True, default=str)
            if key in keys:
                continue
            keys.add(key)
            obj["_file"] = shown
            res.run_paths.append(path)
            (res.records if obj["status"] == "done" else res.failed).append(obj)
        elif isinstance(obj, dict) and isinstance(obj.get("rows"), list):
            rows = [(i, r) for i, r in enumerate(obj["rows"]) if isinstance(r, dict)]
            new = [(i, r) for i, r in rows if "context" in r and "batch" in r and "method" in r]
            if len(new) < len(rows):
                res.notes.append(
                    f"`{shown}`: {len(rows) - len(new)} profile row(s) of the older format (no context/batch) "
                    "skipped; re-run `python -m harness profile ... --out` to include them"
                )
            settings = obj.get("settings") if isinstance(obj.get("settings"), dict) else {}
            reference = settings.get("reference") or obj.get("reference")
            res.profile_rows += [{**r, "_file": shown, "_row": i, "_reference": reference} for i, r in new]
            if new and obj.get("command"):
                res.profile_commands.append(normalize_command(str(obj["command"])))
        else:
            res.notes.append(f"`{shown}`: not a run record or profile file; skipped")
    return res


# --------------------------------------------------------------------------------------------
# Helpers for sections: grouping, task options, model columns, number formats
# --------------------------------------------------------------------------------------------


def num(v: Any, default: float = 0.0) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def fmt(v: Any, spec: str = "{:.2f}", scale: float = 1.0) -> str:
    """``spec`` applied to ``v * scale``; an em dash for a missing value (None, NaN)."""
    if v is None or (isinstance(v, float) and v != v):
        return "—"
    try:
        return spec.format(v * scale)
    except (TypeError, ValueError):
        return str(v)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def suffix(i: int) -> str:
    """File-name suffix of the i-th table of a kind: ``""``, ``-2``, ``-3`` ..."""
    return "" if i == 0 else f"-{i + 1}"


def group_records(records: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> list[tuple[Any, list]]:
    """Records grouped by ``key(record)``, biggest group first (ties in a fixed order)."""
    groups: dict[str, tuple[Any, list]] = {}
    for r in records:
        k = key(r)
        groups.setdefault(json.dumps(k, sort_keys=True, default=str), (k, []))[1].append(r)
    return [groups[s] for s in sorted(groups, key=lambda s: (-len(groups[s][1]), s))]


_TASK_DEFAULTS: dict[str, dict[str, Any]] = {}


def task_config(rec: dict[str, Any]) -> dict[str, Any]:
    """The record's task options with the task's current defaults filled in, so that a record
    written before an option existed groups with those written after (``prefill_chunk``: 0)."""
    name = rec["key"]["task"]
    if name not in _TASK_DEFAULTS:
        try:
            from harness.evaluation import TASKS

            _TASK_DEFAULTS[name] = dataclasses.asdict(TASKS.entry(name).cls.config_class())
        except Exception:  # noqa: BLE001 - a task this checkout does not know: its options as written
            _TASK_DEFAULTS[name] = {}
    cfg = rec["key"].get("task_config") or {}
    return {**{k: v for k, v in _TASK_DEFAULTS[name].items() if k not in cfg}, **cfg}


def column(rec: dict[str, Any]) -> tuple[str, str, str]:
    """The (model, dtype, device) a record's number belongs to: one column of a table."""
    return (rec["model"], rec["key"].get("dtype", ""), rec["key"].get("device", ""))


def column_labels(cols: list[tuple[str, str, str]]) -> dict[tuple[str, str, str], str]:
    """Column titles: the model, with dtype and device where one model has several columns."""
    models = Counter(c[0] for c in cols)
    return {c: c[0] if models[c[0]] == 1 else f"{c[0]} ({c[1]}, {c[2]})" for c in cols}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (at most as many bits and at most the PPL,
    one of them strictly fewer), ordered by bits: the frontier of the bits-vs-PPL trade-off."""
    front = []
    for i, (b, p) in enumerate(points):
        if not any(b2 <= b and p2 <= p and (b2 < b or p2 < p) for j, (b2, p2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i])
