"""The one KV-cache-method interface every method (MoQAE and every baseline) plugs into.

A method is two small pieces, in the style of kvpress:

* ``KVCacheMethod`` — a registered class with a config dataclass. It validates itself against the
  model (``check_model``), may fold weights at attach time (``attach``, QoQ's SmoothAttention), may
  calibrate (``calibrate``, KVQuant / KVmix), declares which signals it needs (``signals``), and makes
  one ``LayerStore`` per decoder layer for every new cache (``new_layer_store``).
* ``LayerStore`` — what one layer of one cache really holds: packed codes, fp16 scales/zeros,
  full-precision tokens, outliers. ``append`` receives each update's post-RoPE K/V plus the observed
  signals; ``read`` returns the K/V attention uses; ``memory`` counts the bytes really held.

Everything that touches transformers internals lives in ``harness.integration``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


class MethodSpecError(ValueError):
    """A bad method name or option; the message is one line listing what is accepted."""


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
    full-precision tokens, outliers with their indices, router state).
    """

    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    payload_bits: float = 0.0
    elements: int = 0

    def add(self, category: str, nbytes: int) -> None:
        if category not in CATEGORIES:
            raise KeyError(f"unknown memory category {category!r}; use one of {CATEGORIES}")
        self.bytes[category] += int(nbytes)

    def __iadd__(self, other: MemoryReport) -> MemoryReport:
        for k, v in other.bytes.items():
            self.bytes[k] = self.bytes.get(k, 0) + v
        self.payload_bits += other.payload_bits
        self.elements += other.elements
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
        return {
            "bytes": dict(self.bytes),
            "total_bytes": self.total_bytes,
            "elements": self.elements,
            "nominal_bits": self.nominal_bits,
            "effective_bits": self.effective_bits,
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
# Methods and their registry
# --------------------------------------------------------------------------------------------


@dataclass
class MethodConfig:
    """Base config; each method subclasses it. ``validate`` raises MethodSpecError on bad values.

    ``aliases`` maps option names accepted on the command line to field names (``lambda`` -> ``lam``);
    ``positional`` names the (str) field that bare spec items fill (``longbench:trec,samsum``).
    """

    aliases: ClassVar[dict[str, str]] = {}
    positional: ClassVar[str | None] = None

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
    #: registry name, set by ``register_method``
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __init__(self, config: MethodConfig | None = None, name: str | None = None):
        self.config = config if config is not None else self.config_class()
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

    def new_cache_state(self) -> dict[str, Any]:
        """State shared by the layers of one cache (e.g. MoQAE's routing decisions for sharing)."""
        return {}

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)


