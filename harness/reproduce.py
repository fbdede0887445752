"""``python -m harness reproduce --profile quick``: the whole benchmark from a profile file, resumable.

A *profile* is data: a TOML file (``harness/profiles/quick.toml``, ``full.toml``, ``smoke.toml``, or
any path) naming the models, the runs (methods × tasks with their options), the profiling settings
and the options of the methods' prepare steps. ``reproduce`` runs it in stages, each through the
same code as the single commands, then writes the report:

1. ``[prepare.NAME]`` (optional) — for every spec of method NAME whose ``needs_prepare()`` is true,
   ``KVCacheMethod.prepare`` with the table's options (e.g. a router trained where none ships for
   the model, into ``OUT/...``); the core knows nothing of what a step does. Artefacts found from an
   earlier run are reused (``skipped``); the spec it returns replaces the original in the stages below;
2. ``[[run]]`` — ``harness.runner.run`` per model: one record per (method, task); records that exist
   are skipped, a failed cell is recorded with its reason and the sweep goes on (a method the model
   cannot run, too); a stage that cannot start (no data, no model) is listed as failed;
3. ``[profile]`` — latency and memory per (method, context, batch) into ``OUT/profile__MODEL.json``,
   saved after every setting; a method whose settings are all there is not profiled again;
4. the report (``harness.reports.write_report``) over exactly the records and profile files of this
   profile, into ``--report``.

The summary lists, per stage, the cells done, skipped (already there) and failed (with reasons).
Interrupting (Ctrl-C, a crash) loses at most the running cell: records are written atomically
when a cell finishes. Profile file format::

    name = "mine"
    models = ["smollm2-135m"]           # aliases, hub ids, folders, .gguf files
    calibration_windows = 4             # windows of methods that calibrate (default 16)
    # device = "cuda"; dtype = "bf16"   # optional

    [[run]]
    name = "wikitext2"
    tasks = ["wikitext2"]
    methods = ["fp16", "int4", "kivi-2", "moqae:lam=0.5"]
    max_windows = 2                     # task options: seqlen, max_windows, limit, max_length

    [profile]
    methods = ["fp16", "int4"]
    contexts = [512, 1024]
    batches = [1]
    new_tokens = 8
    repeats = 1

    [prepare.moqae]                     # options of that method's prepare step (router training)
    steps = 200
"""

from __future__ import annotations

import dataclasses
import gc
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from harness.builtins import REFERENCE_METHOD
from harness.options import (
    FreeText,
    Listed,
    Name,
    NonNegativeFloat,
    NonNegativeInt,
    OneOf,
    PositiveInt,
    Text,
    check_options,
)

PROFILE_DIR = Path(__file__).parent / "profiles"
RUN_OPTIONS = ("seqlen", "max_windows", "limit", "max_length")


# --------------------------------------------------------------------------------------------
# Profile files
# --------------------------------------------------------------------------------------------


@dataclass
class RunStage:
    name: str
    tasks: list[str]
    methods: list[str]
    options: dict[str, Any] = field(default_factory=dict)
    minutes: float | None = None  # measured wall time of the whole stage per model (the dry run's estimate)


@dataclass
class ProfileStage:
    methods: list[str]
    contexts: list[int]
    batches: list[int] = field(default_factory=lambda: [1])
    new_tokens: int = 32
    repeats: int = 3
    models: list[str] | None = None  # default: the profile's models
    reference: str = REFERENCE_METHOD
    minutes: float | None = None


@dataclass
class Profile:
    name: str
    models: list[str]
    runs: list[RunStage]
    profile: ProfileStage | None = None
    prepare: dict[str, dict[str, Any]] = field(default_factory=dict)  # method name -> its [prepare.NAME] table
    calibration_windows: int | None = None
    device: str | None = None
    dtype: str | None = None
    description: str = ""
    path: Path | None = None
    estimate_machine: str = ""  # where the stages' ``minutes`` were measured


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


