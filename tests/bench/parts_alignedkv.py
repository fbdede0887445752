"""AlignedKV's decode-step pieces for ``method_parts.py``: ``python tests/bench/method_parts.py alignedkv``.

The pieces run on a private copy of the layer store taken on first use, with one decode token
appended (its query the step's, as the "queries" signal delivers it); each call times one piece of
that step's ``read`` alone, on inputs computed once from the same state:

* precision selection, the method's own per-step work (``key_widths``: 8 / 12 / 16 bits per key
  channel from the query's exponents and the channel maxima; ``alignment_score`` + ``value_widths``:
  the output estimate from 32 sampled tokens, the alignment exponent, the bits per value token);
* the step's probabilities from the keys as read (q·K̂ᵀ, softmax, to fp16), which the value rule
  needs before the values are read; the model's sdpa computes them a second time;
* the reconstruction at the selected widths (keys and values from the byte planes, missing bits
  filled, with the fp16 tail, as the model's dtype);
* for comparison, a plain read of as many fp16 tokens (cast to the model's dtype) and the step's
  attention (sdpa on K̂, V̂), and ``read`` as a whole.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from method_parts import SCALING, append_token

from baselines.alignedkv import VALUE_STEPS, AlignedKVStore, alignment_score, exponent_field, key_widths, value_widths

SPEC = "alignedkv"
DTYPE = torch.float32

_STATE: dict[int, dict[str, Any]] = {}  # id(store) -> the private copy and the step's inputs


def _state(store: AlignedKVStore) -> dict[str, Any]:
    """A copy of ``store`` with one decode token appended, and what each piece takes as input."""
    if id(store) not in _STATE:
        g = torch.Generator().manual_seed(1)
        s = copy.deepcopy(store)
        q = append_token(s, g)
        keys, values = s.read(DTYPE)
        k_width, v_width = s.last_widths
        b, h, _, d = q.shape
        h_kv = s.info.n_kv_heads
        scores = torch.matmul(q.float().reshape(b, h_kv, h // h_kv, d), keys.float().transpose(-1, -2)) * s.scaling
        probs = torch.softmax(scores, dim=-1).to(torch.float16)[..., : s.k_split.length]  # [B, H_kv, G, P]
        plain = (keys.half(), values.half())  # fp16 K / V of as many tokens
        _STATE[id(store)] = {"store": s, "q": q, "keys": keys, "values": values, "k_width": k_width,
                             "v_width": v_width, "probs": probs, "plain": plain}  # fmt: skip
    return _STATE[id(store)]


def key_selection(store: AlignedKVStore, query: torch.Tensor) -> torch.Tensor:
    st = _state(store)
    s = st["store"]
    return key_widths(exponent_field(st["q"][:, :, 0, :]), s.k_emax.to(torch.int32))  # [B, H_kv, D]


def value_selection(store: AlignedKVStore, query: torch.Tensor) -> torch.Tensor:
    st = _state(store)
    s, probs = st["store"], st["probs"]
    align = alignment_score(probs, s.v_split.high_bytes, s.v_emax.to(torch.int32), s.cfg.lanes, s.cfg.o_exp)
    return value_widths(probs, align, VALUE_STEPS[s.cfg.v_steps])  # [B, H_kv, P]


def selection(store: AlignedKVStore, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return key_selection(store, query), value_selection(store, query)


def probabilities(store: AlignedKVStore, query: torch.Tensor) -> torch.Tensor:
    st = _state(store)
    q, keys = st["q"], st["keys"]
    b, h, _, d = q.shape
    h_kv = keys.shape[1]
    scores = torch.matmul(q.float().reshape(b, h_kv, h // h_kv, d), keys.float().transpose(-1, -2)) * SCALING
    return torch.softmax(scores, dim=-1).to(torch.float16)


def reconstruction(store: AlignedKVStore, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    st = _state(store)
    s = st["store"]
    return s._join(s.k_split, st["k_width"], s.k_tail, DTYPE), s._join(s.v_split, st["v_width"], s.v_tail, DTYPE)


def plain_read(store: AlignedKVStore, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k16, v16 = _state(store)["plain"]
    return k16.to(DTYPE), v16.to(DTYPE)


def attention(store: AlignedKVStore, query: torch.Tensor) -> torch.Tensor:
    st = _state(store)
    return torch.nn.functional.scaled_dot_product_attention(
        st["q"], st["keys"], st["values"], scale=SCALING, enable_gqa=True
    )


def whole_read(store: AlignedKVStore, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _state(store)["store"].read(DTYPE)


PARTS = {
    "precision selection (which bits each element needs, from the query): keys and values": selection,
    "  of which keys (bits per channel from the query's exponents)": key_selection,
    "  of which values (estimate from 32 tokens, alignment, bits per token; from the probabilities)": value_selection,
    "the step's probabilities from the keys as read (q·K̂ᵀ, softmax; sdpa computes them again)": probabilities,
    "reconstruction of the selected precision (K̂, V̂ from the byte planes + fp16 tail)": reconstruction,
    "plain fp16 read of the same tokens (K, V cast to fp32)": plain_read,
    "the step's attention (sdpa on K̂, V̂)": attention,
    "read() as a whole (selection + probabilities + reconstruction + bytes counted)": whole_read,
}
