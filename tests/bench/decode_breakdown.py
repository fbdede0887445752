"""Where a decode step's time goes: ``python tests/bench/decode_breakdown.py fp16 dynamic int4 kivi-2``.

For each method spec: prefill a 4096-token context of SmolLM2-135M (random tokens, 2 torch threads),
one untimed decode step, then 8 decode steps under ``torch.profiler``; ops' own CPU time per step
grouped into weights (linear layers), attention, unpacking (table lookups, bit ops), history copies
and casts (cat, to, copy_), other ops, and the time outside any op (Python and dispatch: the wall
time per step minus the ops' own time). Absolute times under the profiler run higher than
``python -m harness profile``'s (its timing is the reference); the split is what this shows.
Options: ``--context N``, ``--steps N``, ``--threads N``, ``--model M``.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from harness.integration import AttachedMethod, forward
from harness.interface import build_method
from harness.models import load_model

#: (group, substrings of the aten op names it takes), first match wins
GROUPS = (
    ("attention", ("scaled_dot_product", "_flash", "bmm", "baddbmm", "softmax")),
    ("weights (linear layers)", ("aten::linear", "aten::addmm", "aten::mm", "aten::matmul")),
    ("unpack (table lookups, bit ops)", ("aten::index_select", "bitwise", "rshift", "aten::gather", "aten::take")),
    ("history copies and casts", ("aten::cat", "aten::to", "aten::_to_copy", "aten::copy_", "aten::index_copy_",
                                  "aten::clone", "aten::contiguous")),
)  # fmt: skip


def breakdown(lm: torch.nn.Module, spec: str, context: int, steps: int) -> str:
    ids = torch.randint(0, lm.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    with AttachedMethod(lm, build_method(spec)) as am, torch.no_grad():
        for warm in (True, False):  # the first round warms up
            cache = am.new_cache()
            token = forward(lm, ids, cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
            token = forward(lm, token, cache).logits[:, -1:].argmax(-1)  # one untimed step
            if warm:
                continue
            t0 = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    token = forward(lm, token, cache).logits[:, -1:].argmax(-1)
            wall = 1e3 * (time.perf_counter() - t0) / steps
    events = list(prof.key_averages())
    own = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    calls = sum(e.count for e in events) // steps
    ms: dict[str, float] = defaultdict(float)
    for e in events:
        group = next((g for g, keys in GROUPS if any(k in e.key for k in keys)), "other ops")
        ms[group] += e.self_cpu_time_total / steps / 1e3
    parts = ", ".join(f"{g} {v:.1f}" for g, v in sorted(ms.items(), key=lambda x: -x[1]))
    return (f"| {spec} | {wall:.1f} | {wall - own:.1f} | {parts} | {calls:,} |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("methods", nargs="+")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lm, _ = load_model(args.model)
    print(f"{args.model}, context {args.context}, {args.steps} decode steps, {args.threads} threads (ms per step)\n")
    print("| method | wall under the profiler | outside ops (Python, dispatch) | ops' own time by group | op calls |")
    print("|---|---:|---:|---|---:|")
    for spec in args.methods:
        print(breakdown(lm, spec, args.context, args.steps), flush=True)


if __name__ == "__main__":
    main()