class Registry:
    """Named classes with a config dataclass, built from ``name`` or ``name:key=value,...`` specs.

    Serves methods and tasks alike (lm-evaluation-harness style: register by decorator, look up by
    name). ``load`` imports the packages whose modules register entries.
    """

    def __init__(self, kind: str, load: Any):
        self.kind = kind
        self._load = load
        self._entries: dict[str, _Entry] = {}

    def register(self, name: str, description: str = "", **defaults: Any):
        """Class decorator registering ``cls`` under ``name``; ``variant`` adds more names."""

        def deco(cls):
            cls.name = cls.name or name
            doc = description or (cls.__doc__ or "").strip().splitlines()[0]
            self.variant(name, cls, doc, **defaults)
            return cls

        return deco

    def variant(self, name: str, cls: type, description: str = "", **defaults: Any) -> None:
        if name in self._entries and self._entries[name].cls is not cls:
            raise ValueError(f"{self.kind} name {name!r} is already registered by {self._entries[name].cls.__name__}")
        unknown = set(defaults) - {f.name for f in dataclasses.fields(cls.config_class)}
        if unknown:
            raise ValueError(f"{self.kind} {name!r} sets unknown options {sorted(unknown)}")
        self._entries[name] = _Entry(cls, defaults, description)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def entry(self, name: str) -> _Entry:
        self._load()
        if name not in self._entries:
            raise MethodSpecError(f"unknown {self.kind} {name!r}; accepted: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def positional(self, name: str) -> str | None:
        """The option that bare items of a spec fill (``longbench:trec,samsum``), if the entry has one."""
        self._load()
        entry = self._entries.get(name)
        return getattr(entry.cls.config_class, "positional", None) if entry else None

    def config(self, spec: str, **overrides: Any) -> tuple[str, _Entry, Any, dict[str, str]]:
        """Parse ``spec`` into (name, entry, validated config, explicit options)."""
        name = spec.strip().partition(":")[0].strip()
        entry = self.entry(name)
        name, opts = parse_spec(spec, self.positional(name))
        aliases = getattr(entry.cls.config_class, "aliases", {})
        opts = {aliases.get(k, k): v for k, v in opts.items()}
        fields = {f.name: f for f in dataclasses.fields(entry.cls.config_class)}
        unknown = sorted(set(opts) - set(fields))
        if unknown:
            accepted = ", ".join(fields) or "none"
            raise MethodSpecError(f"{name}: unknown option(s) {', '.join(unknown)}; accepted: {accepted}")
        values: dict[str, Any] = dict(entry.defaults)
        values.update({k: v for k, v in overrides.items() if k in fields and v is not None})
        for key, raw in opts.items():
            values[key] = _coerce(raw, fields[key].type, key, name)
        try:
            config = entry.cls.config_class(**values)
        except TypeError as e:
            raise MethodSpecError(f"{name}: {e}") from None
        config.validate()
        return name, entry, config, opts

    def describe(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(name, description, default options) for every entry."""
        out = []
        for name in self.names():
            entry = self._entries[name]
            out.append((name, entry.description, dataclasses.asdict(entry.cls.config_class(**entry.defaults))))
        return out


@dataclass
class _Entry:
    cls: type
    defaults: dict[str, Any]
    description: str


def _load_builtin_methods() -> None:
    """Import the packages whose modules register methods (idempotent)."""
    import baselines  # noqa: F401
    import moqae  # noqa: F401


METHODS = Registry("method", _load_builtin_methods)
register_method = METHODS.register


def register_variant(name: str, cls: type[KVCacheMethod], description: str = "", **defaults: Any) -> None:
    METHODS.variant(name, cls, description, **defaults)


def method_names() -> list[str]:
    return METHODS.names()


def _coerce(value: str, typ: Any, key: str, owner: str) -> Any:
    t = typ if isinstance(typ, type) else str(typ)
    try:
        if t in (bool, "bool"):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if t in (int, "int"):
            return int(value)
        if t in (float, "float"):
            return float(value)
        if t in ("int | None",):
            return None if value.lower() in ("none", "") else int(value)
    except ValueError:
        raise MethodSpecError(f"{owner}: option {key}={value!r} is not a valid {getattr(t, '__name__', t)}") from None
    return value


def parse_spec(spec: str, positional: str | None = None) -> tuple[str, dict[str, str]]:
    """``"kivi:bits=2,group=32"`` -> ``("kivi", {"bits": "2", "group": "32"})``.

    With ``positional`` (a config field name), items without ``=`` are collected into that option:
    ``"longbench:trec,samsum,limit=4"`` -> ``("longbench", {"tasks": "trec,samsum", "limit": "4"})``.
    """
    name, _, rest = spec.strip().partition(":")
    opts: dict[str, str] = {}
    bare: list[str] = []
    if rest:
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq and positional and key.strip():
                bare.append(key.strip())
                continue
            if not eq or not key.strip():
                raise MethodSpecError(f"{name}: bad option {item!r}; write {name}:key=value,key=value")
            opts[key.strip()] = value.strip()
    if bare:
        opts[positional] = ",".join([*bare, opts[positional]] if positional in opts else bare)
    return name.strip(), opts


def build_method(spec: str) -> KVCacheMethod:
    """Build a method from ``name`` or ``name:key=value,...``. Bad input raises MethodSpecError."""
    name, entry, config, opts = METHODS.config(spec)
    label = name if not opts else f"{name}:" + ",".join(f"{k}={v}" for k, v in opts.items())
    return entry.cls(config, name=label)


def describe_methods() -> list[tuple[str, str, dict[str, Any]]]:
    return METHODS.describe()
