"""The report's first table: a scorecard, one per model, one row per method.

Rows follow the methods' own order, names and families (``harness.reports.methods``), so a plugin
method is drawn like a built-in one; ablation variants stay in their method's own section; oracles
keep their "[oracle: upper bound]" label. Columns, each from the records present ("—" where none):

* nominal / effective bits of the method's WikiText-2 record (else of its first task with a record,
  named in the cell; else of its profile row);
* WikiText-2 PPL change against the reference method (``fp16``) on the same protocol, in %;
* LongBench average; RULER's average per length (``avg@L``); the needle test's mean exact match;
* decode step × transformers' ``DynamicCache`` (``dynamic``) and KV bytes × the reference, from the
  profile rows at one context (the largest most profiled methods share; the intro names it), or,
  without profile rows, KV bytes × the reference from the records of one task;
* the share of K/V elements each task's cache held quantized (``quantized_elements`` of the record's
  ``kv``; 0 where the cache held no codes at all).

Each task column reads one protocol (task options, dtype, device): where a model's records of a task
use several, the most common one, and the intro says which and what was left out. A record whose
cache held nothing quantized (KIVI on prompts shorter than its full-precision window) says so in its
cells ("= fp16 (nothing quantized)") instead of passing as a low-bit result.

The core names no method and no task: each task class declares its column
(``Task.scorecard``, a ``harness.evaluation.ScorecardColumn``: title, metric, format, order), read
here for the tasks of the records, so a plugin task gets its column as a built-in one does; the
methods appear only as the references of ``harness.builtins``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from harness.reports.methods import (
    ablation_options,
    display_name,
    family,
    method_sort_key,
    registry_name,
)
from harness.reports.records import fmt, group_records, plural, suffix, task_config
from harness.reports.sections import ReportData, Section, _profile_groups
from harness.reports.table import Table


@dataclass(frozen=True)
class ScorecardColumn:
    """The column(s) a task's records give the report's scorecard (``harness.reports.scorecard``).

    ``metric`` is a key of the record's ``metrics``; one ending in ``@`` is a prefix (RULER's
    ``avg@4096`` ...: one column per length found in the records). ``versus_reference``: shown as the
    change in % against the reference method's value on the same protocol (perplexity). ``order``
    places the column (the built-in tasks use 10-40); the first task column with a record also gives a
    row its nominal and effective bits.
    """

    title: str  # the column's heading
    metric: str
    format: str = "{:.2f}"
    means: str = ""  # what the number is, for the scorecard's intro ("the mean exact match over the grid")
    versus_reference: bool = False
    order: int = 50


def declared_columns(records: list[dict[str, Any]]) -> list[tuple[str, ScorecardColumn]]:
    """(task name, its column) for each task of the records whose class declares a scorecard column,
    in the columns' order (a task that is not installed gives none)."""
    from harness.evaluation import TASKS

    out = []
    for name in dict.fromkeys(r["key"]["task"] for r in records):
        try:
            column = getattr(TASKS.entry(name).cls, "scorecard", None)
        except Exception:  # noqa: BLE001 - a task not installed: no column of its own
            continue
        if isinstance(column, ScorecardColumn):
            out.append((name, column))
    return sorted(out, key=lambda tc: (tc[1].order, tc[0]))


def _references() -> tuple[str, tuple[str, ...]]:
    """(the method KV bytes and PPL are compared against by default, the profile's references)."""
    from harness.builtins import PROFILE_REFERENCES, REFERENCE_METHOD

    return REFERENCE_METHOD, PROFILE_REFERENCES


def _decode_reference() -> str:
    """transformers' own cache: the profile reference other than the harness's reference."""
    ref, refs = _references()
    return next((m for m in refs if m != ref), ref)


# --------------------------------------------------------------------------------------------
# What a record's cache held
# --------------------------------------------------------------------------------------------


