"""Calibration and capture: what a method needs from a model, without touching a module itself
(see ``harness.integration``)."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from harness.integration.cache import (
    apply_rope,
    attention_probs,
    decoder_layers,
    model_info,
    position_embeddings,
    rotary_embedding,
)
from harness.interface import (
    ModelInfo,
    UnsupportedModelError,
)

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
            self._put(layer_idx, "rope", tuple(x.detach() for x in position_embeddings(kwargs, self.family)))

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
