"""Command line: ``python -m harness list | run | report | profile | reproduce``.

Bad input (unknown method or task, unsupported bits, a group that does not divide head_dim, a
missing dataset or model) prints one ``error:`` line and exits with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.builtins import DEFAULT_TASK, PROFILE_REFERENCES
from harness.registry import METHODS, TASKS, MethodSpecError, Registry

EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one ``error:`` line (exit 2) for bad arguments instead of the usage block;
    ``-h`` still prints the usage. Nothing heavy (torch, transformers) is imported before this."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message} (see {self.prog} -h)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (``--limit abc`` and ``--seqlen 0`` are one-line errors)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def split_specs(values: Sequence[str] | None, registry: Registry | None = None) -> list[str]:
    """``["fp16,kivi:bits=2,group=32", "int4"]`` -> ``["fp16", "kivi:bits=2,group=32", "int4"]``.

    A comma separates specs, except before a ``key=value`` that continues the previous spec's options,
    or, with ``registry``, before a bare item that is not a registered name when the previous spec's
    entry takes bare items (``longbench:trec,samsum`` is one spec).
    """
    specs: list[str] = []
    for value in values or []:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            prev = specs[-1] if specs else ""
            if "=" in part and ":" not in part.partition("=")[0] and ":" in prev:  # ckpt=C:/x.pt is an option
                specs[-1] += "," + part
            elif (
                registry is not None
                and ":" in prev
                and ":" not in part
                and part not in registry.names()
                and registry.positional(prev.partition(":")[0].strip())
            ):
                specs[-1] += "," + part
            else:
                specs.append(part)
    return specs


def _cmd_list(args: argparse.Namespace) -> int:
    from harness.evaluation import TASKS
    from harness.interface import METHODS
    from harness.models import MODEL_ALIASES

    def options(opts: dict) -> str:
        return ", ".join(f"{k}={v}" for k, v in opts.items()) or "-"

    broken = 0
    for title, registry in (("methods (use NAME or NAME:key=value,key=value):", METHODS), ("tasks:", TASKS)):
        print(title)
        for d in registry.describe():
            if d.error:  # a plugin that fails to load: one line, the others are listed as usual
                broken += 1
                print(f"  {d.name:<14} NOT AVAILABLE: {d.error}")
                continue
            print(f"  {d.name:<14} {d.description}\n  {'':<14} options: {options(d.options)}")
            print(f"  {'':<14} from: {d.source}")
        for line in registry.problems():
            print(f"  (refused entry point {line})")
    print("model aliases (or a hub id, a local folder, a .gguf file):")
    for name, desc in MODEL_ALIASES.items():
        print(f"  {name:<18} {desc}")
    return 0


def add_executor_args(p: argparse.ArgumentParser) -> None:
    """``--executor`` and the Ray executor's resources (``run`` and ``reproduce``)."""
    g = p.add_argument_group("executor (where the cells run)")
    g.add_argument("--executor", default="local",
                   help="local (default: one cell after another here), ray (a local Ray cluster on 127.0.0.1) "
                        "or ray:ADDRESS (an existing cluster: auto, HOST:6379, ray://HOST:10001)")  # fmt: skip
    g.add_argument("--num-cpus", type=positive_int, default=None, help="CPUs of a local Ray cluster (all)")
    g.add_argument("--cpus-per-cell", type=float, default=1.0, help="CPUs per cell = its torch threads (1)")
    g.add_argument("--gpus-per-cell", type=float, default=0.0, help="GPUs per cell (0; 1 on a GPU cluster)")
    g.add_argument("--memory-per-cell", type=float, default=None, help="GiB of memory Ray reserves per cell")
    g.add_argument("--retries", type=int, default=1, help="Ray retries of a cell whose worker died (1)")
    g.add_argument("--shard-samples", type=positive_int, default=1,
                   help="split each cell of a shardable task (WikiText-2 windows, LongBench samples) into up "
                        "to N Ray tasks (1)")  # fmt: skip


