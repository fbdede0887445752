"""Decode attention from the codes: the CPU path the layer stores take (``LayerStore.attend``).

One decode step of attention over a history held as sequences in token order, quantized
(``harness.quant.QuantizedTensor``) or fp16, without a dequantized copy of the history: the codes
are unpacked by plane (``harness.quant.unpack_planes``: [.., P, T, D/P], channel P·j + i at [i, j])
into a reused CPU workspace, and each product is one matmul batched over the planes, with the
scales applied on the small side (the query, or the probabilities) and the zero-points as a bias.
The math of each layout is in ``scores_from_codes`` / ``mix_from_codes``;
``harness.kernels.decode_attention_from_codes`` is the same computation behind the Triton kernel's
signature, and ``decode_attention_reference`` the dequantize-then-attend reference. Shapes: B batch,
H query heads, H_kv KV heads, R = H / H_kv, D head dim, G group, P = 8 / bits codes per byte (1 for
3-bit codes, unpacked in channel order).
"""

from __future__ import annotations

import math
import threading

import torch

from harness.quant import QuantizedTensor, unpack_3bit, unpack_planes

_WORKSPACE = threading.local()
WORKSPACE_MAX_BYTES = 64 * 2**20


def workspace(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A CPU scratch tensor of ``shape``, reused from call to call (one per thread and dtype, grown to
    the largest request up to ``WORKSPACE_MAX_BYTES``): a fresh multi-MiB allocation per unpack can
    cost as much as the unpack itself on CPU (freed pages go back to the OS and fault in again). It
    holds the unpacked codes of one product at a time. CUDA's caching allocator already reuses
    memory, so on other devices (and above the cap) this is a plain ``torch.empty``."""
    numel = math.prod(shape)
    if device.type != "cpu" or numel * dtype.itemsize > WORKSPACE_MAX_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    pool = getattr(_WORKSPACE, "pool", None)
    if pool is None:
        pool = _WORKSPACE.pool = {}
    buf = pool.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = pool[dtype] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def planes_of(bits: int) -> int:
    """P, the planes the codes of ``bits`` unpack into: codes per byte (8 / bits), or one plane in
    channel order for 3-bit codes (8 codes in 3 bytes, ``harness.quant.pack_3bit``)."""
    return 1 if bits == 3 else 8 // bits


def _planes(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """Unpacked codes as floats minus the symmetric offset, by plane (``unpack_planes``), in the
    workspace: [B, H_kv, P, T, D/P], element [.., i, t, j] the code of channel P·j + i. Valid until
    this thread's next ``_planes`` call. 3-bit codes: one plane, [B, H_kv, 1, T, D]."""
    *lead, t, m = qt.codes.shape
    if qt.bits == 3:
        c = unpack_3bit(qt.codes)  # [B, H_kv, T, D] uint8
        out = workspace((*lead, 1, t, c.shape[-1]), dtype, qt.codes.device)
        c = out.copy_(c.unsqueeze(-3))
    else:
        out = workspace((*lead, 8 // qt.bits, t, m), dtype, qt.codes.device)
        c = unpack_planes(qt.codes, qt.bits, dtype, out=out)
    return c.sub_(2 ** (qt.bits - 1)) if qt.zero is None else c


def _by_plane(x: torch.Tensor, per: int) -> torch.Tensor:
    """x [B, H, *mid, D] -> [B, H, P, *mid, D/P]: channel P·j + i at [.., i, .., j] (a view)."""
    *lead, d = x.shape
    return x.view(*lead, d // per, per).movedim(-1, 2)


def _by_channel(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_by_plane`` for x [B, H, P, R, D/P] -> [B, H, R, D]."""
    b, h, per, r, w = x.shape
    return x.permute(0, 1, 3, 4, 2).reshape(b, h, r, w * per)


_GROUP_MASKS: dict[tuple[int, int, int, torch.dtype, torch.device], torch.Tensor] = {}


def _group_mask(per: int, d: int, group: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[P, D/G, D/P] one-hot: [i, g, j] = 1 where channel P·j + i is in channel group g (of G)."""
    key = (per, d, group, dtype, device)
    if key not in _GROUP_MASKS:
        channel = torch.arange(d, device=device).view(d // per, per).T  # [P, D/P]
        groups = torch.arange(d // group, device=device).view(1, -1, 1)
        _GROUP_MASKS[key] = (channel.unsqueeze(1) // group == groups).to(dtype)
    return _GROUP_MASKS[key]


def scores_from_codes(qg: torch.Tensor, k: QuantizedTensor) -> torch.Tensor:
    """q·k̂ for quantized keys without dequantizing them: qg [B, H_kv, R, D] (queries of the R = n_rep
    heads that share a KV head, already scaled) -> [B, H_kv, R, T].

    Per channel (``axis=-2``, groups of G tokens): Σ_d (q_d·s_{k,d})·c_{t,d} + Σ_d q_d·z_{k,d},
    k = t // G. Per token (``axis=-1``, groups of G channels): Σ_g s_{t,g}·(Σ_{j∈g} q_j·c_{t,j})
    + Σ_g z_{t,g}·Σ_{j∈g} q_j; with several groups per head, the inner sums of all groups come
    from one matmul of the codes with a block-diagonal query (rows (r, g): group g of q, zeros
    elsewhere; D/G times the useful flops, the codes read once). Scales/zeros are applied to the
    small side of the product. The codes come by plane (``unpack_planes``), so each product is a
    matmul batched over the P planes, summed over them (Σ_d = Σ_i Σ_j over d = P·j + i).
    """
    dtype, per = qg.dtype, planes_of(k.bits)
    b, h, t, d = k.shape
    r, g = qg.shape[2], k.group
    c = _planes(k, dtype)  # [B, H_kv, P, T, D/P]
    z = None if k.zero is None else k.zero.to(dtype)
    if k.axis % 4 == 2:  # per channel: s, z [B, H_kv, T/G, D]
        qs = qg.unsqueeze(2) * k.scale.to(dtype).unsqueeze(3)  # [B, H_kv, T/G, R, D]
        qs = _by_plane(qs, per).transpose(-1, -2)  # [B, H_kv, P, T/G, D/P, R]
        out = torch.matmul(c.view(b, h, per, t // g, g, d // per), qs).sum(2)  # [B, H_kv, T/G, G, R]
        if z is not None:
            out += torch.matmul(z, qg.transpose(-1, -2)).unsqueeze(3)  # [B, H_kv, T/G, 1, R]
        return out.view(b, h, t, r).transpose(-1, -2)
    s, ng = k.scale.to(dtype), d // g  # per token: s, z [B, H_kv, T, D/G]
    qp = _by_plane(qg, per)  # [B, H_kv, P, R, D/P]
    if ng == 1:
        out = torch.matmul(qp, c.transpose(-1, -2)).sum(2) * s.transpose(-1, -2)  # [B, H_kv, R, T]
        if z is not None:
            out += qg.sum(-1, keepdim=True) * z.transpose(-1, -2)
        return out
    mask = _group_mask(per, d, g, dtype, qg.device)  # [P, D/G, D/P]
    qb = (qp.unsqueeze(4) * mask.unsqueeze(1)).reshape(b, h, per, r * ng, d // per)  # row (r, g)
    part = torch.matmul(qb, c.transpose(-1, -2)).sum(2).view(b, h, r, ng, t)  # Σ_{j∈g} q_j·c_{t,j}
    out = (part * s.transpose(-1, -2).unsqueeze(2)).sum(3)
    if z is not None:
        out += torch.matmul(qg.view(b, h, r, ng, g).sum(-1), z.transpose(-1, -2))  # [B, H_kv, R, T]
    return out


def mix_from_codes(p: torch.Tensor, v: QuantizedTensor) -> torch.Tensor:
    """Σ_t p_t·v̂_t for quantized values without dequantizing them: p [B, H_kv, R, T] -> [B, H_kv, R, D].

    Per token (``axis=-1``): Σ_t (p_t·s_{t,g})·c_{t,j} + Σ_t p_t·z_{t,g} for channel j in group g;
    with several groups per head, all in one matmul (p ⊙ s)ᵀ [.., R·D/G, T] @ c [.., T, D], keeping
    for each channel its own group's row (D/G times the useful flops; the codes read once).
    Per channel (``axis=-2``, groups of G tokens): Σ_k s_{k,d}·(Σ_{t∈k} p_t·c_{t,d}) + Σ_k z_{k,d}·Σ_{t∈k} p_t.
    The codes come by plane (``unpack_planes``): one matmul batched over the planes, whose result
    [.., P, R, D/P] is put back in channel order.
    """
    dtype, per = p.dtype, planes_of(v.bits)
    b, h, t, d = v.shape
    r, g = p.shape[2], v.group
    c = _planes(v, dtype)  # [B, H_kv, P, T, D/P]
    z = None if v.zero is None else v.zero.to(dtype)
    if v.axis % 4 == 2:  # per channel: s, z [B, H_kv, T/G, D]
        pk = p.reshape(b, h, r, t // g, g).transpose(2, 3)  # [B, H_kv, T/G, R, G]
        part = torch.matmul(pk.unsqueeze(2), c.view(b, h, per, t // g, g, d // per))  # [B, H_kv, P, T/G, R, D/P]
        sv = _by_plane(v.scale.to(dtype), per).unsqueeze(4)  # [B, H_kv, P, T/G, 1, D/P]
        out = _by_channel((part * sv).sum(3))
        if z is not None:
            out += torch.matmul(pk.sum(-1).transpose(-1, -2), z)  # [B, H_kv, R, T/G] @ [.., T/G, D]
        return out
    s, ng = v.scale.to(dtype), d // g  # per token: s, z [B, H_kv, T, D/G]
    if ng == 1:
        out = _by_channel(torch.matmul((p * s.transpose(-1, -2)).unsqueeze(2), c))
    else:
        # row (r, g) = p_t·s_{t,g}, made contiguous from contiguous factors: the matmul copies it once
        # per plane (broadcast), and that copy from a transposed layout was measured 10× slower
        st = s.transpose(-1, -2).contiguous()  # [B, H_kv, D/G, T]
        ps = (p.contiguous().unsqueeze(3) * st.unsqueeze(2)).view(b, h, 1, r * ng, t)
        full = torch.matmul(ps, c).view(b, h, per, r, ng, d // per)
        out = _by_channel((full * _group_mask(per, d, g, dtype, p.device).unsqueeze(1)).sum(4))
    if z is not None:
        out += torch.matmul(p, z).repeat_interleave(g, dim=-1)  # [B, H_kv, R, D/G] -> [.., D]
    return out


def masked_scores(scores: torch.Tensor, mask: torch.Tensor | None, h_kv: int) -> torch.Tensor:
    """Apply a transformers attention mask ([B, 1 or H, 1, T] bool or additive) to scores [B, H_kv, R, T]."""
    if mask is None:
        return scores
    b, _, r, t = scores.shape
    m = mask[..., -1:, :t]  # the decode query's row
    m = m.expand(b, h_kv * r, 1, t).reshape(b, h_kv, r, t) if m.shape[1] != 1 else m.reshape(b, 1, 1, t)
    return scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.to(scores.dtype)


def decode_attention_over(
    query: torch.Tensor,
    keys: list[QuantizedTensor | torch.Tensor],
    values: list[QuantizedTensor | torch.Tensor],
    scaling: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step of attention over a history held as sequences in token order: ``keys`` and
    ``values`` are lists of QuantizedTensor / fp16 tensors [B, H_kv, T_i, D] (the two lists may
    split the history at different points, as KIVI's windows do). query [B, H, 1, D] ->
    attention output [B, H, 1, D]. Quantized parts are attended from their codes
    (``scores_from_codes`` / ``mix_from_codes``): no dequantized history is materialised."""
    b, h, _, d = query.shape
    first = keys[0]
    h_kv = (first.codes if isinstance(first, QuantizedTensor) else first).shape[1]
    half = query.dtype in (torch.float16, torch.bfloat16)
    dtype = torch.float32 if half and query.device.type == "cpu" else query.dtype  # CPU: no half matmuls
    qg = query.reshape(b, h_kv, h // h_kv, d).to(dtype) * scaling
    parts = [
        scores_from_codes(qg, k) if isinstance(k, QuantizedTensor) else torch.matmul(qg, k.to(dtype).transpose(-1, -2))
        for k in keys
    ]
    scores = masked_scores(parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1), mask, h_kv)
    p = torch.softmax(scores, dim=-1)  # [B, H_kv, R, T]
    out, start = None, 0
    for v in values:
        n = v.shape[-2]
        pv = p[..., start : start + n]
        o = mix_from_codes(pv, v) if isinstance(v, QuantizedTensor) else torch.matmul(pv, v.to(dtype))
        out = o if out is None else out + o
        start += n
    return out.reshape(b, h, 1, d).to(query.dtype)
