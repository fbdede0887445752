"""The harness's transformers ``Cache`` and how a method is attached to a model (see ``harness.integration``)."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from harness.interface import (
    SIGNALS,
    KVCacheMethod,
    LayerStore,
    MemoryReport,
    ModelInfo,
    Observation,
    UnsupportedModelError,
)

SERVED_LAYER_TYPES = ("full_attention", "sliding_attention")
HARNESS_ATTENTION = "moqae_harness"
_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Model inspection
# --------------------------------------------------------------------------------------------


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of a causal LM (``model.model.layers``), refusing anything else."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no decoder layers at model.model.layers; the harness serves "
            "decoder-only causal LMs of the Llama / Mistral / Qwen2 families"
        )
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj")):
            raise UnsupportedModelError(
                f"{type(model).__name__}: layer {i} has no self_attn with q_proj/k_proj/v_proj; "
                "the harness serves multi-head / grouped-query attention layers only"
            )
    return list(layers)


def rotary_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's shared rotary-embedding module (``model.model.rotary_emb``), or None."""
    return getattr(getattr(model, "model", None), "rotary_emb", None)


def model_info(model: torch.nn.Module) -> ModelInfo:
    """Attention geometry from the model config; refuses layer types the cache cannot serve."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{cfg.model_type}: encoder-decoder models are not supported")
    layers = decoder_layers(model)
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * len(layers)
    bad = sorted({t for t in layer_types if t not in SERVED_LAYER_TYPES})
    if bad:
        raise UnsupportedModelError(
            f"{cfg.model_type}: layer types {bad} are not served (accepted: {', '.join(SERVED_LAYER_TYPES)})"
        )
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    param = next(model.parameters())
    return ModelInfo(
        family=cfg.model_type,
        n_layers=len(layers),
        n_heads=n_heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        hidden_size=cfg.hidden_size,
        dtype=param.dtype,
        device=param.device,
    )


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


def position_embeddings(attention_kwargs: dict[str, Any], family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) RoPE tables [B, T, D] an attention module's forward receives (a pre-hook's kwargs)."""
    pe = attention_kwargs.get("position_embeddings")
    if pe is None:
        raise UnsupportedModelError(f"{family}: attention gets no position_embeddings; RoPE tables are needed")
    return pe


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as the Llama / Mistral / Qwen2 modeling code applies it: x [B, H, T, D], cos/sin [B, T, D]."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


class _SignalBoard:
    """Signals captured by hooks during the current forward, picked up by the layer's update()."""

    def __init__(self) -> None:
        self.pending: dict[int, dict[str, torch.Tensor]] = {}
        self.cache: HarnessCache | None = None
        self.from_codes = False  # decode steps of this method attend from the codes
        self.deferred: set[int] = set()  # layers whose decode attention the store computes

    def put(self, layer_idx: int, key: str, value: torch.Tensor) -> None:
        self.pending.setdefault(layer_idx, {})[key] = value

    def take(self, layer_idx: int) -> dict[str, torch.Tensor]:
        return self.pending.pop(layer_idx, {})


