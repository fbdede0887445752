"""PolarQuant: key channel pairs in polar form (Wu, Lv, Feng, Zhang, Zhang, Yin, Lin, Yan; arXiv 2502.00527,
NeurIPS 2025, "PolarQuant: Leveraging Polar Transformation for (Efficient) Key Cache Quantization and Decoding
Acceleration").

Not the other PolarQuant (Han et al., arXiv 2502.02617: random preconditioning, recursive polar angles).
The official code is ``github.com/ericshwu/PolarQuant`` (its README cites Wu et al., NeurIPS 2025), read at
commit ``7fc65d8fc0d83e2fd4790d2bc610ac4bd0f132d5``: ``models/modeling_llama_polar.py``
(``LlamaPolarGroupAttention.quantize_and_pack_nbit`` and ``forward``, ``LlamaPolarMixedGroupAttention``) and
``models/kernel4group.py`` (``_kernel``, the lookup-table decode, and its PyTorch check under ``__main__``).
The rules below were read there and are written here from scratch.

Pairs. The code views post-RoPE keys [B, H, T, D] as [B, H, T/G, G, 2, D/2]: pair i is channels
(i, i + D/2), x = channel i, y = channel i + D/2, exactly the pairs transformers' ``rotate_half`` RoPE
(Llama, SmolLM2, Qwen2, Mistral) rotates together. This store pairs the same channels.

Quantizer (per KV head, per group of G consecutive tokens, per pair i; G = ``group`` = 128):

* radius r = sqrt(x² + y²), angle φ = atan2(y, x), moved to [0, 2π) (φ < 0 gets + 2π);
* for each of r (``rbits`` bits) and φ (``tbits`` bits): min m and max over the G tokens, step
  s = (max − m) / 2^b (2^b, not 2^b − 1), code c = clamp(floor((v − m) / s), 0, 2^b − 1);
* reconstruction at the bin middle: r̂ = m_r + (c_r + ½)·s_r, φ̂ = m_φ + (c_φ + ½)·s_φ, and
  k̂_i = r̂·cos φ̂, k̂_{i+D/2} = r̂·sin φ̂ (``read`` returns these keys).

Decode from the codes (``attend``, the kernel's lookup table). Per query head, group and pair the table
LUT[t] = q_x·cos(m_φ + (t + ½)·s_φ) + q_y·sin(m_φ + (t + ½)·s_φ), t < 2^tbits, is built once; the score of
token j is Σ_i LUT_i[c_φ(j, i)]·R_i[c_r(j, i)], with R_i[t] = m_r + (t + ½)·s_r the radius table. The tables
are made from the query at each step and dropped: the store holds none. Full-precision window keys and
the values go through a matmul / ``harness.from_codes.mix_from_codes``.

Decode cost. A step of ``attend`` (1) turns the codes into flat int64 table indices (``PolarSeq.indices``:
unpack, offsets, widening), (2) builds the query's tables (``PolarSeq.tables``), (3) per token, query
head and pair gathers an angle-table entry and a radius, multiplies them and sums over the pairs, and
(4) takes the softmax and mixes the fp16 values. (2)-(4) are the format's own: any implementation does
them per step (the kernel's table-lookup formulation: ``tl.gather``, ``*=``, ``tl.sum``), at a cost that
grows with tokens × query heads × pairs. (1) is this implementation's: ``torch.gather`` takes int64 indices
only, the kernel gathers with the uint8 codes it loads. ``python tests/bench/method_parts.py polarquant``
times each piece alone on one SmolLM2-shaped layer at 4096 tokens ("format lower bound": ``attend`` with
the indices given); the measured split is in docs/results.md.

Windows (the code's ``residual_length`` R = 128, KIVI's key rule): a prefill of T tokens quantizes the first
T − (T mod R) keys and keeps the rest fp16; at decode the new key joins the fp16 buffer, attention reads it,
and only then a buffer that reached R tokens is quantized whole. The harness appends before attention, so
(as ``baselines.kivi``) that flush is applied at the start of the next append. Requires R % G == 0.

Values: ``LlamaPolarGroupAttention`` (the class ``LlamaPolarDecoderLayer`` uses) keeps them in full precision
(here fp16, ``value_bits=16``). ``LlamaPolarMixedGroupAttention`` (commented out there) quantizes them per
token, 4 bits, asymmetric round-to-nearest with KIVI's packer, one range per 128 channels, with the keys'
window rule (same split, same flush): ``value_bits=4`` (``value_group`` 0 = head_dim, which is 128 on
Llama-3.1-8B; the code's 128 does not divide SmolLM2's 64).

Choices, as options where the code leaves one open or differs from its stated intent:

* ``index=packed`` (default): radius and angle codes packed at their own widths (3 + 3 bits = 6 bits per pair).
  ``index=byte``: the released kernel's layout, one uint8 per pair holding (c_r << tbits) | c_φ
  (needs rbits + tbits <= 8; 3 + 3 still takes 8 bits: the kernel docstring defers low-bit packing).
* ``quantize_prefill`` (default True, as every method here): the code's prefill attention runs on the
  full-precision keys (flash attention before the split); ``quantize_prefill=false`` does that.
* The code keeps min / step in the model dtype (bf16 in its runs) and computes atan2 / norms there; here
  the arithmetic is fp32, min and step are stored as fp16 and the codes computed against the stored values.
  A step of 0 (a constant group) gives code 0 (the code divides by zero). The angle range is the plain
  min–max over [0, 2π), with no wrap-around, as in the code.

Settings: ``rbits`` = ``tbits`` = 4 in every released model file (``polarquant``); the benchmark names 4/4 and
3/3 ("polar44", "polar33", ``benchmark/benchmark_matmul.py``): variant ``polarquant-33``. ``polarquant-v4`` is
the mixed class (4-bit values). Memory: codes, four fp16 numbers (m_r, s_r, m_φ, s_φ) per pair per group of
G tokens, fp16 window keys, values (fp16, or codes + fp16 scale/zero per token per group).
Shapes: [B, H_kv, T, D]; P = D / 2 pairs; NG = T / G groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from harness.from_codes import masked_scores, mix_from_codes
from harness.interface import (
    KVCacheMethod,
    LayerStore,
    MemoryReport,
    MethodConfig,
    MethodSpecError,
    ModelInfo,
    Observation,
    ReportStyle,
    Variant,
    tensor_bytes,
)
from harness.options import NonNegativeInt, OneOf, PositiveInt
from harness.quant import META_DTYPE, META_MAX, pack_codes, unpack_codes
from harness.storage import TOKEN_DIM, FullPrecisionSeq, QuantizedSeq, TokenBuffer, held_parts, read_tokens

PolarBits = OneOf(2, 3, 4, 8)
#: meta fields per pair per group, in this order along the stored tensor's [4, P] rows
META_FIELDS = ("r_min", "r_step", "t_min", "t_step")


@dataclass
class PolarQuantConfig(MethodConfig):
    rbits: PolarBits = 4  # radius bits (the code's ``rbits``)
    tbits: PolarBits = 4  # angle bits (the code's ``tbits``)
    group: PositiveInt = 128  # G: tokens per min/step of each pair (the code's ``group_size``)
    residual: PositiveInt = 128  # R: fp16 key window; a multiple of G (the code's ``residual_length``)
    value_bits: OneOf(16, 2, 4, 8) = 16  # 16: values fp16 (LlamaPolarGroupAttention); 4: the Mixed class
    value_group: NonNegativeInt = 0  # channels per value range; 0 = head_dim (the code: 128)
    index: OneOf("packed", "byte") = "packed"  # byte: one uint8 (c_r << tbits) | c_t per pair, as the kernel
    quantize_prefill: bool = True  # False = the code's full-precision prefill attention

    aliases: ClassVar[dict[str, str]] = {"group_size": "group", "residual_length": "residual", "vbits": "value_bits"}

    def validate(self) -> None:
        if self.residual < self.group or self.residual % self.group:
            raise MethodSpecError(
                f"polarquant: residual={self.residual} must be a positive multiple of group={self.group} "
                "(the key buffer is quantized in groups of G tokens when it holds R tokens)"
            )
        if self.index == "byte" and self.rbits + self.tbits > 8:
            raise MethodSpecError(
                f"polarquant: index=byte holds (c_r << tbits) | c_t in one byte; rbits + tbits = "
                f"{self.rbits + self.tbits} > 8 (use index=packed)"
            )


# --------------------------------------------------------------------------------------------
# The quantizer
# --------------------------------------------------------------------------------------------


def _floor_codes(v: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max floor codes over the group axis -2: v [.., G, P] -> codes [.., G, P] (long), fp16 min and
    step [.., P]. Step (max − min) / 2^bits; the codes are computed against the stored fp16 min / step."""
    lo = v.amin(dim=-2).clamp(-META_MAX, META_MAX)
    hi = v.amax(dim=-2).clamp(-META_MAX, META_MAX)
    m = lo.to(META_DTYPE)
    s = ((hi - lo) / 2**bits).to(META_DTYPE)
    sf = s.float().unsqueeze(-2)
    c = torch.floor((v - m.float().unsqueeze(-2)) / torch.where(sf > 0, sf, 1.0))
    c = torch.where(sf > 0, c, 0.0).nan_to_num(0.0).clamp_(0, 2**bits - 1)
    return c.long(), m, s


