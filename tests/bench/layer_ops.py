"""One layer's decode attention under ``torch.profiler``, op by op with shapes:
``python tests/bench/layer_ops.py kivi-2 [--context 4096] [--steps 20]``.

A SmolLM2-135M-shaped layer store (3 KV heads, 9 query heads, head_dim 64) of the method holds
``context`` random tokens; ``steps`` calls of ``LayerStore.attend`` (the from-codes decode path,
``harness.from_codes``) are profiled at 2 torch threads, and the ops taking the most own CPU time
are printed with their input shapes (per call: own time / calls).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from harness.interface import ModelInfo, Observation, build_method


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("method")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(2)
    info = ModelInfo(family="llama", n_layers=1, n_heads=9, n_kv_heads=3, head_dim=64, hidden_size=576,
                     dtype=torch.float32, device=torch.device("cpu"))  # fmt: skip
    method = build_method(args.method)
    method.info = info
    store = method.new_layer_store(0, info)
    store.cache_state = method.new_cache_state()
    g = torch.Generator().manual_seed(0)
    t = args.context
    kv = [torch.randn(1, 3, t, 64, generator=g) for _ in range(2)]
    store.append(*kv, Observation(positions=torch.arange(t), pre_rope_keys=None, block_input=None, queries=None,
                                  rope=None, is_prefill=True))  # fmt: skip
    store.seq_len = t
    q = torch.randn(1, 9, 1, 64, generator=g)
    for _ in range(3):
        store.attend(q, 0.125, None)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.steps):
            store.attend(q, 0.125, None)
    print(f"{args.method}, {t} tokens, {args.steps} calls of attend")
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=24, max_shapes_column_width=70
    )
    print(table)


if __name__ == "__main__":
    main()
