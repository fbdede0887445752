"""PolarQuant's pieces for ``method_parts.py``: ``python tests/bench/method_parts.py polarquant``.

The pieces run on a private copy of the layer store taken on first use with one token appended
(``context`` quantized keys, one fp16 window key, ``context`` + 1 fp16 values: what a decode step
attends to), so every call times the same state. ``PolarQuantStore.attend`` splits into:

* ours: ``PolarSeq.indices``, the codes unpacked (int16), offset and widened to flat int64 table indices
  i·2^b + c (``torch.gather`` takes int64 only; the official Triton kernel, ``models/kernel4group.py``
  ``_kernel`` in ``ericshwu/PolarQuant``, gathers with the uint8 codes it loads, ``& (2^tbits − 1)`` and
  ``>> tbits``, so this pass has no counterpart there);
* the format's own, which any implementation of the format does per step: the lookup tables from the
  query (``PolarSeq.tables``: per query head, group and pair q_x·cos φ_t + q_y·sin φ_t for the 2^tbits
  angle levels, and the 2^rbits radii), then per token, query head and pair an angle-table gather, a
  radius gather, a product, and the sum over pairs (the kernel's ``tl.gather`` / ``*=`` / ``tl.sum``,
  the table-lookup formulation the paper names, arXiv 2502.00527: "turning the query-key inner
  product into a table lookup"; ``attend`` already computes the scores this way), the softmax and the
  fp16 values' mix. "lower bound" times ``attend``'s steps with the indices given.

Also timed, for comparison only (not bit-identical to ``attend``, so not used there): the keys
reconstructed by table lookups (r̂ = R[c_r], cos φ̂ and sin φ̂ from 2^tbits-entry tables: per token and
pair, independent of the number of query heads) followed by a q·k̂ matmul.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from method_parts import SCALING, append_token

from baselines.polarquant import PolarQuantStore

SPEC = "polarquant"

_STATE: dict[int, dict[str, Any]] = {}  # id(store) -> the private copy and its fixed inputs


def _state(store: PolarQuantStore) -> dict[str, Any]:
    """A copy of ``store`` with one token appended, the step's scaled query, indices and probabilities."""
    if id(store) not in _STATE:
        g = torch.Generator().manual_seed(1)
        s = copy.deepcopy(store)
        q = append_token(s, g)
        hk, d = s.info.n_kv_heads, s.info.head_dim
        qg = q.reshape(1, hk, q.shape[1] // hk, d) * SCALING  # [1, H_kv, R, D]
        scores = torch.cat([s.k_q.scores(qg), qg @ s.k_fp.data.float().transpose(-1, -2)], dim=-1)
        _STATE[id(store)] = {"store": s, "q": q, "qg": qg, "indices": s.k_q.indices(),
                             "probs": torch.softmax(scores, dim=-1)}  # fmt: skip
    return _STATE[id(store)]


def attend(store: PolarQuantStore, query: torch.Tensor) -> torch.Tensor:
    st = _state(store)
    return st["store"].attend(st["q"], SCALING, None)  # [1, H, 1, D]


def indices(store: PolarQuantStore, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _state(store)["store"].k_q.indices()  # 2 × [1, H_kv, T, P] int64


def tables(store: PolarQuantStore, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    st = _state(store)
    return st["store"].k_q.tables(st["qg"])


def scores_given_indices(store: PolarQuantStore, query: torch.Tensor) -> torch.Tensor:
    st = _state(store)
    return st["store"].k_q.scores(st["qg"], st["indices"])  # [1, H_kv, R, T]


def scores(store: PolarQuantStore, query: torch.Tensor) -> torch.Tensor:
    st = _state(store)
    return st["store"].k_q.scores(st["qg"])


def values_mix(store: PolarQuantStore, query: torch.Tensor) -> torch.Tensor:
    st = _state(store)
    return torch.matmul(st["probs"], st["store"].v_fp.data.float())  # [1, H_kv, R, D]


def lower_bound(store: PolarQuantStore, query: torch.Tensor) -> torch.Tensor:
    """``attend``'s arithmetic with the int64 indices given: tables, lookups, window keys, softmax, values."""
    st = _state(store)
    s, qg = st["store"], st["qg"]
    parts = [s.k_q.scores(qg, st["indices"]), torch.matmul(qg, s.k_fp.data.float().transpose(-1, -2))]
    p = torch.softmax(torch.cat(parts, dim=-1), dim=-1)  # [1, H_kv, R, T]
    return torch.matmul(p, s.v_fp.data.float())


def keys_by_lookup(store: PolarQuantStore, query: torch.Tensor) -> torch.Tensor:
    """k̂ [1, H_kv, T, D] from the codes by table lookups (indices given): r̂·cos φ̂ | r̂·sin φ̂."""
    st = _state(store)
    seq = st["store"].k_q
    ir, it = st["indices"]  # [1, H_kv, T, P]
    b, h, t, p = ir.shape
    ng, g = t // seq.group, seq.group
    m = seq.meta.value.unflatten(-1, (4, p)).float()  # [1, H_kv, NG, 4, P]
    mid_t = torch.arange(2**seq.tbits, dtype=torch.float32) + 0.5
    mid_r = torch.arange(2**seq.rbits, dtype=torch.float32) + 0.5
    phi = (m[:, :, :, 2, :, None] + mid_t * m[:, :, :, 3, :, None]).reshape(b, h, ng, -1)  # [1, H_kv, NG, P·Lt]
    rad = (m[:, :, :, 0, :, None] + mid_r * m[:, :, :, 1, :, None]).reshape(b, h, ng, -1)  # [1, H_kv, NG, P·Lr]
    it, ir = it.view(b, h, ng, g * p), ir.view(b, h, ng, g * p)
    r = torch.gather(rad, -1, ir)
    x, y = torch.gather(phi.cos(), -1, it).mul_(r), torch.gather(phi.sin(), -1, it).mul_(r)
    return torch.cat([x.view(b, h, t, p), y.view(b, h, t, p)], dim=-1)


def scores_by_keys(store: PolarQuantStore, query: torch.Tensor) -> torch.Tensor:
    st = _state(store)
    return st["qg"] @ keys_by_lookup(store, query).transpose(-1, -2)  # [1, H_kv, R, T]


PARTS = {
    "attend (the step's attention, no append)": attend,
    "ours: codes -> int64 table indices (unpack, offsets)": indices,
    "format: lookup tables from the query (angle LUT, radii)": tables,
    "format: key scores via the tables, indices given": scores_given_indices,
    "key scores from the codes (PolarSeq.scores)": scores,
    "format: values (fp16) mix, probabilities @ V": values_mix,
    "format lower bound: attend with the indices given": lower_bound,
    "alt.: k̂ by table lookups, indices given": keys_by_lookup,
    "alt.: k̂ by lookups + q·k̂ matmul (not bit-identical)": scores_by_keys,
}
