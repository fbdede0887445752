"""The report's lm-eval section: accuracies (± standard error) per task, one table per model and
task options. Declared by ``tasks.lmeval.LMEval.report_sections``."""

from __future__ import annotations

from harness.reports import (
    ReportData,
    Section,
    Table,
    display_name,
    fmt,
    group_records,
    method_sort_key,
    suffix,
    task_config,
)

TASK = "lmeval"


def lmeval_tables(data: ReportData) -> list[Table]:
    lm = [r for r in data.records if r["key"]["task"] == TASK]
    tables = []
    for gi, ((model, cfg), recs) in enumerate(group_records(lm, lambda r: (r["model"], task_config(r)))):
        recs = sorted(recs, key=method_sort_key)
        tasks = [t.strip() for t in str(cfg.get("tasks", "")).split(",") if t.strip()]
        tasks = tasks or list(dict.fromkeys(k.split("/")[0] for r in recs for k in r["metrics"]))
        metrics = [(t, m) for t in tasks for m in ("acc", "acc_norm") if any(f"{t}/{m}" in r["metrics"] for r in recs)]
        header = ["method", *[f"{t} {m}" for t, m in metrics], "mean acc"]
        rows, rows_csv = [], []
        for r in recs:
            m = r["metrics"]
            row = [display_name(r)]
            for t, name in metrics:
                v, se = m.get(f"{t}/{name}"), m.get(f"{t}/{name}_stderr")
                row.append("—" if v is None else f"{100 * v:.1f}" + ("" if se is None else f" ± {100 * se:.1f}"))
                if v is not None:
                    rows_csv.append({"model": model, "method": display_name(r), "spec": r["method"], "task": t,
                                     "metric": name, "value": v, "stderr": se,
                                     "documents": (r.get("documents") or {}).get(t), "record": r["_file"]})  # fmt: skip
            accs = [m[f"{t}/acc"] for t in tasks if f"{t}/acc" in m]
            row.append(fmt(sum(accs) / len(accs), "{:.1f}", 100) if accs else "—")
            rows.append(row)
        docs = recs[0].get("documents") or {}
        t = Table("lmeval" + suffix(gi), f"lm-eval ({', '.join(tasks)}), {model}", header, rows, rows_csv)
        t.intro = (
            f"Accuracy in % ± lm-eval's standard error, {cfg.get('num_fewshot', 0)}-shot; *mean acc* averages acc "
            "over the tasks. Documents per task: "
            + ", ".join(f"{k} {v}" for k, v in docs.items())
            + (f" (the first {cfg['limit']} of each)" if cfg.get("limit") else "")
            + "."
        )
        tables.append(t)
    return tables


LMEVAL = Section("lm-eval", lambda data: ("", lmeval_tables(data)), order=40)
