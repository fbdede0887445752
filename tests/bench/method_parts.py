"""Which part of a method's decode step is the method's own: ``python tests/bench/method_parts.py qjl``.

One SmolLM2-135M-shaped layer (3 KV heads, 9 query heads, head_dim 64) of the method and one of
``int4`` (the reference) hold ``--context`` random post-RoPE tokens. Each round times, at every thread
count of ``--threads``, one decode step of each layer store (append one token, then the step's
attention: ``attend`` from the codes where the method decodes that way, else ``read`` + sdpa, the
path the profile takes) and each piece that ``tests/bench/parts_<method>.py`` names in ``PARTS``
(name -> function(store, query), one call of that piece alone). Rounds are taken in turn, pieces
inside a round too; the table gives medians in ms per call and the ratio to int4's step. A model's
decode step runs 30 such layers (SmolLM2-135M), so 30 × (step − int4's step) is what the store adds
to a decode step over int4.

A parts module may also define ``make_store(spec, info, context, generator) -> LayerStore`` (a
calibrated method's store) and ``SPEC`` (the spec to time when none is given after the name).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from collections.abc import Callable
from types import ModuleType

import torch

from harness.integration import attention_probs
from harness.interface import LayerStore, ModelInfo, Observation, build_method

INFO = ModelInfo(family="llama", n_layers=1, n_heads=9, n_kv_heads=3, head_dim=64, hidden_size=576,
                 dtype=torch.float32, device=torch.device("cpu"))  # fmt: skip
SCALING = 64**-0.5


def random_kv(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys, values [1, H_kv, n, D] and queries [1, H, n, D] of n random tokens."""
    k, v = (torch.randn(1, INFO.n_kv_heads, n, INFO.head_dim, generator=generator) for _ in range(2))
    return k, v, torch.randn(1, INFO.n_heads, n, INFO.head_dim, generator=generator)


def observation(n: int, start: int, queries: torch.Tensor, keys: torch.Tensor) -> Observation:
    """What an append of n tokens at ``start`` observes (pre-RoPE keys stand in as the keys themselves)."""
    return Observation(positions=torch.arange(start, start + n), pre_rope_keys=keys, queries=queries,
                       is_prefill=start == 0)  # fmt: skip


def append_token(store: LayerStore, generator: torch.Generator) -> torch.Tensor:
    """Append one random decode token to ``store`` (as a decode step does); returns its query [1, H, 1, D]."""
    k, v, q = random_kv(1, generator)
    store.append(k, v, observation(1, store.seq_len, q, k))
    store.seq_len += 1
    return q


def default_store(spec: str, info: ModelInfo, context: int, generator: torch.Generator) -> LayerStore:
    """The method's store for layer 0 with ``context`` random tokens appended in one prefill."""
    method = build_method(spec)
    method.info = info
    store = method.new_layer_store(0, info)
    store.cache_state = method.new_cache_state()
    k, v, q = random_kv(context, generator)
    store.append(k, v, observation(context, 0, q, k))
    store.seq_len = context
    if "attention" in method.signals:
        store.observe_attention(q, None)
    return store


def decode_step(store: LayerStore, spec: str, generator: torch.Generator) -> Callable[[], object]:
    """One decode step of the layer as the model takes it: append a token, then attention over
    everything held (and, for a method that observes attention, its probabilities delivered)."""
    method = build_method(spec)
    from_codes = method.decode_from_codes and "attention" not in method.signals
    observes = "attention" in method.signals
    k, v, q = random_kv(1, generator)

    def step() -> object:
        store.append(k, v, observation(1, store.seq_len, q, k))
        store.seq_len += 1
        if from_codes:
            return store.attend(q, SCALING, None)
        keys, values = store.read(torch.float32)
        out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, scale=SCALING, enable_gqa=True)
        if observes:  # harness.integration's attention hook: probabilities of the step, then observe
            store.observe_attention(q, attention_probs(q, keys, None, SCALING))
        return out

    return step


def parts_module(spec: str) -> ModuleType | None:
    """``parts_<registered name>`` (``kvquant-4b-1%`` -> ``parts_kvquant``), or None where there is none."""
    try:
        return importlib.import_module(f"parts_{build_method(spec).name.replace('-', '_')}")
    except ModuleNotFoundError:
        return None


def measure(spec: str, context: int, rounds: int, calls: int, threads: list[int]) -> str:
    g = torch.Generator().manual_seed(0)
    mod = parts_module(spec)
    make = getattr(mod, "make_store", default_store)
    store = make(spec, INFO, context, g)
    ref = default_store("int4", INFO, context, g)
    q = random_kv(1, g)[2]
    jobs: dict[str, Callable[[], object]] = {
        "int4: decode step of one layer": decode_step(ref, "int4", g),
        f"{spec}: decode step of one layer": decode_step(store, spec, g),
    }
    for name, fn in (getattr(mod, "PARTS", {}) if mod else {}).items():
        jobs[f"{spec}: {name}"] = lambda fn=fn: fn(store, q)
    times: dict[tuple[str, int], list[float]] = {(j, n): [] for j in jobs for n in threads}
    for r in range(rounds + 1):  # the first round warms up
        for n in threads:
            torch.set_num_threads(n)
            for name, fn in jobs.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                if r:
                    times[name, n].append(1e3 * (time.perf_counter() - t0) / calls)
    cols = " | ".join(f"ms, {n} thread{'s' * (n > 1)} | × int4 step, {n}" for n in threads)
    lines = [f"{spec}, {context} tokens, median of {rounds} rounds × {calls} calls", "",
             f"| piece | {cols} |", "|---|" + "---:|" * (2 * len(threads))]  # fmt: skip
    for name in jobs:
        cells = []
        for n in threads:
            ms = statistics.median(times[name, n])
            ref_ms = statistics.median(times["int4: decode step of one layer", n])
            cells += [f"{ms:.2f}", f"{ms / ref_ms:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("method", help="method spec; its parts come from tests/bench/parts_<name>.py")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    args = p.parse_args()
    mod = parts_module(args.method)
    spec = getattr(mod, "SPEC", args.method) if args.method == getattr(mod, "__name__", "")[6:] else args.method
    print(measure(spec, args.context, args.rounds, args.calls, [int(x) for x in args.threads.split(",")]))


if __name__ == "__main__":
    main()
