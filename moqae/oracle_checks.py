"""Checks on ``moqae-oracle``: is its estimate right, and is its gain more than a fit to the window?

``check_estimate`` (``python -m moqae oracle-check``): the first-order ΔNLL estimate against the
measured ΔNLL of random single-slot moves away from the uniform base allocation.

``cross_fit`` (``python -m moqae oracle-crossfit``): the verified oracle (``verify=N``) searches the
allocation that lowers the window's own NLL, so it can fit the quantization noise of the very tokens
it is scored on (it goes below fp16 on SmolLM2). Cross-fitting separates the two: the window's
predicted tokens are split into two folds (``split=parity``: even and odd positions, so each fold
covers every chunk's context; ``split=halves`` for a check: first and second half); each fold's
search sees only its own tokens' NLL, and each allocation is scored on the *other* fold's tokens.
Σ over both folds is a whole window's NLL in which no token was scored by the search that chose its
allocation. It is an estimate of the content-driven gain (what a router reading the chunks could at
best learn), not an upper bound: the folds share the context, so some of the noise fit still carries
over (which makes the estimate optimistic, never pessimistic, for the router), and it is labelled as
such wherever it is printed. Its control at exactly the same bits: each fold's allocation with its
routed chunks shuffled within each layer group (the same experts, placed at random), scored on the
same held-out fold. A content signal would make the allocation beat its shuffle.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from moqae.oracle import (
    allocate,
    allocation_bits,
    measured_deltas,
    slot_deltas,
    spearman,
    verified_search,
    window_nll,
)


def check_estimate(attached: Any, ids: torch.Tensor, n_slots: int, seed: int = 0) -> dict[str, Any]:
    """The first-order estimate against the measured ΔNLL for ``n_slots`` random moves (slot, expert)
    away from the uniform base allocation of ``attached.method`` on the window ``ids`` [1, T]."""
    method = attached.method
    n_chunks = ids.shape[1] // method.config.chunk
    base_expert = method.expert_bits.index(method.config.base)
    _, _, base = method.slots(n_chunks)
    nll, first = slot_deltas(attached, ids, base, "first")
    start = 1 if method.config.freeze_first else 0  # the frozen first chunk is never moved
    moves = [(g, c, e) for g in range(len(base)) for c in range(start, n_chunks)
             for e in range(len(method.expert_bits)) if e != base_expert]  # fmt: skip
    order = torch.randperm(len(moves), generator=torch.Generator().manual_seed(seed)).tolist()
    picked = [moves[i] for i in order[:n_slots]]
    measured = measured_deltas(attached, ids, base, picked, ref=nll)
    rows = [{"group": g, "chunk": c, "to_bits": method.expert_bits[e], "first_order": float(first[g, c, e]),
             "measured": m} for (g, c, e), m in zip(picked, measured, strict=True)]  # fmt: skip
    by_bits: dict[str, float] = {}
    for b in sorted({r["to_bits"] for r in rows}):
        sel = [r for r in rows if r["to_bits"] == b]
        if len(sel) > 2:
            by_bits[str(b)] = spearman([r["first_order"] for r in sel], [r["measured"] for r in sel])
    sign = sum((r["first_order"] > 0) == (r["measured"] > 0) for r in rows) / max(len(rows), 1)
    return {"window_nll": nll, "rows": rows, "spearman_by_target_bits": by_bits, "sign_agreement": sign}


def folds(n_targets: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two complementary masks [n_targets] over a window's predicted tokens: ``parity`` (even, odd
    positions) or ``halves`` (first, second half)."""
    pos = torch.arange(n_targets)
    if split == "parity":
        a = pos % 2 == 0
    elif split == "halves":
        a = pos < n_targets // 2
    else:
        raise ValueError(f"split={split!r}; accepted: parity, halves")
    return a, ~a


def searched(attached: Any, ids: torch.Tensor, trials: int, targets: torch.Tensor | None) -> tuple[dict, int]:
    """The verified oracle's allocation for ``ids`` [1, T] under ``attached.method``'s budget and
    estimate, searched on the NLL of the ``targets`` [T-1] tokens (all when None): the knapsack and
    the uniform base as starts, then ``trials`` checked single-slot moves, as
    ``moqae-oracle:verify=N`` does (``moqae.oracle.verified_search``). Returns (allocation, moves kept)."""
    method, cfg = attached.method, attached.method.config
    bits, n_chunks = method.expert_bits, ids.shape[1] // cfg.chunk
    weight, fixed, base = method.slots(n_chunks)
    _, delta = slot_deltas(attached, ids, base, cfg.estimate, targets)  # [G, C, E] ΔNLL from the base
    choice = allocate(delta, bits, weight, cfg.budget, fixed)
    knapsack = {k: choice[i : i + 1].clone() for i, k in enumerate(sorted(base))}
    return verified_search(attached, ids, [(None, knapsack), (None, base)], delta, bits, weight, cfg.budget,
                           fixed, trials, targets)  # fmt: skip


