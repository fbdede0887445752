"""MiKV's pieces for ``method_parts.py``: ``python tests/bench/method_parts.py mikv``.

The decode pieces run on a private copy of the layer store taken on first use, right after one
token is appended (before its attention is observed), and restored before every call, so each call
is one step's piece at the same state: the step's attention probabilities (H2O's signal, which sdpa
never materialises), ``observe_attention`` (column sums into the scores, then one demotion to keep
the high tier at its budget) and ``read`` (both tiers dequantized and put back into token order).
The prefill pieces time the H2O importance of a ``--context``-token prefill of one layer (its
[H, T, T] probabilities, from which the store tiers the prefill at append) against an sdpa prefill
of the same layer (what the dynamic cache's prefill attention costs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from method_parts import INFO, SCALING, append_token, random_kv

from baselines.mikv import MiKVStore, causal_probs, column_scores
from harness.integration import attention_probs

SPEC = "mikv"

_STATE: dict[int, dict[str, Any]] = {}  # id(store) -> the private copy, its snapshot and fixed inputs


def _state(store: MiKVStore) -> dict[str, Any]:
    """A copy of ``store`` with one more token appended, its snapshot, the step's keys and probabilities."""
    if id(store) not in _STATE:
        g = torch.Generator().manual_seed(1)
        s = type(store)(store.layer_idx, store.info, store.cfg, store.scaling)
        s.__dict__.update({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in store.__dict__.items()})
        for name in ("high", "low"):  # tiers: tensors are replaced, never written in place
            tier = getattr(store, name).__class__.__new__(getattr(store, name).__class__)
            tier.__dict__.update(getattr(store, name).__dict__)
            setattr(s, name, tier)
        q = append_token(s, g)
        keys, _ = s.read(torch.float32)  # [1, H_kv, T, D]
        snap = _snapshot(s)
        _STATE[id(store)] = {"store": s, "snap": snap, "q": q, "keys": keys,
                             "probs": attention_probs(q, keys, None, SCALING)}  # fmt: skip
    return _STATE[id(store)]


def _snapshot(s: MiKVStore) -> dict[str, Any]:
    return {"store": dict(s.__dict__), "high": dict(s.high.__dict__), "low": dict(s.low.__dict__)}


def _restore(s: MiKVStore, snap: dict[str, Any]) -> MiKVStore:
    """Put the store back (tensors the store writes in place, mask and scores, are cloned)."""
    s.__dict__.update({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in snap["store"].items()})
    s.high.__dict__.update(snap["high"])
    s.low.__dict__.update(snap["low"])
    return s


def step_probs(store: MiKVStore, query: torch.Tensor) -> torch.Tensor:
    st = _state(store)
    return attention_probs(st["q"], st["keys"], None, SCALING)  # [1, H, 1, T]


def observe(store: MiKVStore, query: torch.Tensor) -> None:
    st = _state(store)
    s = _restore(st["store"], st["snap"])
    s.observe_attention(st["q"], st["probs"])
    assert s.high.length == s.n_high(s.length)  # one token demoted


def read(store: MiKVStore, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    st = _state(store)
    return _restore(st["store"], st["snap"]).read(torch.float32)


_PREFILL: dict[str, torch.Tensor] = {}


def _prefill_inputs(store: MiKVStore) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not _PREFILL:
        k, v, q = random_kv(store.length, torch.Generator().manual_seed(2))
        _PREFILL.update(k=k, v=v, q=q)
    return _PREFILL["q"], _PREFILL["k"], _PREFILL["v"]


def prefill_importance(store: MiKVStore, query: torch.Tensor) -> torch.Tensor:
    q, k, _ = _prefill_inputs(store)
    return column_scores(causal_probs(q, k, SCALING), INFO.n_kv_heads)  # [1, H_kv, T], as the store's append


def prefill_sdpa(store: MiKVStore, query: torch.Tensor) -> torch.Tensor:
    q, k, v = _prefill_inputs(store)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALING, enable_gqa=True)


PARTS: dict[str, Callable[[MiKVStore, torch.Tensor], object]] = {
    "attention probabilities of the step (H2O's signal)": step_probs,
    "column sums + score update + budget (observe_attention)": observe,
    "read: both tiers dequantized and put back into token order": read,
    "prefill probabilities [H, T, T] + column sums (the H2O importance)": prefill_importance,
    "sdpa prefill of the same layer (the dynamic cache's prefill attention)": prefill_sdpa,
}
