"""The one module that touches transformers internals.

* ``model_info`` reads the attention geometry and refuses layer types the harness cannot serve.
* ``HarnessCache`` (a ``transformers.Cache``) holds one ``HarnessLayer`` (a ``DynamicLayer``) per
  decoder layer; each wraps the method's ``LayerStore``. ``update()`` stores the new K/V and returns
  what the store reconstructs, so quantization applies to prefill attention too, unless the method
  keeps prefill in full precision (KIVI's own code does).
* ``AttachedMethod`` installs only the hooks a method asks for: a forward hook on each ``k_proj``
  (pre-RoPE keys), on each block's ``input_layernorm`` (MoQAE's router input), and an attention
  function that delivers queries and attention probabilities (MiKV / H2O) to the layer stores.
* ``forward`` / ``generate`` call the model with a cache under whichever keyword the installed
  transformers release uses (``cache`` since 5.2x, ``past_key_values`` before).
* Calibration and capture, so that a method never touches a module itself: ``capture`` records,
  per layer and forward, pre-RoPE keys and values (k_proj / v_proj outputs), post-RoPE queries,
  block inputs, RoPE tables and attention probabilities as plain tensors (and, with ``grad``, the
  loss gradients of the k_proj / v_proj outputs, KVQuant's Fisher information), removing its
  hooks on exit; ``attention_projections`` gives each layer's q/k/v/o weights and biases as
  parameters (KVmix's weight gradients, QoQ's folds), ``WeightEdits`` changes them and restores
  them bit for bit; ``rope_tables`` / ``attention_scaling`` expose the model's RoPE and attention
  scale; ``calibration_mode`` sets eval mode and ``requires_grad`` for a calibration pass;
  ``model_fingerprint`` / ``model_name`` key calibration artefacts (``harness.files``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


class HarnessLayer(DynamicLayer):
    """A transformers cache layer whose storage is a method's ``LayerStore``.

    ``keys`` / ``values`` stay None: the store is the only holder of the history.
    """

    def __init__(self, store: LayerStore, quantize_prefill: bool, board: _SignalBoard):
        super().__init__()
        self.store = store
        self.quantize_prefill = quantize_prefill
        self.board = board

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
        layers = [
            HarnessLayer(method.new_layer_store(i, info), method.quantize_prefill, board) for i in range(info.n_layers)
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

    def memory(self) -> MemoryReport:
        """Bytes really held by every layer's store, summed."""
        total = MemoryReport()
        for store in self.stores:
            total += store.memory()
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
        scaling = kwargs.get("scaling") or module.head_dim**-0.5
        probs = attention_probs(query, key, attention_mask, scaling)
        cache.layers[module.layer_idx].store.observe_attention(query, probs)
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
            pe = kwargs.get("position_embeddings")
            if pe is None:
                raise UnsupportedModelError(
                    f"{self.info.family}: attention gets no position_embeddings; RoPE tables are needed"
                )
            self.board.put(layer_idx, "rope", pe)

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
    def new_cache(self) -> HarnessCache:
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


# --------------------------------------------------------------------------------------------
# Calibration and capture
# --------------------------------------------------------------------------------------------

#: Signals ``capture`` records, per decoder layer and forward (shapes as delivered):
#: "pre_rope_keys" [B, H_kv, T, D] (k_proj output, before RoPE), "values" [B, H_kv, T, D] (v_proj
#: output), "queries" [B, H, T, D] (q_proj output with RoPE applied), "block_input" [B, T, hidden]
#: (after the block's input norm), "rope" the (cos, sin) tables [B, T, D] the attention got,
#: "attention" the softmax probabilities [B, H, Tq, Tk] in fp32 (``attention_probs``).
CAPTURE_SIGNALS = frozenset({"pre_rope_keys", "values", "queries", "block_input", "rope", "attention"})
#: the captured signals that are projection outputs, whose loss gradients ``capture(grad=...)`` keeps
GRAD_SIGNALS = frozenset({"pre_rope_keys", "values"})
#: ``capture(grad=...)``: "full" (= True) the exact ∂loss/∂output; "cut" each captured output a fresh
#: leaf, so gradients stop there (see ``capture``)
GRAD_MODES = ("full", "cut")
CAPTURE_ATTENTION = "moqae_capture"

#: model config id -> (the attention implementation ``capture`` wraps, where probabilities go)
_CAPTURE_ATTN: dict[int, tuple[str, Callable[[int, torch.Tensor], None]]] = {}


