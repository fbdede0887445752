"""KVQuant's decode-step pieces for ``method_parts.py``: ``python tests/bench/method_parts.py kvquant``
(times ``SPEC``, kvquant-4b-1%).

``make_store`` builds a ``KVQuantStore`` calibrated on random keys / values (per-channel 0.5 / 99.5th
percentile key ranges and unweighted k-means tables, as ``calibrate_kvquant`` without Fisher) with
SmolLM2-135M's RoPE (theta 1e5), holding ``context`` tokens (sink token + quantized prefill).
``PARTS`` times, alone, the pieces of one decode step's ``read`` that are KVQuant's own (the
non-uniform lookup of the key / value codes with their denormalization, RoPE re-applied to the
dequantized pre-RoPE keys, the sparse fp16 outliers scattered back), one token's append (dense-and-
sparse outlier detection, nuq quantization), int4's dequantization of as many tokens for comparison,
and the prefill's quantization of ``context`` tokens against int4's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import baselines.kvquant as kvq
import baselines.kvquant_calibration as kvc
from harness.integration import RopeTables, apply_rope
from harness.interface import LayerStore, ModelInfo, Observation, build_method
from harness.quant import percentile

SPEC = "kvquant-4b-1%"
_CALIB_TOKENS = 2048


def _rope() -> RopeTables:
    rope = {"rope_type": "default", "rope_theta": 1e5}
    cfg = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                      max_position_embeddings=8192, rope_parameters=rope)  # fmt: skip
    return RopeTables(LlamaRotaryEmbedding(cfg))


def calibration(scale: torch.Tensor, bits: int, threshold: float, generator: torch.Generator) -> kvq.LayerCalibration:
    """A layer's calibration from random keys (channel c scaled by ``scale[c]``) and values [N, C]."""
    c = scale.numel()
    k = torch.randn(_CALIB_TOKENS, c, generator=generator) * scale
    v = torch.randn(_CALIB_TOKENS, c, generator=generator)
    t = 1 - (1 - threshold) / 2
    lo, hi = kvq._fp16_outward(percentile(k, 1 - t, dim=0), percentile(k, t, dim=0))  # [C] fp16
    kn = kvq._normalize(k, lo, hi)
    mask = kvq.token_outliers(v, threshold)
    inf = torch.full_like(v, torch.inf)
    vlo, vhi = torch.where(mask, inf, v).amin(-1, keepdim=True), torch.where(mask, -inf, v).amax(-1, keepdim=True)
    vn = kvq._normalize(v, vlo, vhi)
    luts = []
    for xn in (kn[kn.abs() <= 1], vn[vn.abs() <= 1]):
        hist = kvc._Histogram()
        hist.add(xn, torch.ones_like(xn))
        luts.append(hist.lut(2**bits, 50))
    return kvq.LayerCalibration(lo, hi, *luts)


def make_store(spec: str, info: ModelInfo, context: int, generator: torch.Generator) -> LayerStore:
    """A calibrated KVQuant layer store holding ``context`` random tokens (one prefill)."""
    method = build_method(spec)
    method.info = info
    scale = 1 + torch.rand(info.n_kv_heads, 1, info.head_dim, generator=generator)  # per key channel
    cfg = method.config
    method.calibration = [calibration(scale.reshape(-1), cfg.bits, cfg.sparsity_threshold, generator)]
    method._rope = _rope()
    store = method.new_layer_store(0, info)
    store.cache_state = method.new_cache_state()
    k, v = (torch.randn(1, info.n_kv_heads, context, info.head_dim, generator=generator) for _ in range(2))
    k = k * scale  # pre-RoPE keys as calibrated
    pos = torch.arange(context)
    cos, sin = method.rope_tables(pos)
    store.append(apply_rope(k, cos, sin), v, Observation(positions=pos, pre_rope_keys=k, is_prefill=True))
    store.seq_len = context
    return store


# ---- the pieces ---------------------------------------------------------------------------------
_SCRATCH: dict[str, object] = {}  # state the pieces build on first use (a dequantized copy, int4's store)


def _key_levels(store: kvq.KVQuantStore) -> torch.Tensor:
    cal = store._cal(store.k_codes.device)
    return kvq._denormalize(cal.k_lut[None, :], cal.k_lower[:, None], cal.k_upper[:, None])  # [C, 2^b]


def key_lookup(store: kvq.KVQuantStore, query: torch.Tensor) -> torch.Tensor:
    """Per-channel non-uniform levels of every key code, denormalized (pre-RoPE keys, [B, H, 2, T, D/2])."""
    return store._lookup(*store._units(store.k_codes, halves=True), _key_levels(store))


def value_lookup(store: kvq.KVQuantStore, query: torch.Tensor) -> torch.Tensor:
    """Non-uniform levels of every value code, denormalized with the per-token ranges."""
    xn = store._lookup(*store._units(store.v_codes), store._cal(store.v_codes.device).v_lut[None, :])
    lo, hi = (x.float().t()[:, None, :, None] for x in (store.v_lower, store.v_upper))
    return (hi + lo) / 2 + xn.mul_(hi - lo).div_(2)


