"""The report's lm-eval section: every metric lm-eval reported (± its standard error) per task, one
table per model and task options. Declared by ``tasks.lmeval.LMEval.report_sections``."""

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
#: metrics printed as they are (lower is better); every other metric is a rate, printed in %
RAW_METRICS = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


def task_metrics(task: str, records: list[dict]) -> list[str]:
    """The metric names of ``task`` in ``records`` (``acc``, ``acc_norm`` first, then as lm-eval gave them)."""
    names = [k.split("/", 1)[1] for r in records for k in r["metrics"] if k.split("/", 1)[0] == task]
    names = [n for n in dict.fromkeys(names) if not n.partition("[")[0].endswith("_stderr")]
    return sorted(names, key=lambda n: {"acc": 0, "acc_norm": 1}.get(n, 2))


def _stderr_key(task: str, metric: str) -> str:
    name, bracket, flt = metric.partition("[")
    return f"{task}/{name}_stderr{bracket}{flt}"


def format_metric(metric: str, value: float, stderr: float | None) -> str:
    raw = metric.partition("[")[0] in RAW_METRICS
    scale, spec = (1.0, "{:.3f}") if raw else (100.0, "{:.1f}")
    return spec.format(scale * value) + ("" if stderr is None else " ± " + spec.format(scale * stderr))


def lmeval_tables(data: ReportData) -> list[Table]:
    lm = [r for r in data.records if r["key"]["task"] == TASK]
    tables = []
    for gi, ((model, cfg), recs) in enumerate(group_records(lm, lambda r: (r["model"], task_config(r)))):
        recs = sorted(recs, key=method_sort_key)
        tasks = [t.strip() for t in str(cfg.get("tasks", "")).split(",") if t.strip()]
        tasks = tasks or list(dict.fromkeys(k.split("/")[0] for r in recs for k in r["metrics"]))
        metrics = [(t, m) for t in tasks for m in task_metrics(t, recs)]
        header = ["method", *[f"{t} {m}" for t, m in metrics], "mean acc"]
        rows, rows_csv = [], []
        for r in recs:
            m = r["metrics"]
            row = [display_name(r)]
            for t, name in metrics:
                v, se = m.get(f"{t}/{name}"), m.get(_stderr_key(t, name))
                row.append("—" if v is None else format_metric(name, v, se))
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
            f"lm-eval's metrics ± its standard error, {cfg.get('num_fewshot', 0)}-shot: rates (acc, acc_norm, ...) "
            f"in %, {', '.join(RAW_METRICS)} as they are (lower is better); *mean acc* averages acc over the "
            "tasks. Documents per task: "
            + ", ".join(f"{k} {v}" for k, v in docs.items())
            + (f" (the first {cfg['limit']} of each)" if cfg.get("limit") else "")
            + "."
        )
        tables.append(t)
    return tables


LMEVAL = Section("lm-eval", lambda data: ("", lmeval_tables(data)), order=40)