#: the dtype names ``harness.models.parse_dtype`` reads (any case), here without importing torch
DTYPE_NAMES = ("fp16", "float16", "bf16", "bfloat16", "fp32", "float32")


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


# The schema of a profile file: every key with its type and range (``harness.options``), checked
# table by table before anything is imported or loaded.


@dataclass
class RunTable:
    """A ``[[run]]`` table; the task options (seqlen ...) are checked again by each task's own config."""

    tasks: Listed(Name)
    methods: Listed(Name)
    name: Text = ""
    minutes: NonNegativeFloat | None = None  # measured wall time of the stage (the dry run's estimate)
    seqlen: Annotated[int, Field(ge=2)] | None = None
    max_windows: PositiveInt | None = None
    limit: PositiveInt | None = None
    max_length: NonNegativeInt | None = None


@dataclass
class ProfileTable:
    """The ``[profile]`` table."""

    methods: Listed(Name)
    contexts: Listed(PositiveInt)
    batches: Listed(PositiveInt) = field(default_factory=lambda: [1])
    new_tokens: PositiveInt = 32
    repeats: PositiveInt = 3
    models: Listed(Name) | None = None
    reference: Name = REFERENCE_METHOD
    minutes: NonNegativeFloat | None = None


@dataclass
class ProfileFile:
    """The file's top-level keys (``run``, ``profile`` and ``prepare`` are checked table by table)."""

    models: Listed(Name)
    name: Text = ""
    description: Text = ""
    calibration_windows: PositiveInt | None = None
    device: Annotated[str, FreeText("a device: cpu, cuda, cuda:1 ...")] | None = None
    dtype: Annotated[OneOf(*DTYPE_NAMES), BeforeValidator(_lower)] | None = None
    estimate_machine: Text = ""


TABLES = ("run", "profile", "prepare")


def _table(cls: type, where: str, table: Any) -> Any:
    """``table`` (a dict from TOML) as ``cls``: unknown keys, types and ranges refused in one line."""
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a table, got {table!r}")
    accepted = [f.name for f in dataclasses.fields(cls)] + (list(TABLES) if cls is ProfileFile else [])
    unknown = sorted(set(table) - set(accepted))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    return check_options(cls, {k: v for k, v in table.items() if k not in TABLES}, where)


def parse_profile(data: dict[str, Any], name: str = "profile", path: Path | None = None) -> Profile:
    where = str(path or name)
    top = _table(ProfileFile, where, data)
    runs = []
    if not isinstance(data.get("run") or [], list):
        raise ValueError(f"{where}: [[run]] holds a list of tables, got {data['run']!r}")
    for i, r in enumerate(data.get("run") or []):
        t = _table(RunTable, f"{where} [[run]] #{i + 1}", r)
        options = {k: getattr(t, k) for k in RUN_OPTIONS if getattr(t, k) is not None}
        runs.append(RunStage(t.name or t.tasks[0], t.tasks, t.methods, options, t.minutes))
    prof = None
    if "profile" in data:
        p = _table(ProfileTable, f"{where} [profile]", data["profile"])
        prof = ProfileStage(p.methods, p.contexts, p.batches, p.new_tokens, p.repeats, p.models, p.reference,
                            p.minutes)  # fmt: skip
    prepare = data.get("prepare") or {}
    if not isinstance(prepare, dict) or not all(isinstance(v, dict) for v in prepare.values()):
        raise ValueError(f"{where}: [prepare] holds one table per method, e.g. [prepare.NAME] with its options")
    for method, options in prepare.items():
        from harness.interface import METHODS

        try:
            METHODS.entry(method).cls.check_prepare_options(options)
        except ValueError as e:
            raise ValueError(f"{where} [prepare.{method}]: {e}") from None
    if not runs and prof is None:
        raise ValueError(f"{where}: no [[run]] and no [profile]: nothing to reproduce")
    return Profile(
        name=top.name or name,
        models=top.models,
        runs=runs,
        profile=prof,
        prepare=prepare,
        calibration_windows=top.calibration_windows,
        device=top.device or None,
        dtype=top.dtype or None,
        description=top.description,
        path=path,
        estimate_machine=top.estimate_machine,
    )


