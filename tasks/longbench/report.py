"""The report's LongBench section: per-dataset scores and their average, one table per model and
task options. Declared by ``tasks.longbench.task.LongBench.report_sections``."""

from __future__ import annotations

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

TASK = "longbench"


def longbench_tables(data: ReportData) -> list[Table]:
    lb = [r for r in data.records if r["key"]["task"] == TASK]
    tables = []
    for gi, ((model, cfg), recs) in enumerate(group_records(lb, lambda r: (r["model"], task_config(r)))):
        recs = sorted(recs, key=method_sort_key)
        datasets = list(dict.fromkeys(k for r in recs for k in r["metrics"] if k != "average"))
        header = ["method", *datasets, "average"]
        rows, rows_csv = [], []
        for r in recs:
            m = r["metrics"]
            rows.append([display_name(r), *[fmt(m.get(d)) for d in datasets], fmt(m.get("average"))])
            for d in [*datasets, "average"]:
                if d in m:
                    n = (
                        (r.get("n_samples") or {}).get(d)
                        if d != "average"
                        else sum((r.get("n_samples") or {}).values())
                    )
                    rows_csv.append({"model": model, "method": display_name(r), "spec": r["method"], "dataset": d,
                                     "score": m[d], "samples": n, "record": r["_file"]})  # fmt: skip
        n_samples = recs[0].get("n_samples") or {}
        limit = cfg.get("limit")
        t = Table("longbench" + suffix(gi), f"LongBench ({cfg.get('tasks')}), {model}", header, rows, rows_csv)
        budget = cfg.get("max_length") or "the model's window"
        t.intro = (
            "Scores × 100 with each dataset's official metric (F1, ROUGE-L, accuracy, edit similarity); "
            f"*average* is the mean over the datasets. Prompts cut in the middle to {budget} tokens"
            + (f"; the first {plural(limit, 'sample')} of each dataset" if limit else "; every sample")
            + ". Samples per dataset: "
            + ", ".join(f"{d} {n}" for d, n in n_samples.items())
            + "."
        )
        tables.append(t)
    return tables


LONGBENCH = Section("LongBench", lambda data: ("", longbench_tables(data)), order=30)
