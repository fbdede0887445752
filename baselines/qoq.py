"""QoQ's KV4 cache (QServe, Lin et al. 2024, arXiv:2405.04532): SmoothAttention + per-head KV4.

Official code: ``mit-han-lab/qserve`` (kernels) and ``mit-han-lab/deepcompressor`` (the quantization
recipe: ``examples/llm/configs/qoq-g128.yaml``, ``deepcompressor/calib/smooth.py``,
``deepcompressor/app/llm/quant/rotate.py``). Only the KV-cache part of W4A8KV4 is reproduced here:
**weights and activations are not quantized**, so the numbers isolate what QoQ does to the cache.

* **KV4.** Keys (post-RoPE, as QServe's attention kernel reads them) and values are quantized
  dynamically, asymmetrically, per token and per KV head (group = head_dim; deepcompressor's
  ``opts`` group shape [1, 128] for head_dim 128), with fp16 scale and zero. deepcompressor's
  "PostScale" zero point (x̂ = q·s − z, z real) is the harness's x̂ = q·s + min with fp16 min, so
  storage is byte-for-byte that of ``int4``. No full-precision window, no sink tokens.
* **SmoothAttention.** Per key channel j of each KV head: λ_j = (max_t |K_j|)^α, α = 0.5, from the
  post-RoPE keys of the calibration windows (max over every calibration token). deepcompressor's
  qoq config runs its smoothing calibrator with strategy Manual, alpha 0.5, beta 0, so
  ``get_smooth_scale`` = key_span^0.5 / query_span^0 — **keys only**, queries do not enter the
  formula. Channels j and j + D/2 (the rotate-half pairs of RoPE) share λ (max-pooled spans), so
  the scaling commutes with RoPE; zero spans give λ = 1. One λ vector per KV head, broadcast to
  the query heads of that KV head (GQA). Folded into the weights: q_proj output rows × λ, k_proj
  output rows ÷ λ, and their biases (Qwen2 has q/k biases). deepcompressor's ``smooth_attention``
  scales the two *weights* only, which is exact only for bias-free projections; scaling the biases
  too is what keeps q·k unchanged, so this is done here.
* **Value rotation** (``rotate_values``, default on, as the qoq configs' ``rotation.transforms:
  [out_proj]``): each KV head's value vector is rotated by the normalized Sylvester Hadamard
  matrix R (deepcompressor's ``get_rotation_matrix(head_dim, random=False)``) — v_proj output
  rows per head ← R·W_v (and bias), o_proj input columns per query head ← W_o·Rᵀ — which spreads
  value outliers before the per-token quantization and leaves the model's function unchanged.
  head_dim must be a power of two (a Sylvester matrix); otherwise ``check_model`` refuses the
  method and asks for ``rotate_values=false``. (deepcompressor applies this head rotation as part
  of its full residual-stream rotation (QuaRot-style); only the head rotation matters for the KV
  cache, so only it is applied here.)

Order of operations: the harness builds ``AttachedMethod(model, method)`` (which calls ``attach``)
and *then* ``calibrate``. ``attach`` folds the value rotation (no data needed); ``calibrate``
measures λ on the attached model (the value rotation does not change keys) and folds it. A method
that smooths refuses to make caches before it is calibrated. ``detach`` (called by
``AttachedMethod.detach``) calls ``unfold``, which restores the exact original q/k/v/o weights:
copies of the touched tensors are kept on the CPU at fold time, because the runner evaluates every
method on the same model object and dividing by λ again would leave one-ulp rounding drift.
The weights come from ``harness.integration.attention_projections`` and are changed and restored
through ``harness.integration.WeightEdits``; the calibration keys and RoPE tables from
``harness.integration.capture``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from harness.integration import WeightEdits, apply_rope, attention_projections, capture, forward, model_info
from harness.interface import (
    KVCacheMethod,
    LayerStore,
    MethodConfig,
    MethodSpecError,
    ModelInfo,
    ReportStyle,
)
from harness.options import Fraction
from harness.quant import Bits
from harness.storage import QuantizedSeq, SeqPairStore


def sylvester_hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix H_n / √n (n a power of two): symmetric, orthogonal."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h / math.sqrt(n)


def smooth_scales(key_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothAttention λ from per-channel post-RoPE key spans ``key_absmax`` [H_kv, D] -> [H_kv, D].

    The spans of channels j and j + D/2 are max-pooled (RoPE's rotate-half pairs), then
    λ = span^α; λ = 1 where the span is 0 (deepcompressor's ``get_smooth_scale``).
    """
    half = key_absmax.shape[-1] // 2
    pooled = torch.maximum(key_absmax[..., :half], key_absmax[..., half:])
    span = torch.cat([pooled, pooled], dim=-1).double()
    lam = span.pow(alpha)
    lam[lam == 0] = 1.0
    if not torch.isfinite(lam).all():
        lam = torch.ones_like(lam)
    return lam


