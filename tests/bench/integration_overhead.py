"""What a decode step spends in the integration's own code around the stores, against the stores' work.

Run: ``python tests/bench/integration_overhead.py [--method int4] [--context 1024] [--steps 32]
[--no-nonfinite-check]`` (SmolLM2-135M, 1 thread). Each ``HarnessLayer.update`` and each store's
``append`` / ``attend`` is timed (wall clock); ``update`` minus ``append`` is the integration's own part
per layer: the signal board's pick-up, the ``Observation``, the non-finite check (``_NonFinite``; off
with ``--no-nonfinite-check`` to split it out) and the deferred-attention bookkeeping.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from harness.integration import AttachedMethod, forward
from harness.integration import cache as integration_cache
from harness.interface import build_method
from harness.models import load_model


def _timed(owner: type, name: str, key: str, spent: dict[str, float]) -> None:
    real = getattr(owner, name)

    def call(*args, **kwargs):
        t = time.perf_counter()
        out = real(*args, **kwargs)
        spent[key] += time.perf_counter() - t
        return out

    setattr(owner, name, call)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="int4")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--no-nonfinite-check", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.no_nonfinite_check:
        integration_cache._NonFinite.check = lambda self, layer_idx, keys, values: None
    model, _ = load_model(args.model)
    spent: dict[str, float] = defaultdict(float)
    with AttachedMethod(model, build_method(args.method)) as attached, torch.no_grad():
        cache = attached.new_cache()
        store_cls = type(cache.layers[0].store)
        _timed(integration_cache.HarnessLayer, "update", "update", spent)
        _timed(store_cls, "append", "append", spent)
        _timed(store_cls, "attend", "attend", spent)
        tok = forward(model, torch.randint(0, 1000, (1, args.context)), cache).logits[:, -1:].argmax(-1)
        spent.clear()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            tok = forward(model, tok, cache).logits[:, -1:].argmax(-1)
        step = (time.perf_counter() - t0) / args.steps
    n_layers = len(cache.layers)
    ms = {k: 1e3 * v / args.steps for k, v in spent.items()}
    own = ms["update"] - ms["append"]
    print(
        f"{args.method}, {args.context} tokens: decode step {1e3 * step:.2f} ms; store.append {ms['append']:.3f} ms, "
        f"store.attend {ms['attend']:.3f} ms, the integration's own part of update() {own:.3f} ms "
        f"({1e3 * own / n_layers:.1f} us per layer, {100 * own / (1e3 * step):.1f} % of the step)"
    )


if __name__ == "__main__":
    main()