def rope_tables(store: kvq.KVQuantStore, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin of every held position, as ``read`` takes them (the model's rotary module, then halves)."""
    cos, sin = store.rope(torch.arange(store.q_start, store.q_start + store.q_len))
    half = cos.shape[-1] // 2
    return tuple(x[0, :, i * half : (i + 1) * half].contiguous() for x in (cos, sin) for i in (0, 1))


def rope_apply(store: kvq.KVQuantStore, query: torch.Tensor) -> torch.Tensor:
    """RoPE re-applied to the dequantized pre-RoPE keys as ``read`` does it (keys and tables given)."""
    if "rope" not in _SCRATCH:
        k_pre = key_lookup(store, query)  # [B, H, 2, T, D/2]
        tables = rope_tables(store, query)
        b, h, _, t, half = k_pre.shape
        _SCRATCH["rope"] = (k_pre, tables, torch.empty(b, h, t, 2 * half))
    k_pre, (c1, c2, s1, s2), out = _SCRATCH["rope"]
    x1, x2, half = k_pre[:, :, 0], k_pre[:, :, 1], k_pre.shape[-1]
    torch.sub(x1 * c1, x2 * s1, out=out[..., :half])
    return torch.add(x2 * c2, x1 * s2, out=out[..., half:])


def outliers(store: kvq.KVQuantStore, query: torch.Tensor) -> None:
    """The sparse fp16 key and value outliers (1%) written back into dense [B, H, T, D] tensors."""
    dense = torch.empty(store.k_codes.shape[1], store.info.n_kv_heads, store.q_len + 1, store.info.head_dim)
    store.k_sparse.scatter_bhtd(dense, 0)
    store.v_sparse.scatter_bhtd(dense, 1)


def append_one(store: kvq.KVQuantStore, query: torch.Tensor) -> None:
    """One decode token appended: key outliers (static ranges), value outliers (two per-token
    percentiles), nuq codes (nearest level) of both, packed and concatenated."""
    if "token" not in _SCRATCH:
        _SCRATCH["token"] = [torch.randn(1, store.info.n_kv_heads, 1, store.info.head_dim) for _ in range(2)]
    k, v = _SCRATCH["token"]
    pos = torch.tensor([store.q_start + store.q_len])
    store.append(k, v, Observation(positions=pos, pre_rope_keys=k))
    store.seq_len += 1


def _prefill(spec: str, info: ModelInfo, n: int) -> tuple[LayerStore, tuple[torch.Tensor, ...], Observation]:
    """A fresh store of ``spec`` and ``n`` random tokens to append to it (KVQuant: calibrated as ``make_store``,
    once)."""
    g = torch.Generator().manual_seed(1)
    if spec.startswith("kvquant"):
        if f"calibrated {spec}" not in _SCRATCH:
            _SCRATCH[f"calibrated {spec}"] = make_store(spec, info, 1, g)
        held = _SCRATCH[f"calibrated {spec}"]
        store = kvq.KVQuantStore(0, info, held.calib, held.cfg, held.rope)
    else:
        method = build_method(spec)
        method.info = info
        store = method.new_layer_store(0, info)
        store.cache_state = method.new_cache_state()
    k, v = (torch.randn(1, info.n_kv_heads, n, info.head_dim, generator=g) for _ in range(2))
    return store, (k, v), Observation(positions=torch.arange(n), pre_rope_keys=k, is_prefill=True)


def prefill(spec: str) -> Callable[[kvq.KVQuantStore, torch.Tensor], None]:
    """The prefill's quantization: ``spec``'s store of as many tokens as held (first call) appended at once."""

    def run(store: kvq.KVQuantStore, query: torch.Tensor) -> None:
        key = f"prefill {spec}"
        if key not in _SCRATCH:
            _SCRATCH[key] = (store.info, store.q_len + store.sink_k.length)
        info, n = _SCRATCH[key]
        fresh, (k, v), obs = _prefill(spec, info, n)
        fresh.append(k, v, obs)

    return run


def int4_read(store: kvq.KVQuantStore, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For comparison: int4's store of as many tokens dequantized whole (``read``)."""
    if "int4" not in _SCRATCH:
        info = store.info
        int4, (k, v), obs = _prefill("int4", info, store.q_len + store.sink_k.length)
        int4.append(k, v, obs)
        _SCRATCH["int4"] = int4
    return _SCRATCH["int4"].read(torch.float32)


PARTS: dict[str, Callable[[kvq.KVQuantStore, torch.Tensor], object]] = {
    "read: key codes -> per-channel non-uniform levels (pre-RoPE keys)": key_lookup,
    "read: value codes -> non-uniform levels, per-token range": value_lookup,
    "read: RoPE tables of the positions": rope_tables,
    "read: RoPE applied to the pre-RoPE keys": rope_apply,
    "read: sparse outliers put back (K and V)": outliers,
    "append: one token (outliers, nuq codes)": append_one,
    "int4 for comparison: read (dequantize all)": int4_read,
    "prefill: quantize the context (K and V)": prefill(SPEC),
    "int4 for comparison: prefill quantize": prefill("int4"),
}