def quantized_share(kv: dict[str, Any] | None) -> float | None:
    """The share of K/V elements the cache held as codes: ``quantized_elements / elements`` where the
    record counts them; 0 where it held no code bytes at all; None where the record cannot tell."""
    if not isinstance(kv, dict):
        return None
    n, q, fp = kv.get("elements"), kv.get("quantized_elements"), kv.get("fp_elements")
    if not n:
        return None
    if q is not None and fp is not None and q + fp == n:
        return q / n
    codes = (kv.get("bytes") or {}).get("codes")
    return 0.0 if codes == 0 else None


def nothing_quantized_note(rec: dict[str, Any], exempt: set[str]) -> str:
    """``= fp16 (nothing quantized)`` where the record's cache held no element quantized (its bits are
    those of its floats), "" otherwise and for the reference methods (they quantize nothing by design)."""
    if rec["key"]["method"] in exempt or quantized_share(rec.get("kv")) != 0.0:
        return ""
    bits = (rec.get("kv") or {}).get("nominal_bits")
    return f"= fp{bits:g} (nothing quantized)" if isinstance(bits, int | float) and bits else "(nothing quantized)"


# --------------------------------------------------------------------------------------------
# Protocols: the records one column reads
# --------------------------------------------------------------------------------------------


@dataclass
class Protocol:
    """The records of one task (one model) a column reads: the most common option set."""

    task: str
    column: ScorecardColumn
    cfg: dict[str, Any]
    dtype: str
    device: str
    records: list[dict[str, Any]]
    others: list[tuple[str, int]] = field(default_factory=list)  # (protocol, records) left out

    @property
    def title(self) -> str:
        return self.column.title

    @property
    def metric(self) -> str:
        return self.column.metric

    @property
    def spec(self) -> str:
        return protocol_spec(self.task, self.cfg, self.dtype, self.device)

    @property
    def markdown(self) -> str:
        return protocol_spec(self.task, self.cfg, self.dtype, self.device, markdown=True)

    def metrics(self) -> list[str]:
        """The metric names this protocol's column(s) show, read from the records."""
        if not self.metric.endswith("@"):
            return [self.metric]
        keys = {k for r in self.records for k in r["metrics"] if k.startswith(self.metric)}
        return sorted(keys, key=lambda k: (int(k[len(self.metric) :]) if k[len(self.metric) :].isdigit() else 0, k))


def protocol_spec(task: str, cfg: dict[str, Any], dtype: str, device: str, markdown: bool = False) -> str:
    """``wikitext2:seqlen=2048,max_windows=8 (float16, cuda)``: the task spec and where it ran."""
    opts = ",".join(f"{k}={v}" for k, v in cfg.items() if v is not None and v != "")
    spec = f"{task}{':' + opts if opts else ''}"
    return f"{f'`{spec}`' if markdown else spec} ({dtype}, {device})"


def _has_metric(rec: dict[str, Any], metric: str) -> bool:
    m = rec.get("metrics") or {}
    return any(k.startswith(metric) for k in m) if metric.endswith("@") else m.get(metric) is not None


def choose_protocol(records: list[dict[str, Any]], task: str, column: ScorecardColumn) -> Protocol | None:
    """The records of ``task`` (main rows only) with the most common (task options, dtype, device)."""
    metric = column.metric
    recs = [r for r in records if r["key"]["task"] == task and not ablation_options(r) and _has_metric(r, metric)]
    if not recs:
        return None
    key = lambda r: (task_config(r), r["key"].get("dtype", ""), r["key"].get("device", ""))  # noqa: E731
    groups = group_records(recs, key)
    (cfg, dtype, device), chosen = groups[0]
    others = [(protocol_spec(task, *k, markdown=True), len(g)) for k, g in groups[1:]]
    return Protocol(task, column, cfg, dtype, device, sorted(chosen, key=method_sort_key), others)


# --------------------------------------------------------------------------------------------
# Profile rows of one model at one context
# --------------------------------------------------------------------------------------------


@dataclass
class ProfilePick:
    where: str  # "device, dtype"
    context: int
    batch: int
    rows: dict[str, dict[str, Any]]  # method label -> row at (context, batch)
    decode_ref: dict[str, Any] | None
    kv_ref: dict[str, Any] | None
    labels: int  # methods profiled in the group
    at_context: int  # of them with a finished row at the context


