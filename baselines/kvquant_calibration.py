"""KVQuant's datatypes and calibration (Hooper et al. 2024, arXiv:2401.18079), for ``baselines.kvquant``.

The normalisation to a channel's or token's range, nearest non-uniform level, dense-and-sparse outlier
tests, and the calibration of the static key ranges and the non-uniform levels (Fisher-weighted k-means
over the calibration tokens) with its on-disk cache. What each step follows in the official code
(``SqueezeAILab/KVQuant``) is in ``baselines.kvquant``'s module docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from harness.files import calibration_cache_path as _cache_path
from harness.files import load_calibration, save_calibration
from harness.integration import (
    calibration_mode,
    capture,
    forward,
    model_fingerprint,
    model_name,
)
from harness.interface import (
    ModelInfo,
    tensor_bytes,
)
from harness.quant import nearest_level, percentile, weighted_kmeans_1d

if TYPE_CHECKING:
    from baselines.kvquant import KVQuantConfig

NUQ_BITS = (2, 3, 4)
HIST_BINS = 16384
CACHE_VERSION = 1
#: how ``capture`` keeps the Fisher gradients (``harness.integration.GRAD_MODES``); see the docstring
FISHER_GRAD = "cut"


def _fp16_outward(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round a range to fp16 outwards, so every value inside [lower, upper] stays inside; a finite end
    beyond fp16's range (fp32 inputs) is clamped to ±65504 instead of becoming inf (values beyond it
    then saturate at the range's end, as any value outside a static key range)."""
    lo16, hi16 = lower.to(torch.float16), upper.to(torch.float16)
    down = torch.nextafter(lo16, torch.full_like(lo16, -torch.inf))
    up = torch.nextafter(hi16, torch.full_like(hi16, torch.inf))
    lo16 = torch.where(lo16.double() > lower.double(), down, lo16)
    hi16 = torch.where(hi16.double() < upper.double(), up, hi16)
    fmax = torch.finfo(torch.float16).max
    lo16 = torch.where(torch.isfinite(lower), lo16.clamp(-fmax, fmax), lo16)
    hi16 = torch.where(torch.isfinite(upper), hi16.clamp(-fmax, fmax), hi16)
    return lo16, hi16