def load_profile(spec: str | Path) -> Profile:
    """A shipped profile by name (``quick``, ``full``, ``smoke``) or a TOML file by path."""
    path = Path(spec)
    if not path.suffix and not path.exists():
        path = PROFILE_DIR / f"{spec}.toml"
        if not path.exists():
            raise ValueError(f"unknown profile {spec!r}; shipped: {', '.join(available_profiles())}, or a .toml path")
    if not path.is_file():
        raise ValueError(f"no profile file at {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    return parse_profile(data, path.stem, path)


# --------------------------------------------------------------------------------------------
# The summary
# --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    stage: str
    model: str
    cell: str
    status: str  # done | skipped | failed | planned (--dry-run)
    path: Path | None = None
    reason: str = ""


@dataclass
class ReproduceSummary:
    profile: str
    outcomes: list[Outcome] = field(default_factory=list)
    report: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, *args: Any, **kwargs: Any) -> None:
        self.outcomes.append(Outcome(*args, **kwargs))

    def of(self, status: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def done(self) -> list[Outcome]:
        return self.of("done")

    @property
    def skipped(self) -> list[Outcome]:
        return self.of("skipped")

    @property
    def failed(self) -> list[Outcome]:
        return self.of("failed")

    def text(self) -> str:
        head = (
            f"summary (profile {self.profile}, {self.seconds / 60:.1f} min): {len(self.done)} done, "
            f"{len(self.skipped)} skipped, {len(self.failed)} failed"
            + (f", {len(self.of('planned'))} to compute (dry run)" if self.of("planned") else "")
        )
        lines = [head]
        for stage in dict.fromkeys(o.stage for o in self.outcomes):
            for status in ("done", "skipped", "planned", "failed"):
                cells = [o for o in self.outcomes if o.stage == stage and o.status == status]
                if cells:
                    lines.append(f"  {stage:<10} {status:<8} {len(cells):>3}: " + ", ".join(o.cell for o in cells))
        for o in self.failed:
            lines.append(f"  FAILED {o.stage} / {o.model} / {o.cell}: {o.reason}")
        if self.report:
            lines.append(f"report: {self.report[0]}")
        return "\n".join(lines)


def _reason(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:500]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def prepare_methods(
    prof: Profile, model: str, specs: list[str], out: Path, data_dir: Any, device: str | None, dtype: str | None,
    summary: ReproduceSummary, progress: bool, log: Any, executor: Any = None,
) -> dict[str, str]:  # fmt: skip
    """Each method's ``prepare`` step (``KVCacheMethod.prepare``: MoQAE trains a router where none
    ships) for the specs whose method has a ``[prepare.<name>]`` table in the profile; returns
    spec -> the spec to run instead. The model is loaded once, only if some step needs it. With an
    executor the steps run as its tasks, all at once (``RayExecutor.prepare``), before any cell."""
    from harness.data import resolve_data_dir
    from harness.interface import PrepareContext, build_method
    from harness.models import load_model

    cand = [(s, m) for s in dict.fromkeys(specs) if (m := build_method(s)).name in prof.prepare and m.needs_prepare()]
    if not cand:
        return {}
    loaded: list[Any] = []
    load_error: list[BaseException] = []

    def load() -> tuple[Any, Any]:
        if load_error:
            raise load_error[0]
        if not loaded:
            try:
                loaded.extend(load_model(model, device=device, dtype=dtype))
            except Exception as e:
                load_error.append(e)
                raise
        return loaded[0], loaded[1]

    def step(spec: str, method: Any) -> Any:  # its Prepared, None, or the exception that failed it
        ctx = PrepareContext(model, out, resolve_data_dir(data_dir), dict(prof.prepare[method.name]), load,
                             progress=progress, log=log)  # fmt: skip
        try:
            return method.prepare(spec, ctx)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - a failed step is a failed cell; the runs report it per cell
            return e

    if executor is not None:
        steps = [(spec, dict(prof.prepare[method.name])) for spec, method in cand]
        outcomes = executor.prepare(model, steps, out, resolve_data_dir(data_dir), device, dtype)
    else:
        outcomes = (step(spec, method) for spec, method in cand)
    mapping: dict[str, str] = {}
    for (spec, method), done in zip(cand, outcomes, strict=True):
        if isinstance(done, BaseException):
            summary.add("prepare", model, f"{method.label} (prepare)", "failed", reason=_reason(done))
            log(f"FAILED prepare {method.label}: {_reason(done)}")
            continue
        if done is None:
            continue  # nothing was needed (a shipped artefact)
        summary.add("prepare", model, done.cell, "skipped" if done.reused else "done", done.path)
        mapping[spec] = done.spec
    loaded.clear()
    gc.collect()
    return mapping


def run_stage(
    stage: RunStage, model: str, methods: list[str], out: Path, data_dir: Any, device: str | None,
    dtype: str | None, calibration_windows: int | None, summary: ReproduceSummary, progress: bool, log: Any,
    executor: Any = None,
) -> Any:  # fmt: skip
    """One ``[[run]]`` on one model through the runner; returns its ``RunSummary`` (None: it could not
    start, listed as failed). With a deferring executor the cells are only submitted: call
    :func:`stage_outcomes` once it has drained."""
    from harness.runner import CALIBRATION_WINDOWS, run

    log(f"== {stage.name}: {model}, {len(methods)} method(s) x {', '.join(stage.tasks)}")
    try:
        return run(
            methods, stage.tasks, model, out, data_dir=data_dir, device=device, dtype=dtype, progress=progress,
            log=log, calibration_windows=calibration_windows or CALIBRATION_WINDOWS, skip_unsupported=True,
            executor=executor, **stage.options,
        )  # fmt: skip
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - a stage that cannot start is listed, the others go on
        summary.add(stage.name, model, "(all cells)", "failed", reason=_reason(e))
        log(f"FAILED {stage.name} on {model}: {_reason(e)}")
        return None


def stage_outcomes(stage: RunStage, model: str, s: Any, summary: ReproduceSummary) -> list[Path]:
    """A finished stage's cells into the summary; returns the record files it touched."""
    from harness.runner import load_record

    if s is None:
        return []

    def cell(path: Path) -> str:
        rec = load_record(path) or {}
        return str(rec.get("method") or path.stem)

    for p in s.done:
        summary.add(stage.name, model, cell(p), "done", p)
    for p in s.skipped:
        summary.add(stage.name, model, cell(p), "skipped", p)
    for p, reason in s.failed:
        summary.add(stage.name, model, cell(p), "failed", p, reason)
    for p in s.claimed:
        summary.add(stage.name, model, cell(p), "skipped", p, "being computed by another process")
    return [*s.done, *s.skipped, *(p for p, _ in s.failed)]


def profile_rows_done(stage: ProfileStage, specs: list[str], path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of ``path`` that this stage's settings still use, and the specs with every setting there."""
    from harness.interface import build_method
    from harness.runner import load_record

    labels = {s: build_method(s).label for s in specs}
    settings = {(c, b) for c in stage.contexts for b in stage.batches}
    old = (load_record(path) or {}).get("rows") or []
    rows = [
        r for r in old
        if isinstance(r, dict) and r.get("status") in ("done", "oom") and r.get("new_tokens") == stage.new_tokens
        and r.get("repeats") == stage.repeats and (r.get("context"), r.get("batch")) in settings
    ]  # fmt: skip
    complete = [s for s in specs if settings <= {(r["context"], r["batch"]) for r in rows if r["method"] == labels[s]}]
    return [r for r in rows if r["method"] in {labels[s] for s in complete}], complete


def profile_stage(
    stage: ProfileStage, model: str, methods: list[str], path: Path, device: str | None, dtype: str | None,
    summary: ReproduceSummary, progress: bool, log: Any,
) -> Path | None:  # fmt: skip
    """Profile the methods on ``model`` into ``path``; methods with every setting there are skipped."""
    import torch
    from tqdm.auto import tqdm

    from harness.integration import AttachedMethod, forward, model_info
    from harness.interface import build_method
    from harness.models import load_model, model_id
    from harness.profiling import add_ratios, profile_method
    from harness.runner import invocation, write_json_atomic

    specs = list(dict.fromkeys([stage.reference, *methods]))
    labels = {s: build_method(s).label for s in specs}
    rows, complete = profile_rows_done(stage, specs, path)
    for s in complete:
        summary.add("profile", model, labels[s], "skipped", path)
    todo = [s for s in specs if s not in complete]
    meta = {
        "command": invocation(),
        "settings": {"contexts": stage.contexts, "batches": stage.batches, "new_tokens": stage.new_tokens,
                     "repeats": stage.repeats, "reference": stage.reference},
    }  # fmt: skip

    def save() -> None:
        write_json_atomic(path, {**meta, "rows": add_ratios(rows, stage.reference)})

    if not todo:
        return path if rows else None
    log(f"== profile: {model}, {len(todo)} method(s) x contexts {stage.contexts} x batches {stage.batches}")
    try:
        lm, _ = load_model(model, device=device, dtype=dtype)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001
        summary.add("profile", model, "(load model)", "failed", reason=_reason(e))
        return path if rows else None
    info = model_info(lm)
    with AttachedMethod(lm, build_method(stage.reference)) as am, torch.no_grad():  # untimed warm-up
        cache = am.new_cache()
        forward(lm, torch.zeros(1, min(stage.contexts), dtype=torch.long, device=lm.device), cache, logits_to_keep=1)
        forward(lm, torch.zeros(1, 1, dtype=torch.long, device=lm.device), cache, logits_to_keep=1)
        del cache
    name = model_id(model)

    def on_row(row: dict[str, Any]) -> None:  # saved after every setting
        row["model"] = name
        rows.append(row)
        save()

    for s in tqdm(todo, desc="profile", disable=not progress):
        method = build_method(s)
        try:
            method.check_model(info)
            profile_method(lm, method, stage.contexts, stage.batches, stage.new_tokens, stage.repeats, on_row=on_row)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - a failed cell (no router for this model, an error)
            rows[:] = [r for r in rows if r["method"] != labels[s]]
            save()
            summary.add("profile", model, labels[s], "failed", path, _reason(e))
            log(f"FAILED profile {labels[s]}: {_reason(e)}")
            continue
        summary.add("profile", model, labels[s], "done", path)
    save()
    del lm
    gc.collect()
    return path


def profile_models(
    stage: ProfileStage | None, models: list[tuple[str, list[str]]], out: Path, device: str | None,
    dtype: str | None, summary: ReproduceSummary, progress: bool, log: Any,
) -> list[Path]:  # fmt: skip
    """The profile stage on each (model, method specs); returns the profile files written."""
    files = []
    for model, methods in models:
        path = out / f"profile__{_slug(model)}.json"
        done = profile_stage(stage, model, methods, path, device, dtype, summary, progress, log)
        if done is not None:
            files.append(done)
    return files


def dry_run_profile(
    prof: Profile, models: list[str], out: Path, data_dir: Any, device: str | None, dtype: str | None,
    cw: int | None, summary: ReproduceSummary, log: Any,
) -> ReproduceSummary:  # fmt: skip
    """``reproduce --dry-run``: every run cell (done or to do), the prepare steps, the profile stage."""
    from harness.interface import build_method
    from harness.runner import CALIBRATION_WINDOWS, run

    log(f"profile {prof.name}: {prof.description or '(no description)'}")
    estimate = Estimate()
    for model in models:
        for spec, _ in prof.prepare.items():
            log(f"prepare  {spec} on {model} (skipped when a router ships for the model or one was trained)")
        for stage in prof.runs:
            log(f"== {stage.name}: {model}")
            methods = [m for m in stage.methods if not build_method(m).needs_prepare()]
            later = [m for m in stage.methods if m not in methods]
            s = run(methods, stage.tasks, model, out, data_dir=data_dir, device=device, dtype=dtype, log=log,
                    calibration_windows=cw or CALIBRATION_WINDOWS, dry_run=True, **stage.options)  # fmt: skip
            for p in s.skipped:
                summary.add(stage.name, model, p.stem, "skipped", p)
            for p in s.planned:
                summary.add(stage.name, model, p.stem, "planned", p)
            for m in later:
                log(f"todo  {m} / {', '.join(stage.tasks)} (after its prepare step)")
                summary.add(stage.name, model, m, "planned")
            todo = len(s.planned) + len(later)
            estimate.add(stage.name, stage.minutes, todo, todo + len(s.skipped))
    if prof.profile:
        log(f"profile stage: {', '.join(prof.profile.methods)} x contexts {prof.profile.contexts}")
        for model in prof.profile.models or models:
            specs = list(dict.fromkeys([prof.profile.reference, *prof.profile.methods]))
            _, complete = profile_rows_done(prof.profile, specs, out / f"profile__{_slug(model)}.json")
            estimate.add("profile", prof.profile.minutes, len(specs) - len(complete), len(specs))
    log(estimate.text(prof.estimate_machine))
    return summary


@dataclass
class Estimate:
    """The dry run's cost estimate: each stage's measured ``minutes`` (profile file) times the share of its
    cells still to do. A stage without ``minutes`` is counted as unknown, not as free."""

    left: float = 0.0
    whole: float = 0.0
    unknown: list[str] = field(default_factory=list)

    def add(self, stage: str, minutes: float | None, todo: int, cells: int) -> None:
        if minutes is None:
            if todo and stage not in self.unknown:
                self.unknown.append(stage)
            return
        self.whole += minutes
        self.left += minutes * todo / cells if cells else 0.0

    def text(self, machine: str) -> str:
        where = f" measured on {machine}" if machine else ""
        line = f"cost estimate: ~{self.left:.1f} min left of ~{self.whole:.1f} min for the whole profile{where}"
        if self.unknown:
            line += f"; no estimate for {', '.join(self.unknown)} (give the stage a minutes = ... key)"
        return line


def preflight_profile(
    prof: Profile, models: list[str], prof_models: list[str], data_dir: Any, device: str | None, out: Path,
    report_dir: Path,
) -> None:  # fmt: skip
    """Before any model load or compute: every stage's specs, data, models, the device and the output
    folders; raises ``MissingDataError`` listing every problem in one line (nothing is written)."""
    from harness.data import MissingDataError, resolve_data_dir
    from harness.files import check_writable_dir
    from harness.models import ModelLoadError, check_model_source, parse_device
    from harness.runner import build_all, check_out_dir, preflight

    parse_device(device)
    check_out_dir(out)
    check_writable_dir(report_dir, f"--report {report_dir}", "give a writable folder for the report")
    data = resolve_data_dir(data_dir)
    problems: list[str] = []
    for stage in prof.runs:
        methods, tasks = build_all(stage.methods, stage.tasks, **stage.options)
        for model in models:
            problems += preflight(methods, tasks, model, data)
    for model in prof_models:
        try:
            check_model_source(model)
        except ModelLoadError as e:
            problems.append(str(e))
    problems = list(dict.fromkeys(problems))
    if problems:
        offline = (
            ""
            if prof.name == "offline"
            else (" | with no data or network, the offline profile runs: MOQAE_PROFILE=offline nox -s reproduce")
        )
        raise MissingDataError(f"profile {prof.name} cannot run here: " + " | ".join(problems) + offline)


def report_folder(report_dir: Path, files: list[Path], log: Any = print) -> Path:
    """Where the report goes: ``report_dir``, unless no cell of this run finished and a report is
    already there (a run that failed everywhere never replaces a real report): then the failed-cell
    report goes beside it, into ``<report_dir>-failed``."""
    from harness.runner import is_complete, load_record

    def finished_file(path: Path) -> bool:
        obj = load_record(path)
        rows = obj.get("rows") if isinstance(obj, dict) else None
        if isinstance(rows, list):  # a profile file
            return any(isinstance(r, dict) and r.get("status") == "done" for r in rows)
        return is_complete(obj)

    finished = any(finished_file(p) for p in files)
    if finished or not (report_dir / "README.md").exists():
        return report_dir
    beside = report_dir.with_name(report_dir.name + "-failed")
    log(f"no cell finished: {report_dir} is kept; the failed cells are reported in {beside}")
    return beside


def reproduce(
    profile: str | Path | Profile,
    out: str | Path | None = None,
    report: str | Path | None = None,
    data_dir: str | Path | None = None,
    models: list[str] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    calibration_windows: int | None = None,
    progress: bool = True,
    log: Any = print,
    dry_run: bool = False,
    executor: Any = None,
) -> ReproduceSummary:
    """Run a profile (see the module docstring); defaults: ``results/reproduce/<name>`` and
    ``reports/reproduce/<name>``. ``dry_run``: check everything, list the cells (done / todo) and the
    profile's own cost estimate; load and compute nothing. ``executor`` (``harness.ray_executor``):
    every run stage's cells are submitted to it before any is waited on; the profile stage, which
    times the methods, runs here afterwards, alone."""
    t0 = time.perf_counter()
    prof = profile if isinstance(profile, Profile) else load_profile(profile)  # before torch: a bad file fails fast
    from harness.reports import write_report
    from harness.runner import invocation

    out = Path(out or Path("results/reproduce") / prof.name)
    report_dir = Path(report or Path("reports/reproduce") / prof.name)
    models = models or prof.models
    device, dtype = device or prof.device, dtype or prof.dtype
    cw = calibration_windows or prof.calibration_windows
    summary = ReproduceSummary(prof.name)
    files: list[Path] = []
    prof_models = (prof.profile.models or models) if prof.profile else []
    preflight_profile(prof, models, prof_models, data_dir, device, out, report_dir)
    if dry_run:
        return dry_run_profile(prof, models, out, data_dir, device, dtype, cw, summary, log)
    if executor is not None:
        executor.defer = True
    submitted, profiles = [], []
    for model in dict.fromkeys([*models, *prof_models]):
        specs = [m for r in prof.runs for m in r.methods] if model in models else []
        if prof.profile and model in prof_models:
            specs += prof.profile.methods
        routers = prepare_methods(prof, model, specs, out, data_dir, device, dtype, summary, progress, log, executor)
        if model in models:
            for stage in prof.runs:
                methods = [routers.get(m, m) for m in stage.methods]
                s = run_stage(stage, model, methods, out, data_dir, device, dtype, cw, summary, progress, log,
                              executor)  # fmt: skip
                if executor is None:
                    files += stage_outcomes(stage, model, s, summary)
                else:
                    submitted.append((stage, model, s))
        if prof.profile and model in prof_models:
            profiles.append((model, [routers.get(m, m) for m in prof.profile.methods]))
            if executor is None:
                files += profile_models(prof.profile, profiles[-1:], out, device, dtype, summary, progress, log)
    if executor is not None:
        executor.drain()
        executor.defer = False  # run_cells waits for its cells again (the caller may reuse the executor)
        executor.idle()  # a local cluster stops before the profile stage times anything
        for stage, model, s in submitted:
            files += stage_outcomes(stage, model, s, summary)
        files += profile_models(prof.profile, profiles, out, device, dtype, summary, progress, log)
    summary.seconds = time.perf_counter() - t0
    if files:
        title = f"Reproduce: profile {prof.name}" + (f" — {prof.description}" if prof.description else "")
        report_dir = report_folder(report_dir, files, log)
        try:
            summary.report = write_report(list(dict.fromkeys(files)), report_dir, title, command=invocation())
        except ValueError as e:  # nothing finished: no report, said in the summary
            summary.add("report", "", str(report_dir), "failed", reason=_reason(e))
    summary.seconds = time.perf_counter() - t0
    return summary