def polar_quantize(
    x: torch.Tensor, rbits: int, tbits: int, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys x [B, H, n, D] (n % group == 0) -> radius codes, angle codes [B, H, n, P] (long) and
    meta [B, H, n/G, 4, P] fp16 (``META_FIELDS``). Pair i = channels (i, i + D/2)."""
    b, h, n, d = x.shape
    p = d // 2
    xf = x.float().reshape(b, h, n // group, group, 2, p)
    kx, ky = xf[..., 0, :], xf[..., 1, :]  # [B, H, NG, G, P]
    phi = torch.atan2(ky, kx)
    phi = torch.where(phi < 0, phi + 2 * math.pi, phi)  # [0, 2π)
    radius = torch.sqrt(kx * kx + ky * ky)
    cr, mr, sr = _floor_codes(radius, rbits)
    ct, mt, st = _floor_codes(phi, tbits)
    meta = torch.stack([mr, sr, mt, st], dim=-2)  # [B, H, NG, 4, P]
    return cr.reshape(b, h, n, p), ct.reshape(b, h, n, p), meta


def polar_dequantize(cr: torch.Tensor, ct: torch.Tensor, meta: torch.Tensor, group: int) -> torch.Tensor:
    """Codes [B, H, n, P] and meta [B, H, n/G, 4, P] -> keys [B, H, n, 2P] (fp32) at the bins' middles."""
    b, h, n, p = cr.shape
    m = meta.float().unsqueeze(3)  # [B, H, NG, 1, 4, P]
    r = m[..., 0, :] + (cr.view(b, h, n // group, group, p).float() + 0.5) * m[..., 1, :]  # [B, H, NG, G, P]
    phi = m[..., 2, :] + (ct.view(b, h, n // group, group, p).float() + 0.5) * m[..., 3, :]
    return torch.cat([r * torch.cos(phi), r * torch.sin(phi)], dim=-1).view(b, h, n, 2 * p)


def _unpack_into(packed: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """``unpack_codes`` written into ``out``: packed [.., m] uint8 -> out [.., m·8/bits] (an integer dtype).
    At 2 and 4 bits one scalar shift per position, straight into ``out`` (no broadcast shift tensor, no
    uint8 intermediate: a few times faster on CPU)."""
    if bits not in (2, 4):
        out.copy_(unpack_codes(packed, bits))
        return
    o = out.unflatten(-1, (packed.shape[-1], 8 // bits))  # [.., m, 8/bits], code k of byte at bits·k
    torch.bitwise_and(packed, 2**bits - 1, out=o[..., 0])
    for k in range(1, 8 // bits - 1):
        torch.bitwise_and(packed >> bits * k, 2**bits - 1, out=o[..., k])
    torch.bitwise_right_shift(packed, 8 - bits, out=o[..., -1])


class PolarSeq:
    """Keys held in polar form: codes [B, H, T, C] uint8 (C bytes per token) and meta [B, H, T/G, 4·P]
    fp16 (``META_FIELDS`` × pairs), each in a ``TokenBuffer`` growing along its axis -2."""

    def __init__(self, rbits: int, tbits: int, group: int, index: str):
        self.rbits, self.tbits, self.group, self.index = rbits, tbits, group, index
        self.codes, self.meta = TokenBuffer(), TokenBuffer()

    @property
    def length(self) -> int:
        return self.codes.n

    def append(self, x: torch.Tensor) -> None:
        """Quantize and keep keys x [B, H, n, D], n a multiple of G."""
        if x.shape[TOKEN_DIM] == 0:
            return
        cr, ct, meta = polar_quantize(x, self.rbits, self.tbits, self.group)
        if self.index == "byte":
            codes = ((cr << self.tbits) | ct).to(torch.uint8)  # [B, H, n, P]
        else:
            codes = torch.cat([pack_codes(cr, self.rbits), pack_codes(ct, self.tbits)], dim=-1)
        self.codes.append(codes)
        self.meta.append(meta.flatten(-2))  # [B, H, NG, 4·P]

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(radius codes, angle codes) [B, H, T, P] (long) and meta [B, H, T/G, 4, P] fp16."""
        codes, meta = self.codes.value, self.meta.value
        p = meta.shape[-1] // 4
        if self.index == "byte":
            cr, ct = codes >> self.tbits, codes & (2**self.tbits - 1)
        else:
            nr = p * self.rbits // 8
            cr, ct = unpack_codes(codes[..., :nr], self.rbits), unpack_codes(codes[..., nr:], self.tbits)
        return cr.long(), ct.long(), meta.unflatten(-1, (4, p))

    def read(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.length == 0:
            return None
        k = polar_dequantize(*self.unpacked(), self.group)
        return k.to(dtype) if out is None else out.copy_(k)

    def indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat table indices of the codes, i·2^rbits + c_r(j, i) and i·2^tbits + c_φ(j, i), [B, H_kv, T, P]
        (int64, what ``torch.gather`` takes): unpacked side by side into one int16 buffer (int32 past 2^15
        table entries), offset there, each half widened once."""
        codes, p = self.codes.value, self.meta.value.shape[-1] // 4  # [B, H_kv, T, C] uint8
        levels = (2**self.rbits, 2**self.tbits)
        dt = torch.int16 if p * max(levels) <= 2**15 else torch.int32
        idx = torch.empty(*codes.shape[:-1], 2 * p, dtype=dt, device=codes.device)  # [B, H_kv, T, 2P]: c_r | c_φ
        if self.index == "byte":
            torch.bitwise_right_shift(codes, self.tbits, out=idx[..., :p])
            torch.bitwise_and(codes, levels[1] - 1, out=idx[..., p:])
        elif self.rbits == self.tbits:  # both halves in one pass (the bytes hold radius codes, then angle codes)
            _unpack_into(codes, self.rbits, idx)
        else:
            nr = p * self.rbits // 8
            _unpack_into(codes[..., :nr], self.rbits, idx[..., :p])
            _unpack_into(codes[..., nr:], self.tbits, idx[..., p:])
        pair = torch.arange(p, dtype=dt, device=codes.device)
        idx += torch.cat([pair * levels[0], pair * levels[1]])
        return idx[..., :p].long(), idx[..., p:].long()

    def tables(self, qg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's lookup tables from the scaled queries qg [B, H_kv, R, D]: angle table
        LUT[.., g, i, t] = q_x·cos φ_t + q_y·sin φ_t (φ_t = m_φ + (t + ½)·s_φ) [B, H_kv, R, NG, P·Lt] and
        radius table R[.., g, i, t] = m_r + (t + ½)·s_r [B, H_kv, NG, P·Lr] (flat over (pair, level))."""
        meta, dt = self.meta.value, qg.dtype  # [B, H_kv, NG, 4·P]
        b, h, ng, p = *meta.shape[:3], meta.shape[-1] // 4
        lt, lr = 2**self.tbits, 2**self.rbits
        m = meta.unflatten(-1, (4, p)).to(dt)  # [B, H_kv, NG, 4, P]
        mid_t = torch.arange(lt, dtype=dt, device=qg.device) + 0.5
        mid_r = torch.arange(lr, dtype=dt, device=qg.device) + 0.5
        phi = m[:, :, :, 2, :, None] + mid_t * m[:, :, :, 3, :, None]  # [B, H_kv, NG, P, Lt]
        qx, qy = qg[..., :p, None], qg[..., p:, None]  # [B, H_kv, R, P, 1]
        lut = qx.unsqueeze(3) * torch.cos(phi).unsqueeze(2) + qy.unsqueeze(3) * torch.sin(phi).unsqueeze(2)
        rad = m[:, :, :, 0, :, None] + mid_r * m[:, :, :, 1, :, None]  # [B, H_kv, NG, P, Lr]
        return lut.reshape(b, h, qg.shape[2], ng, p * lt), rad.reshape(b, h, ng, p * lr)

    def scores(self, qg: torch.Tensor, indices: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """q·k̂ from the codes through the lookup tables (``tables``): qg [B, H_kv, R, D] (scaled queries of
        the R heads sharing a KV head) -> [B, H_kv, R, T]; score of token j in group g:
        Σ_i LUT[g, i, c_φ(j, i)]·R[g, i, c_r(j, i)] (products in place, summed over i). ``indices``:
        ``self.indices()`` when the caller has them (tests/bench/parts_polarquant.py)."""
        ir, it = self.indices() if indices is None else indices  # [B, H_kv, T, P]
        b, h, t, p = ir.shape
        r, g, ng = qg.shape[2], self.group, t // self.group
        lut, rad = self.tables(qg)
        angle = torch.gather(lut, -1, it.view(b, h, 1, ng, g * p).expand(b, h, r, ng, g * p))  # [B, H_kv, R, NG, G·P]
        radius = torch.gather(rad, -1, ir.view(b, h, ng, g * p))  # [B, H_kv, NG, G·P]
        out = angle.mul_(radius.unsqueeze(2)).view(b, h, r, ng, g, p).sum(-1)  # [B, H_kv, R, NG, G]
        return out.reshape(b, h, r, t)

    @property
    def code_bits(self) -> int:
        """Payload bits per pair held."""
        return 8 if self.index == "byte" else self.rbits + self.tbits

    def memory(self) -> MemoryReport:
        rep = MemoryReport()
        if self.length:
            codes, meta = self.codes.value, self.meta.value
            rep.add("codes", tensor_bytes(codes))
            rep.add("scales", tensor_bytes(meta))
            b, h, t, _ = codes.shape
            pairs = b * h * t * (meta.shape[-1] // 4)
            rep.elements = rep.quantized_elements = 2 * pairs
            rep.payload_bits = float(pairs * self.code_bits)
        rep.reserved_bytes = self.codes.reserved_bytes + self.meta.reserved_bytes
        return rep

    def reorder(self, index: torch.Tensor) -> None:
        self.codes.reorder(index)
        self.meta.reorder(index)


# --------------------------------------------------------------------------------------------
# The layer store
# --------------------------------------------------------------------------------------------


class PolarQuantStore(LayerStore):
    """Keys [polar codes | fp16 window], values fp16 or [per-token codes | fp16 window] (same split)."""

    def __init__(self, layer_idx: int, info: ModelInfo, config: PolarQuantConfig):
        super().__init__(layer_idx, info)
        self.cfg = config
        self.k_q = PolarSeq(config.rbits, config.tbits, config.group, config.index)
        self.k_fp = FullPrecisionSeq()
        vg = config.value_group or info.head_dim
        self.v_q = QuantizedSeq(config.value_bits, vg, axis=-1) if config.value_bits < 16 else None
        self.v_fp = FullPrecisionSeq()
        self._batch: int | None = None

    @property
    def key_counts(self) -> tuple[int, int]:
        """(quantized, fp16) key tokens held."""
        return self.k_q.length, self.k_fp.length

    @property
    def value_counts(self) -> tuple[int, int]:
        """(quantized, fp16) value tokens held."""
        return (self.v_q.length if self.v_q else 0), self.v_fp.length

    def _settle(self) -> None:
        """What the code does after attention: the first n − (n mod R) buffered keys (decode: the whole
        buffer once it holds R) are quantized; with quantized values, the same values too."""
        n = self.k_fp.length - self.k_fp.length % self.cfg.residual
        if n:
            self.k_q.append(self.k_fp.take_front(n))  # [B, H, n, D], n % G == 0
            if self.v_q is not None:
                self.v_q.append(self.v_fp.take_front(n))

    def append(self, keys: torch.Tensor, values: torch.Tensor, obs: Observation) -> None:
        self._batch = keys.shape[0]
        if keys.shape[TOKEN_DIM] == 0:
            return
        prefill = self.k_q.length + self.k_fp.length == 0
        if not prefill:
            self._settle()  # the flush the code applied after the previous step's attention
        self.k_fp.append(keys)
        self.v_fp.append(values)
        if prefill:
            self._settle()  # the code's prefill split, applied at once

    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        nq, nf = self.key_counts
        if nq + nf == 0:
            empty = torch.zeros(self._batch or 0, self.info.n_kv_heads, 0, self.info.head_dim, dtype=dtype)
            return empty, empty.clone()
        first = self.k_fp.data if nq == 0 else self.k_q.codes.value
        k = torch.empty(*first.shape[:2], nq + nf, self.info.head_dim, dtype=dtype, device=first.device)
        if nq:
            self.k_q.read(dtype, out=k[..., :nq, :])
        if nf:
            self.k_fp.read(dtype, out=k[..., nq:, :])
        v = read_tokens([s for s in (self.v_q, self.v_fp) if s is not None], dtype)
        return k, v

    def attend(self, query: torch.Tensor, scaling: float, mask: torch.Tensor | None) -> torch.Tensor:
        """One decode step from the codes: query [B, H, 1, D] -> [B, H, 1, D]. Polar keys through the
        lookup tables (``PolarSeq.scores``), window keys by matmul; values by ``mix_from_codes`` / matmul."""
        b, h, _, d = query.shape
        hk = self.info.n_kv_heads
        half = query.dtype in (torch.float16, torch.bfloat16)
        dt = torch.float32 if half and query.device.type == "cpu" else query.dtype
        qg = query.reshape(b, hk, h // hk, d).to(dt) * scaling  # [B, H_kv, R, D]
        parts = []
        if self.k_q.length:
            parts.append(self.k_q.scores(qg))
        if self.k_fp.length:
            parts.append(torch.matmul(qg, self.k_fp.data.to(dt).transpose(-1, -2)))
        p = torch.softmax(masked_scores(torch.cat(parts, dim=-1), mask, hk), dim=-1)  # [B, H_kv, R, T]
        out, start = None, 0
        for v in held_parts([s for s in (self.v_q, self.v_fp) if s is not None]):
            n = v.shape[-2]
            pv = p[..., start : start + n]
            o = mix_from_codes(pv, v) if not isinstance(v, torch.Tensor) else torch.matmul(pv, v.to(dt))
            out = o if out is None else out + o
            start += n
        return out.reshape(b, h, 1, d).to(query.dtype)

    def memory(self) -> MemoryReport:
        r = self.k_q.memory()
        for seq in (self.k_fp, self.v_q, self.v_fp):
            if seq is not None:
                r += seq.memory()
        return r

    def reorder(self, index: torch.Tensor) -> None:
        for seq in (self.k_q, self.k_fp, self.v_q, self.v_fp):
            if seq is not None:
                seq.reorder(index)


class PolarQuant(KVCacheMethod):
    """PolarQuant (Wu et al., arXiv 2502.00527): RoPE pairs of post-RoPE keys as quantized radius and angle."""

    name = "polarquant"
    description = (
        "PolarQuant (Wu et al.): key pairs (i, i+D/2) as radius/angle codes per G tokens, lookup-table decode, "
        "fp16 residual (options rbits, tbits, group, residual, value_bits)"
    )
    variants = {
        "polarquant-33": Variant("PolarQuant 3-bit radius / 3-bit angle keys (the code's polar33)", rbits=3, tbits=3),
        "polarquant-v4": Variant("PolarQuant 4/4 keys, 4-bit per-token values (the code's Mixed class)", value_bits=4),
    }
    report = ReportStyle("PolarQuant", ">", "teal", rank=71)

    config_class = PolarQuantConfig
    decode_from_codes = True  # decode steps attend from the codes (PolarQuantStore.attend)

    def check_model(self, info: ModelInfo) -> None:
        c, d = self.config, info.head_dim
        if d % 2:
            raise MethodSpecError(f"{self.label}: head_dim={d} is odd; pairs are channels (i, i + D/2)")
        if c.index == "packed" and any((d // 2) * bits % 8 for bits in (c.rbits, c.tbits)):
            raise MethodSpecError(
                f"{self.label}: {d // 2} pairs per head cannot be bit-packed at rbits={c.rbits}, tbits={c.tbits}"
            )
        if c.value_bits < 16:
            vg = c.value_group or d
            if d % vg:
                raise MethodSpecError(f"{self.label}: value_group={vg} does not divide head_dim={d}")
            if d * c.value_bits % 8:
                raise MethodSpecError(f"{self.label}: head_dim={d} cannot be bit-packed at {c.value_bits} bits")

    @classmethod
    def report_sort_key(cls, config: dict[str, Any]) -> tuple:
        try:
            return (-(float(config.get("rbits", 4)) + float(config.get("tbits", 4))) / 2,)
        except (TypeError, ValueError):
            return (-4.0,)

    def new_layer_store(self, layer_idx: int, info: ModelInfo) -> LayerStore:
        return PolarQuantStore(layer_idx, info, self.config)