class Capture:
    """What one ``capture`` context recorded.

    ``layers[i]`` maps the captured signal names of layer ``i`` to their (detached) tensors from the
    latest forward (kept only with ``keep``); ``grad(i, name)`` is the gradient of the loss with
    respect to a projection-output signal after ``backward`` (only with ``grad``).
    """

    def __init__(self, signals: frozenset[str], info: ModelInfo, keep: bool, grad: str | None):
        self.signals, self.keep, self.grad_mode = signals, keep, grad
        self.family, self.head_dim = info.family, info.head_dim
        self.layers: dict[int, dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]] = {}
        self._pending: dict[int, dict[str, Any]] = {}
        self._leaves: dict[tuple[int, str], torch.Tensor] = {}  # [B, T, H_kv * D] projection outputs

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H * D] -> [B, H, T, D] (a view)."""
        b, t, _ = x.shape
        return x.view(b, t, -1, self.head_dim).transpose(1, 2)

    def grad(self, layer_idx: int, name: str) -> torch.Tensor | None:
        """∂loss/∂``name`` [B, H_kv, T, D] of layer ``layer_idx`` in the latest forward, or None where
        that output did not reach the loss. Needs ``capture(..., grad=True)`` and a backward."""
        if self.grad_mode is None or name not in GRAD_SIGNALS & self.signals:
            raise ValueError(
                f"capture: no gradient of {name!r}; pass grad=True and capture one of {sorted(GRAD_SIGNALS)}"
            )
        leaf = self._leaves.get((layer_idx, name))
        if leaf is None:
            raise KeyError(f"capture: layer {layer_idx} produced no {name!r} in the latest forward")
        return None if leaf.grad is None else self._heads(leaf.grad)

    def clear(self) -> None:
        """Drop everything held (signals, gradient leaves), e.g. between calibration windows."""
        self.layers.clear()
        self._pending.clear()
        self._leaves.clear()

    # ---- hooks -------------------------------------------------------------------------------
    def _put(self, layer_idx: int, name: str, value: Any) -> None:
        self._pending.setdefault(layer_idx, {})[name] = value

    def _proj_hook(self, layer_idx: int, name: str):
        def hook(_module, _inputs, output):
            if self.grad_mode is not None and name in GRAD_SIGNALS:
                if self.grad_mode == "full" and output.requires_grad:
                    output.retain_grad()  # in the graph: gradients flow on into earlier layers
                    self._leaves[(layer_idx, name)] = output
                    self._put(layer_idx, name, self._heads(output.detach()))
                    return None
                # nothing before it needs a gradient ("full"), or "cut": the output becomes a leaf
                leaf = output.detach().requires_grad_(True)
                self._leaves[(layer_idx, name)] = leaf
                self._put(layer_idx, name, self._heads(leaf.detach()))
                return leaf
            self._put(layer_idx, name, self._heads(output.detach()))
            return None

        return hook

    def _rope_hook(self, layer_idx: int):
        def hook(_module, _args, kwargs):
            pe = kwargs.get("position_embeddings")
            if pe is None:
                raise UnsupportedModelError(
                    f"{self.family}: attention gets no position_embeddings; RoPE tables are needed"
                )
            self._put(layer_idx, "rope", tuple(x.detach() for x in pe))

        return hook

    def _block_input_hook(self, layer_idx: int):
        def hook(_module, _inputs, output):
            self._put(layer_idx, "block_input", output.detach())

        return hook

    def _layer_done_hook(self, layer_idx: int, on_layer: Callable[[int, dict[str, Any]], None] | None):
        def hook(_module, _args, _output):
            got = self._pending.pop(layer_idx, {})
            q = got.pop("pre_rope_queries", None)
            if q is not None:
                got["queries"] = apply_rope(q, *got["rope"])
            signals = {k: v for k, v in got.items() if k in self.signals}
            if self.keep:
                self.layers[layer_idx] = signals
            if on_layer is not None:
                on_layer(layer_idx, signals)

        return hook


@contextmanager
def capture(
    model: torch.nn.Module,
    signals: Iterable[str],
    on_layer: Callable[[int, dict[str, Any]], None] | None = None,
    grad: bool | str = False,
    keep: bool | None = None,
) -> Iterator[Capture]:
    """Record ``signals`` (see ``CAPTURE_SIGNALS``) of every decoder layer during the forwards run
    inside the context; every hook (and the attention wrapper for "attention") is removed on exit.

    After each layer's attention, ``on_layer(layer_idx, {name: tensor})`` gets that layer's signals
    (tensors detached; "rope" a (cos, sin) pair). ``keep`` (default: when no ``on_layer`` is given)
    also keeps the latest forward's signals in ``Capture.layers``.

    ``grad`` keeps the loss gradients of the captured k_proj / v_proj outputs ("pre_rope_keys" /
    "values"): after ``loss.backward()``, ``Capture.grad(layer, name)`` is ∂loss/∂output. With
    ``grad=True`` ("full") it is the exact gradient (the output's ``retain_grad``, as KVQuant's
    ``run-fisher.py``; an output that nothing before it makes differentiable, e.g. layer 0's with
    frozen weights, is made a leaf). With ``grad="cut"`` every captured output is replaced in the
    forward by a fresh leaf, so no gradient flows through it into earlier layers: the gradient of
    layer l's output then misses the paths through the captured projections of the layers after l.
    The forward's values are the same in every mode.
    """
    wanted = frozenset(signals)
    unknown = wanted - CAPTURE_SIGNALS
    if unknown:
        raise ValueError(f"capture: unknown signals {sorted(unknown)}; known: {sorted(CAPTURE_SIGNALS)}")
    mode = "full" if grad is True else (grad or None)
    if mode is not None and mode not in GRAD_MODES:
        raise ValueError(f"capture: grad={grad!r}; accepted: False, True, {', '.join(map(repr, GRAD_MODES))}")
    if mode is not None and not wanted & GRAD_SIGNALS:
        raise ValueError(f"capture: grad={grad!r} needs one of {sorted(GRAD_SIGNALS)}")
    info = model_info(model)
    cap = Capture(wanted, info, on_layer is None if keep is None else keep, mode)
    handles: list[Any] = []
    restore_attention: Callable[[], None] | None = None
    try:
        for i, layer in enumerate(decoder_layers(model)):
            attn = layer.self_attn
            if wanted & {"rope", "queries"}:
                handles.append(attn.register_forward_pre_hook(cap._rope_hook(i), with_kwargs=True))
            if "queries" in wanted:
                handles.append(attn.q_proj.register_forward_hook(cap._proj_hook(i, "pre_rope_queries")))
            if "pre_rope_keys" in wanted:
                handles.append(attn.k_proj.register_forward_hook(cap._proj_hook(i, "pre_rope_keys")))
            if "values" in wanted:
                handles.append(attn.v_proj.register_forward_hook(cap._proj_hook(i, "values")))
            if "block_input" in wanted:
                norm = getattr(layer, "input_layernorm", None)
                if norm is None:
                    raise UnsupportedModelError(f"{info.family}: layer {i} has no input_layernorm")
                handles.append(norm.register_forward_hook(cap._block_input_hook(i)))
            handles.append(attn.register_forward_hook(cap._layer_done_hook(i, on_layer)))
        if "attention" in wanted:
            restore_attention = _wrap_attention(model, lambda i, probs: cap._put(i, "attention", probs))
        yield cap
    finally:
        for h in handles:
            h.remove()
        if restore_attention is not None:
            restore_attention()
        cap._pending.clear()


def _original_attention(name: str, module: torch.nn.Module) -> Callable[..., Any]:
    """The attention function registered as ``name``; "eager" is the modeling file's own."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name != "eager":
        return ALL_ATTENTION_FUNCTIONS[name]
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as fn
    return fn


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention function of ``capture``: the wrapped one's output, plus its probabilities reported."""
    original, sink = _CAPTURE_ATTN[id(module.config)]
    out = _original_attention(original, module)(module, query, key, value, attention_mask, **kwargs)
    scaling = kwargs.get("scaling") or module.head_dim**-0.5
    with torch.no_grad():
        sink(module.layer_idx, attention_probs(query, key, attention_mask, scaling))  # [B, H, Tq, Tk]
    return out


