"""XQuant: ultra-low-bit KV cache quantization with data-free calibration and cross-layer compression
(Yang et al., EMNLP 2025, arXiv 2510.11236).

Official code: ``brinenick511/XQuant`` — ``models/qwen2_xquant.py`` (``Qwen2FlashAttention2_XQuant``:
bit-widths, calibration and cross-layer sharing) on top of KIVI's cache and
``quant/new_pack.py`` (``triton_quantize_and_pack_along_last_dim``). What is stored:

* **KIVI's layout and windows** (``baselines.kivi.KIVIStore``, reused as the base class): keys per
  channel in groups of G = ``group`` tokens, values per token in groups of G channels, asymmetric
  min-max, fp16 residual of R = ``residual`` = 128 tokens with KIVI's asymmetric key/value windows
  and decode transitions (the official file keeps KIVI's prefill split, key flush at R and sliding
  value window unchanged). G defaults to 32: the official decode step slices the lower layer's packed
  key codes to ``k_bits · n_groups`` int32 words, which is the whole history only when a group of G
  tokens fills ``bits`` int32 words, i.e. G = 32 (KIVI's own scripts use G = 32, R = 128);
  ``xquant:group=128`` is accepted where head_dim allows it.
* **Bit-widths** (the code's ``annotation`` ``kq_vq_km_vm_i1_i2``): keys of layers
  l ≥ ``k_1bit_from`` are 1-bit, below 2-bit; values likewise with ``v_1bit_from`` (a value ≥ the
  number of layers means "no layer"). 1-bit codes are packed 8 per byte (``harness.quant``). The
  code takes the four thresholds per run and ships no per-model setting, so the defaults here are
  a choice in the paper's spirit: keys 2-bit in the shallower half and 1-bit in the deeper half,
  values 1-bit in every layer (keys get the extra bits, as in AsymKV, which XQuant builds on), codes
  shared by the layer pairs of the deeper half for keys and values; "half" = from layer 2⌊L/4⌋
  (``None``). SmolLM2-135M (L = 30, from layer 14): codes alone K 1.20 + V 0.73 bits (0.97, the
  paper's way of counting), 1.44 nominal bits on 2048-token windows with KIVI's fp16 residual.
* **Data-free calibration** of the reconstruction levels. With min-max zero z = min and scale
  s = (max − min)/(2^B − 1), codes are computed as usual, q = round(clamp((x − z)/s, 0, 2^B − 1)),
  and dequantization uses ẑ = z + η·s·(2^B − 1) and ŝ = (1 − 2η)·s, i.e. the levels move inward by
  η of the range at each end (1-bit: η and 1 − η of the range instead of 0 and 1). η ∈ [0, 0.5]
  depends on B: the code's candidates are {0, 1/6, 2/6} for 1-bit and {0, 0.045, 0.09} for 2-bit,
  and it does not search them: the last two fields of the run's annotation index the two lists, a
  per-run setting. Here ``eta1`` / ``eta2`` (any value in [0, 0.5]); the defaults 1/6 and 0.045,
  the middle of each grid, gave the lowest perplexity on one 2048-token window of the calibration
  split (WikiText-2 valid, SmolLM2-135M, one prefill): all layers 2-bit, η2 = 0 / 0.045 / 0.09:
  46.5 / 44.4 / 57.0 (η2 = 0 is KIVI-2); 2-bit keys with 1-bit values, η1 = 0 / 1/6 / 2/6:
  710 / 117 / 677. ŝ and ẑ replace s and z in storage (fp16), so the calibration costs nothing at
  decode time. (The code's unused ``kq == 2`` rounding variant is not reproduced.)
* **Cross-layer compression**: layers form pairs (2i, 2i + 1). For keys, an upper layer 2i + 1 ≥
  ``k_share_from`` stores only its own (calibrated) scales and zeros, computed from its own K, and
  at read time dequantizes the *lower* layer's integer codes with them; values likewise with
  ``v_share_from``. The lower layer's store registers itself in ``cache_state`` (shared by the
  layers of one cache) when it is appended, which is before the upper layer in every forward; the
  upper layer reads the first n codes of the lower layer, n = its own quantized token count (the
  code's slicing). Both layers of a shared pair must have the same bit-width (the code reads the
  lower codes at the upper layer's width; a pair split by a 1-bit threshold is refused).

Accounting (``memory``): an upper layer counts its scales/zeros and fp16 windows, not the codes it
borrows; its quantized elements count toward the elements with 0 payload bits, so nominal bits =
payload bits / elements counts shared codes once (the paper's "equivalent bit-width", which leaves
out the fp16 residual; here the residual counts at 16 bits), and effective bits = all bytes held.
``quantize_prefill`` (default True) makes prefill attention read the quantized cache, as for every
method in the perplexity tables; ``false`` = the code's full-precision prefill attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Annotated

import torch
from pydantic import Field

from baselines.kivi import KIVIConfig, KIVIStore
from harness.interface import (
    KVCacheMethod,
    LayerStore,
    MemoryReport,
    MethodConfig,
    MethodSpecError,
    ModelInfo,
    Observation,
    ReportStyle,
    tensor_bytes,
)
from harness.options import NonNegativeInt, PositiveInt
from harness.quant import META_DTYPE, QuantizedTensor, quantize
from harness.storage import TOKEN_DIM, QuantizedSeq

#: the official code's candidate η per bit-width (``g1``, ``g2`` in ``Qwen2Attention.__init__``)
ETA_GRID = {1: (0.0, 1 / 6, 2 / 6), 2: (0.0, 0.045, 0.09)}
STATE_KEY = "xquant_stores"


def calibrate_levels(q: QuantizedTensor, eta: float) -> QuantizedTensor:
    """Data-free calibration: ẑ = z + η·s·(2^B − 1), ŝ = (1 − 2η)·s, from the stored fp16 s and z."""
    if q.zero is None:
        raise ValueError("xquant: calibration needs asymmetric (min-max) quantization")
    s, z = q.scale.float(), q.zero.float()
    zero = (z + eta * s * (2**q.bits - 1)).to(META_DTYPE)
    return replace(q, scale=((1 - 2 * eta) * s).to(META_DTYPE), zero=zero)


class CalibratedSeq(QuantizedSeq):
    """A ``QuantizedSeq`` whose scale/zero are stored calibrated (codes against the min-max range)."""

    def __init__(self, bits: int, group: int, axis: int, eta: float):
        super().__init__(bits, group, axis)
        self.eta = eta

    def quantize_part(self, x: torch.Tensor) -> QuantizedTensor:
        return calibrate_levels(quantize(x, self.bits, self.group, self.axis), self.eta)


class SharedCodesSeq:
    """The upper layer of a pair: its own calibrated scale/zero, the lower layer's codes.

    ``source()`` returns the lower layer's ``QuantizedSeq``; ``q`` pairs its first ``length`` tokens
    of codes with this layer's scale/zero, so ``read_tokens`` and ``dequantize`` work unchanged.
    """

    def __init__(self, bits: int, group: int, axis: int, eta: float, source: Callable[[], QuantizedSeq]):
        self.bits, self.group, self.axis, self.eta, self.source = bits, group, axis, eta, source
        self.scale: torch.Tensor | None = None
        self.zero: torch.Tensor | None = None
        self.length = 0

    def append(self, x: torch.Tensor) -> None:
        n = x.shape[TOKEN_DIM]
        if n == 0:
            return
        part = calibrate_levels(quantize(x, self.bits, self.group, self.axis), self.eta)  # codes dropped
        if self.scale is None:
            self.scale, self.zero = part.scale, part.zero
        else:
            self.scale = torch.cat([self.scale, part.scale], dim=TOKEN_DIM)
            self.zero = torch.cat([self.zero, part.zero], dim=TOKEN_DIM)
        self.length += n

    @property
    def q(self) -> QuantizedTensor:
        lower = self.source().q
        if lower is None or lower.codes.shape[TOKEN_DIM] < self.length:
            held = 0 if lower is None else lower.codes.shape[TOKEN_DIM]
            raise RuntimeError(
                f"xquant: the lower layer holds {held} coded tokens, the upper layer needs {self.length}"
            )
        if lower.bits != self.bits:
            raise RuntimeError(f"xquant: lower layer codes are {lower.bits}-bit, the upper layer reads {self.bits}-bit")
        codes = lower.codes[..., : self.length, :]
        return QuantizedTensor(codes, self.scale, self.zero, self.bits, self.axis, self.group)

    def read(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor | None:
        return None if self.length == 0 else self.q.dequantize(dtype, out=out)

    def memory(self) -> MemoryReport:
        """Own scales/zeros only; the borrowed codes are held (and counted) by the lower layer."""
        r = MemoryReport()
        if self.scale is not None:
            r.add("scales", tensor_bytes(self.scale) + tensor_bytes(self.zero))
            r.elements = self.scale.numel() * self.group  # one scale per group of G elements
        return r

    def reorder(self, index: torch.Tensor) -> None:
        if self.scale is not None:
            self.scale, self.zero = self.scale.index_select(0, index), self.zero.index_select(0, index)


class XQuantStore(KIVIStore):
    """KIVI's store with XQuant's per-layer bits, calibrated levels and, for upper layers of a
    shared pair, codes borrowed from the lower layer."""

    def __init__(
        self,
        layer_idx: int,
        info: ModelInfo,
        cfg: XQuantConfig,
        k_bits: int,
        v_bits: int,
        k_shared: bool,
        v_shared: bool,
    ):
        kivi = KIVIConfig(bits=2, group=cfg.group, residual=cfg.residual, quantize_prefill=cfg.quantize_prefill)
        super().__init__(layer_idx, info, kivi)
        self.k_bits, self.v_bits, self.k_shared, self.v_shared = k_bits, v_bits, k_shared, v_shared
        g = cfg.group
        if k_shared:
            self.k_q = SharedCodesSeq(k_bits, g, -2, cfg.eta(k_bits), lambda: self._lower().k_q)
        else:
            self.k_q = CalibratedSeq(k_bits, g, -2, cfg.eta(k_bits))
        if v_shared:
            self.v_q = SharedCodesSeq(v_bits, g, -1, cfg.eta(v_bits), lambda: self._lower().v_q)
        else:
            self.v_q = CalibratedSeq(v_bits, g, -1, cfg.eta(v_bits))

    def _lower(self) -> XQuantStore:
        lower = self.cache_state.get(STATE_KEY, {}).get(self.layer_idx - 1)
        if lower is None:
            raise RuntimeError(
                f"xquant: layer {self.layer_idx} shares codes with layer {self.layer_idx - 1}, which has not "
                "been appended to this cache"
            )
        return lower

    def append(self, keys: torch.Tensor, values: torch.Tensor, obs: Observation) -> None:
        self.cache_state.setdefault(STATE_KEY, {})[self.layer_idx] = self
        super().append(keys, values, obs)


#: η of XQuant's code grid (0, η, 2η) of a layer's bit-width
Eta = Annotated[float, Field(ge=0.0, le=0.5)]


@dataclass
class XQuantConfig(MethodConfig):
    group: PositiveInt = 32  # G (see the module docstring: the official slicing assumes 32)
    residual: PositiveInt = 128  # R: KIVI's fp16 residual length, a multiple of G
    # layer thresholds; None = the deeper half, from layer 2·floor(L/4) (an even layer)
    k_1bit_from: NonNegativeInt | None = None  # keys of layers >= this are 1-bit, below 2-bit
    v_1bit_from: NonNegativeInt | None = 0  # values 1-bit in every layer
    k_share_from: NonNegativeInt | None = None  # odd layers >= this reuse the key codes of the layer below
    v_share_from: NonNegativeInt | None = None
    eta1: Eta = 1 / 6  # η of 1-bit layers (code grid 0, 1/6, 2/6)
    eta2: Eta = 0.045  # η of 2-bit layers (code grid 0, 0.045, 0.09)
    quantize_prefill: bool = True  # False = the code's (and KIVI's) full-precision prefill attention

    def validate(self) -> None:
        if self.residual < self.group or self.residual % self.group:
            raise MethodSpecError(f"xquant: residual={self.residual} must be a positive multiple of group={self.group}")

    def eta(self, bits: int) -> float:
        return self.eta1 if bits == 1 else self.eta2

    def threshold(self, name: str, n_layers: int) -> int:
        """The layer index an option names; None = 2·floor(L/4), the first even layer of the deeper half."""
        value = getattr(self, name)
        return 2 * (n_layers // 4) if value is None else value

    def layer_plan(self, layer: int, n_layers: int) -> tuple[int, int, bool, bool]:
        """(key bits, value bits, keys shared, values shared) of one layer."""
        t = {
            name: self.threshold(name, n_layers)
            for name in ("k_1bit_from", "v_1bit_from", "k_share_from", "v_share_from")
        }
        odd = layer % 2 == 1
        return (
            1 if layer >= t["k_1bit_from"] else 2,
            1 if layer >= t["v_1bit_from"] else 2,
            odd and layer >= t["k_share_from"],
            odd and layer >= t["v_share_from"],
        )


class XQuant(KVCacheMethod):
    """XQuant (arXiv 2510.11236): 1/2-bit KIVI-style cache, calibrated levels, cross-layer codes."""

    name = "xquant"
    description = "XQuant: KIVI layout at 1/2 bits, data-free calibrated levels, codes shared by layer pairs"
    report = ReportStyle("XQuant", "h", "C9", rank=70)

    config_class = XQuantConfig
    decode_from_codes = True  # decode steps attend from the codes (KIVIStore.attend), borrowed codes too

    def check_model(self, info: ModelInfo) -> None:
        c = self.config
        if info.head_dim % c.group:
            raise MethodSpecError(
                f"{self.label}: group={c.group} does not divide head_dim={info.head_dim} (value groups run "
                f"along channels); accepted: divisors of {info.head_dim}"
            )
        if info.head_dim % 8:
            raise MethodSpecError(f"{self.label}: head_dim={info.head_dim} cannot be bit-packed at 1 bit")
        for layer in range(1, info.n_layers, 2):
            upper, lower = c.layer_plan(layer, info.n_layers), c.layer_plan(layer - 1, info.n_layers)
            for kind, i in (("keys", 0), ("values", 1)):
                if upper[2 + i] and upper[i] != lower[i]:
                    raise MethodSpecError(
                        f"{self.label}: {kind} of layer {layer} share the codes of layer {layer - 1} but are "
                        f"{upper[i]}-bit against {lower[i]}-bit; put the 1-bit threshold on an even layer "
                        "or start sharing above it"
                    )

    def new_layer_store(self, layer_idx: int, info: ModelInfo) -> LayerStore:
        return XQuantStore(layer_idx, info, self.config, *self.config.layer_plan(layer_idx, info.n_layers))