def pick_profile(rows: list[dict[str, Any]], model: str, kv_reference: str) -> ProfilePick | None:
    """The model's largest profile group (device, dtype), at its most common batch (the smallest of
    equals) and the largest context the most methods finished, among those the decode reference
    finished (any context where it has none)."""
    groups = [(g, grp) for g, grp in _profile_groups(rows) if g[0] == model]
    if not groups:
        return None
    (_, device, dtype, _threads), grp = groups[0]
    done = [r for r in grp if r.get("status") == "done"]
    if not done:
        return None
    batches = Counter(r["batch"] for r in done)
    batch = min(batches, key=lambda b: (-batches[b], b))
    at_batch = [r for r in grp if r["batch"] == batch]
    dec = _decode_reference()
    contexts = {r["context"] for r in at_batch if r.get("status") == "done" and r["method"] == dec}
    contexts = contexts or {r["context"] for r in at_batch if r.get("status") == "done"}
    n_done = Counter(r["context"] for r in at_batch if r.get("status") == "done")
    context = max(contexts, key=lambda c: (n_done[c], c))
    here = {r["method"]: r for r in at_batch if r["context"] == context}

    def ref(name: str) -> dict[str, Any] | None:
        r = here.get(name)
        return r if r is not None and r.get("status") == "done" else None

    labels = len({r["method"] for r in at_batch})
    return ProfilePick(f"{device}, {dtype}", context, batch, here, ref(dec), ref(kv_reference), labels, n_done[context])


def _ratio(row: dict[str, Any] | None, ref: dict[str, Any] | None, key: str) -> float | None:
    if row is None or ref is None or row.get("status") != "done":
        return None
    a, b = row.get(key), ref.get(key)
    return a / b if a is not None and b else None


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


@dataclass
class _Row:
    name: str
    sort: tuple
    family: str
    spec: str
    labels: set[str] = field(default_factory=set)  # method labels (profile rows match on them)
    recs: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> record


def _pseudo(label: str) -> dict[str, Any]:
    """A profile-only method as a record-shaped dict (its label only), for its name and order."""
    return {"key": {"method": registry_name(label), "method_config": {}}, "method": label}