def shuffled(alloc: dict[int, torch.Tensor], frozen: int, seed: int) -> dict[int, torch.Tensor]:
    """``alloc`` ({leader: [1, C]}) with each group's chunks after the first ``frozen`` permuted at random
    (the same experts in other places: the same bits)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, row in sorted(alloc.items()):
        row = row.clone()
        row[0, frozen:] = row[0, frozen:][torch.randperm(row.shape[1] - frozen, generator=gen)]
        out[k] = row
    return out


def cross_fit(attached: Any, ids: torch.Tensor, trials: int, split: str = "parity",
              shuffles: int = 4) -> dict[str, Any]:  # fmt: skip
    """One window ``ids`` [1, T]: summed NLL (both folds) and mean expert bits of fp16 (every slot at the
    top expert), the uniform base, the verified oracle searched on the whole window (in-sample), the
    cross-fitted one (each fold's allocation scored on the other fold) and its shuffled control (the
    mean NLL over ``shuffles`` shuffles)."""
    method = attached.method
    bits, n_chunks = method.expert_bits, ids.shape[1] // method.config.chunk
    weight, _, base = method.slots(n_chunks)
    a, b = folds(ids.shape[1] - 1, split)

    def scored(alloc: dict[int, torch.Tensor]) -> tuple[float, float]:  # (NLL on fold a, on fold b)
        with torch.no_grad():
            return window_nll(attached, ids, alloc, a), window_nll(attached, ids, alloc, b)

    out: dict[str, Any] = {"tokens": [int(a.sum()), int(b.sum())]}
    fp16 = method._uniform(method.top_expert, n_chunks)
    whole, kept = searched(attached, ids, trials, None)
    on_a, kept_a = searched(attached, ids, trials, a)
    on_b, kept_b = searched(attached, ids, trials, b)
    for name, alloc in (("fp16", fp16), ("uniform", base), ("in_sample", whole)):
        out[name] = {"nll_folds": list(scored(alloc)), "bits": allocation_bits(alloc, bits, weight)}
    out["in_sample"]["moves_kept"] = kept
    (sel_a, held_b), (held_a, sel_b) = scored(on_a), scored(on_b)
    frozen = 1 if method.config.freeze_first else 0
    held = torch.zeros(2, dtype=torch.float64)
    for seed in range(shuffles):  # scored on the same held-out folds as the allocations they shuffle
        mix_a, mix_b = shuffled(on_a, frozen, 2 * seed), shuffled(on_b, frozen, 2 * seed + 1)
        with torch.no_grad():
            held += torch.tensor([window_nll(attached, ids, mix_b, a), window_nll(attached, ids, mix_a, b)])
    mean_bits = (allocation_bits(mix_a, bits, weight) + allocation_bits(mix_b, bits, weight)) / 2
    out["shuffled"] = {"nll_folds": (held / max(shuffles, 1)).tolist(), "bits": mean_bits, "shuffles": shuffles}
    out["cross_fit"] = {
        "nll_folds": [held_a, held_b],  # each fold scored under the allocation searched on the other
        "selection_nll_folds": [sel_a, sel_b],  # each fold under the allocation searched on itself
        "bits": (allocation_bits(on_a, bits, weight) + allocation_bits(on_b, bits, weight)) / 2,
        "moves_kept": [kept_a, kept_b],
    }
    return out


def summarize(windows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """PPL over all windows' predicted tokens (and the selection folds' PPL for the cross-fit)."""
    n = sum(sum(w["tokens"]) for w in windows)
    out = {}
    for name in ("fp16", "uniform", "in_sample", "cross_fit", "shuffled"):
        nll = sum(sum(w[name]["nll_folds"]) for w in windows)
        out[name] = {"ppl": math.exp(nll / n), "bits": sum(w[name]["bits"] for w in windows) / len(windows)}
    out["cross_fit"]["selection_ppl"] = math.exp(sum(sum(w["cross_fit"]["selection_nll_folds"]) for w in windows) / n)
    return out


#: the rows of a cross-fit table, labelled as what each one is
CROSSFIT_ROWS = (
    ("fp16", "fp16 (every chunk FP16)"),
    ("uniform", "uniform INT4 in MoQAE's layout"),
    ("in_sample", "oracle searched on the window's own tokens [oracle: upper bound]"),
    ("cross_fit", "oracle searched on the other fold, scored on held-out tokens [estimate, not a bound]"),
    ("shuffled", "its control: the same allocations, chunks shuffled (same bits)"),
)


def crossfit_markdown(result: dict[str, Any]) -> str:
    """A Markdown page for one ``oracle-crossfit`` run (``result`` as the command writes it)."""
    from harness.reports.table import markdown_table

    summary = result["summary"]
    uniform = summary["uniform"]["ppl"]
    rows = [[label, f"{summary[k]['ppl']:.4f}", f"{100 * (summary[k]['ppl'] / uniform - 1):+.2f} %",
             f"{summary[k]['bits']:.3f}"] for k, label in CROSSFIT_ROWS]  # fmt: skip
    n = len(result["windows"])
    return (
        f"# MoQAE oracle, cross-fitted: {result['model']}, {n} × {result['seqlen']} tokens\n\n"
        f"`{result['command']}`\n\n"
        f"`{result['method']}`, {result['verify']} checked moves per search, folds: {result['split']}.\n\n"
        + markdown_table(["allocation", "PPL", "vs uniform", "mean expert bits"], rows)
        + f"\n\nThe searches' own folds under their allocations: PPL {summary['cross_fit']['selection_ppl']:.4f}. "
        "See docs/results.md: *Does per-chunk mixing pay?*\n"
    )
