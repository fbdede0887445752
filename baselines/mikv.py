"""MiKV: importance-aware mixed-precision KV cache ("No Token Left Behind", Yang et al., arXiv 2402.18096).

MiKV keeps the KV pairs an eviction policy (H2O) would keep in high precision and, instead of
evicting the others, keeps them in low precision; keys are channel-balanced before quantization.
No official code exists: this is implemented from the paper, with every choice listed here.

Importance (H2O). Per layer, batch row and KV head, the score of a cached token is the post-softmax
attention it has received, summed over queries and over the query heads of the GQA group, accumulated
over forwards: prefill column sums, then + the column sums of every decode step (H2O's
``H2OKVCache_LayerWise._update_hh_score`` in ``FMInference/H2O``, ``h2o_hf/utils_real_drop``, sums the
same way per head). As in H2O, a window of the most recent tokens is always important, and only the
tokens still in the high tier keep a score (a demoted token is never promoted back).

Budget. With T tokens held, the high tier holds n_hi(T) = max(floor(ratio · T), w(T)) tokens per
head, where the recent window w(T) = min(T, ``recent``), or, with ``recent=0`` (default), half the
budget, floor(ratio · T) // 2: H2O's equal split between heavy hitters and recent tokens. The rest of
the high tier is the heavy hitters: the top-scoring tokens older than the window. Default 25 % FP16 +
75 % INT2 (nominal 0.25 · 16 + 0.75 · 2 = 5.5 bits, the figure the MoQAE paper lists for MiKV).

Tiers. High tier: fp16 (``high_bits=16``) or per-token INT8/INT4; low tier: per-token asymmetric
INT2/4/8 (``low_bits``), groups of ``group`` channels (0 = head_dim), ``harness.quant``. Both tiers
keep their tokens in position order per head (every head has the same count), and a per-token tier
mask [B, H_kv, T] says where each token lives; ``read`` puts both tiers back into token order.

When tokens move between tiers (importance is only known after attention, which runs after append):

* Prefill (the first append): the post-RoPE queries of the prefill arrive with the keys
  (signal ``queries``), so the store computes the prefill's attention probabilities itself from the
  full-precision queries and keys (causal softmax, the model's attention scaling read at attach),
  which is what MiKV's/H2O's full-precision prefill attention gives, scores the tokens and tiers them
  at once (low-tier tokens quantized straight from the model's K/V): with ``quantize_prefill=True``
  (default, like-for-like perplexity) the prefill's own attention reads the mixed-precision cache;
  ``mikv:quantize_prefill=false`` gives MiKV's own full-precision prefill attention. The prefill's
  attention is then not counted again: ``attention_needed`` tells the attention hook not to compute
  its probabilities a second time. (Without queries, e.g. a store fed by hand, the prefill is held
  in the high tier and re-tiered when its attention probabilities arrive.)
* Decode: new tokens enter the high tier (they are the most recent); after the step's attention,
  ``observe_attention`` adds the column sums to the scores and, while the high tier exceeds
  n_hi(T), demotes the lowest-scoring high-tier token outside the recent window, as H2O evicts after
  attention. A demoted token is quantized from its high-precision copy, which is then dropped: no
  full-precision copy of a low-precision token is kept.

Outlier-aware channel balancing (Sec. 3.2). At prefill, per batch row, KV head and channel c,
b_c = sqrt(max|q_c| / max|k_c|) with the maxima over the prefill tokens and over the query heads of
the group (b_c = 1 where either maximum is 0). Keys are stored as k · b (both tiers, all later tokens
with the same b), and ``read`` returns the dequantized keys ÷ b: equivalent to attending with q ÷ b
and the balanced keys, so q·k is unchanged before quantization while the outlier channels of the keys
shrink before per-token quantization. b is held in fp16 (counted as scales); without prefill queries
(or ``balance=false``) b = 1 and nothing is stored. fp16 range: a finite balanced key k · b beyond
±65504 is stored saturated there (not as inf), and ``read`` saturates finite unbalanced keys k̂ ÷ b at
the read dtype's maximum (the per-token grid of the balanced keys, divided by a smaller b_c, can land
beyond the input's range: 6.9e4 measured for keys of ±65504); no value within that range changes.

Decode and prefill cost. H2O's importance needs the post-softmax attention probabilities, which
FlashAttention and sdpa never materialise, so MiKV computes them besides the model's attention: at
prefill the full [H, T, T] matrix (its column sums; once, at append), at each decode step one row per
query head over the T tokens held, then the column sums, the score update and, while the high tier
is over budget, one demotion per head (re-quantizing a token). The official H2O code
(``FMInference/H2O``, ``h2o_hf/utils_real_drop``) computes attention eagerly for this. What is this
implementation's own: the decode step reads both tiers dequantized and permuted into token order,
then attends with sdpa (no attention from the codes), and the step's probabilities repeat sdpa's
q·k. ``python tests/bench/method_parts.py mikv`` times each piece for one SmolLM2-135M layer at 4096
tokens against int4's decode step and an sdpa prefill (measured numbers: docs/results.md).

Memory accounting: tiers by their codes/scales or fp16 tokens; b under ``scales``; the tier mask
(1 byte per token per head) and the high tier's fp32 importance scores under ``router`` (the
method's token-selection state, as MoQAE's votes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from harness.integration import attention_scaling
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
from harness.options import Fraction, NonNegativeInt, OneOf
from harness.quant import META_DTYPE, SUPPORTED_BITS, Bits, QuantizedTensor, quantize
from harness.storage import TOKEN_DIM, held_memory

FP16_BITS = 16
Held = torch.Tensor | QuantizedTensor  # fp16 tokens or per-token codes


@dataclass
class MiKVConfig(MethodConfig):
    ratio: Fraction = 0.25  # fraction of tokens kept in the high-precision tier
    high_bits: OneOf(FP16_BITS, *SUPPORTED_BITS) = 16  # 16 = fp16, or 8 / 4 (per-token INT)
    low_bits: Bits = 2  # 2 / 4 / 8 (per-token INT)
    recent: NonNegativeInt = 0  # recent window always high; 0 = half the high-precision budget (H2O's split)
    group: NonNegativeInt = 0  # channels per quantization range; 0 = head_dim
    balance: bool = True  # outlier-aware channel balancing of the keys
    quantize_prefill: bool = True  # prefill attention reads the mixed-precision cache

    aliases: ClassVar[dict[str, str]] = {"high": "high_bits", "low": "low_bits", "window": "recent"}

    def validate(self) -> None:
        if self.low_bits > self.high_bits:
            raise MethodSpecError(f"mikv: low_bits={self.low_bits} must not exceed high_bits={self.high_bits}")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Tokens ``idx`` [B, H, m] of ``x`` [B, H, n, X] (per head) -> [B, H, m, X], as whole rows."""
    b, h, m = idx.shape
    n, width = x.shape[TOKEN_DIM], x.shape[-1]
    rows = (idx + (torch.arange(b * h, device=idx.device) * n).view(b, h, 1)).flatten()  # [B·H·m] in [B·H·n, X]
    return x.reshape(b * h * n, width).index_select(0, rows).view(b, h, m, width)


