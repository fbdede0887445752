"""The report's RULER section: per model and task options, one table of RULER's average per length
(with the methods' nominal bits beside it) and one table per length of the score of every task.
Declared by ``tasks.ruler.task.RULER.report_sections``.

Scores are RULER's ``string_match_all`` / ``string_match_part`` × 100 (``tasks.ruler.metrics``); the
average over tasks per length is RULER's own summary. The haystack is named in every table's intro
(``noise`` is RULER's noise haystack standing in for its Paul Graham essays where those are used).
"""

from __future__ import annotations

from typing import Any

from harness.reports import (
    ReportData,
    Section,
    Table,
    display_name,
    fmt,
    group_records,
    method_sort_key,
    plural,
    suffix,
    task_config,
)

TASK = "ruler"


def _lengths(recs: list[dict[str, Any]]) -> list[int]:
    keys = {k for r in recs for k in r["metrics"]}
    return sorted({int(k.split("@")[1]) for k in keys if k.startswith("avg@")})


def _tasks(recs: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k.split("@")[0] for r in recs for k in r["metrics"] if "@" in k and k[:4] != "avg@"))


def ruler_tables(data: ReportData) -> list[Table]:
    records = [r for r in data.records if r["key"]["task"] == TASK]
    tables = []
    for gi, ((model, cfg), recs) in enumerate(group_records(records, lambda r: (r["model"], task_config(r)))):
        recs = sorted(recs, key=method_sort_key)
        lengths, tasks = _lengths(recs), _tasks(recs)
        info = recs[0].get("ruler") or {}
        intro = (
            f"RULER's scores × 100 (string_match_all; string_match_part for qa), "
            f"{plural(info.get('samples', cfg.get('samples')), 'sample')} per task and length, seed "
            f"{info.get('seed', cfg.get('seed'))}, haystack `{info.get('haystack', cfg.get('haystack'))}`, "
            f"chat template {'on' if info.get('chat', cfg.get('chat')) else 'off'}; the same prompts for every "
            "method (`prompts_sha1` in each record)."
        )
        header = ["method", "nominal bits", *[f"avg@{n}" for n in lengths], "average"]
        rows, rows_csv = [], []
        for r in recs:
            m, kv = r["metrics"], r.get("kv") or {}
            rows.append([display_name(r), fmt(kv.get("nominal_bits")), *[fmt(m.get(f"avg@{n}")) for n in lengths],
                         fmt(m.get("average"))])  # fmt: skip
            for key, value in m.items():
                task, _, length = key.partition("@")
                rows_csv.append({"model": model, "method": display_name(r), "spec": r["method"], "task": task,
                                 "length": length, "score": value, "record": r["_file"]})  # fmt: skip
        t = Table("ruler" + suffix(gi), f"RULER ({cfg.get('tasks')}), {model}: average per length", header, rows,
                  rows_csv, numeric_from=1)  # fmt: skip
        t.intro = intro
        tables.append(t)
        for n in lengths:
            header = ["method", *tasks, "average"]
            rows = [[display_name(r), *[fmt(r["metrics"].get(f"{k}@{n}")) for k in tasks],
                     fmt(r["metrics"].get(f"avg@{n}"))] for r in recs]  # fmt: skip
            tables.append(Table(f"ruler{suffix(gi)}-{n}", f"RULER at {n} tokens, {model}", header, rows, []))
    return tables


RULER_SECTION = Section("RULER", lambda data: ("", ruler_tables(data)), order=33)