def _normalize(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """x' = (x − zp)/r with zp = (upper + lower)/2, r = (upper − lower)/2 (fp32; x' = 0 where r = 0)."""
    lo, hi = lower.float(), upper.float()
    zp, r = (hi + lo) / 2, (hi - lo) / 2
    return torch.where(r > 0, (x.float() - zp) / torch.where(r > 0, r, torch.ones_like(r)), torch.zeros_like(zp))


def _denormalize(xn: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    lo, hi = lower.float(), upper.float()
    return (hi + lo) / 2 + xn * (hi - lo) / 2


def _order_percentile(x: torch.Tensor, q: float) -> torch.Tensor:
    """``harness.quant.percentile(x, q, dim=-1)`` from the two order statistics it interpolates, taken
    with ``topk`` instead of a full sort (the same values, so the same result)."""
    n = x.shape[-1]
    pos = q * (n - 1)
    lo = int(pos // 1)
    hi = min(lo + 1, n - 1)
    if q >= 0.5:  # descending: the i-th smallest is at n − 1 − i
        top = torch.topk(x, n - lo, dim=-1).values
        a, b = top[..., n - 1 - lo], top[..., n - 1 - hi]
    else:
        bottom = torch.topk(x, hi + 1, dim=-1, largest=False).values
        a, b = bottom[..., lo], bottom[..., hi]
    return a + (b - a) * (pos - lo)


def token_outliers(tok: torch.Tensor, threshold: float) -> torch.Tensor:
    """Dynamic per-token outlier mask of ``tok`` [..., C]: entries >= the ``t``-th or <= the
    ``1 − t``-th percentile of their token, t = 1 − (1 − threshold)/2 (``get_outliers_dynamic``)."""
    t = 1 - (1 - threshold) / 2
    hi = _order_percentile(tok.float(), t).unsqueeze(-1)
    lo = _order_percentile(tok.float(), 1 - t).unsqueeze(-1)
    return (tok >= hi) | (tok <= lo)


def _nearest_level(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """``harness.quant.nearest_level`` (the bucket of x among the midpoints: how many are < x, NaN
    last); for a large ``x`` counted midpoint by midpoint, which is faster on CPU than ``bucketize``."""
    if x.numel() < 65536:
        return nearest_level(x, lut)
    mids = ((lut[1:] + lut[:-1]) / 2).to(x.dtype)
    codes = torch.full(x.shape, mids.numel(), dtype=torch.uint8, device=x.device)
    for m in mids:  # midpoints >= x are not below it (NaN: none is)
        codes -= (x <= m).view(torch.uint8)
    return codes


def channel_outliers(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """Static outlier mask (``get_outliers``): strictly outside [lower, upper] (broadcast per channel)."""
    return (x > upper.float()) | (x < lower.float())


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


@dataclass
class LayerCalibration:
    """Static quantizer state of one layer (held once per model, counted once per layer store)."""

    k_lower: torch.Tensor  # [H_kv * D] fp16, per-channel pre-RoPE key range
    k_upper: torch.Tensor  # [H_kv * D] fp16
    k_lut: torch.Tensor  # [2^b] fp32, ascending normalized levels
    v_lut: torch.Tensor  # [2^b] fp32

    def to(self, device: torch.device) -> LayerCalibration:
        return LayerCalibration(*(t.to(device) for t in (self.k_lower, self.k_upper, self.k_lut, self.v_lut)))

    @property
    def nbytes(self) -> int:
        return sum(tensor_bytes(t) for t in (self.k_lower, self.k_upper, self.k_lut, self.v_lut))


class _TailTracker:
    """Streaming per-channel percentile: keeps only the extreme order statistics it needs."""

    def __init__(self, n_total: int, q: float, largest: bool):
        self.n, self.q, self.largest = n_total, q, largest
        pos = q * (n_total - 1)
        self.lo = int(pos // 1)
        self.frac = pos - self.lo
        self.m = (n_total - self.lo) if largest else min(self.lo + 2, n_total)
        self.vals: torch.Tensor | None = None  # [m, C]

    def add(self, rows: torch.Tensor) -> None:  # rows [N, C]
        x = rows.float() if self.vals is None else torch.cat([self.vals, rows.float()], dim=0)
        self.vals = torch.topk(x, min(self.m, x.shape[0]), dim=0, largest=self.largest).values

    def value(self) -> torch.Tensor:
        s = torch.sort(self.vals, dim=0).values.double()  # ascending
        offset = (self.n - s.shape[0]) if self.largest else 0  # global index of s[0]
        i = self.lo - offset
        j = min(i + 1, s.shape[0] - 1)
        return s[i] + (s[j] - s[i]) * self.frac


class _Histogram:
    """Weighted histogram of normalized values on [−1, 1]: weight and weighted sum per bin."""

    def __init__(self, bins: int = HIST_BINS):
        self.bins = bins
        self.w = torch.zeros(bins, dtype=torch.float64)
        self.wx = torch.zeros(bins, dtype=torch.float64)
        self.count = torch.zeros(bins, dtype=torch.float64)
        self.cx = torch.zeros(bins, dtype=torch.float64)

    def add(self, xn: torch.Tensor, w: torch.Tensor) -> None:
        x, w = xn.detach().double().flatten().cpu(), w.detach().double().flatten().cpu()
        idx = ((x + 1) / 2 * self.bins).floor().clamp(0, self.bins - 1).long()
        self.w.index_add_(0, idx, w)
        self.wx.index_add_(0, idx, w * x)
        self.count.index_add_(0, idx, torch.ones_like(x))
        self.cx.index_add_(0, idx, x)

    def lut(self, k: int, iters: int) -> torch.Tensor:
        w, wx = (self.w, self.wx) if self.w.sum() > 0 else (self.count, self.cx)  # all-zero Fisher: unweighted
        nz = w > 0
        return weighted_kmeans_1d(wx[nz] / w[nz], w[nz], k, iters)


def _window_positions(b: int, t: int) -> torch.Tensor:
    """Position within its window of every row of a flattened [B*T, C] tensor."""
    return torch.arange(t).repeat(b)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, H_kv, T, D] (a captured k_proj / v_proj output) -> [B*T, H_kv*D], the projection's rows."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b * t, h * d)


def calibrate_kvquant(
    model: torch.nn.Module, windows: list[torch.Tensor], info: ModelInfo, cfg: KVQuantConfig
) -> list[LayerCalibration]:
    """Per-layer KVQuant quantizers from calibration ``windows`` ([B, T] token ids).

    Pass 1 (forward): per-channel key percentiles over all calibration tokens. Pass 2 (forward +
    backward when ``cfg.fisher``): normalized keys/values and their Fisher weights summed into one
    histogram per layer and tensor, then weighted k-means gives the lookup tables.
    """
    n_layers = info.n_layers
    device = next(model.parameters()).device
    sparse = cfg.sparsity_threshold < 1.0
    t = 1 - (1 - cfg.sparsity_threshold) / 2 if sparse else 1.0
    n_total = sum(w.numel() for w in windows)
    if n_total < 2:
        raise ValueError("kvquant: calibration needs at least two tokens")

    # ---- pass 1: per-channel key ranges ----------------------------------------------------
    uppers = [_TailTracker(n_total, t, largest=True) for _ in range(n_layers)]
    lowers = [_TailTracker(n_total, 1 - t, largest=False) for _ in range(n_layers)]

    def add_ranges(i: int, signals: dict[str, torch.Tensor]) -> None:
        rows = _rows(signals["pre_rope_keys"])  # [B*T, H_kv*D]
        uppers[i].add(rows)
        lowers[i].add(rows)

    with capture(model, {"pre_rope_keys"}, on_layer=add_ranges), torch.no_grad():
        for ids in windows:
            forward(model, ids.to(device))
    k_ranges = [_fp16_outward(lo.value(), hi.value()) for lo, hi in zip(lowers, uppers, strict=True)]

    # ---- pass 2: histograms of normalized values, Fisher-weighted --------------------------
    k_hist = [_Histogram() for _ in range(n_layers)]
    v_hist = [_Histogram() for _ in range(n_layers)]
    # every parameter frozen; with Fisher, the captured k_proj / v_proj outputs are gradient leaves
    # ("cut": each layer's gradient stops at the later layers' k_proj / v_proj outputs)
    kv, grad = {"pre_rope_keys", "values"}, FISHER_GRAD if cfg.fisher else False
    with calibration_mode(model, trainable=()), capture(model, kv, grad=grad, keep=True) as cap:
        for ids in windows:
            ids = ids.to(device)
            cap.clear()
            with torch.set_grad_enabled(cfg.fisher):
                out = forward(model, ids, labels=ids)
                if cfg.fisher:
                    out.loss.backward()
            b, tt = ids.shape
            sink = _window_positions(b, tt).to(device) < cfg.first_few_fp16  # [B*T]
            for i in range(n_layers):
                k = _rows(cap.layers[i]["pre_rope_keys"]).float()  # [B*T, H_kv*D]
                v = _rows(cap.layers[i]["values"]).float()
                kw, vw = (
                    _fisher(cap.grad(i, n) if cfg.fisher else None, x, cfg.fisher)
                    for n, x in (("pre_rope_keys", k), ("values", v))
                )
                lo, hi = k_ranges[i]
                kn = _normalize(k, lo.to(device), hi.to(device))
                keep = (kn.abs() <= 1) & ~sink[:, None]
                k_hist[i].add(kn[keep], kw[keep])
                v_lo = percentile(v, 1 - t, dim=-1).unsqueeze(-1)
                v_hi = percentile(v, t, dim=-1).unsqueeze(-1)
                vn = _normalize(v, v_lo, v_hi)
                keep = (vn.abs() <= 1) & ~sink[:, None]
                v_hist[i].add(vn[keep], vw[keep])
            cap.clear()
    k = 2**cfg.bits
    return [
        LayerCalibration(
            k_lower=k_ranges[i][0].cpu(),
            k_upper=k_ranges[i][1].cpu(),
            k_lut=k_hist[i].lut(k, cfg.kmeans_iters),
            v_lut=v_hist[i].lut(k, cfg.kmeans_iters),
        )
        for i in range(n_layers)
    ]


def _fisher(grad: torch.Tensor | None, like: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Squared gradient of the loss w.r.t. an activation (``grad`` [B, H_kv, T, D] -> [B*T, C] like
    ``like``); ones when disabled."""
    if not enabled:
        return torch.ones_like(like)
    if grad is None:  # the activation does not reach the loss
        return torch.zeros_like(like)
    return _rows(grad).reshape(like.shape).float() ** 2


def calibration_cache_path(model: torch.nn.Module, windows: list[torch.Tensor], cfg: KVQuantConfig) -> Path:
    """Where the calibration of ``model`` on ``windows`` with ``cfg``'s quantizer options is cached."""
    opts = {k: getattr(cfg, k) for k in ("bits", "sparsity_threshold", "first_few_fp16", "fisher", "kmeans_iters")}
    return _cache_path("kvquant", model_name(model), model_fingerprint(model), {"v": CACHE_VERSION, **opts}, windows)


def _save_calibration(path: Path, calib: list[LayerCalibration]) -> None:
    save_calibration(path, [{k: getattr(c, k) for k in ("k_lower", "k_upper", "k_lut", "v_lut")} for c in calib])


def _load_calibration(path: Path, n_layers: int) -> list[LayerCalibration] | None:
    data = load_calibration(path)
    if not isinstance(data, list) or len(data) != n_layers:
        return None
    return [LayerCalibration(**d) for d in data]
