"""transformers' own caches as comparison rows: ``DynamicCache`` and ``QuantizedCache`` untouched,
with the accounting the harness's records need (``memory``, ``layer_stats``).

A transformers user who wants a quantized KV cache writes ``generate(...,
cache_implementation="quantized", cache_config={"backend": "quanto", "nbits": 4})``; the peer methods
(``baselines.hf_caches``) run exactly those cache classes through the same tasks and profile. The
subclasses below add methods only: every update, quantization and read is transformers' own.

Memory comes from the tensors each layer really holds: every tensor reachable from a layer's K/V
attributes (``keys``/``values``, and a quantized layer's ``_quantized_keys``/``_quantized_values``,
whatever the backend keeps there: optimum-quanto's packed tensor subclasses are opened through
``__tensor_flatten__``, HQQ's ``(codes, meta)`` through its tuple and dict), each storage counted
once at its full size. Integer tensors of the quantized part are codes, its float tensors scales
and zero points, the float tensors of ``keys``/``values`` full-precision tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, QuantizedCache

from harness.interface import MemoryReport

#: (attribute of a transformers cache layer, whether it holds quantized states)
_HELD = (("keys", False), ("values", False), ("_quantized_keys", True), ("_quantized_values", True))


def tensor_leaves(x: Any) -> Iterator[torch.Tensor]:
    """The plain tensors inside ``x``: tensor subclasses opened through ``__tensor_flatten__``
    (optimum-quanto's ``QBitsTensor`` -> packed data, scale, shift), tuples, lists and dicts."""
    if isinstance(x, torch.Tensor):
        if type(x) is not torch.Tensor and hasattr(x, "__tensor_flatten__"):
            names, _ = x.__tensor_flatten__()
            for name in names:
                yield from tensor_leaves(getattr(x, name))
        else:
            yield x
    elif isinstance(x, tuple | list):
        for item in x:
            yield from tensor_leaves(item)
    elif isinstance(x, dict):
        for item in x.values():
            yield from tensor_leaves(item)


def layer_tokens(layer: Any) -> tuple[int, int, int]:
    """(tokens held, of which in full precision, elements per token for keys and values together)."""
    keys = getattr(layer, "keys", None)
    fp = keys.shape[-2] if isinstance(keys, torch.Tensor) and keys.dim() == 4 else 0
    total = getattr(layer, "cumulative_length", None) if hasattr(layer, "_quantized_keys") else fp
    per_token = 0
    for name in ("keys", "_quantized_keys"):  # [B, H, T, D] either way
        t = getattr(layer, name, None)
        shape = getattr(t, "shape", None) if not isinstance(t, tuple) else t[1].get("shape")
        if shape is not None and len(shape) == 4:
            per_token = 2 * shape[0] * shape[1] * shape[3]
            break
    return int(total or 0), fp, per_token


class AccountedCache:
    """What ``HarnessCache`` offers the tasks, for a transformers cache (mixed into its class)."""

    nbits: int | None = None  # the quantized part's bits (None: nothing is quantized)

    def memory(self) -> MemoryReport:
        """Bytes really held by every layer (each storage once), nominal bits from the token counts;
        ``nonfinite_kv``: NaN / inf among the float tensors held (the codes cannot hold any)."""
        r, seen = MemoryReport(), set()
        for layer in self.layers:
            for attr, quantized in _HELD:
                for t in tensor_leaves(getattr(layer, attr, None)):
                    storage = t.untyped_storage()
                    if storage.data_ptr() in seen or storage.nbytes() == 0:
                        continue
                    seen.add(storage.data_ptr())
                    floating = t.is_floating_point()
                    r.add("fp_tokens" if not quantized else "scales" if floating else "codes", storage.nbytes())
                    if floating:
                        r.nonfinite_kv += int((~torch.isfinite(t)).sum())
            total, fp, per_token = layer_tokens(layer)
            keys = getattr(layer, "keys", None)
            fp_bits = 8 * keys.element_size() if isinstance(keys, torch.Tensor) else 16
            r.elements += total * per_token
            r.payload_bits += float(fp * per_token * fp_bits + (total - fp) * per_token * (self.nbits or fp_bits))
        return r

    def layer_stats(self) -> list[dict[str, list[float]]]:
        return [{} for _ in self.layers]

    @property
    def nonfinite_kv(self) -> int:
        return self.memory().nonfinite_kv


class AccountedDynamicCache(AccountedCache, DynamicCache):
    """transformers' ``DynamicCache``, untouched: K/V in the model's dtype, grown by concatenation."""


class AccountedQuantizedCache(AccountedCache, QuantizedCache):
    """transformers' ``QuantizedCache`` (backends ``quanto``, ``hqq``), untouched."""

    def __init__(self, backend: str, config: Any, **options: Any):
        super().__init__(backend, config, **options)
        self.nbits = options.get("nbits")