@dataclass
class QoQConfig(MethodConfig):
    bits: Bits = 4
    smooth: bool = True  # SmoothAttention (needs calibration)
    alpha: Fraction = 0.5  # SmoothAttention migration strength
    rotate_values: bool = True  # per-head Hadamard rotation of values


class QoQ(KVCacheMethod):
    """QoQ (QServe) KV4: SmoothAttention folded into q/k_proj, Hadamard-rotated values, per-head INT4."""

    name = "qoq"
    description = "QServe's QoQ KV4: SmoothAttention + Hadamard-rotated values, per-head INT4 K/V"
    report = ReportStyle("QoQ", "^", "C4", rank=50)

    config_class = QoQConfig
    decode_from_codes = True  # decode steps attend from the codes (SeqPairStore.attend), as int4

    def __init__(self, config: QoQConfig | None = None, name: str | None = None):
        super().__init__(config, name)
        self.lam: list[torch.Tensor] | None = None  # per layer [H_kv, D] (float64, CPU)
        self.rotation: torch.Tensor | None = None  # [D, D] when values are rotated
        self._edits = WeightEdits()  # exact CPU copies of the q/k/v/o parameters changed, tagged q, k, v, o
        self._smoothed = False

    # ---- life cycle --------------------------------------------------------------------------
    def check_model(self, info: ModelInfo) -> None:
        d = info.head_dim
        if self.config.rotate_values and (d & (d - 1)):
            raise MethodSpecError(
                f"{self.label}: rotate_values needs a power-of-two head_dim for a Sylvester Hadamard matrix, "
                f"got head_dim={d}; pass rotate_values=false"
            )
        if self.config.smooth and d % 2:
            raise MethodSpecError(f"{self.label}: SmoothAttention pairs RoPE's rotate-half channels; head_dim={d}")
        if d * self.config.bits % 8:
            raise MethodSpecError(f"{self.label}: head_dim={d} cannot be bit-packed at {self.config.bits} bits")

    @property
    def needs_calibration(self) -> bool:
        return self.config.smooth

    def attach(self, model: torch.nn.Module, info: ModelInfo) -> None:
        """Fold the per-head value rotation (data-free); SmoothAttention is folded by ``calibrate``."""
        if self.config.rotate_values:
            self.rotation = sylvester_hadamard(info.head_dim)
            try:
                self._fold_rotation(model, info, self.rotation)
            except BaseException:
                self.unfold(model)  # AttachedMethod does not call detach when attach fails
                raise

    def detach(self, model: torch.nn.Module, info: ModelInfo) -> None:
        self.unfold(model)

    def calibrate(self, model: torch.nn.Module, calibration_batches: Iterable[torch.Tensor]) -> None:
        """λ from the post-RoPE keys of the calibration windows, then fold it into q_proj / k_proj."""
        if not self.config.smooth:
            return
        info = self.info or model_info(model)
        self._edits.restore(("q", "k"))  # recalibrating: start from the unsmoothed weights
        spans = key_absmax(model, calibration_batches, info)
        self.lam = [smooth_scales(s, self.config.alpha) for s in spans]
        self._fold_smoothing(model, info, self.lam)
        self._smoothed = True

    def unfold(self, model: torch.nn.Module) -> None:
        """Restore every weight this method changed (exact copies taken before folding)."""
        self._edits.restore()
        self._smoothed = False

    def new_layer_store(self, layer_idx: int, info: ModelInfo) -> LayerStore:
        if self.config.smooth and not self._smoothed:
            raise RuntimeError(
                f"{self.label}: SmoothAttention is not calibrated; call AttachedMethod.calibrate(windows) "
                "first (or use smooth=false)"
            )
        b, d = self.config.bits, info.head_dim
        return SeqPairStore(layer_idx, info, QuantizedSeq(b, d, axis=-1), QuantizedSeq(b, d, axis=-1))

    # ---- weight folding ----------------------------------------------------------------------
    def _fold_rotation(self, model: torch.nn.Module, info: ModelInfo, r: torch.Tensor) -> None:
        d, h, h_kv = info.head_dim, info.n_heads, info.n_kv_heads
        edits = self._edits
        for proj in attention_projections(model):
            v, o = proj.v, proj.o
            if o is None:
                raise MethodSpecError(
                    f"{self.label}: rotate_values needs the attention's output projection; pass rotate_values=false"
                )
            for tag, p in (("v", v.weight), ("v", v.bias), ("o", o.weight)):
                edits.save(tag, p)
            rr = r.to(v.weight.device)
            w = v.weight.double().view(h_kv, d, -1)  # [H_kv, D, hidden]: v_g' = R v_g
            edits.set("v", v.weight, torch.matmul(rr, w).view_as(v.weight))
            if v.bias is not None:
                edits.set("v", v.bias, torch.matmul(rr, v.bias.double().view(h_kv, d, 1)).view(-1))
            wo = o.weight.double().view(o.weight.shape[0], h, d)  # [hidden, H, D]: W_o,h' = W_o,h Rᵀ
            edits.set("o", o.weight, torch.matmul(wo, rr.T).view_as(o.weight))

    def _fold_smoothing(self, model: torch.nn.Module, info: ModelInfo, lam: list[torch.Tensor]) -> None:
        n_rep = info.n_heads // info.n_kv_heads
        edits = self._edits
        for proj, lam_l in zip(attention_projections(model), lam, strict=True):
            q, k = proj.q, proj.k
            for tag, p in (("q", q.weight), ("q", q.bias), ("k", k.weight), ("k", k.bias)):
                edits.save(tag, p)
            lk = lam_l.to(k.weight.device).reshape(-1)  # [H_kv * D]
            lq = lam_l.to(q.weight.device).repeat_interleave(n_rep, dim=0).reshape(-1)  # [H * D]
            edits.set("q", q.weight, q.weight.double() * lq[:, None])
            edits.set("k", k.weight, k.weight.double() / lk[:, None])
            if q.bias is not None:
                edits.set("q", q.bias, q.bias.double() * lq)
            if k.bias is not None:
                edits.set("k", k.bias, k.bias.double() / lk)


@torch.no_grad()
def key_absmax(model: torch.nn.Module, batches: Iterable[torch.Tensor], info: ModelInfo) -> list[torch.Tensor]:
    """max_t |K| per layer [H_kv, D] of the post-RoPE keys over every token of ``batches`` ([B, T] ids)."""
    spans: list[torch.Tensor | None] = [None] * info.n_layers

    def add_spans(i: int, signals: dict) -> None:
        k = apply_rope(signals["pre_rope_keys"].float(), *signals["rope"])  # [B, H_kv, T, D] post-RoPE
        m = k.abs().amax(dim=(0, 2))
        spans[i] = m if spans[i] is None else torch.maximum(spans[i], m)

    with capture(model, {"pre_rope_keys", "rope"}, on_layer=add_spans):
        device = next(model.parameters()).device
        n = 0
        for ids in batches:
            forward(model, ids.to(device))
            n += 1
        if n == 0:
            raise ValueError("qoq: calibration got no windows")
    return [s.double().cpu() for s in spans]
