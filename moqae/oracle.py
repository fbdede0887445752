"""An oracle allocation of MoQAE's experts: how far can per-chunk mixing go? (an upper bound)

``moqae-oracle:budget=B`` uses MoQAE's experts, chunks, routing freezing and routing sharing, but
no router: for each evaluation window it measures how much the window's NLL depends on each
(layer group, chunk) slot's expert, and gives every slot the expert that minimises the window's
NLL under an average-bit budget ``B``. It looks at the window it is scored on, so it is an upper
bound on what any chunk router of this layout can reach, never a method claim; its records say
``"oracle": true`` and every report row is labelled as such.

Sensitivity (first order, one forward + backward per window and pass). The window runs through a
cache in which every slot holds ``Σ_e w_e·Q_e(x)`` with ``w`` the one-hot of the current allocation
(the forward value is exactly that allocation's cache; ``moqae.method`` ``_store_relaxed``), so
    ΔNLL(slot → e) ≈ ∂NLL/∂w_e − ∂NLL/∂w_current
(NLL summed over the window's tokens, all layers of the group through their shared decision).
``base`` is the first linearisation point (every routed slot at ``base`` bits, default INT4, the
first chunk FP16 with RF); ``passes`` > 1 linearises again at the previous pass's allocation and
keeps the allocation whose probed NLL is lowest. ``measured_deltas`` gives the exact ΔNLL of
single slots for validating the estimate (``python -m moqae oracle-check``).

``verify=N`` then searches on the window itself: single-slot moves in order of their estimated gain,
each kept only if the window's NLL drops within the budget (at most N forwards per window), starting
from the better of the knapsack's allocation and the uniform base; never worse than either.

``transfer=true`` applies each window's allocation to the *next* window instead (the first window
runs the uniform base): what of the oracle's gain carries over to other text, and so could be
learnt by a router, and what is a fit to the window's own quantization noise.

Allocation: a multiple-choice knapsack over slots, solved greedily on each slot's lower convex hull
of (bits, ΔNLL): start every slot at its cheapest hull point, then take upgrades in order of NLL
saved per bit while the budget allows (optimal for the LP relaxation, within one upgrade of the
integer optimum). The budget is the average expert bits over all layers and chunks of the window,
the frozen first chunk included: MoQAE's ``nominal_bits`` when the window is whole chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F

from harness.integration import forward
from harness.interface import MethodSpecError, ModelInfo, ReportStyle
from harness.options import FreeText, NonNegativeInt, OneOf, PositiveFloat
from harness.quant import SUPPORTED_BITS
from moqae.method import FP16_BITS, MoQAE, MoQAEConfig


@dataclass
class MoQAEOracleConfig(MoQAEConfig):
    budget: PositiveFloat = 4.0  # average expert bits over every layer and chunk of a window
    base: OneOf(FP16_BITS, *SUPPORTED_BITS) = 4  # bits of the first linearisation point (every routed slot)
    passes: NonNegativeInt = 1  # linearisations (each after the first from the previous allocation); 0 = base
    # first: first-order from one backward; measured: one forward per slot and expert
    estimate: OneOf("first", "measured") = "first"
    transfer: bool = False  # apply the previous window's allocation (the first window: uniform base)
    verify: NonNegativeInt = 0  # >0: up to this many single-slot moves tried on the window, each kept if it helps
    ckpt: Annotated[str, FreeText("random (no router is used)")] = "random"  # a bank is still made for the groups

    def validate(self) -> None:
        super().validate()
        bits = self.expert_bits
        if self.base not in bits:
            raise MethodSpecError(f"moqae-oracle: base={self.base} is not one of the experts {self.experts}")
        if not min(bits) <= self.budget <= max(bits):
            raise MethodSpecError(
                f"moqae-oracle: budget={self.budget:g} must be within the experts' bits {self.experts}"
            )


def groups(method: MoQAE, n_layers: int) -> dict[int, int]:
    """Leader layer -> number of layers that use its decision (routing sharing)."""
    out: dict[int, int] = {}
    for i in range(n_layers):
        out[method.bank.leader(i)] = out.get(method.bank.leader(i), 0) + 1
    return out


def probe_gradients(attached: Any, ids: torch.Tensor, forced: dict[int, torch.Tensor],
                    targets: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:  # fmt: skip
    """Summed NLL of ``ids`` [1, T] under the allocation ``forced`` ({leader: [1, n_chunks]} expert
    indices) and ∂NLL/∂w [n_leaders, n_chunks, E] (leaders in ascending order); ``targets`` [T-1]
    (bool) sums the NLL of those predicted tokens only."""
    method: MoQAE = attached.method
    cache = attached.new_cache()
    probe: dict[tuple[int, int], torch.Tensor] = {}
    cache.state["forced"] = forced
    cache.state["train"] = {"relaxed": True, "probe": probe, "weights": [], "probs": {}, "sample": False}
    with torch.enable_grad():
        logits = forward(attached.model, ids, cache).logits
        nll = _summed_nll(logits, ids, targets)
        keys = sorted(probe)
        grads = torch.autograd.grad(nll, [probe[k] for k in keys])
    leaders = sorted(forced)
    n_chunks = 1 + max(c for _, c in keys)
    out = torch.zeros(len(leaders), n_chunks, len(method.expert_bits))
    for (leader, c), g in zip(keys, grads, strict=True):
        out[leaders.index(leader), c] = g[0].float().cpu()
    return nll.item(), out


def lower_hull(points: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """The lower convex hull of (cost, loss, expert) points, by increasing cost (dominated ones dropped)."""
    hull: list[tuple[float, float, int]] = []
    for p in sorted(points):
        if hull and p[1] >= hull[-1][1]:
            continue  # costs more, loses no less
        while len(hull) >= 2:
            (c1, l1, _), (c2, l2, _) = hull[-2], hull[-1]
            if (l2 - l1) * (p[0] - c1) >= (p[1] - l1) * (c2 - c1):  # hull[-1] is above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(delta: torch.Tensor, bits: tuple[int, ...], weight: list[int], budget: float,
             fixed: dict[tuple[int, int], int]) -> torch.Tensor:  # fmt: skip
    """Experts [G, C] minimising Σ ΔNLL under mean bits ≤ ``budget`` (weighted by layers per group).

    ``delta`` [G, C, E]: estimated ΔNLL of each expert per slot; ``weight`` [G]: layers per group;
    ``fixed``: slots whose expert is given (the frozen first chunk)."""
    g_n, c_n, _ = delta.shape
    total = sum(weight) * c_n
    spend = budget * total - sum(weight[g] * bits[e] for (g, _), e in fixed.items())
    choice = torch.empty(g_n, c_n, dtype=torch.long)
    steps: list[tuple[float, int, int, int, int, float]] = []  # (-gain per bit, g, c, from, to, cost)
    for g in range(g_n):
        for c in range(c_n):
            if (g, c) in fixed:
                choice[g, c] = fixed[(g, c)]
                continue
            hull = lower_hull([(weight[g] * b, float(delta[g, c, e]), e) for e, b in enumerate(bits)])
            choice[g, c] = hull[0][2]
            spend -= hull[0][0]
            for (c0, l0, e0), (c1, l1, e1) in zip(hull, hull[1:], strict=False):
                steps.append(((l1 - l0) / (c1 - c0), g, c, e0, e1, c1 - c0))
    if spend < -1e-6 * total:
        cheapest = (budget * total - spend) / total
        raise MethodSpecError(f"moqae-oracle: budget={budget:g} is below the cheapest allocation ({cheapest:.3f} bits)")
    for _, g, c, e0, e1, cost in sorted(steps):  # most NLL saved per bit first (convex: in order per slot)
        if int(choice[g, c]) == e0 and cost <= spend + 1e-9:
            choice[g, c] = e1
            spend -= cost
    return choice


class MoQAEOracle(MoQAE):
    """Oracle allocation of MoQAE's experts per chunk and layer group (sees the window: upper bound)."""

    name = "moqae-oracle"
    description = (
        "upper bound (sees the window): MoQAE's experts per chunk from the window's own NLL; budget, "
        "estimate=first|measured, verify=N (a checked search; docs/results.md: Does per-chunk mixing pay?)"
    )
    report = ReportStyle("MoQAE oracle (upper bound)", "*", "C9", rank=91)
    report_sections = ("moqae.report:ANALYSIS",)
    oracle = True  # per instance: False with passes=0
    config_class = MoQAEOracleConfig

    def __init__(self, config: MoQAEOracleConfig | None = None, name: str | None = None):
        super().__init__(config, name)
        self.oracle = self.config.passes > 0  # passes=0 (the uniform base allocation) sees no window
        self.n_layers = 0
        self._forced: dict[int, torch.Tensor] | None = None
        self._previous: dict[int, torch.Tensor] | None = None  # transfer: the last window's allocation
        self.last_probe: dict[str, Any] = {}  # the last window's probed NLLs per pass (for tests, analysis)

    @classmethod
    def ablation_options(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {}  # every option is part of the bound's setting (MoQAE's rule would count ckpt=random)

    def _uniform(self, expert: int, n_chunks: int) -> dict[int, torch.Tensor]:
        """Every routed slot at ``expert``, the first chunk at the top expert with RF."""
        forced = {}
        for leader in groups(self, self.n_layers):
            row = torch.full((1, n_chunks), expert, dtype=torch.long)
            if self.config.freeze_first:
                row[0, 0] = self.top_expert
            forced[leader] = row
        return forced

    def slots(self, n_chunks: int) -> tuple[list[int], dict[tuple[int, int], int], dict[int, torch.Tensor]]:
        """The allocation problem for a window of ``n_chunks`` chunks: layers per group [G], the slots
        whose expert is given ({(group, 0): top expert} with RF) and the uniform base allocation."""
        weight = list(groups(self, self.n_layers).values())
        fixed = {(g, 0): self.top_expert for g in range(len(weight))} if self.config.freeze_first else {}
        return weight, fixed, self._uniform(self.expert_bits.index(self.config.base), n_chunks)

    def attach(self, model: torch.nn.Module, info: ModelInfo) -> None:
        super().attach(model, info)
        self.n_layers = info.n_layers

    def see_window(self, attached: Any, ids: torch.Tensor) -> None:
        cfg, bits = self.config, self.expert_bits
        n_chunks = ids.shape[1] // cfg.chunk
        self._forced = None
        if n_chunks < 1 or cfg.passes == 0:
            return  # passes=0: the uniform base allocation itself (no look at the window)
        weight, fixed, base = self.slots(n_chunks)
        current = base
        tried: list[list[Any]] = []  # [probed NLL (None until probed), allocation] per pass
        for p in range(cfg.passes):
            nll, delta = cached_probe(attached, ids, current, cfg.estimate)  # delta: ΔNLL vs the current [G, C, E]
            if p:
                tried[-1][0] = nll
            else:
                base_nll, base_delta = nll, delta
            choice = allocate(delta, bits, weight, cfg.budget, fixed)
            current = {k: choice[i : i + 1].clone() for i, k in enumerate(sorted(current))}
            tried.append([None, current])
        if cfg.passes > 1:  # keep the allocation (each within the budget) with the lowest NLL
            with torch.no_grad():
                tried[-1][0] = window_nll(attached, ids, current)
            current = min(tried, key=lambda t: t[0])[1]
        self.last_probe = {"nll": [t[0] for t in tried]}
        if cfg.verify:
            starts = [(None, current), (base_nll, base)]
            current, kept = verified_search(attached, ids, starts, base_delta, bits, weight, cfg.budget, fixed,
                                            cfg.verify)  # fmt: skip
            self.last_probe["verified_moves"] = kept
        if cfg.transfer:  # does the allocation carry to other text? (window-specific fit vs a learnable signal)
            previous, self._previous = self._previous, current
            same = previous is not None and all(previous[k].shape == v.shape for k, v in current.items())
            current = previous if same else None  # None: the uniform base allocation
        self._forced = current

    def new_cache_state(self) -> dict[str, Any]:
        if self._forced is None:  # no window seen (decode, profiling) or passes=0: uniform base allocation
            return {"forced": self._uniform(self.expert_bits.index(self.config.base), UNIFORM_CHUNKS)}
        return {"forced": self._forced}


#: chunks of the uniform allocation used where no window was seen (131,072 tokens at chunk 32)
UNIFORM_CHUNKS = 4096
_PROBES: dict[tuple, tuple[float, torch.Tensor]] = {}  # the last windows' probes (budgets share them)


def slot_deltas(attached: Any, ids: torch.Tensor, forced: dict[int, torch.Tensor], estimate: str,
                targets: torch.Tensor | None = None):  # fmt: skip
    """(summed NLL of the allocation ``forced``, ΔNLL [G, C, E] of moving each slot alone to each expert):
    ``first`` from the probe's gradients, ``measured`` by one forward per slot and expert; the NLL of
    the ``targets`` [T-1] tokens only, if given."""
    if estimate == "first":
        nll, grad = probe_gradients(attached, ids, forced, targets)
        cur = torch.stack([forced[k][0] for k in sorted(forced)])[:, : grad.shape[1]]  # [G, C] expert indices
        return nll, grad - grad.gather(2, cur[..., None])
    leaders, n_experts = sorted(forced), len(attached.method.expert_bits)
    n_chunks = forced[leaders[0]].shape[1]
    first = 1 if attached.method.config.freeze_first else 0  # the frozen first chunk is never moved
    slots = [(g, c, e) for g in range(len(leaders)) for c in range(first, n_chunks) for e in range(n_experts)
             if int(forced[leaders[g]][0, c]) != e]  # fmt: skip
    with torch.no_grad():
        nll = window_nll(attached, ids, forced, targets)
    delta = torch.zeros(len(leaders), n_chunks, n_experts)
    measured = measured_deltas(attached, ids, forced, slots, ref=nll, targets=targets)
    for (g, c, e), d in zip(slots, measured, strict=True):
        delta[g, c, e] = d
    return nll, delta


def cached_probe(attached: Any, ids: torch.Tensor, forced: dict[int, torch.Tensor], estimate: str = "first"):
    """``slot_deltas``, remembered for the same model, method layout, window and allocation (a sweep
    over budgets probes each window once per linearisation point)."""
    cfg = attached.method.config
    layout = (cfg.experts, cfg.chunk, cfg.value_group, cfg.freeze_first, cfg.share, estimate,
              attached.info.n_layers, attached.info.hidden_size)  # fmt: skip
    alloc = tuple((k, tuple(v.flatten().tolist())) for k, v in sorted(forced.items()))
    key = (id(attached.model), layout, tuple(ids.flatten().tolist()), alloc)
    if key not in _PROBES:
        if len(_PROBES) >= 64:
            _PROBES.pop(next(iter(_PROBES)))
        _PROBES[key] = slot_deltas(attached, ids, forced, estimate)
    return _PROBES[key]


def allocation_bits(alloc: dict[int, torch.Tensor], bits: tuple[int, ...], weight: list[int]) -> float:
    """Average expert bits of an allocation ({leader: [1, C]}, leaders ascending) over layers and chunks."""
    rows = [alloc[k][0] for k in sorted(alloc)]
    table = torch.tensor(bits, dtype=torch.float64)
    total = sum(w * float(table[r].sum()) for w, r in zip(weight, rows, strict=True))
    return total / (sum(weight) * rows[0].numel())


def verified_search(attached: Any, ids: torch.Tensor, starts: list[tuple[float | None, dict[int, torch.Tensor]]],
                    delta: torch.Tensor, bits: tuple[int, ...], weight: list[int], budget: float,
                    fixed: dict[tuple[int, int], int], trials: int,
                    targets: torch.Tensor | None = None) -> tuple[dict[int, torch.Tensor], int]:  # fmt: skip
    """Local search on the window itself: from the best start within the budget (the knapsack's
    allocation, the uniform base: the last of ``starts``), try single-slot moves, each kept only if the
    window's NLL drops and the budget holds (two sweeps, at most ``trials`` forwards): first moving the
    start's slots back to the base, least sure first (by ``delta`` [G, C, E], the estimated ΔNLL from
    the base), then the moves estimated to help most. Never worse than its best start; returns
    (allocation, moves kept). ``targets`` [T-1] (bool): the NLL searched is that of those tokens only
    (``moqae.oracle_checks.cross_fit``)."""
    best, best_nll = None, math.inf
    with torch.no_grad():
        for nll, alloc in starts:
            if allocation_bits(alloc, bits, weight) <= budget + 1e-9:
                nll = window_nll(attached, ids, alloc, targets) if nll is None else nll
                if nll < best_nll:
                    best, best_nll = alloc, nll
        if best is None:
            raise MethodSpecError(f"moqae-oracle: no start allocation within budget={budget:g}")
        leaders = sorted(best)
        g_n, c_n, e_n = delta.shape
        base = starts[-1][1]
        # first undo the start's moves its estimate was least sure of (single-slot estimates do not add
        # up), then try the moves estimated to help most
        now = torch.stack([best[k][0] for k in leaders])  # [G, C] the start's experts
        was = torch.stack([base[k][0] for k in leaders])  # [G, C] the base's
        slots = [(g, c) for g in range(g_n) for c in range(c_n) if (g, c) not in fixed]
        undo = sorted((abs(float(delta[g, c, int(now[g, c])])), g, c, int(was[g, c])) for g, c in slots
                      if now[g, c] != was[g, c])  # fmt: skip
        gain = sorted(
            (float(delta[g, c, e]), g, c, e) for g, c in slots for e in range(e_n) if float(delta[g, c, e]) < 0
        )
        moves = undo + gain
        done, kept = 0, 0
        for _ in range(2):
            for _, g, c, e in moves:
                if done >= trials:
                    break
                if int(best[leaders[g]][0, c]) == e:
                    continue
                cand = {k: v.clone() for k, v in best.items()}
                cand[leaders[g]][0, c] = e
                if allocation_bits(cand, bits, weight) > budget + 1e-9:
                    continue
                nll = window_nll(attached, ids, cand, targets)
                done += 1
                if nll < best_nll:
                    best, best_nll, kept = cand, nll, kept + 1
    return best, kept


def window_nll(attached: Any, ids: torch.Tensor, forced: dict[int, torch.Tensor] | None,
               targets: torch.Tensor | None = None) -> float:  # fmt: skip
    """Summed NLL of ``ids`` [1, T] through a cache of ``attached.method`` with decisions ``forced``
    (of the predicted tokens ``targets`` [T-1] (bool) only, if given)."""
    cache = attached.new_cache()
    if forced is not None:
        cache.state["forced"] = forced
    return _summed_nll(forward(attached.model, ids, cache).logits, ids, targets).item()


def _summed_nll(logits: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """Σ NLL of ``ids`` [1, T] under ``logits`` [1, T, V], over the ``targets`` mask [T-1] if given."""
    if targets is None:
        return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
    return F.cross_entropy(logits[0, :-1][targets].float(), ids[0, 1:][targets], reduction="sum")


def measured_deltas(attached: Any, ids: torch.Tensor, base: dict[int, torch.Tensor],
                    slots: list[tuple[int, int, int]], ref: float | None = None,
                    targets: torch.Tensor | None = None) -> list[float]:  # fmt: skip
    """Exact ΔNLL (summed over the window, or its ``targets`` [T-1] tokens) of moving each slot (group
    index, chunk, expert) alone from the allocation ``base``: one forward per slot."""
    with torch.no_grad():
        ref = window_nll(attached, ids, base, targets) if ref is None else ref
        out = []
        leaders = sorted(base)
        for g, c, e in slots:
            forced = {k: v.clone() for k, v in base.items()}
            forced[leaders[g]][0, c] = e
            out.append(window_nll(attached, ids, forced, targets) - ref)
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation of two equal-length lists (ties by order)."""

    def ranks(x: list[float]) -> torch.Tensor:
        r = torch.empty(len(x))
        r[torch.tensor(x).argsort()] = torch.arange(len(x), dtype=torch.float32)
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / math.sqrt(float((ra * ra).sum() * (rb * rb).sum()) or 1.0))
