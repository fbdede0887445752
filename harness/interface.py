"""The one KV-cache-method interface every method (MoQAE and every baseline) plugs into.

A method is two small pieces, in the style of kvpress:

* ``KVCacheMethod`` — a registered class with a config dataclass. It validates itself against the
  model (``check_model``), may fold weights at attach time (``attach``, QoQ's SmoothAttention), may
  calibrate (``calibrate``, KVQuant / KVmix), declares which signals it needs (``signals``), and makes
  one ``LayerStore`` per decoder layer for every new cache (``new_layer_store``). It also declares
  what reports need (``name``, ``description``, ``variants``, ``report``: family, marker, colour,
  rank; ``report_label``, ``report_sort_key``, ``ablation_options``, ``report_sections``) and a
  ``prepare`` step that ``python -m harness reproduce`` runs before the sweep (MoQAE's router
  training). The registry (``harness.registry``) finds it by name, built-in or entry point.
* ``LayerStore`` — what one layer of one cache really holds: packed codes, fp16 scales/zeros,
  full-precision tokens, outliers. ``append`` receives each update's post-RoPE K/V plus the observed
  signals; ``read`` returns the K/V attention uses; ``memory`` counts the bytes really held.

Everything that touches transformers internals lives in ``harness.integration``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from harness import registry as _registry
from harness.registry import MethodSpecError, Registry, Variant, parse_spec  # noqa: F401  (re-exported)


class UnsupportedModelError(ValueError):
    """The model has layers or shapes that a method (or the harness) cannot serve."""


# --------------------------------------------------------------------------------------------
# What a method can see
# --------------------------------------------------------------------------------------------

#: Signals a method can ask for (``KVCacheMethod.signals``); hooks are installed only for these.
#: pre_rope_keys / block_input / queries arrive in the ``Observation`` of each append; "attention"
#: delivers queries and attention probabilities to ``LayerStore.observe_attention`` after attention.
SIGNALS = frozenset({"pre_rope_keys", "block_input", "queries", "attention"})


@dataclass(frozen=True)
class ModelInfo:
    """The attention geometry of a model, read from its config by ``harness.integration``."""

    family: str  # model_type: llama, mistral, qwen2, ...
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    dtype: torch.dtype
    device: torch.device


@dataclass
class Observation:
    """Signals observed for one layer during the forward that produced an ``append``.

    Shapes: ``pre_rope_keys`` [B, H_kv, T, D] (output of k_proj, before RoPE, as KVQuant quantizes);
    ``block_input`` [B, T, hidden] (the hidden states entering the decoder block after its input norm,
    MoQAE's router input); ``queries`` [B, H, T, D] post-RoPE queries of the same tokens (MiKV's
    channel balancing); ``rope`` the (cos, sin) tables [B, T, D] of these tokens, to re-apply RoPE
    with ``harness.integration.apply_rope``; ``positions`` [T] absolute positions.
    """

    positions: torch.Tensor
    pre_rope_keys: torch.Tensor | None = None
    block_input: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    is_prefill: bool = False


# --------------------------------------------------------------------------------------------
# Memory accounting
# --------------------------------------------------------------------------------------------

#: Byte categories of the accounting.
CATEGORIES = ("codes", "scales", "fp_tokens", "outliers", "router")


@dataclass
class MemoryReport:
    """Bytes a cache holds, by category, and the element count they represent.

    ``payload_bits`` is the sum over stored K/V elements of their payload bit-width (codes: their
    bits; elements kept in full precision: 16). nominal bits = payload_bits / elements (the papers'
    convention, e.g. MoQAE's 4.13); effective bits = 8 · all bytes / elements (codes, scales/zeros,
    full-precision tokens, outliers with their indices, router state). ``nonfinite_kv``: NaN / ±inf
    key and value elements appended (set by ``HarnessCache.memory``; 0 for a store's own report).
    ``reserved_bytes``: capacity allocated ahead of the tokens (``harness.storage.TokenBuffer``'s
    spare), held but storing no token; reported beside the bytes, never in ``total_bytes`` or the bits.
    ``quantized_elements`` / ``fp_elements``: the elements counted as held as codes / as floats (set by
    ``harness.storage.held_memory`` from the tensors held); ``as_dict`` gives them only where they
    account for every element (a store that counts ``elements`` itself reports them as None: unknown).
    """

    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    payload_bits: float = 0.0
    elements: int = 0
    nonfinite_kv: int = 0
    reserved_bytes: int = 0
    quantized_elements: int = 0
    fp_elements: int = 0

    def add(self, category: str, nbytes: int) -> None:
        if category not in CATEGORIES:
            raise KeyError(f"unknown memory category {category!r}; use one of {CATEGORIES}")
        self.bytes[category] += int(nbytes)

    def __iadd__(self, other: MemoryReport) -> MemoryReport:
        for k, v in other.bytes.items():
            self.bytes[k] = self.bytes.get(k, 0) + v
        self.payload_bits += other.payload_bits
        self.elements += other.elements
        self.nonfinite_kv += other.nonfinite_kv
        self.reserved_bytes += other.reserved_bytes
        self.quantized_elements += other.quantized_elements
        self.fp_elements += other.fp_elements
        return self

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def nominal_bits(self) -> float:
        return self.payload_bits / self.elements if self.elements else 0.0

    @property
    def effective_bits(self) -> float:
        return 8.0 * self.total_bytes / self.elements if self.elements else 0.0

    def as_dict(self) -> dict[str, Any]:
        counted = self.quantized_elements + self.fp_elements == self.elements
        return {
            "bytes": dict(self.bytes),
            "total_bytes": self.total_bytes,
            "elements": self.elements,
            "nominal_bits": self.nominal_bits,
            "effective_bits": self.effective_bits,
            "nonfinite_kv": self.nonfinite_kv,
            "reserved_bytes": self.reserved_bytes,
            "quantized_elements": self.quantized_elements if counted else None,
            "fp_elements": self.fp_elements if counted else None,
        }


def tensor_bytes(t: torch.Tensor | None) -> int:
    """Bytes a tensor really holds (0 for None)."""
    return 0 if t is None else t.numel() * t.element_size()


# --------------------------------------------------------------------------------------------
# Per-layer storage
# --------------------------------------------------------------------------------------------


class LayerStore(ABC):
    """The K/V one decoder layer of one cache holds. Shapes: keys/values [B, H_kv, T, D]."""

    def __init__(self, layer_idx: int, info: ModelInfo):
        self.layer_idx = layer_idx
        self.info = info
        self.seq_len = 0  # tokens held; maintained by the cache after each append
        self.cache_state: dict[str, Any] = {}  # shared by the layers of one cache (set by the cache)

    @abstractmethod
    def append(self, keys: torch.Tensor, values: torch.Tensor, obs: Observation) -> None:
        """Store new post-RoPE keys/values (and whatever the observation lets the method derive)."""

    @abstractmethod
    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """All K/V held, reconstructed for attention: ([B, H_kv, T, D], [B, H_kv, T, D])."""

    @abstractmethod
    def memory(self) -> MemoryReport:
        """Bytes really held by this layer, by category, with payload bits and element count."""

    def observe_attention(self, queries: torch.Tensor, probs: torch.Tensor | None) -> None:  # noqa: B027
        """Queries [B, H, Tq, D] (post-RoPE) and attention probabilities [B, H, Tq, Tk] of the
        forward that just read this layer (only delivered when the method asks for them)."""

    def attention_needed(self, q_len: int, kv_len: int) -> bool:
        """Whether ``observe_attention`` needs the probabilities of this forward (else it gets None)."""
        return True

    def stats(self) -> dict[str, list[float]]:
        """Per-layer counters a method reports (e.g. MoQAE's chunks per expert); summed over windows."""
        return {}

    def attend(self, query: torch.Tensor, scaling: float, mask: torch.Tensor | None) -> torch.Tensor:
        """One decode step of attention straight from what is held (no dequantized history):
        query [B, H, 1, D] -> output [B, H, 1, D]. Only called on stores whose method sets
        ``KVCacheMethod.decode_from_codes``; ``mask`` is transformers' attention mask or None."""
        raise NotImplementedError(f"{type(self).__name__} cannot attend from its codes")

    def last_read_bytes(self) -> int | None:
        """Bytes the latest ``read`` fetched, for methods that read less than they hold (AlignedKV's
        partial reads of fp16 values). None (the default) means everything held was read."""
        return None

    def reorder(self, index: torch.Tensor) -> None:
        """Select/reorder the batch (beam search). Methods that support it override this."""
        raise NotImplementedError(f"{type(self).__name__} does not support batch reordering (beam search)")


# --------------------------------------------------------------------------------------------
# What a method tells the report and the reproduce pipeline
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportStyle:
    """How reports draw and order a method's rows.

    ``family`` groups rows in plot legends (one marker and colour per family); ``marker`` and
    ``color`` are matplotlib's; ``rank`` places the method in the paper's row order (uniform 0-20,
    KIVI 30, KVQuant 40, QoQ 50, MiKV 60, other methods 70 by name, MoQAE 90).
    """

    family: str = "other"
    marker: str = "P"
    color: str = "C5"
    rank: int = 70


@dataclass
class PrepareContext:
    """What ``KVCacheMethod.prepare`` gets from ``python -m harness reproduce``.

    ``out`` is the results folder of the sweep (artefacts go under it, so a re-run finds them);
    ``options`` the profile's ``[prepare.<method name>]`` table; ``load()`` loads the model and
    tokenizer once, on the first call, and returns them.
    """

    model: str  # the model spec as the profile gives it (alias, hub id, folder, .gguf)
    out: Path
    data_dir: Path | None
    options: dict[str, Any]
    load: Callable[[], tuple[torch.nn.Module, Any]]
    progress: bool = True
    log: Callable[[str], Any] = print


@dataclass
class Prepared:
    """What a ``prepare`` step made: the spec to run instead (``moqae:lam=0.5,ckpt=.../router.pt``),
    a name for the summary (``router moqae λ=0.5``), the artefact and whether it was already there."""

    spec: str
    cell: str
    path: Path
    reused: bool = False


# --------------------------------------------------------------------------------------------
# Methods and their registry
# --------------------------------------------------------------------------------------------


@dataclass
class MethodConfig:
    """Base config; each method subclasses it. ``validate`` raises MethodSpecError on bad values.

    ``aliases`` maps option names accepted on the command line to field names (``lambda`` -> ``lam``);
    ``positional`` names the (str) field that bare spec items fill (``longbench:trec,samsum``);
    ``keyed_if_set`` names options added after records were written: at their default they are left
    out of ``options()`` (the record key), so the older records keep their keys.
    """

    aliases: ClassVar[dict[str, str]] = {}
    positional: ClassVar[str | None] = None
    keyed_if_set: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:  # noqa: B027
        pass


class KVCacheMethod(ABC):
    """A KV-cache compression method. Subclasses set ``config_class`` and implement ``new_layer_store``."""

    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    #: signals from ``SIGNALS`` this method needs; hooks are installed for these only
    signals: ClassVar[frozenset[str]] = frozenset()
    #: its stores implement ``LayerStore.attend``: decode steps attend from the codes (see
    #: ``harness.integration``; ``MOQAE_DECODE_FROM_CODES=0`` turns it off for comparison)
    decode_from_codes: ClassVar[bool] = False
    #: registry name (the record's ``key.method``) and one line for ``python -m harness list``
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: named presets of the options, each a registry name of its own (``kivi-2``: bits=2)
    variants: ClassVar[dict[str, Variant]] = {}
    #: how reports draw and order its rows
    report: ClassVar[ReportStyle] = ReportStyle()
    #: extra report sections, as ``"module:object"`` names of ``harness.reports.Section`` objects
    report_sections: ClassVar[tuple[str, ...]] = ()
    #: an oracle sees each evaluation window before its cache is made (``see_window``): an upper bound,
    #: never a method claim. Tasks that support it (``Task.supports_oracles``) call ``see_window``;
    #: other tasks refuse it; records carry ``"oracle": true`` and every report row says "upper bound".
    oracle: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None, name: str | None = None):
        from harness.options import check_config

        self.config = check_config(config if config is not None else self.config_class(), self.name or "method")
        self.config.validate()
        self.label = name or self.name
        self.info: ModelInfo | None = None

    # ---- life cycle ------------------------------------------------------------------------
    def check_model(self, info: ModelInfo) -> None:  # noqa: B027
        """Raise UnsupportedModelError / MethodSpecError if the method cannot serve this model."""

    def attach(self, model: torch.nn.Module, info: ModelInfo) -> None:  # noqa: B027
        """Optional weight folding at attach time (e.g. QoQ's SmoothAttention)."""

    def detach(self, model: torch.nn.Module, info: ModelInfo) -> None:  # noqa: B027
        """Undo what ``attach`` (or ``calibrate``) changed in the model's weights."""

    @property
    def needs_calibration(self) -> bool:
        return False

    def calibrate(self, model: torch.nn.Module, calibration_batches: Iterable[torch.Tensor]) -> None:  # noqa: B027
        """Optional calibration on windows of the calibration split (never the test split)."""

    @property
    def quantize_prefill(self) -> bool:
        """If False, prefill attention uses the full-precision K/V (as KIVI's own code does)."""
        return bool(getattr(self.config, "quantize_prefill", True))

    @abstractmethod
    def new_layer_store(self, layer_idx: int, info: ModelInfo) -> LayerStore:
        """A fresh, empty store for one layer of a new cache."""

    def own_cache(self, model: torch.nn.Module) -> Any | None:
        """A method that brings its own transformers ``Cache`` (the peer rows: transformers'
        ``DynamicCache`` / ``QuantizedCache``, ``harness.integration.peers``) returns a fresh one here;
        it must offer ``memory()`` and ``layer_stats()``. None (the default): the harness's cache of
        this method's layer stores."""
        return None

    def see_window(self, attached: Any, ids: torch.Tensor) -> None:  # noqa: B027
        """Oracles only: look at the evaluation window ``ids`` [1, T] (with ``attached``, the
        ``AttachedMethod`` of this method on the model) before the task makes its cache for it."""

    def new_cache_state(self) -> dict[str, Any]:
        """State shared by the layers of one cache (e.g. MoQAE's routing decisions for sharing)."""
        return {}

    def options(self) -> dict[str, Any]:
        """The config as the record key holds it (``keyed_if_set`` options only where not at their default)."""
        values = dataclasses.asdict(self.config)
        for f in dataclasses.fields(self.config):
            if f.name in self.config.keyed_if_set and values[f.name] == f.default:
                del values[f.name]
        return values

    # ---- before a run (python -m harness reproduce) -------------------------------------------
    @classmethod
    def check_prepare_options(cls, options: dict[str, Any]) -> None:
        """Validate a profile's ``[prepare.<name>]`` table (raise MethodSpecError, one line)."""
        if options:
            raise MethodSpecError(f"{cls.name}: has no prepare step; remove [prepare.{cls.name}] from the profile")

    def needs_prepare(self) -> bool:
        """True if ``prepare`` may have work to do for this spec (decided from the config alone,
        before any model is loaded)."""
        return False

    def prepare(self, spec: str, ctx: PrepareContext) -> Prepared | None:
        """Work that must happen before the runs (MoQAE trains a router where none ships). Returns
        the spec to run instead, or None when nothing was needed. Raising fails this cell only."""
        return None

    # ---- in reports (class-level: a report reads records, not live methods) --------------------
    @classmethod
    def report_label(cls, label: str, config: dict[str, Any]) -> str:
        """The row name of a record whose method spec was ``label`` (options as the user wrote them)."""
        return label

    @classmethod
    def report_sort_key(cls, config: dict[str, Any]) -> tuple:
        """Order of this method's rows within its rank (default: more bits first)."""
        try:
            return (-float(config.get("bits", 16)),)
        except (TypeError, ValueError):
            return (-16.0,)

    @classmethod
    def ablation_options(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Options that make a record an ablation variant: its row leaves the main tables for the
        method's own report section (MoQAE: anything but λ, router file, seed off its defaults)."""
        return {}


METHODS = _registry.METHODS
register_method = METHODS.register


def register_variant(name: str, cls: type[KVCacheMethod], description: str = "", **defaults: Any) -> None:
    METHODS.variant(name, cls, description, **defaults)


def method_names() -> list[str]:
    return METHODS.names()


def build_method(spec: str) -> KVCacheMethod:
    """Build a method from ``name`` or ``name:key=value,...``. Bad input raises MethodSpecError."""
    name, entry, config, opts = METHODS.config(spec)
    label = name if not opts else f"{name}:" + ",".join(f"{k}={v}" for k, v in opts.items())
    return entry.cls(config, name=label)


def describe_methods() -> list[tuple[str, str, dict[str, Any]]]:
    return [(d.name, d.error or d.description, d.options) for d in METHODS.describe()]