def _set_attn_implementation(model: torch.nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(name)
            return
        except (ValueError, ImportError, KeyError):
            pass
    model.config._attn_implementation = name


def _wrap_attention(model: torch.nn.Module, sink: Callable[[int, torch.Tensor], None]) -> Callable[[], None]:
    """Route the model's attention through ``_capture_attention`` (wrapping whatever implementation
    is set, the harness's included); returns the function that undoes it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    cfg = model.config
    if id(cfg) in _CAPTURE_ATTN:
        raise RuntimeError("capture: attention probabilities of this model are already being captured")
    original = cfg._attn_implementation or "sdpa"
    mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(original)
    if mask_fn is None:
        raise UnsupportedModelError(
            f"attention implementation {original!r} has no mask function in transformers; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    # registered with the wrapped implementation's mask function (see AttachedMethod._install_attention)
    name = f"{CAPTURE_ATTENTION}_{original}"
    AttentionInterface.register(name, _capture_attention)
    AttentionMaskInterface.register(name, mask_fn)
    _CAPTURE_ATTN[id(cfg)] = (original, sink)
    _set_attn_implementation(model, name)

    def restore() -> None:
        _CAPTURE_ATTN.pop(id(cfg), None)
        _set_attn_implementation(model, original)

    return restore


@contextmanager
def calibration_mode(
    model: torch.nn.Module, trainable: Iterable[torch.nn.Parameter] | None = None
) -> Iterator[torch.nn.Module]:
    """Eval mode for a calibration pass; with ``trainable``, ``requires_grad`` only on those parameters
    (every other parameter frozen). Mode and every flag are restored on exit."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    try:
        model.eval()
        if trainable is not None:
            for p in params:
                p.requires_grad_(False)
            for p in trainable:
                p.requires_grad_(True)
        yield model
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)


