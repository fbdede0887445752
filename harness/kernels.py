"""Fused kernels for quantized KV caches: Triton on CUDA (and on CPU through Triton's interpreter),
with pure-torch references.

Everything here reads and writes the storage layout of ``harness.quant.QuantizedTensor`` unchanged:
uint8 codes packed little-end first along the last dim (``pack_bits``), fp16 scale and zero-point,
asymmetric min-max ranges (``quantize``). Shapes below: B batch, H query heads, H_kv KV heads,
n_rep = H / H_kv (GQA: query head h reads KV head h // n_rep, as transformers' ``repeat_kv``),
D head dim, G group, b bits, P = 8 / b codes per byte.

Kernels (need ``triton``; ``HAVE_TRITON`` says whether it imported)

* ``triton_quantize_pack(x, bits, group, axis)`` — quantize and pack a chunk in one pass; codes,
  scales and zeros bit-identical to ``harness.quant.quantize``:

  - per-channel keys, ``axis=-2``: x [..., T, D] -> codes [..., T, D/P], scale/zero [..., T/G, D];
    one program per (group of G tokens, leading index) holds the [G, D] tile, reduces min/max over
    the tokens and packs P neighbouring channels per byte;
  - per-token values, ``axis=-1``: x [..., D] -> codes [..., D/P], scale/zero [..., D/G]; a group
    is G contiguous channels, so the tensor is a [N, G] matrix of rows (N = numel / G) whose codes
    are G/P contiguous bytes per row (needs G % P == 0).

  Per group: z = fp16(min), s = fp16((max - z) / (2^b - 1)) (IEEE division, ``div_rn``),
  c = round_half_even(clamp((x - z) / s, 0, 2^b - 1)), c = 0 where s <= 0 (constant group: exact
  up to fp16(min)), all in fp32 as ``quantize`` does, so the codes agree bit for bit. Groups where
  fp16 metadata breaks (a nonzero range whose scale flushes to 0, which the kernel marks with s = -1;
  an infinite zero or scale; a top level z + (2^b - 1)·s above 65504; NaN) get ``quantize``'s
  clamped grid: when any is present the result of ``quantize`` itself is returned (one check per call).

* ``triton_decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, group,
  k_fp, v_fp, scale)`` — one decode step straight from the packed cache (KIVI / MoQAE layout):

  - q [B, H, 1, D];
  - keys per channel: k_codes [B, H_kv, T_k, D/P], k_scale / k_zero [B, H_kv, T_k/G, D], then an
    optional fp16 tail k_fp [B, H_kv, R_k, D];
  - values per token: v_codes [B, H_kv, T_v, D/P], v_scale / v_zero [B, H_kv, T_v, D/G], then an
    optional fp16 tail v_fp [B, H_kv, R_v, D]; T = T_k + R_k = T_v + R_v (KIVI's key and value
    windows split the history at different points);
  - returns softmax(q·Kᵀ·scale)·V, [B, H, 1, D] in q's dtype (scale defaults to D^-1/2).

  Flash-decoding: grid (B·H_kv, splits); each program takes the n_rep query heads of one KV head
  (so each code byte is read once for all of them) and a contiguous slice of the tokens, and walks
  it in tiles of BLOCK_T tokens. A tile's bytes, scales and zeros are loaded and dequantized in
  registers — k̂[t, d] = c[t, d]·s[t // G, d] + z[t // G, d], v̂[t, d] = c[t, d]·s[t, d // G] +
  z[t, d // G], with c = (byte[t, d // P] >> b·(d mod P)) & (2^b - 1) — or taken from the fp16
  tail past T_k / T_v; scores = q·k̂ᵀ (``tl.dot``, query heads padded to 16 rows), online softmax
  in base 2 (running max m, sum l, accumulator acc [n_rep, D]). A second kernel merges the
  splits: M = max m_s, out = Σ_s 2^(m_s - M)·acc_s / Σ_s 2^(m_s - M)·l_s. The dequantized cache
  never exists in memory: per step the kernel reads codes + scales/zeros + the fp16 tail once.

References (pure torch, any device)

* ``decode_attention_reference`` — what the harness does today: ``QuantizedTensor.dequantize`` the
  history into one [B, H_kv, T, D] tensor (fp16 tail copied behind it), then softmax attention.
* ``decode_attention_from_codes`` — attends from the codes without the dequantized history,
  applying scales and zeros after grouped matmuls on the unpacked codes c (floats, no scale pass):

  - per-channel keys, token t in group g = t // G:
    q·k̂_t = Σ_d (q_d·s_{g,d})·c_{t,d} + Σ_d q_d·z_{g,d};
    as tensors: qs [B, H_kv, T_k/G, n_rep, D] = q ⊙ s, scores = c.view(.., T_k/G, G, D) @ qsᵀ
    plus bias q @ zᵀ [B, H_kv, T_k/G, n_rep] broadcast over the G tokens of each group;
  - per-token values, channel d in group g = d // G:
    out_d = Σ_t (p_t·s_{t,g})·c_{t,d} + Σ_t p_t·z_{t,g};
    ps [B, H_kv, n_rep, T_v, D/G] = p ⊙ s, out = block diagonal of psᵀ @ c [.., T_v, D], plus p @ z.

  The computation is ``harness.from_codes.decode_attention_over``, the path the stores' ``attend``
  takes: the codes c unpacked by plane (``harness.quant.unpack_planes``: [.., P, T, D/P], channel
  P·j + i at [i, j], into a reused CPU workspace), each product one matmul batched over the P
  planes, the query (or the result) split or merged the same way.

Sources. KIVI (Liu et al., ICML 2024), official code jy-yuan/KIVI, ``quant/new_pack.py``
(``triton_quantize_and_pack_along_last_dim``: a Triton min/max kernel, then torch scale / round,
then a Triton kernel packing 32/b codes per int32; ``quant_and_pack_kcache`` / ``_vcache`` the
torch versions) and ``quant/matmul.py`` + ``quant/csrc/gemv_cuda.cu`` (``cuda_bmm_fA_qB_outer``:
a GEMV that multiplies fp16 activations with packed codes, shifting and masking each code out of
its word and applying its group's scale and zero in registers; used twice per decode step in
``models/llama_kivi.py``, for q·Kᵀ on the transposed per-channel keys and for p·V on the per-token
values, with a torch softmax in between). The kernels here are written from that description, not
copied: they keep the harness's byte packing (codes along D, keys not transposed), fuse the
quantizer into one kernel (ranges, rounding and packing), and fuse both products and the softmax
into one flash-decoding kernel (Dao et al., "Flash-Decoding for long-context inference", 2023).

On CPU tensors the Triton kernels run only through Triton's interpreter (numpy; slow, for tests):
set ``TRITON_INTERPRET=1`` before ``triton`` is first imported (``interpreted()`` tells). In that
mode CUDA tensors go through the interpreter too.
"""

