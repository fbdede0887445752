"""KVQuant (Hooper et al. 2024, arXiv:2401.18079): pre-RoPE per-channel keys, non-uniform datatypes,
dense-and-sparse outliers, attention-sink-aware fp16 first token.

Official code: ``SqueezeAILab/KVQuant`` — ``quant/kvquant/simquant_module_quantizer.py`` (``SimQuant``
calibration, ``quant_fn_nuq_recon``, ``get_outliers`` / ``get_outliers_dynamic``),
``quant/llama_simquant.py`` (which tensors get which quantizer) and ``gradients/run-fisher.py``
(Fisher information). Where the paper and the code differ, the code is followed:

* **Keys** are the k_proj output (pre-RoPE, ``obs.pre_rope_keys``), quantized **per channel** of the
  whole k_proj output (H_kv·D channels) with **static** ranges from calibration: lower/upper =
  the 0.5th / 99.5th percentile of each channel over the calibration tokens (``np.percentile``,
  linear interpolation; min / max without dense-and-sparse), zp = (upper + lower)/2,
  r = (upper − lower)/2, x' = (k − zp)/r. With dense-and-sparse, keys strictly outside
  [lower, upper] are outliers. ``read`` dequantizes and re-applies RoPE; cos/sin are recomputed with
  the model's own rotary-embedding module (taken in ``attach``) from the token positions, which are
  implicit (token i of the cache is position i: the harness never evicts), so nothing per token is
  kept for RoPE. RoPE variants whose tables depend on the sequence length (dynamic NTK, longrope)
  are refused.
* **Values** are quantized **per token, dynamically**; as in the code (``v_proj`` output rows), one
  range spans the whole v_proj output of a token (all KV heads), not one head. With
  dense-and-sparse, per-token outliers are the entries ≥ the 99.5th or ≤ the 0.5th percentile of the
  token (``get_outliers_dynamic``: inclusive), and the range is the min / max of the remaining
  entries.
* **nuq datatype**: per layer one lookup table of 2^b levels for K and one for V in the normalized
  domain x' ∈ [−1, 1], fitted by k-means weighted by Fisher information (the squared gradient of the
  LM loss w.r.t. the k_proj / v_proj outputs, as ``run-fisher.py``) on every calibration element
  that is neither an outlier (|x'| > 1) nor one of the ``first_few_fp16`` tokens of a window.
  Deviation (``FISHER_GRAD = "cut"``, kept so that calibrations stay what they were): every
  layer's k_proj / v_proj output is a fresh gradient leaf, so a layer's gradient misses the paths
  through the later layers' k_proj / v_proj; ``run-fisher.py`` keeps them (``retain_grad``, the
  ``"full"`` mode of ``harness.integration.capture``).
  The official code runs sklearn ``KMeans(max_iter=50, k-means++)`` on all elements; here the
  normalized elements are first summed into a 16384-bin weighted histogram over [−1, 1] (each bin
  at the weighted mean of its elements, so memory does not grow with the calibration set), then a
  weighted Lloyd k-means with greedy k-means++ seeding (seed 0) runs on the bins, at most
  ``kmeans_iters`` = 50 iterations. Reconstruction picks the nearest level (ties: the lower level,
  as ``argmin`` in ``round_to_nearest_pole_sim``). Codes are b-bit indices packed with
  ``harness.quant.pack_bits`` (2 and 4 bits) or, for 3 bits, eight codes per three bytes
  (``pack_3bit``), so 3-bit codes really take 3 bits.
* **Dense-and-sparse**: outliers are kept exactly in fp16, each with an int32 index into the
  token-major [T, B, H_kv·D] layout of the quantized segment (int64 once that layout outgrows
  int32), counted as category "outliers" (2 + 4 bytes each).
* **Attention sink**: the first ``first_few_fp16`` tokens (default 1; the code's default is −1,
  off) are stored in fp16 (post-RoPE keys) and never quantized. As in the code they are excluded
  from the k-means but *included* in the per-channel key ranges of the calibration.
* **Calibration** uses the windows the harness passes (the runner: 16 windows of the calibration
  split); the k_proj / v_proj outputs and their loss gradients come from
  ``harness.integration.capture``. The result is cached under ``$MOQAE_HARNESS_CACHE/calibration``
  (default ``~/.cache/moqae-harness/calibration``; ``harness.files.calibration_cache_path``), keyed
  by the model (config and a parameter fingerprint), the method options and the calibration token
  ids, so a second run does not recalibrate.
* **Accounting**: packed codes ("codes"); the per-token value ranges (fp16 lower/upper) plus, once
  per layer, the static per-channel key ranges (fp16) and the two fp32 lookup tables ("scales");
  the sink tokens ("fp_tokens"); outlier values and indices ("outliers"). Nominal bits count b per
  quantized element and 16 per outlier or sink element.

**Decode cost.** Each decode step reads the whole history back (``read``, then sdpa). KVQuant's own
part of it: the non-uniform lookup (every code indexes a table: per-channel key levels, one value
table scaled by the token's range), RoPE re-applied to every dequantized pre-RoPE key, the sparse fp16
outliers put back, and per appended token the value outliers' two percentiles. The official code fuses
the first three into the attention matvec with custom CUDA kernels (``deployment/kvquant/
quant_cuda_kernel.cu``: ``vecquant4matmul_nuq_perchannel_transposed_rope_mha_batched_fused``, a CSR
SpMV with RoPE for the outliers; ``vecquant4appendvecK``); here they are torch ops over the history
(4-bit codes looked up a byte at a time straight into the attention layout, RoPE on contiguous halves,
no other copy of the history), bit-identical to dequantize-then-rotate. ``python tests/bench/method_parts.py
kvquant`` (parts: ``tests/bench/parts_kvquant.py``) times each piece alone against int4's decode
step; the numbers are in docs/results.md.

Not reproduced: the code's optional Q-Norm (``--norm``, used for its 2-bit DBRX checkpoints),
per-token outlier capping (``--cap_outliers``) and the NormalFloat tables (``--nf``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
from pydantic import Field

from baselines.kvquant_calibration import (
    NUQ_BITS,
    LayerCalibration,
    _denormalize,
    _fp16_outward,
    _load_calibration,
    _nearest_level,
    _normalize,
    _save_calibration,
    calibrate_kvquant,
    calibration_cache_path,
    channel_outliers,
    token_outliers,
)
from harness.integration import (
    RopeTables,
    calibration_mode,
    model_info,
    rope_tables,
)
from harness.interface import (
    KVCacheMethod,
    LayerStore,
    MemoryReport,
    MethodConfig,
    MethodSpecError,
    ModelInfo,
    Observation,
    ReportStyle,
    UnsupportedModelError,
    Variant,
    tensor_bytes,
)
from harness.options import NonNegativeInt, OneOf, PositiveInt
from harness.quant import code_table, pack_codes, unpack_codes
from harness.storage import FullPrecisionSeq

# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


class _Sparse:
    """Outliers kept exactly: fp16 values at flat indices of the token-major [T, B, C] layout."""

    def __init__(self) -> None:
        self.idx: torch.Tensor | None = None  # int32 (int64 beyond 2^31 elements)
        self.val: torch.Tensor | None = None  # fp16

    def append(self, x: torch.Tensor, mask: torch.Tensor, offset: int) -> None:
        """``x``, ``mask``: [Tc, B, C] of a new chunk starting at flat element ``offset``."""
        flat = torch.nonzero(mask.reshape(-1)).squeeze(-1) + offset
        if flat.numel() == 0:
            return
        val = x.reshape(-1)[flat - offset].to(torch.float16)
        idx_dtype = torch.int32 if int(flat.max()) < 2**31 else torch.int64
        if self.idx is None:
            self.idx, self.val = flat.to(idx_dtype), val
            return
        if idx_dtype == torch.int64 or self.idx.dtype == torch.int64:
            self.idx = self.idx.to(torch.int64)
            idx_dtype = torch.int64
        self.idx = torch.cat([self.idx, flat.to(idx_dtype)])
        self.val = torch.cat([self.val, val])

    @property
    def count(self) -> int:
        return 0 if self.idx is None else self.idx.numel()

    def scatter_bhtd(self, dense: torch.Tensor, t0: int) -> None:
        """Write the outliers into ``dense`` [B, H, T', D] (contiguous float) at tokens t0, t0 + 1, ...:
        token-major flat index i = (t·B + b)·C + h·D + d goes to ((b·H + h)·T' + t0 + t)·D + d."""
        if self.idx is None:
            return
        bb, hh, tt, dd = dense.shape
        i = self.idx if dense.numel() < 2**31 else self.idx.long()  # every value below stays < numel
        t, bc = i // (bb * hh * dd), i % (bb * hh * dd)
        dense.view(-1)[bc // dd * (tt * dd) + (t + t0) * dd + bc % dd] = self.val.to(dense.dtype)

    def nbytes(self) -> int:
        return tensor_bytes(self.idx) + tensor_bytes(self.val)


class KVQuantStore(LayerStore):
    """One layer of a KVQuant cache: fp16 sink tokens, then nuq codes in token-major [T, B, C]
    layout (C = H_kv·D): pre-RoPE keys with static per-channel ranges, values with per-token
    ranges, plus the sparse fp16 outliers of each."""

    def __init__(
        self,
        layer_idx: int,
        info: ModelInfo,
        calib: LayerCalibration,
        cfg: KVQuantConfig,
        rope: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    ):
        super().__init__(layer_idx, info)
        self.calib, self.cfg, self.rope = calib, cfg, rope
        self.sink_k, self.sink_v = FullPrecisionSeq(), FullPrecisionSeq()  # post-RoPE keys, values
        self.k_codes: torch.Tensor | None = None  # [T, B, C * bits / 8] uint8
        self.v_codes: torch.Tensor | None = None
        self.v_lower: torch.Tensor | None = None  # [T, B] fp16
        self.v_upper: torch.Tensor | None = None
        self.k_sparse, self.v_sparse = _Sparse(), _Sparse()
        self.q_start: int | None = None  # position of the first quantized token
        self.q_len = 0
        self._calib_dev: LayerCalibration | None = None

    @property
    def sparse(self) -> bool:
        return self.cfg.sparsity_threshold < 1.0

    def _cal(self, device: torch.device) -> LayerCalibration:
        if self._calib_dev is None or self._calib_dev.k_lut.device != device:
            self._calib_dev = self.calib.to(device)
        return self._calib_dev

    # ---- append ------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, obs: Observation) -> None:
        if obs.pre_rope_keys is None:
            raise RuntimeError("kvquant: the cache got no pre-RoPE keys (the 'pre_rope_keys' signal)")
        pos = obs.positions
        n_sink = int((pos < self.cfg.first_few_fp16).sum())
        if n_sink:
            if self.q_len:
                raise RuntimeError("kvquant: sink tokens arrived after quantized tokens")
            self.sink_k.append(keys[..., :n_sink, :])
            self.sink_v.append(values[..., :n_sink, :])
        if n_sink == keys.shape[-2]:
            return
        first = int(pos[n_sink])
        if self.q_start is None:
            self.q_start = first
        elif first != self.q_start + self.q_len:
            raise RuntimeError(
                f"kvquant: positions must be contiguous (expected {self.q_start + self.q_len}, got {first})"
            )
        b, h, _, d = keys.shape
        # token-major [Tc, B, C]
        k = obs.pre_rope_keys[..., n_sink:, :].permute(2, 0, 1, 3).reshape(-1, b, h * d).float()
        v = values[..., n_sink:, :].permute(2, 0, 1, 3).reshape(-1, b, h * d).float()
        cal = self._cal(k.device)
        offset = self.q_len * b * h * d
        # keys: static per-channel range
        k_codes = _nearest_level(_normalize(k, cal.k_lower, cal.k_upper), cal.k_lut)
        if self.sparse:
            self.k_sparse.append(k, channel_outliers(k, cal.k_lower, cal.k_upper), offset)
        # values: dynamic per-token range (over all KV heads of the token)
        if self.sparse:
            mask = token_outliers(v, self.cfg.sparsity_threshold)
            inf = torch.full_like(v, torch.inf)
            lo = torch.where(mask, inf, v).amin(dim=-1)
            hi = torch.where(mask, -inf, v).amax(dim=-1)
            none = ~torch.isfinite(lo)  # every entry an outlier: any range will do
            lo, hi = torch.where(none, 0.0, lo), torch.where(none, 0.0, hi)
            self.v_sparse.append(v, mask, offset)
        else:
            lo, hi = v.amin(dim=-1), v.amax(dim=-1)
        lo16, hi16 = _fp16_outward(lo, hi)  # [Tc, B]
        v_codes = _nearest_level(_normalize(v, lo16[..., None], hi16[..., None]), cal.v_lut)
        bits = self.cfg.bits
        self.k_codes = _cat(self.k_codes, pack_codes(k_codes, bits))
        self.v_codes = _cat(self.v_codes, pack_codes(v_codes, bits))
        self.v_lower, self.v_upper = _cat(self.v_lower, lo16), _cat(self.v_upper, hi16)
        self.q_len += k.shape[0]

    # ---- read --------------------------------------------------------------------------------
    # Bit-identical to dequantizing with ``_denormalize`` (k_lut[code], per-channel key range; v_lut[code],
    # per-token value range), scattering the outliers, then ``apply_rope`` and ``torch.cat`` with the sink
    # (tests/test_kvquant.py keeps that computation): the same fp32 operations per element, but the key
    # levels are denormalized once per channel and level, a packed byte's two 4-bit codes are looked up
    # together (its two fp32 levels read as one int64), codes are gathered straight into [B, H, T, D] (keys
    # with each head's two RoPE halves apart, so that RoPE's products run on contiguous halves),
    # rotate_half's negation and cat are folded into one subtraction, and the result is written in place.
    def _units(self, packed: torch.Tensor, halves: bool = False) -> tuple[torch.Tensor, int]:
        """Codes [T, B, C·bits/8] -> int32 lookup units [B, H, T, D/n], or with ``halves`` [B, H, 2, T,
        D/2n] (each head's two halves apart, for RoPE), n codes per unit (n = 2: a packed 4-bit byte;
        else n = 1: one code)."""
        n = 2 if self.cfg.bits == 4 and self.info.head_dim % 4 == 0 else 1
        if n == 1:
            packed = unpack_codes(packed, self.cfg.bits)
        t, b, _ = packed.shape
        h = self.info.n_kv_heads
        u = (
            packed.view(t, b, h, 2, -1).permute(1, 2, 3, 0, 4)
            if halves
            else packed.view(t, b, h, -1).permute(1, 2, 0, 3)
        )
        return u.contiguous().int(), n

    def _lookup(self, units: torch.Tensor, n: int, levels: torch.Tensor) -> torch.Tensor:
        """``levels`` [G, 2^b] (one table per channel, G = H·D; or G = 1) at ``units`` [..., T, U] -> fp32
        [..., T, U·n]."""
        g, k = levels.shape
        if n == 2:  # a [256, 2] table (per channel pair): the two levels of each byte value, as one int64
            ct = code_table(4, torch.long, levels.device)  # [256, 2] codes in each byte value
            pair = torch.arange(2, device=ct.device)
            levels = (levels[0][ct] if g == 1 else levels.view(-1, 2, k)[:, pair, ct]).contiguous().view(torch.int64)
            k = 256
        if g > 1:  # per-channel tables: the i-th unit of a token (in channel order) reads table i
            offsets = k * torch.arange(g // n, dtype=torch.int32, device=units.device)
            units = units + offsets.view(*units.shape[1:-2], 1, units.shape[-1])
        out = levels.reshape(-1).index_select(0, units.view(-1))
        return out.view(torch.float32).view(*units.shape[:-1], -1)

    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.q_len:
            return self.sink_k.read(dtype).contiguous(), self.sink_v.read(dtype).contiguous()
        cal = self._cal(self.k_codes.device)
        n_sink = self.sink_k.length
        b, t = self.k_codes.shape[1], self.q_len
        # fp32 [B, H, n_sink + T, D]; sink tokens first (converted as .to(fp32) would)
        shape = (b, self.info.n_kv_heads, n_sink + t, self.info.head_dim)
        k, v = (torch.empty(shape, dtype=torch.float32, device=cal.k_lut.device) for _ in range(2))
        if n_sink:
            self.sink_k.read(torch.float32, out=k[..., :n_sink, :])
            self.sink_v.read(torch.float32, out=v[..., :n_sink, :])
        # keys: per channel c and level j: zp_c + lut_j·r_c (as _denormalize), looked up, outliers put back
        units, n = self._units(self.k_codes, halves=True)
        key_levels = _denormalize(cal.k_lut[None, :], cal.k_lower[:, None], cal.k_upper[:, None])  # [C, 2^b]
        k_pre = self._lookup(units, n, key_levels)  # [B, H, 2, T, D/2] pre-RoPE
        half = self.info.head_dim // 2
        self.k_sparse.scatter_bhtd(k_pre.view(b, -1, t, half), 0)
        # RoPE (apply_rope: x·cos + rotate_half(x)·sin, rotate_half(x) = [−x2, x1]) by halves
        cos, sin = self.rope(torch.arange(self.q_start, self.q_start + t, device=k_pre.device))  # [1, T, D]
        c1, c2, s1, s2 = (x[0, :, i * half : (i + 1) * half].contiguous() for x in (cos, sin) for i in (0, 1))
        x1, x2, out = k_pre[:, :, 0], k_pre[:, :, 1], k[..., n_sink:, :]
        torch.sub(x1 * c1, x2 * s1, out=out[..., :half])
        torch.add(x2 * c2, x1 * s2, out=out[..., half:])
        # values: lut_j looked up, then zp_t + xn·r_t / 2 per token (as _denormalize), outliers put back
        units, n = self._units(self.v_codes)
        xn = self._lookup(units, n, cal.v_lut[None, :])  # [B, H, T, D]
        lo, hi = (x.float().t()[:, None, :, None] for x in (self.v_lower, self.v_upper))  # [B, 1, T, 1]
        torch.add((hi + lo) / 2, xn.mul_(hi - lo).div_(2), out=v[..., n_sink:, :])
        self.v_sparse.scatter_bhtd(v, n_sink)
        return (k, v) if dtype == torch.float32 else (k.to(dtype), v.to(dtype))

    # ---- accounting --------------------------------------------------------------------------
    def memory(self) -> MemoryReport:
        r = self.sink_k.memory()
        r += self.sink_v.memory()
        if self.q_len:
            n = 2 * self.q_len * self.k_codes.shape[1] * self.info.n_kv_heads * self.info.head_dim
            n_out = self.k_sparse.count + self.v_sparse.count
            r.add("codes", tensor_bytes(self.k_codes) + tensor_bytes(self.v_codes))
            r.add("scales", tensor_bytes(self.v_lower) + tensor_bytes(self.v_upper) + self.calib.nbytes)
            r.add("outliers", self.k_sparse.nbytes() + self.v_sparse.nbytes())
            r.elements += n
            r.payload_bits += float((n - n_out) * self.cfg.bits + 16 * n_out)
        return r

    def stats(self) -> dict[str, list[float]]:
        return {"outliers": [float(self.k_sparse.count), float(self.v_sparse.count)]}


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=0)


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


@dataclass
class KVQuantConfig(MethodConfig):
    bits: OneOf(*NUQ_BITS) = 4  # nuq bits: 2, 3, 4
    # 1.0: dense only; 0.99: the 1% outside the 0.5/99.5th percentiles in fp16
    sparsity_threshold: Annotated[float, Field(gt=0.5, le=1.0)] = 0.99
    first_few_fp16: NonNegativeInt = 1  # attention-sink tokens kept in fp16
    fisher: bool = True  # weight the k-means by Fisher information
    kmeans_iters: PositiveInt = 50
    cache: bool = True  # reuse a calibration cached on disk

    aliases: ClassVar[dict[str, str]] = {"threshold": "sparsity_threshold", "sparsity": "sparsity_threshold"}


class KVQuant(KVCacheMethod):
    """KVQuant: pre-RoPE per-channel keys, per-token values, nuq lookup tables, sparse outliers, sink."""

    name = "kvquant"
    description = "KVQuant: pre-RoPE per-channel keys, Fisher-weighted nuq, dense-and-sparse, fp16 sink"
    variants = {
        "kvquant-4b": Variant("KVQuant nuq4, dense only (no outliers), fp16 sink", sparsity_threshold=1.0),
        "kvquant-4b-1%": Variant("KVQuant nuq4-1%: 1% outliers in fp16, fp16 sink", bits=4),
        "kvquant-3b-1%": Variant("KVQuant nuq3-1%: 1% outliers in fp16, fp16 sink", bits=3),
        "kvquant-2b-1%": Variant("KVQuant nuq2-1%: 1% outliers in fp16, fp16 sink", bits=2),
    }
    report = ReportStyle("KVQuant", "D", "C1", rank=40)

    @classmethod
    def report_sort_key(cls, config: dict) -> tuple:
        """More bits first, then dense before dense-and-sparse (fewer outliers first)."""
        return (-float(config.get("bits", 4)), -float(config.get("sparsity_threshold", 1.0)))

    config_class = KVQuantConfig
    signals = frozenset({"pre_rope_keys"})

    def __init__(self, config: KVQuantConfig | None = None, name: str | None = None):
        super().__init__(config, name)
        self.calibration: list[LayerCalibration] | None = None
        self.calibration_source: str | None = None  # "computed" or the cache file it came from
        self._rope: RopeTables | None = None

    @property
    def needs_calibration(self) -> bool:
        return True

    def check_model(self, info: ModelInfo) -> None:
        c = info.n_kv_heads * info.head_dim
        per = {2: 4, 3: 8, 4: 2}[self.config.bits]
        if c % per:
            raise MethodSpecError(
                f"{self.label}: H_kv*head_dim={c} cannot be packed at {self.config.bits} bits "
                f"(needs a multiple of {per})"
            )

    def attach(self, model: torch.nn.Module, info: ModelInfo) -> None:
        rope = rope_tables(model)
        if rope is None:
            raise UnsupportedModelError(
                f"{self.label}: the model has no shared rotary embedding to re-apply RoPE to pre-RoPE keys"
            )
        rope_type = rope.rope_type
        if rope_type in ("dynamic", "longrope"):
            raise UnsupportedModelError(
                f"{self.label}: RoPE type {rope_type!r} depends on the sequence length; pre-RoPE keys cannot be "
                "re-rotated exactly (accepted: static RoPE types such as default, linear, llama3, yarn)"
            )
        dim = rope.dim(info.device)
        if dim != info.head_dim:
            raise UnsupportedModelError(
                f"{self.label}: partial rotary embeddings ({dim} of {info.head_dim} dims) are not supported"
            )
        self._rope = rope

    def detach(self, model: torch.nn.Module, info: ModelInfo) -> None:
        self._rope = None

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [1, T, D] in fp32 for absolute ``positions`` [T], from the model's rotary module."""
        if self._rope is None:
            raise RuntimeError(f"{self.label}: not attached to a model")
        return self._rope(positions)

    def calibrate(self, model: torch.nn.Module, calibration_batches: Iterable[torch.Tensor]) -> None:
        info = self.info or model_info(model)
        windows = [w if w.dim() == 2 else w.view(1, -1) for w in calibration_batches]
        if not windows:
            raise ValueError(f"{self.label}: calibration got no windows")
        path = calibration_cache_path(model, windows, self.config)
        if self.config.cache and path.exists():
            calib = _load_calibration(path, info.n_layers)
            if calib is not None:
                self.calibration, self.calibration_source = calib, str(path)
                return
        with calibration_mode(model):
            self.calibration = calibrate_kvquant(model, windows, info, self.config)
        self.calibration_source = "computed"
        if self.config.cache:
            _save_calibration(path, self.calibration)

    def new_layer_store(self, layer_idx: int, info: ModelInfo) -> LayerStore:
        if self.calibration is None:
            raise RuntimeError(f"{self.label}: not calibrated; call AttachedMethod.calibrate(windows) first")
        return KVQuantStore(layer_idx, info, self.calibration[layer_idx], self.config, self.rope_tables)
