"""Quantization primitives shared by every KV-cache method.

One module, vectorised torch, no Python loops over tokens or channels:

* ``quantize`` — asymmetric min-max (KIVI, MoQAE, uniform INT-N) or symmetric round-to-nearest
  quantization in groups of ``group`` consecutive elements along any ``axis``.
* ``pack_bits`` / ``unpack_bits`` — 1, 2, 4 and 8-bit codes packed into bytes along the last dim.
* ``pack_codes`` / ``unpack_codes`` — the same plus 3-bit codes (8 codes in 3 bytes), for
  lookup-table (non-uniform) datatypes; ``nearest_level``, ``weighted_kmeans_1d`` and ``percentile``
  build and apply such tables (KVQuant's nuq datatype and outlier thresholds).
* ``unpack_to_float`` — packed bytes straight to float codes through a 256-row table (the
  dequantization path; measured 2–3× faster than shift/mask/convert on CPU).
* ``unpack_planes`` — packed bytes to float codes plane by plane (the i-th code of every byte
  together), each plane one contiguous write: the decode path's unpacking (``harness.from_codes``),
  2.5× faster than the table for 2-bit codes at a SmolLM2 layer's size (``nox -s bench``), in a
  regrouped channel order.
* ``QuantizedTensor`` — what a cache stores: packed codes (uint8) plus fp16 scale and zero-point;
  ``quantize`` stores 1, 2, 3, 4 or 8-bit codes (``QUANT_BITS``; 3-bit through ``pack_3bit``,
  1-bit asymmetric only).

Math (asymmetric, as in KIVI's ``quant/new_pack.py`` and the MoQAE paper):
    s = (max - min) / (2^b - 1),   q = round(clamp((x - min) / s, 0, 2^b - 1)),   x̂ = q·s + min
Symmetric RTN: s = max|x| / (2^(b-1) - 1), q = clamp(round(x / s), -(2^(b-1) - 1), 2^(b-1) - 1),
x̂ = q·s; codes are stored offset by 2^(b-1) so they are unsigned.

Scale and zero-point are stored in fp16 (the papers' convention) and the codes are computed against
the *stored* fp16 values, so dequantization reproduces exactly what was accounted for.
Rounding is ``torch.round`` (round half to even). A constant group has s = 0: every code is 0 and
x̂ = min, exact up to the fp16 rounding of min (exact for fp16 inputs); no NaN is produced.

fp16 range (``fit_asymmetric`` / ``fit_symmetric``): s and z are computed in fp32; a group with
finite values whose fp16 s or z would overflow or flush to zero is clamped into fp16 instead (no
fp32 metadata, so bytes, layouts and kernels stay as they are): values beyond ±65504 (fp32 inputs)
saturate there; a 1-bit range wider than 65504 gets s = 65504 with the two levels centred in the
range; a nonzero s below fp16's smallest step becomes 2^-24 (error ≤ the fp16 rounding of the
values, as fp16 storage); where the rounded-up s would put the top level z + (2^b − 1)·s (±qmax·s
symmetric) above 65504, so that an fp16 read overflows, s is one fp16 step smaller. Only such
groups change: for fp16 inputs, a group within a rounding of ±65504, a 1-bit range wider than 65504,
or a range below 2^-25·(2^b − 1) (a few subnormal steps); every other group keeps the values above
bit for bit. Groups holding inf or NaN are not touched (``HarnessCache`` counts them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.options import OneOf

SUPPORTED_BITS = (2, 4, 8)
#: the option type of a bit-width that ``quantize`` stores per token / per channel (int, kivi, ...)
Bits = OneOf(*SUPPORTED_BITS)
PACK_BITS = (1, 2, 4, 8)  # byte-aligned packing (pack_bits / unpack_to_float)
QUANT_BITS = (1, 2, 3, 4, 8)  # what ``quantize`` stores (3-bit: 8 codes in 3 bytes)
META_DTYPE = torch.float16
META_MAX = float(torch.finfo(META_DTYPE).max)  # 65504
META_STEP = 2.0**-24  # the smallest positive fp16 (subnormal)


def _check_bits(bits: int, accepted: tuple[int, ...] = PACK_BITS) -> None:
    if bits not in accepted:
        raise ValueError(f"bits must be one of {accepted} for packed storage, got {bits}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) along the last dim into uint8 (little-end first).

    ``codes``: [..., n] with n divisible by 8 // bits  ->  [..., n * bits // 8] uint8.
    """
    _check_bits(bits)
    per_byte = 8 // bits
    n = codes.shape[-1]
    if n % per_byte:
        raise ValueError(f"last dim {n} is not divisible by {per_byte} ({bits}-bit packing)")
    c = codes.to(torch.uint8)
    if per_byte == 1:
        return c.contiguous()
    c = c.reshape(*c.shape[:-1], n // per_byte, per_byte)
    return (c << _shifts(bits, c.device)).sum(dim=-1, dtype=torch.uint8)


_SHIFTS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    """[8 // bits] uint8 shifts 0, bits, 2·bits, ... (cached per device)."""
    key = (bits, torch.device(device))
    if key not in _SHIFTS:
        _SHIFTS[key] = torch.arange(0, 8, bits, dtype=torch.uint8, device=device)
    return _SHIFTS[key]


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: [..., m] uint8 -> [..., m * 8 // bits] uint8 codes."""
    _check_bits(bits)
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(-1) >> _shifts(bits, packed.device)) & mask  # [..., m, per_byte]
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


_CODE_TABLES: dict[tuple[int, torch.dtype, torch.device, int], torch.Tensor] = {}


def code_table(bits: int, dtype: torch.dtype, device: torch.device, offset: int = 0) -> torch.Tensor:
    """[256, 8 // bits] table: row b holds the codes packed in byte b (little-end first) minus
    ``offset``, as ``dtype``. Cached per (bits, dtype, device, offset)."""
    _check_bits(bits)
    key = (bits, dtype, torch.device(device), offset)
    table = _CODE_TABLES.get(key)
    if table is None:
        byte = torch.arange(256, device=device).unsqueeze(-1)  # [256, 1]
        shifts = torch.arange(0, 8, bits, device=device)  # [per_byte]
        table = (((byte >> shifts) & ((1 << bits) - 1)) - offset).to(dtype)
        _CODE_TABLES[key] = table
    return table


def unpack_to_float(packed: torch.Tensor, bits: int, dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
    """``unpack_bits(packed, bits).to(dtype) - offset`` in one table gather per byte (no shift/mask/
    convert passes over the history): [..., m] uint8 -> [..., m * 8 // bits] ``dtype``."""
    table = code_table(bits, dtype, packed.device, offset)
    out = torch.nn.functional.embedding(packed.to(torch.int32), table)  # [..., m, per_byte]
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * (8 // bits))


def unpack_planes(packed: torch.Tensor, bits: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed codes [..., T, m] -> float planes [..., P, T, m] (P = 8 // bits codes per byte): plane i
    holds the i-th code of every byte, so planes[..., i, t, j] is the code of channel P·j + i.

    One shift, mask and converting copy per plane, each a contiguous write: 1.6–2.7× faster on CPU
    than gathering P floats per byte from a table in channel order (``unpack_to_float``; ``nox -s
    bench``, group *unpack codes*).
    Codes are exact small integers, so the values are ``unpack_to_float``'s, regrouped; a consumer
    splits the other side of its products the same way (channel P·j + i -> [i, j]). ``out``: a
    contiguous tensor of that shape and dtype to write into (a reused workspace)."""
    _check_bits(bits)
    per = 8 // bits
    if out is None:
        out = torch.empty(*packed.shape[:-2], per, *packed.shape[-2:], dtype=dtype, device=packed.device)
    mask = (1 << bits) - 1
    for i in range(per):
        plane = packed if i == 0 else packed >> (bits * i)
        out.select(-3, i).copy_(plane & mask if i < per - 1 else plane)
    return out


@dataclass
class QuantizedTensor:
    """Packed integer codes with fp16 scale / zero-point, grouped along one axis.

    Layout: ``codes`` keeps the original tensor's shape except the last dim, which is packed
    (``shape[-1] * bits / 8`` bytes). ``scale`` and ``zero`` have the original shape with the
    group axis reduced to ``shape[axis] // group`` (one entry per group). ``zero`` is None for
    symmetric quantization.
    """

    codes: torch.Tensor  # uint8, [..., D * bits / 8]
    scale: torch.Tensor  # fp16, group axis reduced
    zero: torch.Tensor | None  # fp16, same shape as scale; None when symmetric
    bits: int
    axis: int  # negative index of the group axis
    group: int

    @property
    def shape(self) -> tuple[int, ...]:
        s = list(self.codes.shape)
        s[-1] = s[-1] * 8 // self.bits
        return tuple(s)

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """x̂ = q·s + z (asymmetric) or (q − 2^(b−1))·s (symmetric), in ``dtype``: one table gather
        (``unpack_to_float``) and one fused multiply-add over the history. ``out`` (a tensor or a
        slice view of this shape and dtype) receives the result, so a reader can assemble the
        history without a concatenation copy."""
        offset = 2 ** (self.bits - 1) if self.zero is None else 0
        if self.bits == 3:
            q = unpack_3bit(self.codes).to(dtype) - offset
        else:
            q = unpack_to_float(self.codes, self.bits, dtype, offset)
        shape = q.shape
        ax = self.axis % len(shape)
        grouped = shape[:ax] + (shape[ax] // self.group, self.group) + shape[ax + 1 :]
        qg = q.view(grouped)
        scale = self.scale.to(dtype).unsqueeze(ax + 1)
        target = None if out is None else out.view(grouped)
        if self.zero is None:
            x = torch.mul(qg, scale, out=qg if target is None else target)
        else:
            x = torch.addcmul(self.zero.to(dtype).unsqueeze(ax + 1), qg, scale, out=target)
        return x.view(shape) if out is None else out

    # --- storage accounting -------------------------------------------------------------
    @property
    def code_bytes(self) -> int:
        return self.codes.numel() * self.codes.element_size()

    @property
    def meta_bytes(self) -> int:
        n = self.scale.numel() * self.scale.element_size()
        if self.zero is not None:
            n += self.zero.numel() * self.zero.element_size()
        return n

    @property
    def numel(self) -> int:
        return self.codes.numel() * 8 // self.bits

    @staticmethod
    def cat(parts: list[QuantizedTensor], dim: int) -> QuantizedTensor:
        """Concatenate along a non-packed dim (e.g. tokens). Groups must not straddle parts."""
        first = parts[0]
        if len(parts) == 1:
            return first
        if dim % first.codes.dim() == first.codes.dim() - 1:
            raise ValueError("cannot concatenate along the packed last dim")
        for p in parts[1:]:
            if (p.bits, p.axis, p.group, p.symmetric) != (
                first.bits,
                first.axis,
                first.group,
                first.symmetric,
            ):
                raise ValueError("cannot concatenate quantized tensors with different layouts")
        return QuantizedTensor(
            codes=torch.cat([p.codes for p in parts], dim=dim),
            scale=torch.cat([p.scale for p in parts], dim=dim),
            zero=None if first.zero is None else torch.cat([p.zero for p in parts], dim=dim),
            bits=first.bits,
            axis=first.axis,
            group=first.group,
        )

    def select(self, dim: int, index: int) -> QuantizedTensor:
        """The slice at ``index`` of a leading (non-packed, non-group) dim, as views."""
        pick = lambda t: None if t is None else t.select(dim, index)  # noqa: E731
        return QuantizedTensor(pick(self.codes), pick(self.scale), pick(self.zero), self.bits, self.axis, self.group)

    def index_select(self, dim: int, index: torch.Tensor) -> QuantizedTensor:
        """Select along a non-packed, non-group dim (batch reordering for beam search)."""
        return QuantizedTensor(
            codes=self.codes.index_select(dim, index),
            scale=self.scale.index_select(dim, index),
            zero=None if self.zero is None else self.zero.index_select(dim, index),
            bits=self.bits,
            axis=self.axis,
            group=self.group,
        )


def _grouped(x: torch.Tensor, axis: int, group: int) -> tuple[torch.Tensor, int]:
    """Reshape ``x`` so the group axis splits into (n_groups, group); return the view and its index."""
    ax = axis % x.dim()
    n = x.shape[ax]
    if group < 1 or n % group:
        raise ValueError(f"group size {group} does not divide axis of length {n}")
    return x.reshape(x.shape[:ax] + (n // group, group) + x.shape[ax + 1 :]), ax


def _step_down(scale: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """``scale`` (fp16, > 0 where it matters) one fp16 step smaller where the top level ``top`` (fp32) is
    above fp16's maximum: the bit pattern minus one (``nextafter`` lacks fp16 on some torch builds)."""
    smaller = (scale.view(torch.int16) - 1).view(META_DTYPE)
    return torch.where(top > META_MAX, smaller, scale)


def fit_asymmetric(lo: torch.Tensor, hi: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (zero, scale) of groups with fp32 range [lo, hi]: z = fp16(lo), s = fp16((hi − z) / qmax), except
    groups of finite values where fp16 breaks (an infinite z or s, a nonzero s flushed to 0, a top level
    z + qmax·s above 65504), which get the clamped grid of the module docstring."""
    zero = lo.to(META_DTYPE)
    z32 = zero.float()
    exact = (hi - z32) / qmax
    scale = exact.to(META_DTYPE)
    top = z32 + qmax * scale.float()
    if _all_fine(top, exact, scale, zero):
        return zero, scale
    broken = ~torch.isfinite(zero) | ~torch.isfinite(top) | (top > META_MAX) | ((exact > 0) & (scale == 0))
    broken &= torch.isfinite(lo) & torch.isfinite(hi)
    # the clamped grid (computed for every group, kept only where fp16 breaks: no host sync)
    lo_c, hi_c = lo.clamp(-META_MAX, META_MAX), hi.clamp(-META_MAX, META_MAX)
    s_c = (hi_c - lo_c.to(META_DTYPE).float()) / qmax
    wide = s_c > META_MAX  # 1-bit only: the range is wider than fp16 can step
    s_c = s_c.clamp(max=META_MAX)
    z_c = torch.where(wide, (lo_c + hi_c) / 2 - s_c * (qmax / 2), lo_c).to(META_DTYPE)  # wide: levels centred
    s16 = s_c.to(META_DTYPE)
    s16 = torch.where((s_c > 0) & (s16 == 0), torch.full_like(s16, META_STEP), s16)
    s16 = _step_down(s16, z_c.float() + qmax * s16.float())
    return torch.where(broken, z_c, zero), torch.where(broken, s16, scale)


def _all_fine(top: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> bool:
    """True when no group can need the clamped grid: every fp16 zero and top level within ±65504 and
    no nonzero range flushed to a zero scale (then the full test of ``fit_asymmetric`` /
    ``fit_symmetric`` marks nothing; NaN or inf anywhere fails this check and takes the full test).
    Checked on CPU only, where ops run synchronously and the check saves a dozen passes; on an
    accelerator it would cost a host sync, so False there (the full test, without a sync)."""
    if top.device.type != "cpu":
        return False
    fine = (top.abs() <= META_MAX) & ~((exact > 0) & (scale == 0))
    if zero is not None:
        fine &= zero.abs() <= META_MAX
    return bool(fine.all())


def fit_symmetric(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """fp16 scale of groups with fp32 max |x| ``amax``: s = fp16(amax / qmax), except groups of finite values
    where fp16 breaks (an infinite s, a nonzero s flushed to 0, a top level qmax·s above 65504), which get
    the clamped scale of the module docstring."""
    exact = amax / qmax
    scale = exact.to(META_DTYPE)
    top = qmax * scale.float()
    if _all_fine(top, exact, scale):
        return scale
    broken = (~torch.isfinite(top) | (top > META_MAX) | ((exact > 0) & (scale == 0))) & torch.isfinite(amax)
    s_c = amax.clamp(max=META_MAX) / qmax
    s16 = s_c.to(META_DTYPE)
    s16 = torch.where((s_c > 0) & (s16 == 0), torch.full_like(s16, META_STEP), s16)
    s16 = _step_down(s16, qmax * s16.float())
    return torch.where(broken, s16, scale)


def quantize(x: torch.Tensor, bits: int, group: int, axis: int = -1, symmetric: bool = False) -> QuantizedTensor:
    """Quantize ``x`` in groups of ``group`` consecutive elements along ``axis``.

    Keys per channel (KIVI): ``x`` [B, H, T, D], ``axis=-2`` (groups of tokens, one range per channel).
    Values per token: ``axis=-1`` (groups of channels, one range per token).
    """
    _check_bits(bits, QUANT_BITS)
    if symmetric and bits < 2:
        raise ValueError("symmetric quantization needs bits >= 2")
    axis = axis - x.dim() if axis >= 0 else axis
    xg, ax = _grouped(x.float(), axis, group)
    gax = ax + 1  # index of the within-group axis
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = fit_symmetric(xg.abs().amax(dim=gax), qmax)
        s = scale.float().unsqueeze(gax)
        flat = ~(s > 0)  # all zeros (or a NaN scale): the middle code
        safe = s.masked_fill(flat, 1.0)
        q = (torch.clamp(torch.round(xg / safe), -qmax, qmax) + 2 ** (bits - 1)).masked_fill_(flat, 2 ** (bits - 1))
        zero = None
    else:
        qmax = 2**bits - 1
        zero, scale = fit_asymmetric(*torch.aminmax(xg, dim=gax), qmax)
        s = scale.float().unsqueeze(gax)
        z = zero.float().unsqueeze(gax)
        flat = ~(s > 0)  # a constant group (or a NaN scale): codes 0
        safe = s.masked_fill(flat, 1.0)
        q = torch.round(torch.clamp((xg - z) / safe, 0, qmax)).masked_fill_(flat, 0.0)
    codes = pack_codes(q.reshape(x.shape).to(torch.uint8), bits)
    return QuantizedTensor(codes=codes, scale=scale, zero=zero, bits=bits, axis=axis, group=group)


def fake_quantize(x: torch.Tensor, bits: int, group: int, axis: int = -1, symmetric: bool = False) -> torch.Tensor:
    """Quantize then dequantize (for error analysis and calibration searches, never for storage)."""
    return quantize(x, bits, group, axis, symmetric).dequantize(x.dtype)


# --------------------------------------------------------------------------------------------
# Lookup-table (non-uniform) datatypes: 3-bit packing, nearest level, weighted 1-D k-means
# --------------------------------------------------------------------------------------------


def pack_3bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack 3-bit codes along the last dim, 8 codes into 3 bytes (little-end first): [..., n] -> [..., 3n/8]."""
    n = codes.shape[-1]
    if n % 8:
        raise ValueError(f"last dim {n} is not divisible by 8 (3-bit packing)")
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], n // 8, 8)
    shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=c.device)
    word = (c << shifts).sum(dim=-1)  # [..., n/8], 24 bits used
    out = torch.stack([(word >> s) & 0xFF for s in (0, 8, 16)], dim=-1).to(torch.uint8)
    return out.reshape(*codes.shape[:-1], n // 8 * 3)


def unpack_3bit(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_3bit``: [..., 3m] uint8 -> [..., 8m] uint8 codes."""
    m = packed.shape[-1] // 3
    b = packed.to(torch.int32).reshape(*packed.shape[:-1], m, 3)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=packed.device)
    return ((word.unsqueeze(-1) >> shifts) & 7).to(torch.uint8).reshape(*packed.shape[:-1], m * 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_3bit(codes) if bits == 3 else pack_bits(codes, bits)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_3bit(packed) if bits == 3 else unpack_bits(packed, bits)


def nearest_level(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the ascending lookup table ``lut`` for each element (uint8);
    an exact tie goes to the lower level."""
    mids = (lut[1:] + lut[:-1]) / 2
    return torch.bucketize(x.contiguous(), mids.to(x.dtype)).to(torch.uint8)


def percentile(x: torch.Tensor, q: float, dim: int = -1) -> torch.Tensor:
    """``np.percentile(x, 100 q, axis=dim)`` with linear interpolation (no size limit)."""
    s = torch.sort(x, dim=dim).values
    n = s.shape[dim]
    pos = q * (n - 1)
    lo = int(pos // 1)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    a, b = s.select(dim, lo), s.select(dim, hi)
    return a + (b - a) * frac


def weighted_kmeans_1d(
    points: torch.Tensor, weights: torch.Tensor, k: int, iters: int = 50, seed: int = 0
) -> torch.Tensor:
    """Weighted 1-D k-means (greedy k-means++ seeding, Lloyd updates); returns k ascending centroids.

    ``points``, ``weights``: [N]. Points with zero weight are ignored; with fewer distinct points
    than ``k``, the table repeats its largest point (duplicates are never selected twice).
    """
    x, w = points.double().flatten(), weights.double().flatten()
    keep = w > 0
    x, w = x[keep], w[keep]
    if x.numel() == 0:
        return torch.linspace(-1, 1, k, dtype=torch.float32)
    distinct = torch.unique(x)
    if distinct.numel() <= k:
        pad = distinct[-1:].expand(k - distinct.numel())
        return torch.cat([distinct, pad]).float()
    g = torch.Generator().manual_seed(seed)
    n_trials = 2 + int(torch.log(torch.tensor(float(k))).item())
    centers = x[torch.multinomial(w, 1, generator=g)]
    d2 = (x - centers[0]) ** 2
    for _ in range(1, k):
        cand = x[torch.multinomial(w * d2 + 1e-300, n_trials, replacement=True, generator=g)]
        cand_d2 = torch.minimum(d2.unsqueeze(0), (x.unsqueeze(0) - cand.unsqueeze(1)) ** 2)  # [trials, N]
        best = torch.argmin((cand_d2 * w).sum(dim=1))
        centers = torch.cat([centers, cand[best : best + 1]])
        d2 = cand_d2[best]
    centers = torch.sort(centers).values
    for _ in range(iters):
        assign = torch.bucketize(x, (centers[1:] + centers[:-1]) / 2)
        wsum = torch.zeros(k, dtype=x.dtype).index_add_(0, assign, w)
        wx = torch.zeros(k, dtype=x.dtype).index_add_(0, assign, w * x)
        new = torch.where(wsum > 0, wx / wsum.clamp_min(1e-300), centers)
        new = torch.sort(new).values
        if torch.equal(new, centers):
            break
        centers = new
    return centers.float()
