"""Micro-benchmarks of the quantized-cache primitives (pytest-benchmark): ``nox -s bench`` or
``pytest tests/bench --benchmark-only``. Not collected by ``nox -s tests`` (pyproject's pytest
``addopts`` ignores this folder unless it is named on the command line).

Each benchmark records the bytes it must move at least (codes + scales/zeros + fp16 tails + inputs
and outputs); the session ends with a table of median times, achieved GB/s (those bytes / median)
and the speed-up over the torch reference of the same group (reference median / median).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch


@dataclass
class Row:
    group: str
    impl: str
    seconds: float
    nbytes: int
    reference: bool


ROWS: list[Row] = []
TABLES: list[str] = []  # whole tables (tests/bench/test_bench_decode.py), printed at the end


def record(benchmark, group: str, impl: str, nbytes: int, reference: bool = False) -> None:
    """Store a finished benchmark's median with its byte count (and in the JSON's extra_info)."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    median = stats.stats.median
    info = {"bytes": nbytes, "GB/s": nbytes / median / 1e9, "reference": reference}
    benchmark.extra_info.update(info, torch_threads=torch.get_num_threads())
    ROWS.append(Row(group, impl, median, nbytes, reference))


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tr = terminalreporter
    for table in TABLES:
        tr.write_sep("=", "decode and prefill against transformers' caches (see the × dynamic columns)")
        tr.write_line(table)
    if not ROWS:
        return
    tr.write_sep("=", "quantized-cache kernels: achieved bandwidth")
    tr.write_line(f"{'group':<40} {'implementation':<28} {'median ms':>10} {'MB moved':>9} {'GB/s':>8} {'x ref':>7}")
    for group in dict.fromkeys(r.group for r in ROWS):
        rows = [r for r in ROWS if r.group == group]
        ref = next((r for r in rows if r.reference), None)
        for r in rows:
            ratio = f"{ref.seconds / r.seconds:7.2f}" if ref else f"{'':>7}"
            tr.write_line(
                f"{group:<40} {r.impl:<28} {r.seconds * 1e3:10.3f} {r.nbytes / 1e6:9.2f} "
                f"{r.nbytes / r.seconds / 1e9:8.2f} {ratio}"
            )
    tr.write_line("x ref: the group's torch reference median / this median (> 1: faster than the reference)")


@pytest.fixture
def record_bandwidth():
    """``record(benchmark, group, impl, nbytes, reference=False)`` for the closing table."""
    return record


@pytest.fixture
def record_table():
    """``record_table(text)``: a whole table for the closing summary."""
    return TABLES.append