class _NonFinite:
    """Non-finite (NaN / ±inf) K/V elements appended to one cache, per layer; one warning per cache.

    A method stores whatever it is given (nothing raises), so a NaN spreads through its scales and
    every later read; this count makes it visible (``HarnessCache.memory().nonfinite_kv``, the
    records' ``kv``). Per append: one fp32 sum of the keys and one of the values, checked for
    finiteness (a NaN or inf anywhere makes the sum non-finite; an fp32 overflow of the sum of finite
    values only costs the exact count, which is computed only then), i.e. one host sync per append.
    """

    def __init__(self, n_layers: int, label: str):
        self.per_layer = [0] * n_layers
        self.label = label
        self.warned = False

    @property
    def total(self) -> int:
        return sum(self.per_layer)

    def check(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Count the non-finite elements of ``keys`` / ``values`` [B, H_kv, T, D] appended to ``layer_idx``."""
        with torch.no_grad():
            if bool(torch.isfinite(keys.sum(dtype=torch.float32) + values.sum(dtype=torch.float32))):
                return
            n = int((~torch.isfinite(keys)).sum()) + int((~torch.isfinite(values)).sum())
        if n == 0:
            return
        self.per_layer[layer_idx] += n
        if not self.warned:
            self.warned = True
            _log.warning(
                f"{self.label}: {n} non-finite key/value element(s) (NaN or inf) appended to layer {layer_idx}; "
                "the cache stores them as given (counted in kv.nonfinite_kv; this warning is shown once per cache)"
            )


class HarnessLayer(DynamicLayer):
    """A transformers cache layer whose storage is a method's ``LayerStore``.

    ``keys`` / ``values`` stay None: the store is the only holder of the history. Every append is
    checked for non-finite elements (``nonfinite``: the cache's counter, None = no check).
    """

    def __init__(
        self, store: LayerStore, quantize_prefill: bool, board: _SignalBoard, nonfinite: _NonFinite | None = None
    ):
        super().__init__()
        self.store = store
        self.quantize_prefill = quantize_prefill
        self.board = board
        self.nonfinite = nonfinite

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.batch_size = key_states.shape[0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, n_new = self.store.seq_len, key_states.shape[-2]
        signals = self.board.take(self.store.layer_idx)
        rope = signals.get("rope")
        queries = signals.get("pre_rope_queries")
        obs = Observation(
            positions=torch.arange(start, start + n_new, device=key_states.device),
            pre_rope_keys=signals.get("pre_rope_keys"),
            block_input=signals.get("block_input"),
            queries=apply_rope(queries, *rope) if queries is not None and rope is not None else None,
            rope=rope,
            is_prefill=start == 0,
        )
        dtype = key_states.dtype
        if self.nonfinite is not None:
            self.nonfinite.check(self.store.layer_idx, key_states, value_states)
        if self.board.from_codes and n_new == 1 and start > 0:
            # Decode step: the store attends from what it holds (``_harness_attention`` calls
            # ``store.attend``); the returned tensors are placeholders that attention never reads.
            self.store.append(key_states, value_states, obs)
            self.store.seq_len = start + n_new
            self.board.deferred.add(self.store.layer_idx)
            return key_states, value_states
        if not self.quantize_prefill and n_new > 1:
            # Full-precision attention over the new tokens, history read from the store.
            past = self.store.read(dtype) if start else None
            self.store.append(key_states, value_states, obs)
            self.store.seq_len = start + n_new
            if past is None:
                return key_states, value_states
            return torch.cat([past[0], key_states], dim=-2), torch.cat([past[1], value_states], dim=-2)
        self.store.append(key_states, value_states, obs)
        self.store.seq_len = start + n_new
        return self.store.read(dtype)

    def get_seq_length(self) -> int:
        return self.store.seq_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.store.seq_len + query_length, 0

    def reset(self) -> None:
        raise NotImplementedError("make a new cache with AttachedMethod.new_cache() instead of reset()")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("cropping a quantized cache is not supported (assisted decoding)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.store.reorder(beam_idx.to(self.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.store.reorder(indices.to(self.device))
        self.batch_size = len(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.store.seq_len:
            index = torch.arange(self.batch_size, device=self.device).repeat_interleave(repeats)
            self.store.reorder(index)
            self.batch_size *= repeats

    def offload(self) -> None:
        raise NotImplementedError("offloading is not supported by the harness cache")

    def prefetch(self) -> None:
        pass


class HarnessCache(Cache):
    """A transformers ``Cache`` made of one ``HarnessLayer`` per decoder layer of one method."""

    def __init__(self, method: KVCacheMethod, info: ModelInfo, board: _SignalBoard):
        self.method = method
        self.state = method.new_cache_state()
        self._nonfinite = _NonFinite(info.n_layers, method.label)
        layers = [
            HarnessLayer(method.new_layer_store(i, info), method.quantize_prefill, board, self._nonfinite)
            for i in range(info.n_layers)
        ]
        for layer in layers:
            layer.store.cache_state = self.state
        super().__init__(layers=layers)
        self.board = board

    @property
    def stores(self) -> list[LayerStore]:
        return [layer.store for layer in self.layers]

    def layer_stats(self) -> list[dict[str, list[float]]]:
        return [store.stats() for store in self.stores]

    @property
    def nonfinite_kv(self) -> int:
        """Non-finite (NaN / ±inf) key and value elements appended so far, all layers."""
        return self._nonfinite.total

    def memory(self) -> MemoryReport:
        """Bytes really held by every layer's store, summed, with the non-finite K/V elements appended."""
        total = MemoryReport()
        for store in self.stores:
            total += store.memory()
        total.nonfinite_kv = self.nonfinite_kv
        return total

    def read_bytes(self) -> int:
        """Bytes the latest forward read from the cache, summed over layers: each store's
        ``last_read_bytes()``, or the bytes it holds where that is None (it reads everything)."""
        total = 0
        for store in self.stores:
            n = store.last_read_bytes()
            total += store.memory().total_bytes if n is None else n
        return total


# --------------------------------------------------------------------------------------------
# Attaching a method to a model
# --------------------------------------------------------------------------------------------


def _causal_bias(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(q_len, device=device).unsqueeze(1) + (kv_len - q_len)
    j = torch.arange(kv_len, device=device).unsqueeze(0)
    return torch.where(j <= i, 0.0, float("-inf"))


def attention_probs(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Softmax attention probabilities [B, H, Tq, Tk] in fp32 (keys repeated for GQA)."""
    n_rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(n_rep, dim=1) if n_rep > 1 else key
    scores = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scaling
    q_len, kv_len = scores.shape[-2:]
    if attention_mask is None:
        scores = scores + _causal_bias(q_len, kv_len, scores.device)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :kv_len], float("-inf"))
    else:
        scores = scores + attention_mask[..., :kv_len].float()
    return torch.softmax(scores, dim=-1)


_BOARDS: dict[int, tuple[_SignalBoard, str, frozenset[str]]] = {}


def _harness_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention function that delegates to the model's original one and reports queries/probs."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    board, original, signals = _BOARDS[id(module.config)]
    cache = board.cache
    if cache is not None and module.layer_idx in board.deferred:
        board.deferred.discard(module.layer_idx)
        scaling = kwargs.get("scaling") or module.head_dim**-0.5
        out = cache.layers[module.layer_idx].store.attend(query, scaling, attention_mask)  # [B, H, 1, D]
        return out.transpose(1, 2).contiguous(), None
    fn = ALL_ATTENTION_FUNCTIONS[original] if original != "eager" else None
    if fn is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as fn
    out = fn(module, query, key, value, attention_mask, **kwargs)
    if cache is not None and "attention" in signals:
        store = cache.layers[module.layer_idx].store
        scaling = kwargs.get("scaling") or module.head_dim**-0.5
        needed = store.attention_needed(query.shape[-2], key.shape[-2])
        store.observe_attention(query, attention_probs(query, key, attention_mask, scaling) if needed else None)
    return out


class AttachedMethod:
    """A method attached to a model: hooks installed, weights folded, ready to make caches.

    Use as a context manager, or call ``detach()``, which removes the hooks and lets the method
    undo any weight folding (``KVCacheMethod.detach``).
    """

    def __init__(self, model: torch.nn.Module, method: KVCacheMethod, from_codes: bool | None = None):
        self.model, self.method = model, method
        self.info = model_info(model)
        unknown = set(method.signals) - SIGNALS
        if unknown:
            raise ValueError(f"{method.label}: unknown signals {sorted(unknown)}; known: {sorted(SIGNALS)}")
        method.check_model(self.info)
        method.info = self.info
        self.board = _SignalBoard()
        if from_codes is None:
            from_codes = os.environ.get("MOQAE_DECODE_FROM_CODES", "1") not in ("0", "false", "no")
        # A method that observes attention probabilities (MiKV) needs the normal attention path.
        self.board.from_codes = bool(from_codes and method.decode_from_codes and "attention" not in method.signals)
        self._handles: list[Any] = []
        self._original_attn: str | None = None
        self._attached = False
        try:
            self._install_hooks()
            method.attach(model, self.info)
            self._attached = True
        except BaseException:
            self.detach()  # leave the model as it was
            raise

    def _install_hooks(self) -> None:
        method, layers = self.method, decoder_layers(self.model)
        if "pre_rope_keys" in method.signals:
            for i, layer in enumerate(layers):
                self._handles.append(layer.self_attn.k_proj.register_forward_hook(self._proj_hook(i, "pre_rope_keys")))
        if "queries" in method.signals:
            for i, layer in enumerate(layers):
                self._handles.append(
                    layer.self_attn.q_proj.register_forward_hook(self._proj_hook(i, "pre_rope_queries"))
                )
        if method.signals & {"pre_rope_keys", "queries"}:
            for i, layer in enumerate(layers):
                self._handles.append(layer.self_attn.register_forward_pre_hook(self._rope_hook(i), with_kwargs=True))
        if "block_input" in method.signals:
            for i, layer in enumerate(layers):
                norm = getattr(layer, "input_layernorm", None)
                if norm is None:
                    raise UnsupportedModelError(f"{self.info.family}: layer {i} has no input_layernorm")
                self._handles.append(norm.register_forward_hook(self._block_input_hook(i)))
        if "attention" in method.signals:
            self._install_attention()
        elif self.board.from_codes:
            self._install_attention()

    # ---- hooks -------------------------------------------------------------------------------
    def _proj_hook(self, layer_idx: int, name: str):
        d = self.info.head_dim

        def hook(_module, _inputs, output):
            b, t, _ = output.shape
            self.board.put(layer_idx, name, output.view(b, t, -1, d).transpose(1, 2))

        return hook

    def _rope_hook(self, layer_idx: int):
        def hook(_module, _args, kwargs):
            self.board.put(layer_idx, "rope", position_embeddings(kwargs, self.info.family))

        return hook

    def _block_input_hook(self, layer_idx: int):
        def hook(_module, _inputs, output):
            self.board.put(layer_idx, "block_input", output)

        return hook

    def _install_attention(self) -> None:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        cfg = self.model.config
        self._original_attn = cfg._attn_implementation or "sdpa"
        # One name per original implementation, registered with that implementation's mask function:
        # transformers builds no mask at all for an attention name it has no mask function for, and
        # the delegated sdpa would then fall back to a top-left causal mask, wrong for queries that
        # follow cached tokens (chunked prefill).
        name = f"{HARNESS_ATTENTION}_{self._original_attn}"
        AttentionInterface.register(name, _harness_attention)
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(self._original_attn)
        if mask_fn is None:
            raise UnsupportedModelError(
                f"attention implementation {self._original_attn!r} has no mask function in transformers; "
                "load the model with attn_implementation='sdpa' or 'eager'"
            )
        AttentionMaskInterface.register(name, mask_fn)
        _BOARDS[id(cfg)] = (self.board, self._original_attn, self.method.signals)
        self._set_attn(name)

    def _set_attn(self, name: str) -> None:
        if hasattr(self.model, "set_attn_implementation"):
            try:
                self.model.set_attn_implementation(name)
                return
            except (ValueError, ImportError, KeyError):
                pass
        self.model.config._attn_implementation = name

    # ---- public ------------------------------------------------------------------------------
    def new_cache(self) -> Cache:
        """A fresh cache: the method's own transformers cache (a peer row), else a ``HarnessCache``."""
        own = self.method.own_cache(self.model)
        if own is not None:  # a transformers cache of its own (a peer row): no store, no hook of ours
            self.board.cache = None
            return own
        cache = HarnessCache(self.method, self.info, self.board)
        self.board.cache = cache
        self.board.pending.clear()
        self.board.deferred.clear()
        return cache

    def calibrate(self, batches: Iterable[torch.Tensor]) -> None:
        self.method.calibrate(self.model, batches)

    def detach(self) -> None:
        if self._attached:
            self.method.detach(self.model, self.info)
            self._attached = False
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._original_attn is not None:
            _BOARDS.pop(id(self.model.config), None)
            self._set_attn(self._original_attn)
            self._original_attn = None
        self.board.cache = None

    def __enter__(self) -> AttachedMethod:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


# --------------------------------------------------------------------------------------------
# Calling the model with a cache
# --------------------------------------------------------------------------------------------


def _cache_kwarg(fn: Any) -> str:
    """The keyword under which this transformers release takes a cache (``forward`` and ``generate`` agree)."""
    params = inspect.signature(fn).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache: Cache) -> dict[str, Cache]:
    """``{<cache keyword of this transformers release>: cache}`` for ``model(...)`` / ``model.generate(...)``."""
    return {_cache_kwarg(model.forward): cache}


def forward(model: torch.nn.Module, input_ids: torch.Tensor, cache: Cache | None = None, **kwargs: Any):
    """``model(input_ids, <cache kwarg>=cache, use_cache=...)``; returns the model output."""
    if cache is None:
        return model(input_ids=input_ids, use_cache=False, **kwargs)
    kwargs[_cache_kwarg(model.forward)] = cache
    return model(input_ids=input_ids, use_cache=True, **kwargs)


def generate(model: torch.nn.Module, input_ids: torch.Tensor, cache: Cache | None = None, **kwargs: Any):
    """``model.generate`` with the given cache (a fresh ``HarnessCache`` per call)."""
    if cache is not None:
        kwargs[_cache_kwarg(model.forward)] = cache
    return model.generate(input_ids=input_ids, **kwargs)