def scorecard_table(data: ReportData, model: str, index: int) -> Table | None:
    records = [r for r in data.records if r["model"] == model]
    ref_name = data.reference
    exempt = {ref_name, *_references()[1]}
    protocols = [p for t, c in declared_columns(records) if (p := choose_protocol(records, t, c)) is not None]
    profile = pick_profile(data.profile_rows, model, ref_name)
    if not protocols and profile is None:
        return None

    rows: dict[str, _Row] = {}
    label_to_row: dict[str, str] = {}
    for r in sorted((r for p in protocols for r in p.records), key=method_sort_key):
        name = display_name(r)
        row = rows.setdefault(name, _Row(name, method_sort_key(r), family(r), r["method"]))
        row.labels.add(r["method"])
        label_to_row.setdefault(r["method"], name)
    for r in sorted(records, key=method_sort_key):  # a label's row, also where that record's task is not shown
        label_to_row.setdefault(r["method"], display_name(r))
    for p in protocols:
        for r in p.records:
            rows[display_name(r)].recs.setdefault(p.task, r)
    if profile is not None:
        for label in profile.rows:
            name = label_to_row.get(label)
            if name is None or name not in rows:
                pseudo = _pseudo(label)
                name = display_name(pseudo)
                rows.setdefault(name, _Row(name, method_sort_key(pseudo), family(label), label))
            rows[name].labels.add(label)
    ordered = sorted(rows.values(), key=lambda row: row.sort)

    # the references of each protocol: PPL change, and KV bytes where there is no profile
    ref_recs = {p.task: next((r for r in p.records if r["key"]["method"] == ref_name and not r.get("oracle")), None)
                for p in protocols}  # fmt: skip
    kv_from = None if profile is not None else next((p for p in protocols if ref_recs[p.task] is not None), None)
    dec = _decode_reference()

    header = ["method", "family", "nominal bits", "effective bits"]
    columns: list[tuple[Protocol, str]] = []  # (protocol, metric) per task column
    for p in protocols:
        for metric in p.metrics():
            columns.append((p, metric))
            versus = f"{p.title} {metric} Δ vs {ref_name}".replace(" ppl ", " PPL ")
            header.append(versus if p.column.versus_reference else f"{p.title} {metric}")
    if profile is not None:
        at = f"({profile.context} tokens)"
        header += [f"decode step × {dec} {at}", f"KV bytes × {ref_name} {at}"]
    elif kv_from is not None:
        header.append(f"KV bytes × {ref_name} ({kv_from.title})")
    header.append("held quantized % (" + " / ".join(p.title for p in protocols) + ")")

    table_rows, csv_rows = [], []
    first_task = protocols[0].task if protocols else ""
    for row in ordered:
        base = {"model": model, "method": row.name, "spec": row.spec, "family": row.family}

        def put(col: str, value: Any, rec: dict[str, Any] | None = None, protocol: str = "", **extra: Any) -> None:
            if value is None:
                return
            trace = {"record": rec["_file"]} if rec is not None and "_file" in rec else {}
            csv_rows.append({**base, "column": col, "protocol": protocol, "value": value, **extra, **trace})  # noqa: B023

        cells = [row.name, row.family]
        src = next((p for p in protocols if p.task in row.recs), None)
        prow = profile.rows.get(next(iter(sorted(row.labels & set(profile.rows))), "")) if profile else None
        if src is not None:
            r = row.recs[src.task]
            kv = r.get("kv") or {}
            note = nothing_quantized_note(r, exempt)
            where = "" if src.task == first_task else f" ({src.title})"
            cells += [fmt(kv.get("nominal_bits")) + where + (f" {note}" if note else ""),
                      fmt(kv.get("effective_bits")) + where]  # fmt: skip
            put("nominal_bits", kv.get("nominal_bits"), r, src.spec)
            put("effective_bits", kv.get("effective_bits"), r, src.spec)
        elif prow is not None and prow.get("status") == "done":
            cells += [fmt(prow.get("nominal_bits")) + " (profile)", fmt(prow.get("effective_bits")) + " (profile)"]
            for k in ("nominal_bits", "effective_bits"):
                put(k, prow.get(k), None, f"profile {profile.where}, {profile.context} tokens",
                    record=prow.get("_file"), row=prow.get("_row"))  # fmt: skip
        else:
            cells += ["—", "—"]
        for p, metric in columns:
            r = row.recs.get(p.task)
            if r is None:
                cells.append("—")
                continue
            note = nothing_quantized_note(r, exempt)
            value = r["metrics"].get(metric)
            if p.column.versus_reference:
                ref = ref_recs[p.task]
                ref_value = None if ref is None else ref["metrics"].get(metric)
                change = 100.0 * (value / ref_value - 1.0) if value is not None and ref_value else None
                text = fmt(change, p.column.format)
                put(metric, value, r, p.spec)
                put(f"{metric}_change_pct", change, r, p.spec, reference=ref_name)
            else:
                text = fmt(value, p.column.format)
                put(f"{p.task} {metric}", value, r, p.spec)
            cells.append(text + (f" {note}" if note and text != "—" else ""))
        if profile is not None:
            dec_ratio = _ratio(prow, profile.decode_ref, "decode_step_s")
            kv_ratio = _ratio(prow, profile.kv_ref, "kv_bytes")
            bad = prow is not None and prow.get("status") != "done"
            cells += [f"**{prow.get('status')}**" if bad else fmt(dec_ratio, "{:.3f}"),
                      f"**{prow.get('status')}**" if bad else fmt(kv_ratio, "{:.3f}")]  # fmt: skip
            where = f"profile {profile.where}, context {profile.context}, batch {profile.batch}"
            if prow is not None:
                trace = {"record": prow.get("_file"), "row": prow.get("_row")}
                put(f"decode_step_s × {dec}", dec_ratio, None, where, **trace)
                put(f"kv_bytes × {ref_name}", kv_ratio, None, where, **trace)
        elif kv_from is not None:
            r, ref = row.recs.get(kv_from.task), ref_recs[kv_from.task]
            a, b = ((r or {}).get("kv") or {}).get("total_bytes"), ((ref or {}).get("kv") or {}).get("total_bytes")
            kv_ratio = a / b if a is not None and b else None
            cells.append(fmt(kv_ratio, "{:.3f}"))
            put(f"kv_bytes × {ref_name}", kv_ratio, r, kv_from.spec)
        shares = []
        for p in protocols:
            r = row.recs.get(p.task)
            share = None if r is None else quantized_share(r.get("kv"))
            shares.append(fmt(share, "{:.1f}", 100.0))
            if r is not None:
                put(f"{p.task} held quantized", share, r, p.spec)
        cells.append(" / ".join(shares))
        table_rows.append(cells)

    t = Table("scorecard" + suffix(index), f"Scorecard: {model}", header, table_rows, csv_rows, numeric_from=2)
    t.intro = _intro(protocols, ref_recs, ref_name, profile, kv_from, dec)
    return t


