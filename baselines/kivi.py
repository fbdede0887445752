"""KIVI: tuning-free asymmetric 2-bit KV-cache quantization (Liu et al., ICML 2024, arXiv 2402.02750).

What is stored, per layer and KV head (the paper, Sec. 3-4, and the official code
``jy-yuan/KIVI``, ``models/llama_kivi.py`` / ``models/mistral_kivi.py``, whose conditions this
store follows):

* Keys (post-RoPE) are quantized **per channel** in groups of ``group`` (G) consecutive tokens: one
  fp16 scale and minimum per channel per G tokens (``QuantizedSeq`` axis=-2).
* Values are quantized **per token** in groups of G consecutive channels (``QuantizedSeq`` axis=-1).
* Asymmetric min-max with fp16 scale and minimum (``harness.quant.quantize``; the official
  ``quant/new_pack.py`` computes the same min / (max - min) / (2^b - 1) ranges).
* A full-precision (fp16) residual of R = ``residual`` tokens, with KIVI's asymmetric windows:

  - prefill of T tokens: the first T - (T mod R) keys are quantized, the last T mod R stay fp16
    (T < R: all fp16; T a multiple of R: none fp16); the first T - R values are quantized and the
    last R stay fp16 (T <= R: all fp16);
  - decode: the key buffer is quantized all at once when it holds R tokens (the official code
    flushes when ``key_states_full`` *reaches* ``residual_length``, hence R % G == 0); the value
    window slides one token at a time (the oldest fp16 value is quantized when the window holds
    *more than* R tokens, i.e. R + 1).

Order of operations. In the official decode step the new token joins the fp16 buffers, attention
runs over [quantized | fp16 buffer incl. the new token], and only *then* the key buffer is flushed
(if it reached R) and the oldest value quantized (if the window exceeds R). The harness calls
``append`` before attention reads the store, so this store applies those post-attention transitions
at the start of the *next* append: every decode step's attention sees exactly what KIVI's does
(1..R fp16 keys, up to R + 1 fp16 values). Between steps the store therefore still holds the
not-yet-applied transition (e.g. R fp16 keys right after the step that filled the buffer), and
``memory()`` counts that, since it is what is held. The prefill split is applied right away.

Prefill attention. KIVI's own prefill attention runs on the full-precision K/V (the split is done
after it); here ``quantize_prefill`` defaults to True so perplexity tables compare like with like
(the window's attention reads the quantized cache, as for every other method);
``kivi:quantize_prefill=false`` reproduces KIVI's full-precision prefill.

Options: ``bits`` (2 or 4; 8 accepted), ``group`` G (default 32), ``residual`` R (default 128,
a multiple of G), ``quantize_prefill``, and ``key_bits`` / ``value_bits`` (0: ``bits``) for keys and
values at different widths (KIVI's own code quantizes both at one ``k_bits = v_bits``; the split is
the building block of KVTuner's per-layer pairs and of "Quantize What Counts", arXiv 2502.15075).
Variants ``kivi-2`` / ``kivi-4`` and ``kivi-k4v2`` (4-bit keys, 2-bit values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from baselines.uniform import SplitBits
from harness.interface import (
    KVCacheMethod,
    LayerStore,
    MethodConfig,
    MethodSpecError,
    ModelInfo,
    Observation,
    ReportStyle,
    Variant,
)
from harness.options import PositiveInt
from harness.quant import Bits
from harness.storage import TOKEN_DIM, WindowedPairStore


@dataclass
class KIVIConfig(MethodConfig):
    bits: Bits = 2
    group: PositiveInt = 32  # G: tokens per key range (per channel), channels per value range (per token)
    residual: PositiveInt = 128  # R: full-precision residual length; a multiple of G
    quantize_prefill: bool = True  # False = KIVI's own full-precision prefill attention
    key_bits: SplitBits = 0  # 0 = bits
    value_bits: SplitBits = 0  # 0 = bits

    aliases: ClassVar[dict[str, str]] = {"residual_length": "residual", "group_size": "group"}  # KIVI's names
    keyed_if_set: ClassVar[tuple[str, ...]] = ("key_bits", "value_bits")

    def widths(self) -> tuple[int, int]:
        """(key bits, value bits)."""
        return self.key_bits or self.bits, self.value_bits or self.bits

    def validate(self) -> None:
        if self.residual < self.group or self.residual % self.group:
            raise MethodSpecError(
                f"kivi: residual={self.residual} must be a positive multiple of group={self.group} "
                "(the key buffer is quantized per channel in groups of G tokens when it holds R tokens)"
            )


class KIVIStore(WindowedPairStore):
    """Keys per channel / values per token at ``bits``, plus KIVI's fp16 residual windows.

    Token order of the history: [quantized | fp16] for keys and for values (the two split points
    differ; ``harness.storage.WindowedPairStore`` holds them). Shapes: [B, H_kv, T, D].
    """

    def __init__(self, layer_idx: int, info: ModelInfo, config: KIVIConfig):
        super().__init__(layer_idx, info, *config.widths(), config.group)
        self.cfg = config  # k_fp: key buffer, < R tokens after a transition; v_fp: <= R values

    # ---- KIVI's transitions ------------------------------------------------------------------
    def _settle(self) -> None:
        """Quantize what KIVI's code quantizes after attention: the first n - (n mod R) buffered
        keys (decode: the whole buffer once it reached R) and all but the last R fp16 values."""
        r = self.cfg.residual
        n_k = self.k_fp.length - self.k_fp.length % r
        if n_k:
            self.k_q.append(self.k_fp.take_front(n_k))  # [B, H, n_k, D], n_k % G == 0
        n_v = self.v_fp.length - r
        if n_v > 0:
            self.v_q.append(self.v_fp.take_front(n_v))  # [B, H, n_v, D]

    def append(self, keys: torch.Tensor, values: torch.Tensor, obs: Observation) -> None:
        self._batch = keys.shape[0]
        if keys.shape[TOKEN_DIM] == 0:
            return
        prefill = self.k_q.length + self.k_fp.length == 0
        if not prefill:
            self._settle()  # the transitions KIVI applied after the previous step's attention
        self.k_fp.append(keys)
        self.v_fp.append(values)
        if prefill:
            self._settle()  # KIVI's prefill split, applied at once


class KIVI(KVCacheMethod):
    """KIVI (arXiv 2402.02750): per-channel keys, per-token values, fp16 residual window."""

    name = "kivi"
    description = "KIVI: per-channel K, per-token V, fp16 residual (bits, key_bits, value_bits, group, residual)"
    variants = {
        "kivi-2": Variant("KIVI-2: 2-bit keys per channel / values per token, fp16 residual", bits=2),
        "kivi-4": Variant("KIVI-4: 4-bit keys per channel / values per token, fp16 residual", bits=4),
        "kivi-k4v2": Variant("KIVI with 4-bit keys and 2-bit values (K4V2), fp16 residual", key_bits=4, value_bits=2),
    }
    report = ReportStyle("KIVI", "s", "C0", rank=30)

    config_class = KIVIConfig
    decode_from_codes = True  # decode steps attend from the codes (KIVIStore.attend)

    def check_model(self, info: ModelInfo) -> None:
        c = self.config
        if info.head_dim % c.group:
            raise MethodSpecError(
                f"{self.label}: group={c.group} does not divide head_dim={info.head_dim} (value groups run "
                f"along channels); accepted: divisors of {info.head_dim}"
            )
        for bits in set(c.widths()):
            if info.head_dim * bits % 8:
                raise MethodSpecError(f"{self.label}: head_dim={info.head_dim} cannot be bit-packed at {bits} bits")

    def new_layer_store(self, layer_idx: int, info: ModelInfo) -> LayerStore:
        return KIVIStore(layer_idx, info, self.config)