def executor(args: argparse.Namespace) -> Any:
    """The executor the arguments ask for, as a context manager (``None`` inside for ``local``)."""
    from harness.ray_executor import RayExecutor, parse_executor

    address = parse_executor(args.executor)
    if address is None or args.dry_run:  # a dry run computes nothing: no cluster
        if args.shard_samples > 1:
            raise ValueError("--shard-samples needs --executor ray (the local executor runs each cell in one piece)")
        return contextlib.nullcontext(None)
    return RayExecutor(address=address, num_cpus=args.num_cpus, cpus_per_cell=args.cpus_per_cell,
                       gpus_per_cell=args.gpus_per_cell, memory_per_cell=args.memory_per_cell, retries=args.retries,
                       shard_samples=args.shard_samples, progress=not args.no_progress)  # fmt: skip


def _cmd_run(args: argparse.Namespace) -> int:
    from harness.evaluation import TASKS
    from harness.runner import results_table, run

    with executor(args) as ex:
        summary = run(
            methods=split_specs(args.methods),
            tasks=split_specs(args.tasks, TASKS),
            model=args.model,
            out_dir=args.out,
            data_dir=args.data_dir,
            device=args.device,
            dtype=args.dtype,
            force=args.force,
            progress=not args.no_progress,
            seqlen=args.seqlen,
            max_windows=args.max_windows,
            limit=args.limit,
            max_length=args.max_length,
            calibration_windows=args.calibration_windows,
            dry_run=args.dry_run,
            executor=ex,
        )
    if args.dry_run:
        print(f"dry run: {len(summary.planned)} cell(s) to compute, {len(summary.skipped)} already done")
        return 0
    paths = summary.done + summary.skipped
    if paths:
        print(results_table(paths))
    claimed = f", {len(summary.claimed)} claimed by another process" if summary.claimed else ""
    print(f"summary: {len(summary.done)} done, {len(summary.skipped)} skipped, {len(summary.failed)} failed{claimed}")
    for path, reason in summary.failed:
        print(f"  failed: {path.name}: {reason}")
    return 1 if summary.failed else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from harness.reports import write_report

    sources = [*args.results_dirs, *split_specs(args.results)]
    if not sources:
        raise ValueError("give the results: python -m harness report RESULTS_DIR --out DIR (or --results DIR)")
    written = write_report(sources, args.out, args.title)
    print(f"wrote {written[0]} (index) and {len(written) - 1} more files in {Path(args.out)}")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from harness.reproduce import available_profiles, reproduce

    if args.list_profiles:
        for name in available_profiles():
            print(name)
        return 0
    with executor(args) as ex:
        summary = reproduce(
            args.profile, out=args.out, report=args.report, data_dir=args.data_dir,
            models=split_specs(args.models) or None, device=args.device, dtype=args.dtype,
            calibration_windows=args.calibration_windows, progress=not args.no_progress, dry_run=args.dry_run,
            executor=ex,
        )  # fmt: skip
    print(summary.text())
    return 1 if summary.failed else 0


def _int_list(values: list[str]) -> list[int]:
    try:
        return [int(x) for x in split_specs(values)]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {','.join(values)!r}") from None


def profile_out(arg: str | None) -> Path | None:
    """``profile --out``: a folder, like ``run``'s (the rows go to ``DIR/profile.json``, with
    ``profile.md`` and the plots beside it), or a ``.json`` file path as before."""
    if not arg:
        return None
    out = Path(arg)
    if out.suffix.lower() != ".json" or out.is_dir():
        out = out / "profile.json"
    if out.exists() and out.is_dir():
        raise ValueError(f"--out {arg}: {out} is a folder")
    from harness.files import check_writable_dir  # here, not at the top: harness.cli imports nothing heavy

    check_writable_dir(out.parent, f"--out {arg}", "give a writable folder or .json path")
    return out  # the folder is made when the first row is written