def _take_q(q: QuantizedTensor, idx: torch.Tensor) -> QuantizedTensor:
    """Per-head token selection of a per-token (axis=-1) quantized tensor: codes and ranges move together."""
    zero = None if q.zero is None else _take(q.zero, idx)
    return QuantizedTensor(_take(q.codes, idx), _take(q.scale, idx), zero, q.bits, q.axis, q.group)


def saturate(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` with finite values beyond ``dtype``'s range clamped to ±its maximum (inf and NaN kept), so a
    cast to ``dtype`` overflows only where ``x`` already was infinite; ``x`` itself where ``dtype``
    holds every value of ``x``'s dtype."""
    fmax = torch.finfo(dtype).max
    if fmax >= torch.finfo(x.dtype).max:
        return x
    return torch.where(torch.isinf(x), x, x.clamp(-fmax, fmax))


def group_heads(x: torch.Tensor, n_kv_heads: int, reduce: str) -> torch.Tensor:
    """Reduce [B, H, ...] over the query heads of each GQA group -> [B, H_kv, ...] (sum or amax)."""
    b, h = x.shape[:2]
    g = x.reshape(b, n_kv_heads, h // n_kv_heads, *x.shape[2:])
    return g.sum(2) if reduce == "sum" else g.amax(2)


def causal_probs(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """``harness.integration.attention_probs(queries, keys, None, scaling)`` (causal softmax, fp32,
    [B, H, Tq, Tk]) by the same operations, with the scaling and the causal bias applied in place:
    two fewer [B, H, Tq, Tk] temporaries at prefill, the same numbers (torch.equal, tested)."""
    n_rep = queries.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(n_rep, dim=1) if n_rep > 1 else keys  # [B, H, Tk, D]
    scores = torch.matmul(queries.float(), k.float().transpose(-1, -2)).mul_(scaling)  # [B, H, Tq, Tk]
    q_len, kv_len = scores.shape[-2:]
    bias = torch.full((q_len, kv_len), float("-inf"), device=scores.device).triu_(kv_len - q_len + 1)  # 0 where j <= i
    return torch.softmax(scores.add_(bias), dim=-1)


def column_scores(probs: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """H2O importance of one forward: probs [B, H, Tq, Tk] summed over queries and the query heads of
    each KV group -> [B, H_kv, Tk] (fp32)."""
    return group_heads(probs.float().sum(-2), n_kv_heads, "sum")


def balance_factors(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """MiKV's channel balancer b = sqrt(max|q_c| / max|k_c|) -> [B, H_kv, 1, D] fp16.

    queries [B, H, T, D] (post-RoPE, maxima also over the query heads of each group), keys
    [B, H_kv, T, D]. Channels where either maximum is 0 get b = 1.
    """
    qmax = group_heads(queries.float().abs().amax(TOKEN_DIM), keys.shape[1], "amax")  # [B, H_kv, D]
    kmax = keys.float().abs().amax(TOKEN_DIM)  # [B, H_kv, D]
    ok = (qmax > 0) & (kmax > 0)
    b = torch.where(ok, torch.sqrt(qmax / torch.where(ok, kmax, torch.ones_like(kmax))), torch.ones_like(kmax))
    b = b.to(META_DTYPE)
    return torch.where(torch.isfinite(b) & (b > 0), b, torch.ones_like(b)).unsqueeze(TOKEN_DIM)


class _Tier:
    """Keys and values of one precision tier, [B, H_kv, n, D] in position order per head."""

    def __init__(self, bits: int, group: int):
        self.bits, self.group = bits, group
        self.k: Held | None = None  # [B, H_kv, n, D]
        self.v: Held | None = None

    @property
    def length(self) -> int:
        if self.k is None:
            return 0
        return (self.k.codes if isinstance(self.k, QuantizedTensor) else self.k).shape[TOKEN_DIM]

    def encode(self, x: torch.Tensor) -> Held:
        if self.bits == FP16_BITS:
            return x.to(torch.float16)
        return quantize(x, self.bits, self.group, axis=-1)  # per token

    @staticmethod
    def _decode(x: Held, dtype: torch.dtype) -> torch.Tensor:
        return x.dequantize(dtype) if isinstance(x, QuantizedTensor) else x.to(dtype)

    @staticmethod
    def _cat(a: Held | None, b: Held) -> Held:
        if a is None:
            return b
        if isinstance(a, QuantizedTensor):
            return QuantizedTensor.cat([a, b], dim=TOKEN_DIM)
        return torch.cat([a, b], dim=TOKEN_DIM)

    @staticmethod
    def _select(x: Held, idx: torch.Tensor) -> Held:
        return _take_q(x, idx) if isinstance(x, QuantizedTensor) else _take(x, idx)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Encode and append tokens (they must come after every token already in the tier)."""
        if k.shape[TOKEN_DIM] == 0:
            return
        self.k, self.v = self._cat(self.k, self.encode(k)), self._cat(self.v, self.encode(v))

    def append_encoded(self, k: Held, v: Held) -> None:
        """Append already-encoded tokens (the caller restores position order with ``select``)."""
        self.k, self.v = self._cat(self.k, k), self._cat(self.v, v)

    def select(self, idx: torch.Tensor) -> None:
        """Keep tokens ``idx`` [B, H, m] (per head, in this order)."""
        if self.k is None:
            return
        if idx.shape[-1] == 0:
            self.k = self.v = None
            return
        self.k, self.v = self._select(self.k, idx), self._select(self.v, idx)

    def gather(self, idx: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded tokens ``idx`` [B, H, m] -> ([B, H, m, D], [B, H, m, D])."""
        return self._decode(self._select(self.k, idx), dtype), self._decode(self._select(self.v, idx), dtype)

    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.k is None:
            return None, None
        return self._decode(self.k, dtype), self._decode(self.v, dtype)

    def read_into(self, out_k: torch.Tensor, out_v: torch.Tensor) -> None:
        """Decode the tier into ``out_k``, ``out_v`` [B, H, n, D] (views, in their dtype), as ``read`` would."""
        for x, out in ((self.k, out_k), (self.v, out_v)):
            if isinstance(x, QuantizedTensor):
                x.dequantize(out.dtype, out=out)
            else:
                out.copy_(x)

    def memory(self) -> MemoryReport:
        r = held_memory(self.k)
        r += held_memory(self.v)
        return r

    def reorder(self, index: torch.Tensor) -> None:
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


class MiKVStore(LayerStore):
    """High tier (important tokens) + low tier (the rest), a tier mask, H2O scores, key balancer."""

    def __init__(self, layer_idx: int, info: ModelInfo, config: MiKVConfig, scaling: float | None = None):
        super().__init__(layer_idx, info)
        self.cfg = config
        self.scaling = scaling if scaling is not None else info.head_dim**-0.5
        group = config.group or info.head_dim
        self.high = _Tier(config.high_bits, group)
        self.low = _Tier(config.low_bits, group)
        self.mask: torch.Tensor | None = None  # [B, H_kv, T] bool, True = high tier
        self.scores: torch.Tensor | None = None  # [B, H_kv, n_hi] fp32, H2O scores of the high tier
        self.balancer: torch.Tensor | None = None  # [B, H_kv, 1, D] fp16, None = no balancing
        self.scored = 0  # queries of tokens [0, scored) are already in the scores
        self._batch: int | None = None

    # ---- budget ------------------------------------------------------------------------------
    def budget(self, t: int) -> int:
        """floor(ratio · t) high-precision tokens per head."""
        return min(t, math.floor(self.cfg.ratio * t + 1e-9))

    def window(self, t: int) -> int:
        """Recent tokens always in the high tier."""
        w = self.cfg.recent if self.cfg.recent > 0 else self.budget(t) // 2
        return min(t, w)

    def n_high(self, t: int) -> int:
        return max(self.budget(t), self.window(t))

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[-1]

    def positions(self, n_lo: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token positions of the low and high tiers, ([B, H, n_lo], [B, H, n_hi]), ascending per head,
        from the tier mask (computed per call: a copy kept between calls would be held and not counted)."""
        order = torch.argsort(self.mask.to(torch.uint8), dim=-1, stable=True)  # low first, each ascending
        n_lo = self.low.length if n_lo is None else n_lo
        return order[..., :n_lo], order[..., n_lo:]

    # ---- store -------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, obs: Observation) -> None:
        b, h, n, _ = keys.shape
        self._batch = b
        if n == 0:
            return
        prefill = self.length == 0
        if prefill and self.cfg.balance and obs.queries is not None:
            self.balancer = balance_factors(obs.queries, keys)
        k = saturate(keys.float() * self.balancer.float(), torch.float16) if self.balancer is not None else keys
        if prefill and obs.queries is not None:
            # the prefill's attention, from the full-precision queries and keys, decides the tiers now
            probs = causal_probs(obs.queries, keys, self.scaling)  # [B, H, T, T]
            self._tier_prefill(k, values, column_scores(probs, h))
            return
        self.high.append(k, values)  # new tokens are the most recent: high tier, position order kept
        new_mask = torch.ones(b, h, n, dtype=torch.bool, device=keys.device)
        self.mask = new_mask if self.mask is None else torch.cat([self.mask, new_mask], dim=-1)
        zeros = torch.zeros(b, h, n, dtype=torch.float32, device=keys.device)
        self.scores = zeros if self.scores is None else torch.cat([self.scores, zeros], dim=-1)

    def _tier_prefill(self, k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor) -> None:
        """Store the prefill [B, H_kv, T, D] by tiers: the recent window and the top-scoring older
        tokens (scores [B, H_kv, T]) high, the rest quantized low straight from the given K/V."""
        t = k.shape[TOKEN_DIM]
        w = self.window(t)
        mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        mask[..., t - w :] = True
        heavy = self.n_high(t) - w
        if heavy > 0:
            mask.scatter_(-1, scores[..., : t - w].topk(heavy, dim=-1).indices, True)
        self.mask, self.scored = mask, t
        pos_lo, pos_hi = self.positions(n_lo=t - self.n_high(t))
        self.high.append(_take(k, pos_hi), _take(v, pos_hi))
        self.low.append(_take(k, pos_lo), _take(v, pos_lo))
        self.scores = scores.gather(-1, pos_hi)

    def attention_needed(self, q_len: int, kv_len: int) -> bool:
        """False when ``observe_attention`` would change nothing: every query already scored (the
        prefill, scored at append) and the high tier within its budget (it is, right after tiering)."""
        if self.mask is None:
            return False
        return kv_len != self.length or self.scored < kv_len or self.high.length > self.n_high(self.length)

    def observe_attention(self, queries: torch.Tensor, probs: torch.Tensor | None) -> None:
        if probs is None or self.mask is None:
            return
        t_q, t_k = probs.shape[-2:]
        if t_k != self.length:
            raise RuntimeError(f"mikv layer {self.layer_idx}: attention over {t_k} tokens, store holds {self.length}")
        first = t_k - t_q  # position of the first query
        skip = max(0, self.scored - first)  # queries already counted (the prefill scored at append)
        if skip < t_q:
            col = column_scores(probs[..., skip:, :], self.mask.shape[1])  # [B, H_kv, T]
            _, pos_hi = self.positions()
            self.scores += col.gather(-1, pos_hi)
            self.scored = t_k
        self._enforce_budget()

    def _enforce_budget(self) -> None:
        """Demote the lowest-scoring high-tier tokens outside the recent window down to n_hi(T)."""
        t = self.length
        excess = self.high.length - self.n_high(t)
        if excess <= 0:
            return
        pos_lo, pos_hi = self.positions()
        old = pos_hi < t - self.window(t)  # [B, H, n_hi] candidates
        excess = min(excess, int(old.sum(-1).min()))
        if excess <= 0:
            return
        cand = torch.where(old, self.scores, torch.full_like(self.scores, float("inf")))
        demote = torch.topk(cand, excess, dim=-1, largest=False).indices.sort(-1).values  # [B, H, e]
        keep_mask = torch.ones_like(old).scatter_(-1, demote, False)
        keep = torch.argsort((~keep_mask).to(torch.uint8), dim=-1, stable=True)[..., : old.shape[-1] - excess]
        # quantize the demoted tokens from their high-precision copy, then drop that copy
        dk, dv = self.high.gather(demote, torch.float32)  # [B, H, e, D]
        pos_dem = pos_hi.gather(-1, demote)  # [B, H, e]
        self.high.select(keep)
        self.scores = self.scores.gather(-1, keep)
        self.mask.scatter_(-1, pos_dem, False)
        # merge into the low tier in position order
        self.low.append_encoded(self.low.encode(dk), self.low.encode(dv))
        order = torch.argsort(torch.cat([pos_lo, pos_dem], dim=-1), dim=-1)  # positions are distinct: one order
        self.low.select(order)

    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, d = self._batch or 0, self.info.n_kv_heads, self.info.head_dim
        t = self.length
        dev = self.mask.device if self.mask is not None else self.info.device
        out_k = torch.empty(b, h, t, d, dtype=dtype, device=dev)
        out_v = torch.empty(b, h, t, d, dtype=dtype, device=dev)
        if t == 0:
            return out_k, out_v
        # both tiers decoded side by side in tier order (low, then high), then one row permutation
        work = torch.float32 if self.balancer is not None else dtype
        tier_k = torch.empty(b, h, t, d, dtype=work, device=dev)  # [B, H, T, D] in tier order
        tier_v = torch.empty(b, h, t, d, dtype=work, device=dev)
        n_lo = self.low.length
        for tier, part in ((self.low, slice(0, n_lo)), (self.high, slice(n_lo, t))):
            if tier.length:
                tier.read_into(tier_k[..., part, :], tier_v[..., part, :])
        if self.balancer is not None:  # undo the balancing: q·(k̃ / b) = (q / b)·k̃
            tier_k = saturate(tier_k.div_(self.balancer.float()), dtype)
        tier_pos = torch.cat(self.positions(), dim=-1)  # [B, H, T] position of each tier-order slot
        slot = torch.empty_like(tier_pos).scatter_(-1, tier_pos, torch.arange(t, device=dev).expand_as(tier_pos))
        rows = (slot + (torch.arange(b * h, device=dev) * t).view(b, h, 1)).flatten()  # [B·H·T] source rows
        torch.index_select(tier_k.to(dtype).view(-1, d), 0, rows, out=out_k.view(-1, d))
        torch.index_select(tier_v.to(dtype).view(-1, d), 0, rows, out=out_v.view(-1, d))
        return out_k, out_v

    def memory(self) -> MemoryReport:
        r = self.high.memory()
        r += self.low.memory()
        r.add("scales", tensor_bytes(self.balancer))
        r.add("router", tensor_bytes(self.mask) + tensor_bytes(self.scores))
        return r

    def stats(self) -> dict[str, list[float]]:
        """Tokens per tier (summed over batch rows and KV heads): [high, low]."""
        b, h = (self.mask.shape[:2]) if self.mask is not None else (0, 0)
        return {"tier_tokens": [float(self.high.length * b * h), float(self.low.length * b * h)]}

    def reorder(self, index: torch.Tensor) -> None:
        self.high.reorder(index)
        self.low.reorder(index)
        for name in ("mask", "scores", "balancer"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index))
        self._batch = len(index)


class MiKV(KVCacheMethod):
    """MiKV (arXiv 2402.18096): importance-aware mixed precision with outlier-aware key balancing."""

    name = "mikv"
    description = "MiKV: H2O-important tokens FP16, the rest INT2, balanced keys (options ratio, high, low)"
    report = ReportStyle("MiKV", "v", "C2", rank=60)

    config_class = MiKVConfig
    signals = frozenset({"attention", "queries"})

    def __init__(self, config: MiKVConfig | None = None, name: str | None = None):
        super().__init__(config, name)
        self.scaling: float | None = None

    def check_model(self, info: ModelInfo) -> None:
        c = self.config
        group = c.group or info.head_dim
        if info.head_dim % group:
            raise MethodSpecError(
                f"{self.label}: group={group} does not divide head_dim={info.head_dim}; "
                f"accepted: divisors of {info.head_dim}"
            )
        for bits in (c.high_bits, c.low_bits):
            if bits != FP16_BITS and info.head_dim * bits % 8:
                raise MethodSpecError(f"{self.label}: head_dim={info.head_dim} cannot be bit-packed at {bits} bits")

    def attach(self, model: torch.nn.Module, info: ModelInfo) -> None:
        """Read the attention scaling the model uses (for the prefill probabilities the store computes)."""
        self.scaling = attention_scaling(model)

    def new_layer_store(self, layer_idx: int, info: ModelInfo) -> LayerStore:
        return MiKVStore(layer_idx, info, self.config, self.scaling)