@dataclass(frozen=True)
class Projection:
    """One linear projection's parameters: weight [out, in], bias [out] or None."""

    weight: torch.nn.Parameter
    bias: torch.nn.Parameter | None


@dataclass(frozen=True)
class AttentionProjections:
    """The attention projections of one decoder layer (parameters, changed in place by folds):
    q [H·D, hidden], k / v [H_kv·D, hidden], o [hidden, H·D] (None if the layer has none)."""

    q: Projection
    k: Projection
    v: Projection
    o: Projection | None


def attention_projections(model: torch.nn.Module) -> list[AttentionProjections]:
    """Per decoder layer, its q/k/v/o projection parameters (the model's own tensors)."""

    def proj(m: torch.nn.Module | None) -> Projection | None:
        return None if m is None else Projection(m.weight, getattr(m, "bias", None))

    return [
        AttentionProjections(
            q=proj(layer.self_attn.q_proj),
            k=proj(layer.self_attn.k_proj),
            v=proj(layer.self_attn.v_proj),
            o=proj(getattr(layer.self_attn, "o_proj", None)),
        )
        for layer in decoder_layers(model)
    ]


class WeightEdits:
    """In-place changes of model parameters that can be undone exactly.

    ``set`` keeps a CPU copy of a parameter's original data the first time it changes it; ``restore``
    copies the originals back (bit for bit: no inverse fold, which would drift by rounding).
    ``tag`` names a group of parameters so that part of the edits can be undone.
    """

    def __init__(self) -> None:
        # id(parameter) -> (tag, parameter, CPU copy of its original data)
        self._saved: dict[int, tuple[str, torch.nn.Parameter, torch.Tensor]] = {}

    def save(self, tag: str, p: torch.nn.Parameter | None) -> None:
        if p is not None and id(p) not in self._saved:
            self._saved[id(p)] = (tag, p, p.detach().to("cpu", copy=True))

    def set(self, tag: str, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        """``p`` ← ``value`` (cast to p's dtype), the original saved first."""
        self.save(tag, p)
        with torch.no_grad():
            p.copy_(value.to(p.dtype))

    def restore(self, tags: Iterable[str] | None = None) -> None:
        """Restore the parameters of ``tags`` (all when None) and forget them."""
        which = None if tags is None else set(tags)
        for key, (tag, p, original) in list(self._saved.items()):
            if which is None or tag in which:
                with torch.no_grad():
                    p.copy_(original.to(p.device))
                del self._saved[key]

    def __len__(self) -> int:
        return len(self._saved)


class RopeTables:
    """The model's own RoPE tables for absolute positions, from its shared rotary-embedding module."""

    def __init__(self, rotary: torch.nn.Module):
        self._rotary = rotary
        #: transformers' RoPE type: default, linear, llama3, yarn, dynamic, longrope, ...
        self.rope_type: str = getattr(rotary, "rope_type", "default")

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [1, T, D'] in fp32 for absolute ``positions`` [T]."""
        probe = torch.zeros(1, device=positions.device, dtype=torch.float32)
        return self._rotary(probe, positions.view(1, -1))

    def dim(self, device: torch.device) -> int:
        """D', the channels the tables rotate (less than head_dim for partial rotary embeddings)."""
        probe = torch.zeros(1, device=device, dtype=torch.float32)
        cos, _ = self._rotary(probe, torch.zeros(1, 1, dtype=torch.long, device=device))
        return cos.shape[-1]


def rope_tables(model: torch.nn.Module) -> RopeTables | None:
    """The model's RoPE tables (``RopeTables``), or None if it has no shared rotary embedding."""
    rotary = rotary_embedding(model)
    return None if rotary is None else RopeTables(rotary)


def attention_scaling(model: torch.nn.Module) -> float:
    """The softmax scaling the model's attention uses (its ``scaling``, else head_dim^-0.5)."""
    scaling = getattr(decoder_layers(model)[0].self_attn, "scaling", None)
    return float(scaling or model_info(model).head_dim ** -0.5)


def model_name(model: torch.nn.Module) -> str:
    """The name or path the model was loaded from (its model_type when it has none)."""
    return str(getattr(model.config, "_name_or_path", "") or model.config.model_type)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of a model's config and weights (float64 sums of every parameter)."""
    h = hashlib.sha1()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(p.detach().double().sum().cpu().numpy().tobytes())
    return h.hexdigest()
