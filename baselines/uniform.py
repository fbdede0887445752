"""The reference and uniform baselines: ``full``, ``fp16``, ``int8``, ``int4``, ``int2``.

* ``full`` keeps K/V in the model's compute dtype: the same numbers as running without a cache.

* ``fp16`` stores K/V as 16-bit floats, the papers' reference. With a model running in fp16 its
  logits equal a run without a cache; in fp32 the only change is the fp16 rounding of K/V.
  All byte ratios in this project are against this method's bytes.
* ``intN`` — uniform per-token asymmetric min-max quantization of keys and values (the "INT4 / INT2"
  rows of the MoQAE, KIVI and KVQuant tables), one range per token per group of ``group``
  channels (default: the whole head, group = head_dim). Every token, prefill and decode, is stored
  quantized; attention reads the dequantized history.
* K/V bit splits: ``key_bits`` / ``value_bits`` (0: ``bits``) quantize keys and values at different
  widths, the setting of "Quantize What Counts" (arXiv 2502.15075: keys need more bits than values)
  and the per-layer pairs KVTuner searches (KexuanZhang/KVTuner, written K8V4, K4V2, ...). Variant
  ``int-k4v2``: 4-bit keys, 2-bit values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from harness.interface import (
    KVCacheMethod,
    LayerStore,
    MethodConfig,
    MethodSpecError,
    ModelInfo,
    ReportStyle,
    Variant,
)
from harness.options import NonNegativeInt, OneOf
from harness.quant import SUPPORTED_BITS, Bits
from harness.storage import FullPrecisionSeq, QuantizedSeq, SeqPairStore


@dataclass
class FP16Config(MethodConfig):
    pass


class FP16(KVCacheMethod):
    """K/V stored as 16-bit floats: the papers' FP16 reference."""

    name = "fp16"
    description = "K/V stored as fp16 (the reference; byte ratios are against it)"
    report = ReportStyle("uniform", "X", "C7", rank=10)

    config_class = FP16Config

    def new_layer_store(self, layer_idx: int, info: ModelInfo) -> LayerStore:
        return SeqPairStore(layer_idx, info, FullPrecisionSeq(), FullPrecisionSeq())


class FullPrecision(KVCacheMethod):
    """K/V kept exactly as the model computed them (fp32 on CPU): a no-quantization check."""

    name = "full"
    description = "K/V kept in the model's compute dtype (equals running without quantization)"
    report = ReportStyle("uniform", "X", "C7", rank=0)

    config_class = FP16Config

    def new_layer_store(self, layer_idx: int, info: ModelInfo) -> LayerStore:
        return SeqPairStore(layer_idx, info, FullPrecisionSeq(None), FullPrecisionSeq(None))


#: a K or V width: 0 = the method's ``bits``
SplitBits = OneOf(0, *SUPPORTED_BITS)


@dataclass
class UniformConfig(MethodConfig):
    bits: Bits = 4
    group: NonNegativeInt = 0  # channels per range; 0 = head_dim (one range per token per head)
    symmetric: bool = False
    key_bits: SplitBits = 0  # 0 = bits
    value_bits: SplitBits = 0  # 0 = bits

    keyed_if_set: ClassVar[tuple[str, ...]] = ("key_bits", "value_bits")

    def widths(self) -> tuple[int, int]:
        """(key bits, value bits)."""
        return self.key_bits or self.bits, self.value_bits or self.bits


class Uniform(KVCacheMethod):
    """Uniform per-token INT-N quantization of keys and values (group = head_dim by default)."""

    name = "int"
    description = "uniform per-token asymmetric INT-N K/V (options bits, key_bits, value_bits)"
    variants = {
        **{f"int{b}": Variant(f"uniform per-token asymmetric INT{b} K/V", bits=b) for b in (8, 4, 2)},
        "int-k4v2": Variant("uniform per-token INT4 keys, INT2 values (K4V2)", key_bits=4, value_bits=2),
    }
    report = ReportStyle("uniform", "X", "C7", rank=20)

    config_class = UniformConfig
    decode_from_codes = True  # decode steps attend from the codes (SeqPairStore.attend)

    def check_model(self, info: ModelInfo) -> None:
        group = self.config.group or info.head_dim
        if info.head_dim % group:
            raise MethodSpecError(
                f"{self.label}: group={group} does not divide head_dim={info.head_dim}; "
                f"accepted: divisors of {info.head_dim}"
            )
        for bits in set(self.config.widths()):
            if info.head_dim * bits % 8:
                raise MethodSpecError(f"{self.label}: head_dim={info.head_dim} cannot be bit-packed at {bits} bits")

    def new_layer_store(self, layer_idx: int, info: ModelInfo) -> LayerStore:
        c = self.config
        group = c.group or info.head_dim
        k_bits, v_bits = c.widths()
        k = QuantizedSeq(k_bits, group, axis=-1, symmetric=c.symmetric)
        v = QuantizedSeq(v_bits, group, axis=-1, symmetric=c.symmetric)
        return SeqPairStore(layer_idx, info, k, v)