def _cmd_profile(args: argparse.Namespace) -> int:
    from harness.profiling import plot_profile, profile, profile_table
    from harness.runner import invocation, write_json_atomic, write_text_atomic

    contexts, batches = _int_list(args.context or ["2048"]), _int_list(args.batch or ["1"])
    out = profile_out(args.out)
    rows_so_far: list[dict] = []

    def save(row: dict) -> None:  # after every setting: a crash loses at most the running one
        rows_so_far.append(row)
        if out is not None:
            write_json_atomic(out, {"command": invocation(), "rows": rows_so_far})

    import torch

    threads = _int_list(args.threads) if args.threads else []
    if any(t < 1 for t in threads):
        raise ValueError(f"--threads {','.join(args.threads)}: thread counts must be integers >= 1")
    if len(threads) == 1:
        torch.set_num_threads(threads[0])  # every row states the count it ran with (torch_threads)
    reference, *also = split_specs([args.reference])
    rows = profile(
        split_specs(args.methods), args.model, contexts, batches, args.new_tokens, args.repeats,
        device=args.device, dtype=args.dtype, reference=reference, progress=not args.no_progress, on_row=save,
        compare_reads=args.compare_reads, also=also, interleave=not args.sequential,
        threads=threads if len(threads) > 1 else None,
    )  # fmt: skip
    table = profile_table(rows, reference=reference, also=also)
    print(table)
    if out is not None:
        write_json_atomic(out, {"command": invocation(), "rows": rows})
        where = f"{rows[0]['model']}, {rows[0]['device']}, {rows[0]['dtype']}, attention {rows[0]['attention']}"
        order = "one method after the other" if args.sequential else "the methods' rounds in turn"
        head = f"# Profile ({where}; {args.new_tokens} decode steps, {args.repeats} timed rounds, {order})"
        md = out.with_suffix(".md")
        write_text_atomic(md, f"{head}\n\n{table}\n\nCommand:\n\n    {invocation()}\n")
        plots = plot_profile(rows, out.with_suffix(".png")) if len(contexts) > 1 else []
        print(f"wrote {', '.join(str(p) for p in [out, md, *plots])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m harness", description="KV-cache quantization benchmark harness")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list registered methods, tasks and model aliases").set_defaults(fn=_cmd_list)
    r = sub.add_parser("run", help="run methods x tasks on one model, one JSON record per cell")
    r.add_argument("--methods", action="append", required=True, help="comma-separated method specs")
    r.add_argument(
        "--tasks", action="append", default=None, help=f"comma-separated task specs (default {DEFAULT_TASK})"
    )
    r.add_argument("--model", default="smollm2-135m", help="alias, hub id, local folder or .gguf file")
    r.add_argument("--out", default="results", help="directory for the JSON records")
    r.add_argument("--data-dir", default=None, help="local data mirror (else $MOQAE_DATA_DIR, else the hub)")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument("--dtype", default=None, help="fp16, bf16 or fp32 (default: bf16/fp16 on GPU, fp32 on CPU)")
    r.add_argument("--seqlen", type=positive_int, default=None, help="window length (tasks with a seqlen option)")
    r.add_argument("--max-windows", type=positive_int, default=None, help="at most N windows (tasks with max_windows)")
    r.add_argument(
        "--limit", type=positive_int, default=None, help="first N samples of each dataset (tasks with a limit)"
    )
    r.add_argument("--max-length", type=int, default=None, help="prompt token budget (tasks with max_length)")
    r.add_argument(
        "--calibration-windows", type=positive_int, default=16, help="windows methods that calibrate use (16)"
    )
    r.add_argument("--force", action="store_true", help="recompute records that already exist")
    r.add_argument("--dry-run", action="store_true", help="check everything, list the cells; compute nothing")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_executor_args(r)
    r.set_defaults(fn=_cmd_run)
    rep = sub.add_parser("report", help="every table and plot of run records and profile files, README.md index")
    rep.add_argument("results_dirs", nargs="*", metavar="RESULTS_DIR", help="folders (or files) of records")
    rep.add_argument("--results", action="append", default=[], help="folders (or files) of records (repeatable)")
    rep.add_argument("--out", required=True, help="folder for README.md, the tables (.csv, .tex) and plots")
    rep.add_argument("--title", default="", help="title of the report")
    rep.set_defaults(fn=_cmd_report)
    rp = sub.add_parser(
        "reproduce", help="the benchmark of a profile (quick, full, a TOML file), resumable, then the report"
    )
    rp.add_argument("--profile", default="quick", help="shipped profile name (quick, full, smoke) or a .toml path")
    rp.add_argument("--data-dir", default=None, help="local data mirror (else $MOQAE_DATA_DIR, else the hub)")
    rp.add_argument("--out", default=None, help="records folder (default results/reproduce/PROFILE)")
    rp.add_argument("--report", default=None, help="report folder (default reports/reproduce/PROFILE)")
    rp.add_argument("--models", action="append", help="comma-separated models instead of the profile's")
    rp.add_argument("--device", default=None)
    rp.add_argument("--dtype", default=None)
    rp.add_argument("--calibration-windows", type=positive_int, default=None, help="instead of the profile's value")
    rp.add_argument("--list-profiles", action="store_true", help="list the shipped profiles")
    rp.add_argument("--dry-run", action="store_true", help="check everything, list the cells; compute nothing")
    rp.add_argument("--no-progress", action="store_true")
    add_executor_args(rp)
    rp.set_defaults(fn=_cmd_reproduce)
    prof = sub.add_parser("profile", help="prefill / decode latency, KV bytes, peak memory, ratios to a reference")
    prof.add_argument("--methods", action="append", required=True, help="comma-separated method specs")
    prof.add_argument("--model", default="smollm2-135m", help="alias, folder, hub id or a random *-shape alias")
    prof.add_argument("--context", "--prompt", action="append", help="comma-separated context lengths (2048)")
    prof.add_argument("--batch", action="append", help="comma-separated batch sizes (1)")
    prof.add_argument("--new-tokens", "--decode", type=positive_int, default=32, help="decode steps timed per round")
    prof.add_argument(
        "--compare-reads", action="store_true",
        help="also profile dequantize-then-attend decode for methods that attend from their codes",
    )  # fmt: skip
    prof.add_argument("--repeats", type=positive_int, default=3, help="timed rounds after one warm-up")
    prof.add_argument(
        "--reference", default=",".join(PROFILE_REFERENCES),
        help=f"methods the ratios are taken against, all profiled in this process: the first for every "
             f"figure, the others for the times ({','.join(PROFILE_REFERENCES)})",
    )  # fmt: skip
    prof.add_argument(
        "--sequential", action="store_true",
        help="profile one method after the other (each method's rounds back to back) instead of taking "
             "the methods' rounds in turn",
    )  # fmt: skip
    prof.add_argument(
        "--threads", action="append",
        help="comma-separated torch thread counts, all measured in this process (default: torch's own)",
    )  # fmt: skip
    prof.add_argument("--device", default=None)
    prof.add_argument("--dtype", default=None)
    prof.add_argument("--out", default=None, help="folder for profile.json (+ .md, .png/.svg), or a .json path")
    prof.add_argument("--no-progress", action="store_true")
    prof.set_defaults(fn=_cmd_profile)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run" and not args.tasks:
        args.tasks = [DEFAULT_TASK]
    try:  # names first, before torch is imported: a typo costs a fraction of a second, not the imports
        METHODS.check_names(getattr(args, "methods", None))
        TASKS.check_names(getattr(args, "tasks", None), bare_items=True)
        if args.command == "profile":
            METHODS.check_names([args.reference])
        if hasattr(args, "executor"):  # Ray missing, a bad --executor: before torch too
            from harness.ray_executor import parse_executor

            parse_executor(args.executor)
    except (MethodSpecError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    from harness.errors import MissingDataError, ModelLoadError  # no torch: a bad profile fails before it

    try:
        return args.fn(args)
    except (MethodSpecError, MissingDataError, ModelLoadError, ValueError) as e:  # UnsupportedModelError too
        message = " ".join(str(e).split())
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: finished records are kept; re-run the same command to resume", file=sys.stderr)
        return 130