import math

import torch

from harness.from_codes import decode_attention_over
from harness.quant import META_MAX, SUPPORTED_BITS, QuantizedTensor, quantize

try:  # optional: CPU-only installs never need it
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # ImportError, or a broken install (missing CUDA driver bits, ...)
    triton = None
    tl = None
    HAVE_TRITON = False

__all__ = [
    "HAVE_TRITON",
    "interpreted",
    "triton_quantize_pack",
    "triton_decode_attention",
    "decode_attention_reference",
    "decode_attention_from_codes",
    "decode_bytes",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.0 / math.log(2.0)  # exp(x) = 2^(x·log2 e)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if HAVE_TRITON:

    @triton.jit
    def _quant_channel_kernel(
        x_ptr,  # [L, T, D] float
        codes_ptr,  # [L, T, D / P] uint8
        scale_ptr,  # [L, T / G, D] fp16
        zero_ptr,  # [L, T / G, D] fp16
        T,
        D: tl.constexpr,
        G: tl.constexpr,
        BITS: tl.constexpr,
        P: tl.constexpr,  # codes per byte
        QMAX: tl.constexpr,  # 2^b - 1, as a float
        BLOCK_G: tl.constexpr,  # next power of two >= G
        BLOCK_NB: tl.constexpr,  # next power of two >= D / P
    ):
        """Per-channel ranges over G tokens; one program per (token group, leading index)."""
        grp = tl.program_id(0)  # token group (the long grid axis)
        row = tl.program_id(1).to(tl.int64)
        nb = D // P
        offs_g = tl.arange(0, BLOCK_G)
        offs_j = tl.arange(0, BLOCK_NB)  # byte within a token's row
        offs_p = tl.arange(0, P)  # code within a byte
        offs_t = grp * G + offs_g
        g_ok = offs_g < G
        j_ok = offs_j < nb
        chan = offs_j[:, None] * P + offs_p[None, :]  # [NB, P]: channel of each (byte, code)
        mask = g_ok[:, None, None] & j_ok[None, :, None]  # [G, NB, P]
        x = tl.load(x_ptr + row * T * D + offs_t[:, None, None] * D + chan[None, :, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        lo = tl.min(tl.where(mask, x, float("inf")), axis=0)  # [NB, P]
        hi = tl.max(tl.where(mask, x, float("-inf")), axis=0)
        zero16 = lo.to(tl.float16)
        z = zero16.to(tl.float32)
        exact = tl.math.div_rn(hi - z, tl.full(hi.shape, QMAX, tl.float32))
        scale16 = exact.to(tl.float16)
        s = scale16.to(tl.float32)
        flushed = (exact > 0) & (s == 0)  # a range whose fp16 scale underflows: marked -1 for the host
        safe = tl.where(s > 0, s, 1.0)
        v = tl.math.div_rn(x - z[None, :, :], tl.broadcast_to(safe[None, :, :], x.shape))
        v = tl.minimum(tl.maximum(v, 0.0), QMAX)
        r = v.to(tl.int32)  # floor (v >= 0)
        frac = v - r.to(tl.float32)  # exact
        up = (frac > 0.5) | ((frac == 0.5) & ((r & 1) == 1))  # round half to even, as torch.round
        q = r + up.to(tl.int32)
        q = tl.where(s[None, :, :] > 0, q, 0)
        packed = tl.sum(q << (offs_p * BITS)[None, None, :], axis=2)  # [G, NB]
        tl.store(
            codes_ptr + row * T * nb + offs_t[:, None] * nb + offs_j[None, :],
            packed.to(tl.uint8),
            mask=g_ok[:, None] & j_ok[None, :],
        )
        meta = row * (T // G) * D + grp * D + chan
        tl.store(scale_ptr + meta, tl.where(flushed, -1.0, s).to(tl.float16), mask=j_ok[:, None])
        tl.store(zero_ptr + meta, zero16, mask=j_ok[:, None])

    @triton.jit
    def _quant_token_kernel(
        x_ptr,  # [N, G] float (rows = groups of G contiguous channels)
        codes_ptr,  # [N, G / P] uint8
        scale_ptr,  # [N] fp16
        zero_ptr,  # [N] fp16
        N,
        G: tl.constexpr,
        BITS: tl.constexpr,
        P: tl.constexpr,
        QMAX: tl.constexpr,
        BLOCK_R: tl.constexpr,  # rows per program
        BLOCK_GB: tl.constexpr,  # next power of two >= G / P
    ):
        """Per-token ranges over G channels; one program per BLOCK_R groups."""
        gb = G // P
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_j = tl.arange(0, BLOCK_GB)
        offs_p = tl.arange(0, P)
        r_ok = rows < N
        j_ok = offs_j < gb
        mask = r_ok[:, None, None] & j_ok[None, :, None]  # [R, GB, P]
        chan = offs_j[:, None] * P + offs_p[None, :]  # [GB, P]
        x = tl.load(x_ptr + rows[:, None, None] * G + chan[None, :, :], mask=mask, other=0.0).to(tl.float32)
        lo = tl.min(tl.min(tl.where(mask, x, float("inf")), axis=2), axis=1)  # [R]
        hi = tl.max(tl.max(tl.where(mask, x, float("-inf")), axis=2), axis=1)
        zero16 = lo.to(tl.float16)
        z = zero16.to(tl.float32)
        exact = tl.math.div_rn(hi - z, tl.full(hi.shape, QMAX, tl.float32))
        scale16 = exact.to(tl.float16)
        s = scale16.to(tl.float32)
        flushed = (exact > 0) & (s == 0)  # a range whose fp16 scale underflows: marked -1 for the host
        safe = tl.where(s > 0, s, 1.0)
        v = tl.math.div_rn(x - z[:, None, None], tl.broadcast_to(safe[:, None, None], x.shape))
        v = tl.minimum(tl.maximum(v, 0.0), QMAX)
        r = v.to(tl.int32)
        frac = v - r.to(tl.float32)
        up = (frac > 0.5) | ((frac == 0.5) & ((r & 1) == 1))
        q = r + up.to(tl.int32)
        q = tl.where(s[:, None, None] > 0, q, 0)
        packed = tl.sum(q << (offs_p * BITS)[None, None, :], axis=2)  # [R, GB]
        tl.store(codes_ptr + rows[:, None] * gb + offs_j[None, :], packed.to(tl.uint8), mask=r_ok[:, None] & j_ok)
        tl.store(scale_ptr + rows, tl.where(flushed, -1.0, s).to(tl.float16), mask=r_ok)
        tl.store(zero_ptr + rows, zero16, mask=r_ok)

    @triton.jit
    def _decode_split_kernel(
        q_ptr,  # [BH, NREP, D] (BH = B·H_kv)
        kc_ptr,  # [BH, TK, D / P] uint8
        ks_ptr,  # [BH, TK / G, D]
        kz_ptr,
        vc_ptr,  # [BH, TV, D / P] uint8
        vs_ptr,  # [BH, TV, D / G]
        vz_ptr,
        kf_ptr,  # [BH, T - TK, D] fp16 key tail
        vf_ptr,  # [BH, T - TV, D] fp16 value tail
        m_ptr,  # [BH, S, BLOCK_R] fp32 running max (base 2)
        l_ptr,  # [BH, S, BLOCK_R] fp32 running sum
        acc_ptr,  # [BH, S, BLOCK_R, BLOCK_D] fp32 unnormalised output
        TK,
        TV,
        T,
        SPLIT_LEN,
        N_SPLITS,
        qk_scale,  # softmax scale · log2(e)
        NREP: tl.constexpr,
        D: tl.constexpr,
        G: tl.constexpr,
        BITS: tl.constexpr,
        P: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_T: tl.constexpr,
        INPUT_PREC: tl.constexpr,
    ):
        """Online-softmax attention of one KV head's n_rep queries over one slice of tokens."""
        bh = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        db = D // P  # bytes per token row
        ngv = D // G  # value groups per token
        code_mask = (1 << BITS) - 1
        offs_r = tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        r_ok = offs_r < NREP
        d_ok = offs_d < D
        byte_d = offs_d // P
        shift_d = (offs_d % P) * BITS
        vgrp_d = offs_d // G
        q = tl.load(
            q_ptr + bh * NREP * D + offs_r[:, None] * D + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0
        )
        kc_base = kc_ptr + bh * TK * db
        ks_base = ks_ptr + bh * (TK // G) * D
        kz_base = kz_ptr + bh * (TK // G) * D
        kf_base = kf_ptr + bh * (T - TK) * D
        vc_base = vc_ptr + bh * TV * db
        vs_base = vs_ptr + bh * TV * ngv
        vz_base = vz_ptr + bh * TV * ngv
        vf_base = vf_ptr + bh * (T - TV) * D

        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        t_begin = split * SPLIT_LEN
        t_end = tl.minimum(t_begin + SPLIT_LEN, T)
        for start in range(t_begin, t_end, BLOCK_T):
            offs_t = start + tl.arange(0, BLOCK_T)
            t_ok = offs_t < t_end
            # keys, as a transposed tile [BLOCK_D, BLOCK_T]: codes before TK, fp16 tail after
            kq_ok = t_ok & (offs_t < TK)
            kf_ok = t_ok & (offs_t >= TK)
            mk = d_ok[:, None] & kq_ok[None, :]
            kb = tl.load(kc_base + offs_t[None, :] * db + byte_d[:, None], mask=mk, other=0).to(tl.int32)
            kcode = ((kb >> shift_d[:, None]) & code_mask).to(tl.float32)
            kmeta = (offs_t // G)[None, :] * D + offs_d[:, None]
            ksc = tl.load(ks_base + kmeta, mask=mk, other=0.0).to(tl.float32)
            kzr = tl.load(kz_base + kmeta, mask=mk, other=0.0).to(tl.float32)
            kfp = tl.load(
                kf_base + (offs_t - TK)[None, :] * D + offs_d[:, None], mask=d_ok[:, None] & kf_ok[None, :], other=0.0
            ).to(tl.float32)
            k = tl.where(kq_ok[None, :], kcode * ksc + kzr, kfp)
            s = tl.dot(q, k.to(q.dtype), input_precision=INPUT_PREC) * qk_scale  # [BLOCK_R, BLOCK_T]
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            # values, tile [BLOCK_T, BLOCK_D]: codes before TV, fp16 tail after
            vq_ok = t_ok & (offs_t < TV)
            vf_ok = t_ok & (offs_t >= TV)
            mv = vq_ok[:, None] & d_ok[None, :]
            vb = tl.load(vc_base + offs_t[:, None] * db + byte_d[None, :], mask=mv, other=0).to(tl.int32)
            vcode = ((vb >> shift_d[None, :]) & code_mask).to(tl.float32)
            vmeta = offs_t[:, None] * ngv + vgrp_d[None, :]
            vsc = tl.load(vs_base + vmeta, mask=mv, other=0.0).to(tl.float32)
            vzr = tl.load(vz_base + vmeta, mask=mv, other=0.0).to(tl.float32)
            vfp = tl.load(
                vf_base + (offs_t - TV)[:, None] * D + offs_d[None, :], mask=vf_ok[:, None] & d_ok[None, :], other=0.0
            ).to(tl.float32)
            v = tl.where(vq_ok[:, None], vcode * vsc + vzr, vfp)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=INPUT_PREC)
            m_i = m_new
        part = bh * N_SPLITS + split
        tl.store(m_ptr + part * BLOCK_R + offs_r, m_i)
        tl.store(l_ptr + part * BLOCK_R + offs_r, l_i)
        tl.store(acc_ptr + (part * BLOCK_R + offs_r[:, None]) * BLOCK_D + offs_d[None, :], acc)

    @triton.jit
    def _decode_combine_kernel(
        m_ptr,
        l_ptr,
        acc_ptr,
        out_ptr,  # [BH, NREP, D]
        N_SPLITS,
        NREP: tl.constexpr,
        D: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Merge the splits of one KV head: out = Σ 2^(m_s - M)·acc_s / Σ 2^(m_s - M)·l_s."""
        bh = tl.program_id(0).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        m_run = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_run = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for split in range(0, N_SPLITS):
            part = bh * N_SPLITS + split
            m = tl.load(m_ptr + part * BLOCK_R + offs_r)
            lsum = tl.load(l_ptr + part * BLOCK_R + offs_r)
            a = tl.load(acc_ptr + (part * BLOCK_R + offs_r[:, None]) * BLOCK_D + offs_d[None, :])
            m_new = tl.maximum(m_run, m)
            c_old = tl.exp2(m_run - m_new)
            c_new = tl.exp2(m - m_new)
            l_run = l_run * c_old + lsum * c_new
            acc = acc * c_old[:, None] + a * c_new[:, None]
            m_run = m_new
        out = acc / l_run[:, None]
        mask = (offs_r < NREP)[:, None] & (offs_d < D)[None, :]
        tl.store(
            out_ptr + bh * NREP * D + offs_r[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask
        )


def interpreted() -> bool:
    """Whether the kernels run through Triton's interpreter (``TRITON_INTERPRET=1`` was set when
    ``triton`` and this module were imported): the only way they run on CPU tensors."""
    return HAVE_TRITON and type(_decode_split_kernel).__name__ == "InterpretedFunction"


def _require_triton() -> None:
    if not HAVE_TRITON:
        raise RuntimeError(
            "harness.kernels: triton is not installed (pip install 'triton>=3.0', or the project's "
            "'gpu' / 'dev' extra); the torch references decode_attention_reference / "
            "decode_attention_from_codes and harness.quant.quantize work without it"
        )


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not interpreted():
        raise RuntimeError(
            f"harness.kernels: the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
            f"imported to run them through Triton's interpreter on {t.device.type} (slow; for tests)"
        )


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return 8 // bits


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class _on_device:
    """``torch.cuda.device(t.device)`` for CUDA tensors, nothing otherwise."""

    def __init__(self, t: torch.Tensor):
        self.ctx = torch.cuda.device(t.device) if t.device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


# --------------------------------------------------------------------------------------------
# Fused quantize + pack
# --------------------------------------------------------------------------------------------


def triton_quantize_pack(x: torch.Tensor, bits: int, group: int, axis: int = -1) -> QuantizedTensor:
    """Quantize and pack ``x`` in one kernel; the result equals ``harness.quant.quantize(x, bits,
    group, axis)`` (asymmetric): codes bit for bit, scale and zero exactly.

    ``axis=-2``: per-channel ranges over groups of ``group`` tokens, x [..., T, D] (keys, KIVI /
    MoQAE); ``axis=-1``: per-token ranges over groups of ``group`` channels, x [..., D] (values).
    ``x``: fp16, bf16 or fp32, CUDA (compiled) or CPU (Triton's interpreter).
    """
    _require_triton()
    _check_device(x)
    per_byte = _check_bits(bits)
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be one of {FLOAT_DTYPES}, got {x.dtype}")
    axis = axis - x.dim() if axis >= 0 else axis
    if axis not in (-1, -2) or x.dim() < -axis:
        raise ValueError(f"axis must be -1 (per token) or -2 (per channel) of a tensor with enough dims, got {axis}")
    x = x.contiguous()
    d = x.shape[-1]
    if d % per_byte:
        raise ValueError(f"last dim {d} is not divisible by {per_byte} ({bits}-bit packing)")
    n = x.shape[axis]
    if group < 1 or n % group:
        raise ValueError(f"group size {group} does not divide axis of length {n}")
    codes = torch.empty(*x.shape[:-1], d // per_byte, dtype=torch.uint8, device=x.device)
    meta_shape = list(x.shape)
    meta_shape[axis] = n // group
    scale = torch.empty(meta_shape, dtype=torch.float16, device=x.device)
    zero = torch.empty(meta_shape, dtype=torch.float16, device=x.device)
    qmax = float(2**bits - 1)
    if x.numel():
        with _on_device(x):
            if axis == -2:
                lead = x.numel() // (n * d)
                _quant_channel_kernel[(n // group, lead)](
                    x, codes, scale, zero, n,
                    D=d, G=group, BITS=bits, P=per_byte, QMAX=qmax,
                    BLOCK_G=_pow2(group), BLOCK_NB=_pow2(d // per_byte), num_warps=4,
                )  # fmt: skip
            else:
                if group % per_byte:
                    raise ValueError(
                        f"per-token groups of {group} channels do not fill whole bytes at {bits} bits "
                        f"(group must be a multiple of {per_byte})"
                    )
                rows = x.numel() // group
                block_r = max(1, min(_pow2(rows), 4096 // _pow2(group)))
                _quant_token_kernel[(triton.cdiv(rows, block_r),)](
                    x, codes, scale, zero, rows,
                    G=group, BITS=bits, P=per_byte, QMAX=qmax,
                    BLOCK_R=block_r, BLOCK_GB=_pow2(group // per_byte), num_warps=4,
                )  # fmt: skip
    # groups where fp16 metadata breaks (a scale that flushed to 0, marked -1 by the kernel; an infinite zero
    # or scale; a top level above 65504): harness.quant clamps them, so its result is returned instead
    top = zero.float() + qmax * scale.float()
    if bool(((scale < 0) | ~torch.isfinite(top) | (top > META_MAX)).any()):
        return quantize(x, bits, group, axis)
    return QuantizedTensor(codes=codes, scale=scale, zero=zero, bits=bits, axis=axis, group=group)


# --------------------------------------------------------------------------------------------
# Decode attention
# --------------------------------------------------------------------------------------------


def _decode_shapes(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, group, k_fp, v_fp):
    """Validate the cache layout; return (B, H, H_kv, n_rep, D, T_k, T_v, T)."""
    per_byte = _check_bits(bits)
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must be [B, H, 1, D] (one decode step), got {tuple(q.shape)}")
    b, h, _, d = q.shape
    hkv = k_codes.shape[1]
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} KV heads")
    tk, tv = k_codes.shape[2], v_codes.shape[2]
    rk = 0 if k_fp is None else k_fp.shape[2]
    rv = 0 if v_fp is None else v_fp.shape[2]
    if tk + rk != tv + rv:
        raise ValueError(f"keys hold {tk}+{rk} tokens but values {tv}+{rv}")
    if tk + rk == 0:
        raise ValueError("empty cache: nothing to attend to")
    if d % group or tk % group:
        raise ValueError(f"group {group} must divide head_dim {d} and the quantized key length {tk}")
    expect = {
        "k_codes": (k_codes, (b, hkv, tk, d // per_byte)),
        "k_scale": (k_scale, (b, hkv, tk // group, d)),
        "k_zero": (k_zero, (b, hkv, tk // group, d)),
        "v_codes": (v_codes, (b, hkv, tv, d // per_byte)),
        "v_scale": (v_scale, (b, hkv, tv, d // group)),
        "v_zero": (v_zero, (b, hkv, tv, d // group)),
        "k_fp": (k_fp, (b, hkv, rk, d)),
        "v_fp": (v_fp, (b, hkv, rv, d)),
    }
    for name, (t, shape) in expect.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if k_codes.dtype != torch.uint8 or v_codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8 (harness.quant.pack_bits), got {k_codes.dtype} / {v_codes.dtype}")
    return b, h, hkv, h // hkv, d, tk, tv, tk + rk


def triton_decode_attention(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    bits: int,
    group: int,
    k_fp: torch.Tensor | None = None,
    v_fp: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    num_splits: int | None = None,
    block_t: int | None = None,
) -> torch.Tensor:
    """One decode step, softmax(q·Kᵀ·scale)·V over [packed keys | k_fp] and [packed values | v_fp],
    straight from the codes (see the module docstring for the layout and the algorithm).

    q [B, H, 1, D] (fp16 / bf16: dot products on those types with fp32 accumulation; fp32: IEEE
    fp32 dots); keys per channel, values per token, ``bits`` 2, 4 or 8, group ``group``.
    ``num_splits`` (split-K over tokens; default: enough programs to fill the GPU, 1 on CPU) and
    ``block_t`` (tokens per tile) tune the launch. Returns [B, H, 1, D] in q's dtype.
    """
    _require_triton()
    _check_device(q)
    b, h, hkv, n_rep, d, tk, tv, t = _decode_shapes(
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, group, k_fp, v_fp
    )
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q must be one of {FLOAT_DTYPES}, got {q.dtype}")
    per_byte = 8 // bits
    scale = d**-0.5 if scale is None else float(scale)
    block_d = max(16, _pow2(d))
    block_r = max(16, _pow2(n_rep))
    block_t = block_t or max(16, min(64, 4096 // block_d))
    if num_splits is None:
        if q.device.type == "cuda":
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count
            num_splits = min(triton.cdiv(2 * sms, b * hkv), triton.cdiv(t, 4 * block_t))  # >= 4 tiles each
        else:
            num_splits = 1
    num_splits = max(1, min(int(num_splits), triton.cdiv(t, block_t)))
    split_len = triton.cdiv(triton.cdiv(t, num_splits), block_t) * block_t
    num_splits = triton.cdiv(t, split_len)

    dev = q.device

    def arg(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:  # a valid pointer even when empty
        return torch.zeros(1, dtype=dtype, device=dev) if x is None or x.numel() == 0 else x.contiguous()

    qc = q.contiguous()
    kc, ks, kz = arg(k_codes, torch.uint8), arg(k_scale, torch.float16), arg(k_zero, torch.float16)
    vc, vs, vz = arg(v_codes, torch.uint8), arg(v_scale, torch.float16), arg(v_zero, torch.float16)
    k_fp, v_fp = arg(k_fp, torch.float16), arg(v_fp, torch.float16)
    m = torch.empty(b * hkv, num_splits, block_r, dtype=torch.float32, device=dev)
    lsum = torch.empty_like(m)
    acc = torch.empty(b * hkv, num_splits, block_r, block_d, dtype=torch.float32, device=dev)
    out = torch.empty(b, h, 1, d, dtype=q.dtype, device=dev)
    with _on_device(q):
        _decode_split_kernel[(b * hkv, num_splits)](
            qc, kc, ks, kz, vc, vs, vz, k_fp, v_fp,
            m, lsum, acc, tk, tv, t, split_len, num_splits, scale * LOG2E,
            NREP=n_rep, D=d, G=group, BITS=bits, P=per_byte,
            BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_T=block_t,
            INPUT_PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4,
        )  # fmt: skip
        _decode_combine_kernel[(b * hkv,)](
            m, lsum, acc, out, num_splits, NREP=n_rep, D=d, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4
        )
    return out


# --------------------------------------------------------------------------------------------
# torch references
# --------------------------------------------------------------------------------------------


def decode_attention_reference(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    bits: int,
    group: int,
    k_fp: torch.Tensor | None = None,
    v_fp: torch.Tensor | None = None,
    scale: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize-then-attend (the harness's read path): the history K̂ = [dequant(keys) | k_fp],
    V̂ = [dequant(values) | v_fp] as [B, H_kv, T, D] ``dtype`` tensors (each part written into its
    slice, as ``harness.storage.read_tokens`` does), then for q viewed [B, H_kv, n_rep, D]:
    out = softmax(q·K̂ᵀ·scale)·V̂ -> [B, H, 1, D] in q's dtype. Same arguments as
    ``triton_decode_attention``; ``dtype`` is the compute dtype."""
    b, h, hkv, n_rep, d, tk, tv, t = _decode_shapes(
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, group, k_fp, v_fp
    )
    scale = d**-0.5 if scale is None else float(scale)
    k = torch.empty(b, hkv, t, d, dtype=dtype, device=q.device)
    v = torch.empty_like(k)
    if tk:
        QuantizedTensor(k_codes, k_scale, k_zero, bits, axis=-2, group=group).dequantize(dtype, out=k[..., :tk, :])
    if tk < t:
        k[..., tk:, :].copy_(k_fp)
    if tv:
        QuantizedTensor(v_codes, v_scale, v_zero, bits, axis=-1, group=group).dequantize(dtype, out=v[..., :tv, :])
    if tv < t:
        v[..., tv:, :].copy_(v_fp)
    qg = q.reshape(b, hkv, n_rep, d).to(dtype)
    p = torch.softmax(torch.matmul(qg, k.transpose(-1, -2)) * scale, dim=-1)  # [B, H_kv, n_rep, T]
    return torch.matmul(p, v).reshape(b, h, 1, d).to(q.dtype)


def decode_attention_from_codes(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    bits: int,
    group: int,
    k_fp: torch.Tensor | None = None,
    v_fp: torch.Tensor | None = None,
    scale: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Attention from the codes, scales and zeros applied after grouped matmuls (no dequantized
    history; the codes are unpacked to ``dtype`` floats plane by plane, ``unpack_planes``).

    With qg = q·scale viewed [B, H_kv, n_rep, D], c the unpacked codes, G = ``group``:

    * quantized keys, c [B, H_kv, T_k, D], s / z [B, H_kv, T_k/G, D]:
      scores[.., r, t] = Σ_d (qg_{r,d}·s_{t//G,d})·c_{t,d} + Σ_d qg_{r,d}·z_{t//G,d}, computed as
      c.view(B, H_kv, T_k/G, G, D) @ (qg ⊙ s)ᵀ [.., T_k/G, D, n_rep] plus (z @ qgᵀ) per group;
    * softmax over [quantized | fp16 tail] scores -> p [B, H_kv, n_rep, T];
    * quantized values, c [B, H_kv, T_v, D/G, G], s / z [B, H_kv, T_v, D/G]:
      out[.., r, g, j] = Σ_t (p_{r,t}·s_{t,g})·c_{t,g,j} + Σ_t p_{r,t}·z_{t,g}: one matmul
      (p ⊙ s)ᵀ [.., n_rep·D/G, T_v] @ c [.., T_v, D] whose block diagonal (row group g, channel
      group g) is the first sum (D/G times the useful flops, but c is read once, in place), then
      the bias p @ z broadcast over the G channels of each group; plus p_tail @ v_fp.

    Same arguments and result as ``decode_attention_reference``.
    """
    _decode_shapes(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, group, k_fp, v_fp)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    keys = [QuantizedTensor(k_codes, k_scale, k_zero, bits, axis=-2, group=group), k_fp]
    values = [QuantizedTensor(v_codes, v_scale, v_zero, bits, axis=-1, group=group), v_fp]
    keys = [x for x in keys if x is not None and x.shape[-2]]
    values = [x for x in values if x is not None and x.shape[-2]]
    out = decode_attention_over(q.to(dtype), keys, values, scale)  # the stores' own from-codes path
    return out.to(q.dtype)


def decode_bytes(
    q: torch.Tensor,
    tensors: list[torch.Tensor | None],
) -> int:
    """Bytes one decode step must move at least: q, the output and every cache tensor given
    (codes, scales, zeros, fp16 tails), for achieved-bandwidth figures."""
    n = 2 * q.numel() * q.element_size()
    return n + sum(t.numel() * t.element_size() for t in tensors if t is not None)
