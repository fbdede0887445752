"""Latency and memory profiling of KV-cache methods, every figure also as a ratio to fp16.

For each method and each (context, batch) setting, on one model and the same random prompt (speed
and memory do not depend on token or weight values, so random-weight ``*-shape`` models serve):

* ``prefill_s`` — median wall time of the prefill of ``context`` tokens into a fresh cache (logits
  of the last position only, as ``generate`` computes them);
* ``decode_step_s`` — median wall time of one greedy decode step (``new_tokens`` steps per round,
  the first round of each setting is a warm-up and not timed); ``decode_tokens_per_s`` =
  batch / ``decode_step_s``;
* ``kv_bytes`` — bytes the cache really holds after prefill + decode (``HarnessCache.memory``; the
  spare capacity of its growable buffers is ``kv_reserved_bytes``, beside it),
  and ``kv_read_bytes_per_step`` — bytes the last decode step's reads touched where a method
  reports it (AlignedKV reads fewer bits than it holds), else the bytes held;
* ``peak_bytes`` — on CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated before
  the setting (the weights); on CPU the process's peak resident set (sampled from
  ``/proc/self/statm`` every 2 ms) minus the resident set before the setting;
* ``calibration_s`` (KVQuant, KVmix) and ``own_prefill_s`` / ``own_decode_step_s`` (MoQAE's
  routers, timed only while profiled) where a method has such parts.

CUDA is synchronised around every timed region; one untimed prefill + step runs before the first
setting so that the process's one-time costs are not counted in it. A setting that runs out of memory gives a record
with ``status: "oom"`` and the sweep goes on. Rows name the device, dtype and attention kernel.

``python -m harness profile --methods fp16,int4,kivi-2 --model smollm2-135m --context 1024,4096
--batch 1 --new-tokens 32``
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from harness.builtins import REFERENCE_METHOD
from harness.integration import AttachedMethod, forward
from harness.interface import KVCacheMethod

REFERENCE = REFERENCE_METHOD  # the default; profile(reference=...) changes it


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _enable_own_timing(method: KVCacheMethod) -> None:
    """Methods that can time their own parts (MoQAE's ``time_routes``) only do so while profiled,
    so that the synchronisation it needs on GPU never slows a normal run."""
    if hasattr(method, "time_routes"):
        method.time_routes = True


def _own_seconds(method: KVCacheMethod) -> float | None:
    value = getattr(method, "route_seconds", None)
    return float(value) if value is not None else None


def method_parameters(method: KVCacheMethod) -> int:
    """Parameters a method adds to the model (MoQAE's routers), 0 for the others."""
    bank = getattr(method, "bank", None)
    return sum(p.numel() for p in bank.parameters()) if bank is not None else 0


def is_out_of_memory(err: BaseException) -> bool:
    """True for CUDA OOM, a failed CPU allocation, or Python's MemoryError."""
    if isinstance(err, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return None


def _release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so that one setting's
    RSS baseline does not include what the previous one freed."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block above its starting level: CUDA allocator peak, or sampled CPU RSS."""

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device, self.interval = device, interval_s
        self.peak_bytes: int | None = None
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_rss"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _release_freed_memory()
        self._base = _rss_bytes()
        self._top = self._base or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self._base is not None:
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._top = max(self._top, _rss_bytes() or 0)
            self._stop.wait(self.interval)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        if self._base is None:
            return
        self._stop.set()
        self._thread.join()
        self._top = max(self._top, _rss_bytes() or 0)
        self.peak_bytes = self._top - self._base


@torch.no_grad()
def _one_round(model: torch.nn.Module, attached: AttachedMethod, ids: torch.Tensor, new_tokens: int) -> dict[str, Any]:
    """Prefill ``ids`` into a fresh cache, then ``new_tokens`` greedy decode steps, each timed."""
    method, device = attached.method, ids.device
    cache = attached.new_cache()
    own0 = _own_seconds(method)
    _sync(device)
    t0 = time.perf_counter()
    logits = forward(model, ids, cache, logits_to_keep=1).logits  # as generate: last position only
    _sync(device)
    t_prefill = time.perf_counter() - t0
    own1 = _own_seconds(method)
    step_times = []
    token = logits[:, -1:].argmax(-1)
    del logits
    for _ in range(new_tokens):
        _sync(device)
        t0 = time.perf_counter()
        logits = forward(model, token, cache).logits
        _sync(device)
        step_times.append(time.perf_counter() - t0)
        token = logits[:, -1:].argmax(-1)
    own2 = _own_seconds(method)
    out = {"prefill": t_prefill, "steps": step_times, "memory": cache.memory()}
    out["read"] = cache.read_bytes() if hasattr(cache, "read_bytes") else None
    if own0 is not None:
        out["own_prefill"], out["own_step"] = own1 - own0, (own2 - own1) / max(new_tokens, 1)
    return out


def _summary(
    rounds: list[dict[str, Any]], last: dict[str, Any], peak: int | None, kind: str, batch: int, new_tokens: int
) -> dict[str, Any]:
    """A profile row's figures from its timed ``rounds`` (medians) and the ``last`` round's cache."""
    steps = [t for r in rounds for t in r["steps"]]
    step = statistics.median(steps) if steps else None
    memory, read = last["memory"], last["read"]
    out: dict[str, Any] = {
        "status": "done",
        "prefill_s": statistics.median(r["prefill"] for r in rounds),
        "decode_step_s": step,
        "decode_tokens_per_s": batch / step if step else None,
        "kv_bytes": memory.total_bytes,
        "kv_reserved_bytes": memory.reserved_bytes,  # growable buffers' spare capacity, beside kv_bytes
        "kv_read_bytes_per_step": read if read is not None and new_tokens else memory.total_bytes,
        "nominal_bits": memory.nominal_bits,
        "effective_bits": memory.effective_bits,
        "peak_bytes": peak,
        "peak_kind": kind,
    }
    if "own_prefill" in last:
        out["own_prefill_s"] = statistics.median(r["own_prefill"] for r in rounds)
        out["own_decode_step_s"] = statistics.median(r["own_step"] for r in rounds)
    return out


def _prompt(model: torch.nn.Module, context: int, batch: int, seed: int) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(seed))
    return ids.to(next(model.parameters()).device)


def profile_setting(
    model: torch.nn.Module,
    attached: AttachedMethod,
    context: int,
    batch: int = 1,
    new_tokens: int = 32,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Time prefill and decode of one (context, batch) setting for an attached method: ``repeats``
    timed rounds after one warm-up round, back to back."""
    ids = _prompt(model, context, batch, seed)
    with PeakMemory(ids.device) as peak:
        rounds = [_one_round(model, attached, ids, new_tokens) for _ in range(repeats + 1)]
    return _summary(rounds[1:], rounds[-1], peak.peak_bytes, peak.kind, batch, new_tokens)


def _row_base(
    model: torch.nn.Module, method: KVCacheMethod, from_codes: bool | None, new_tokens: int, repeats: int
) -> dict[str, Any]:
    """What identifies a method's rows: device, dtype, attention kernel, threads, protocol."""
    device = next(model.parameters()).device
    return {
        "method": method.label + (" [dequantize]" if from_codes is False and method.decode_from_codes else ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attention": getattr(model.config, "_attn_implementation", None),
        "torch_threads": torch.get_num_threads(),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "calibration_s": 0.0,
    }


def _attach(
    model: torch.nn.Module, method: KVCacheMethod, from_codes: bool | None, contexts: Sequence[int], seed: int
) -> tuple[AttachedMethod, float]:
    """Attach ``method``; a method that calibrates does so on random tokens (speed does not
    depend on their values), outside any timed region. Returns (attached, calibration seconds)."""
    am = AttachedMethod(model, method, from_codes=from_codes)
    if not method.needs_calibration:
        return am, 0.0
    try:
        g = torch.Generator().manual_seed(seed + 1)
        window = torch.randint(0, model.config.vocab_size, (1, min(max(contexts), 512)), generator=g)
        t0 = time.perf_counter()
        am.calibrate([window.to(next(model.parameters()).device)])
        return am, time.perf_counter() - t0
    except BaseException:
        am.detach()
        raise


def _out_of_memory_row(err: BaseException, device: torch.device) -> dict[str, Any]:
    """The record of a setting that ran out of memory (the sweep goes on); other errors raise."""
    if not is_out_of_memory(err):
        raise err
    _release_freed_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"status": "oom", "reason": " ".join(str(err).split())[:300]}


def profile_method(
    model: torch.nn.Module,
    method: KVCacheMethod,
    contexts: Sequence[int] = (2048,),
    batches: Sequence[int] = (1,),
    new_tokens: int = 32,
    repeats: int = 3,
    seed: int = 0,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    from_codes: bool | None = None,
) -> list[dict[str, Any]]:
    """One row per (context, batch): ``profile_setting`` plus what identifies it. Calibration (if
    the method has one) runs once, on random tokens (speed does not depend on its values).
    ``from_codes=False`` makes decode steps dequantize the history and run the model's attention
    (the row's method is then labelled ``<method> [dequantize]``)."""
    _check(contexts, batches, new_tokens, repeats)
    device = next(model.parameters()).device
    base = _row_base(model, method, from_codes, new_tokens, repeats)
    _enable_own_timing(method)
    rows = []
    am, base["calibration_s"] = _attach(model, method, from_codes, contexts, seed)
    with am:
        base["decode_from_codes"] = am.board.from_codes
        base["method_parameters"] = method_parameters(method)  # MoQAE's routers exist once attached
        for context in contexts:
            for batch in batches:
                row = {**base, "context": context, "batch": batch}
                try:
                    row.update(profile_setting(model, am, context, batch, new_tokens, repeats, seed))
                except Exception as err:  # noqa: BLE001 - an OOM setting is a record, not a crash
                    row.update(_out_of_memory_row(err, device))
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def profile_interleaved(
    model: torch.nn.Module,
    jobs: Sequence[tuple[KVCacheMethod, bool | None]],
    contexts: Sequence[int] = (2048,),
    batches: Sequence[int] = (1,),
    new_tokens: int = 32,
    repeats: int = 3,
    seed: int = 0,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    tick: Callable[[], None] | None = None,
    threads: Sequence[int | None] = (None,),
) -> list[dict[str, Any]]:
    """``profile_method`` for several (method, from_codes) jobs with their rounds interleaved: round
    r of every method runs before round r + 1 of any, each method attached for its round only.

    On a shared 2-core CPU the speed drifts by 10–20 % within and between processes (the same
    fp16 decode step measured 73.7 and 83.7 ms in two sequential runs that differed only in the
    order of fp16 and dynamic); interleaving spreads such drift over every method alike instead
    of charging it to whichever ran during it. A method that calibrates does so at each attach
    (untimed; the row's ``calibration_s`` is the first). ``on_row`` gets each setting's rows when
    it is done; the list returned is method by method, in ``jobs`` order. ``tick`` is called
    after each method's round (progress). ``threads``: torch thread counts, each set before its
    methods' rounds (``torch.set_num_threads``) and taken in turn with them, so that round r runs
    every method at every count before round r + 1; None keeps the process's count. Each row
    states its count (``torch_threads``)."""
    _check(contexts, batches, new_tokens, repeats)
    device = next(model.parameters()).device
    bases = []
    for method, from_codes in jobs:
        _enable_own_timing(method)
        base = _row_base(model, method, from_codes, new_tokens, repeats)
        am, base["calibration_s"] = _attach(model, method, from_codes, contexts, seed)
        with am:
            base["decode_from_codes"] = am.board.from_codes
            base["method_parameters"] = method_parameters(method)
        bases.append(base)
    units = [(t, j) for t in threads for j in range(len(jobs))]  # (threads, job): what takes turns
    rows: list[list[dict[str, Any]]] = [[] for _ in jobs]
    kind = PeakMemory(device).kind
    for context in contexts:
        for batch in batches:
            ids = _prompt(model, context, batch, seed)
            rounds: dict[tuple, list[dict[str, Any]]] = {u: [] for u in units}
            peaks: dict[tuple, int | None] = dict.fromkeys(units)
            counts: dict[tuple, int] = {}
            failed: dict[tuple, dict[str, Any]] = {}
            for _ in range(repeats + 1):  # the first round of each method warms up and is not timed
                for t, j in units:
                    if (t, j) in failed:
                        continue
                    method, from_codes = jobs[j]
                    _set_threads(t)
                    counts[t, j] = torch.get_num_threads()
                    try:
                        am, _ = _attach(model, method, from_codes, contexts, seed)
                        with am, PeakMemory(device) as peak:
                            rounds[t, j].append(_one_round(model, am, ids, new_tokens))
                    except Exception as err:  # noqa: BLE001 - an OOM setting is a record, not a crash
                        failed[t, j] = _out_of_memory_row(err, device)
                        continue
                    if peak.peak_bytes is not None:
                        peaks[t, j] = max(peaks[t, j] or 0, peak.peak_bytes)
                    if tick is not None:
                        tick()
            for t, j in units:  # each setting's rows as soon as it is done (a crash keeps them)
                row = {**bases[j], "context": context, "batch": batch, "interleaved": True}
                if t is not None:
                    row["torch_threads"] = counts[t, j]
                runs = rounds[t, j]
                row.update(failed.get((t, j)) or _summary(runs[1:], runs[-1], peaks[t, j], kind, batch, new_tokens))
                rows[j].append(row)
                if on_row is not None:
                    on_row(row)
    return [row for job_rows in rows for row in job_rows]


def _check(contexts: Sequence[int], batches: Sequence[int], new_tokens: int, repeats: int) -> None:
    if not contexts or min(contexts) < 1 or not batches or min(batches) < 1 or new_tokens < 0 or repeats < 1:
        got = f"context={list(contexts)}, batch={list(batches)}, new_tokens={new_tokens}, repeats={repeats}"
        raise ValueError(f"profile: need contexts >= 1, batches >= 1, new tokens >= 0, repeats >= 1 (got {got})")


# --------------------------------------------------------------------------------------------
# Ratios and tables
# --------------------------------------------------------------------------------------------

#: (row key, column title, unit scale, format) of the profile table; each also gets a ratio column.
COLUMNS = (
    ("prefill_s", "prefill ms", 1e3, "{:.1f}"),
    ("decode_step_s", "decode ms/step", 1e3, "{:.2f}"),
    ("decode_tokens_per_s", "tokens/s", 1.0, "{:.1f}"),
    ("kv_bytes", "KV MiB", 2**-20, "{:.2f}"),
    ("kv_read_bytes_per_step", "read MiB/step", 2**-20, "{:.2f}"),
    ("peak_bytes", "peak MiB", 2**-20, "{:.1f}"),
)


def add_ratios(rows: list[dict[str, Any]], reference: str = REFERENCE, suffix: str = "_ratio") -> list[dict[str, Any]]:
    """Add ``<key><suffix>`` = row / reference row of the same (context, batch, torch threads) for each column."""

    def setting(r: dict[str, Any]) -> tuple:
        return r.get("context"), r.get("batch"), r.get("torch_threads")

    refs = {setting(r): r for r in rows if r["method"] == reference and r.get("status") == "done"}
    for r in rows:
        ref = refs.get(setting(r))
        for key, *_ in COLUMNS:
            a, b = r.get(key), (ref or {}).get(key)
            r[f"{key}{suffix}"] = a / b if a is not None and b else None
    return rows


#: the columns that also get a ratio to each extra reference (``--reference fp16,dynamic``): times
TIME_COLUMNS = ("prefill_s", "decode_step_s", "decode_tokens_per_s")


def add_all_ratios(rows: list[dict[str, Any]], reference: str, also: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Ratios to ``reference`` (``<key>_ratio``) and to each method of ``also`` (``<key>_vs_<name>``)."""
    add_ratios(rows, reference)
    for other in also:
        add_ratios(rows, other, suffix=f"_vs_{other}")
    return rows


def profile_table(rows: list[dict[str, Any]], reference: str = REFERENCE, also: Sequence[str] = ()) -> str:
    """Markdown table, one line per row, every figure followed by its ratio to ``reference``, and
    each time also by its ratio to every method of ``also`` (e.g. transformers' ``dynamic``). Rows
    measured at several torch thread counts get a ``threads`` column after ``batch``."""
    from harness.reports.table import markdown_table

    add_all_ratios(rows, reference, also)
    by_threads = len({r.get("torch_threads") for r in rows}) > 1
    head = ["method", "context", "batch"] + (["threads"] if by_threads else [])
    for key, title, *_ in COLUMNS:
        head += [title, f"× {reference}"] + ([f"× {o}" for o in also] if key in TIME_COLUMNS else [])
    head += ["own ms (prefill / step)", "added params"]
    lines = []
    for r in rows:
        cells = [r["method"], str(r["context"]), str(r["batch"])]
        if by_threads:
            cells.append(str(r.get("torch_threads")))
        if r.get("status") != "done":
            lines.append(cells + [f"**{r.get('status')}**"] + ["—"] * (len(head) - len(cells) - 1))
            continue
        for key, _, unit, fmt in COLUMNS:
            v, q = r.get(key), r.get(f"{key}_ratio")
            cells += ["—" if v is None else fmt.format(v * unit), "—" if q is None else f"{q:.3f}"]
            for o in also if key in TIME_COLUMNS else ():
                q = r.get(f"{key}_vs_{o}")
                cells.append("—" if q is None else f"{q:.3f}")
        own = r.get("own_prefill_s")
        cells.append("—" if own is None else f"{1e3 * own:.1f} / {1e3 * r['own_decode_step_s']:.2f}")
        params = r["method_parameters"]
        cells.append(f"{params:,} ({100 * params / r['model_parameters']:.3f} %)" if params else "0")
        lines.append(cells)
    return markdown_table(head, lines, numeric_from=1)


def plot_profile(rows: list[dict[str, Any]], path: Path, title: str = "") -> list[Path]:
    """KV memory and decode latency against context length, one line per method (first batch
    size), side by side; PNG and SVG (``harness.reports.plots.plot_against_context``)."""
    from harness.reports.plots import plot_against_context

    done = [r for r in rows if r.get("status") == "done"]
    if not done:
        return []
    where = f"{done[0]['model']}, {done[0]['device']}, {done[0]['dtype']}"
    heading = title or "KV memory and decode latency against context length"
    png = plot_against_context(done, path, ["kv_bytes", "decode_step_s"], heading, where)
    return [png, png.with_suffix(".svg")] if png else []


def profile(
    methods: list[str],
    model: str,
    contexts: Sequence[int] = (2048,),
    batches: Sequence[int] = (1,),
    new_tokens: int = 32,
    repeats: int = 3,
    device: str | None = None,
    dtype: str | None = None,
    reference: str = REFERENCE,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    compare_reads: bool = False,
    also: Sequence[str] = (),
    interleave: bool = True,
    threads: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Profile each method spec on one loaded model (alias, folder, hub id or a random ``*-shape``).

    The ``reference`` method (fp16) is profiled first, then each method of ``also`` (more
    references, e.g. transformers' ``dynamic``), added if missing, so that every ratio is taken
    against figures measured in the same process. ``compare_reads`` also profiles each method that
    attends from its codes with dequantize-then-attend decode steps (``[dequantize]``).
    ``interleave`` (the default) takes the methods' rounds in turn (``profile_interleaved``);
    False profiles one method after the other, each with its rounds back to back.
    ``threads`` (several torch thread counts): every setting at each count, in one process; each is
    set before its rounds (interleaved with the methods' rounds, or before each method's rows when
    sequential), and the process's count is restored at the end. None keeps the process's count.
    """
    from tqdm.auto import tqdm

    from harness.integration import model_info
    from harness.interface import build_method
    from harness.models import load_model, model_id

    _check(contexts, batches, new_tokens, repeats)
    refs = list(dict.fromkeys([reference, *also]))
    specs = refs + [m for m in methods if m not in refs]
    objs = [build_method(m) for m in specs]
    lm, _ = load_model(model, device=device, dtype=dtype)
    info = model_info(lm)
    for m in objs:
        m.check_model(info)
    rows: list[dict[str, Any]] = []

    def tag(row: dict[str, Any]) -> None:
        row["model"] = model_id(model)
        rows.append(row)
        if on_row is not None:
            on_row(row)

    counts: list[int | None] = list(dict.fromkeys(threads)) if threads else [None]
    before = torch.get_num_threads()
    try:
        # One untimed, unrecorded prefill + decode step first (at each thread count): the process's
        # one-time costs (thread pools, kernel caches, lazy initialisation) must not land in the
        # first setting's figures.
        for t in counts:
            _set_threads(t)
            with AttachedMethod(lm, build_method(reference)) as am, torch.no_grad():
                cache = am.new_cache()
                forward(lm, torch.zeros(1, min(contexts), dtype=torch.long, device=lm.device), cache, logits_to_keep=1)
                forward(lm, torch.zeros(1, 1, dtype=torch.long, device=lm.device), cache, logits_to_keep=1)
                del cache
        jobs = [(m, None) for m in objs]
        if compare_reads:
            jobs += [(build_method(m.label), False) for m in objs if m.decode_from_codes]
        if interleave:
            total = len(jobs) * len(counts) * len(contexts) * len(batches) * (repeats + 1)
            with tqdm(total=total, desc="profile rounds", disable=not progress) as bar:
                done = profile_interleaved(
                    lm, jobs, contexts, batches, new_tokens, repeats, on_row=tag, tick=bar.update, threads=counts
                )
            return add_all_ratios(done, reference, refs[1:])  # method by method (``rows`` is setting by setting)
        for m, from_codes in tqdm(jobs, desc="profile", disable=not progress):
            for t in counts:
                _set_threads(t)
                profile_method(lm, m, contexts, batches, new_tokens, repeats, on_row=tag, from_codes=from_codes)
        return add_all_ratios(rows, reference, refs[1:])
    finally:
        if threads:
            torch.set_num_threads(before)
