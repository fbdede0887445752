"""QJL's decode step and key quantization in pieces, for ``python tests/bench/method_parts.py qjl``.

The store is ``method_parts``' layer 0 of ``qjl`` (an initial layer: m = 4d = 256 sign bits per key
and m_o = d = 64 outlier bits, 8 outlier channels per group of 32 tokens; SmolLM2's head_dim d = 64).
Pieces of one decode step: unpacking the sign bits, the query sketches, the per-group sign products
(as ``key_scores`` orients them, and the other way round, which BLAS runs faster but sums in another
order), the scores from the sign bits (``QJLStore.key_scores``: all of these; also with the groups in
one chunk, to see what the chunking saves) and the values from their codes. The format's own
part is the ``format:`` row: the scores as one dense matmul of ±1 sketches unpacked beforehand,
[T, m + m_o] against the sketched query, i.e. the m + m_o sign coordinates per key that QJL must
touch at each step whatever the implementation, beside the same product over d channels (what a
key format with one number per channel, int4's, needs). Prefill rows time the key quantization of
``CONTEXT`` keys (JL projection, outlier top-k, packing) against int4's ``quantize`` of the same keys,
and the JL projection alone (the format's own part of it).
"""

from __future__ import annotations

import torch
from method_parts import SCALING, default_store

import baselines.qjl as qjl
from baselines.qjl import QJLStore, _scratch_signs
from harness.from_codes import mix_from_codes
from harness.interface import LayerStore, ModelInfo
from harness.quant import quantize

SPEC = "qjl"
CONTEXT = 4096
_READY: dict[int, dict[str, torch.Tensor]] = {}  # id(store) -> tensors prepared outside the timed pieces


def make_store(spec: str, info: ModelInfo, context: int, generator: torch.Generator) -> LayerStore:
    """``method_parts``' store, plus what the pieces take as given: the ±1 sketches unpacked once
    [B, H_kv, T, m + m_o], fp32 keys [B, H_kv, T, d] and ``CONTEXT`` fresh keys."""
    store = default_store(spec, info, context, generator)
    assert isinstance(store, QJLStore) and store.n_out, "the parts assume QJL with outlier channels"
    b, h, tq = store.sign_in.value.shape[:3]
    g, n = store.cfg.group, b * h * tq // store.cfg.group
    sg, so = _scratch_signs(store.sign_in.value).clone(), _scratch_signs(store.sign_out.value).clone()
    q = torch.randn(b, info.n_heads, 1, info.head_dim, generator=generator)
    q_s, q_out_s = query_sketches(store, q)  # [B, H, R, m], [B, H, N, R, m]
    _READY[id(store)] = {
        "sketches": torch.cat([sg, so], dim=-1),  # [B, H_kv, T, m + m_o]
        "sg": sg.view(n, g, store.m),
        "so": so.view(n, g, store.m_o),
        "q_in_s": (q_s.unsqueeze(2) - q_out_s).flatten(0, 2),  # [B·H·N, R, m]
        "q_out_s": q_out_s[..., : store.m_o].flatten(0, 2).contiguous(),  # [B·H·N, R, m_o]
        "keys": torch.randn(b, h, tq, info.head_dim, generator=generator),
        "new_keys": torch.randn(b, h, CONTEXT, info.head_dim, generator=generator),
    }
    return store