def _intro(protocols: list[Protocol], ref_recs: dict[str, Any], ref_name: str, profile: ProfilePick | None,
           kv_from: Protocol | None, dec: str) -> str:  # fmt: skip
    lines = [
        "One row per method in the methods' own order (ablation variants are in their method's own section); "
        "every cell from the records present, — where none. *Nominal / effective bits*: of the method's "
        f"{protocols[0].title if protocols else 'first task'} record (else of its first task with a record, named in "
        "the cell). Each column reads one "
        "protocol:",
        "",
    ]
    for p in protocols:
        what = p.column.means or p.metric
        if p.column.versus_reference:
            ref = ref_recs.get(p.task)
            what += f" against {ref_name}'s " + (
                f"({fmt(ref['metrics'].get(p.metric), '{:.4f}')})" if ref else f"(no {ref_name} record: —)"
            )
        extra = ""
        windows = sorted({r.get("windows") for r in p.records if r.get("windows")})
        if windows:
            extra = ", " + "/".join(map(str, windows)) + f" window{'s' if windows != [1] else ''}"
        line = f"- *{p.title}*: {p.markdown}{extra}, {plural(len(p.records), 'record')}: {what}."
        if p.others:
            left = "; ".join(f"{spec} ({plural(n, 'record')})" for spec, n in p.others)
            line += f" The most common of its option sets; left out: {left}."
        lines.append(line)
    if profile is not None:
        common = (
            "every profiled method has"
            if profile.at_context == profile.labels
            else f"{profile.at_context} of {profile.labels} profiled methods have"
        )
        lines.append(
            f"- *decode step × {dec}*, *KV bytes × {ref_name}*: profile rows ({profile.where}) at {profile.context} "
            f"tokens of context, batch {profile.batch}: the largest context {common} a finished row at"
            + ("" if profile.decode_ref else f"; no finished {dec} row there: its column is —")
            + ("" if profile.kv_ref else f"; no finished {ref_name} row there: its column is —")
            + "."
        )
    elif kv_from is not None:
        lines.append(
            f"- *KV bytes × {ref_name}*: the bytes each {kv_from.title} record's cache held over {ref_name}'s "
            "(no profile rows for this model)."
        )
    lines += [
        "- *held quantized %*: the share of K/V elements each task's cache held as codes (the cache the record "
        "reports: its last window or prompt); — where the record does not count them.",
        "",
        "*= fp16 (nothing quantized)*: on that task the method's cache held every K/V element in floats (e.g. "
        "prompts shorter than its full-precision window): the figure is not a quantized result.",
    ]
    return "\n".join(lines)


def scorecard_tables(data: ReportData) -> list[Table]:
    models = [m for m, _ in group_records(data.records, lambda r: r["model"])]
    models += [m for m in dict.fromkeys(r.get("model", "?") for r in data.profile_rows) if m not in models]
    tables = []
    for model in models:
        t = scorecard_table(data, model, len(tables))
        if t is not None:
            tables.append(t)
    return tables


SCORECARD = Section("Scorecard", lambda data: ("", scorecard_tables(data)), order=0, hide_empty=True)