def _qg(store: QJLStore, query: torch.Tensor) -> torch.Tensor:
    b, h, _, d = query.shape
    h_kv = store.info.n_kv_heads
    return query.reshape(b, h_kv, h // h_kv, d).float() * SCALING  # [B, H_kv, R, D]


def unpack_signs(store: QJLStore, query: torch.Tensor) -> object:
    """The sign bytes of every quantized key to ±1 floats (``signs``, into the workspace), m then m_o."""
    _scratch_signs(store.sign_in.value)
    return _scratch_signs(store.sign_out.value)


def query_sketches(store: QJLStore, query: torch.Tensor) -> object:
    """S q and, per group, S (M_out⊙q) from the outlier channels' columns of S (as ``key_scores``)."""
    qg, S = _qg(store, query), store.S  # noqa: N806
    b, h, r, d = qg.shape
    idx = store.outlier_idx.value.long()  # [B, H, N, n_out]
    n = idx.shape[2]
    q_pick = qg.unsqueeze(2).expand(b, h, n, r, d).gather(-1, idx.unsqueeze(3).expand(b, h, n, r, store.n_out))
    s_pick = S.T.contiguous().index_select(0, idx.reshape(-1)).view(b, h, n, store.n_out, store.m)
    return qg @ S.T, q_pick @ s_pick


def sign_products(store: QJLStore, query: torch.Tensor) -> object:
    """The per-group products of ``key_scores`` alone, on sketches unpacked beforehand: [G, m] @ [m, R]
    per group (R = 3 columns), inliers then outliers, one batched matmul each."""
    r = _READY[id(store)]
    return r["sg"] @ r["q_in_s"].transpose(-1, -2), r["so"] @ r["q_out_s"].transpose(-1, -2)


def sign_products_transposed(store: QJLStore, query: torch.Tensor) -> object:
    """The same products the other way round, [R, m] @ [m, G] per group: the same sums in another
    order (other last digits, so not what ``key_scores`` may do), in the orientation BLAS runs fast."""
    r = _READY[id(store)]
    return r["q_in_s"] @ r["sg"].transpose(-1, -2), r["q_out_s"] @ r["so"].transpose(-1, -2)


def key_scores(store: QJLStore, query: torch.Tensor) -> object:
    return store.key_scores(_qg(store, query))


def key_scores_unchunked(store: QJLStore, query: torch.Tensor) -> object:
    """``key_scores`` with all groups in one chunk (the products before the chunking): what it saves."""
    chunk, qjl.CHUNK_BYTES = qjl.CHUNK_BYTES, 2**62
    try:
        return store.key_scores(_qg(store, query))
    finally:
        qjl.CHUNK_BYTES = chunk


def values(store: QJLStore, query: torch.Tensor) -> object:
    """Σ p·v̂ over the 2-bit value codes (``mix_from_codes``), uniform p (the codes grow by a token a step)."""
    b, h, t, _ = store.v_q.q.shape
    return mix_from_codes(torch.full((b, h, query.shape[1] // h, t), 1.0 / t), store.v_q.q)


def format_scores(store: QJLStore, query: torch.Tensor) -> object:
    """One dense matmul [B, H_kv, R, m + m_o] @ [B, H_kv, m + m_o, T]: every sign coordinate of every key
    once (the faster orientation of the product; the query sketch's outlier part taken as S q's)."""
    q_s = _qg(store, query) @ store.S.T  # [B, H, R, m]
    q_sketch = torch.cat([q_s, q_s[..., : store.m_o]], dim=-1)  # [B, H, R, m + m_o]
    return q_sketch @ _READY[id(store)]["sketches"].transpose(-1, -2)


def dense_keys_scores(store: QJLStore, query: torch.Tensor) -> object:
    """The same product over d channels of fp32 keys [B, H_kv, T, d] (one number per channel)."""
    return _qg(store, query) @ _READY[id(store)]["keys"].transpose(-1, -2)


def quantize_keys(store: QJLStore, query: torch.Tensor) -> object:
    return store.quantize_keys(_READY[id(store)]["new_keys"])


def projection_only(store: QJLStore, query: torch.Tensor) -> object:
    """The JL projection of the same keys, inlier and outlier sketches: [T, d] @ [d, m] and [d, m_o]."""
    k = _READY[id(store)]["new_keys"]
    return k @ store.S.T, k @ store.S[: store.m_o].T


def int4_quantize(store: QJLStore, query: torch.Tensor) -> object:
    return quantize(_READY[id(store)]["new_keys"], 4, store.info.head_dim, axis=-1)


PARTS = {
    "unpack the sign bits (m + m_o = 320 ±1 floats per key)": unpack_signs,
    "query sketches (S q; S(M_out⊙q) per group)": query_sketches,
    "sign products as key_scores runs them ([32 × m] @ [m × 3] per group)": sign_products,
    "the same products the other way round ([3 × m] @ [m × 32]; other last digits)": sign_products_transposed,
    "scores from the sign bits (key_scores: unpack, sketches, products)": key_scores,
    "the same, all groups in one chunk (CHUNK_BYTES unbounded)": key_scores_unchunked,
    "values from their 2-bit codes (mix_from_codes)": values,
    "format: scores as ONE dense matmul of unpacked ±1 sketches [T, 320]": format_scores,
    "reference: the same matmul over d = 64 fp32 channels [T, 64]": dense_keys_scores,
    f"prefill: quantize_keys of {CONTEXT} keys": quantize_keys,
    f"prefill: the JL projection alone of {CONTEXT} keys (format)": projection_only,
    f"prefill: int4's quantize of the same {CONTEXT} keys": int4_quantize,
}
