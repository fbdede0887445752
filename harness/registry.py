"""Lazy registries of methods and tasks: built-in ``"module:Class"`` names plus Python entry points.

As lm-evaluation-harness does, nothing is imported to list names: a registry knows

* the built-in mapping (``harness.builtins``: name -> ``"module:Class"``), and
* every installed package's entry points in its group (``moqae_harness.methods``,
  ``moqae_harness.tasks``), so a user's own package adds a method with zero edits here::

      [project.entry-points."moqae_harness.methods"]
      keep64-int3 = "keep64_int3:Keep64Int3"

and imports a class only when a spec names it. A class serves its own ``name`` and the names in its
``variants`` (``{"kivi-2": Variant("KIVI-2 ...", bits=2)}``): the mapping points each of them at the
class. A plugin that fails to import is reported in one line (``describe``, ``python -m harness
list``) and breaks no other entry. Classes may also be registered at run time (``register``).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any


class MethodSpecError(ValueError):
    """A bad method name or option; the message is one line listing what is accepted."""


@dataclass(frozen=True)
class Variant:
    """A named preset of a class's options (``kivi-2`` = KIVI with bits=2)."""

    description: str
    options: dict[str, Any] = field(default_factory=dict)

    def __init__(self, description: str, **options: Any):
        object.__setattr__(self, "description", description)
        object.__setattr__(self, "options", options)


@dataclass(frozen=True)
class Source:
    """Where a registry entry comes from: ``built-in``, ``entry point`` (of ``package``) or ``registered``."""

    origin: str
    target: str  # "module:Class"
    package: str = ""

    def __str__(self) -> str:
        if self.origin == "entry point":
            return f"entry point of {self.package or '?'} ({self.target})"
        return f"{self.origin} ({self.target})"


@dataclass
class Entry:
    cls: type
    defaults: dict[str, Any]
    description: str
    source: Source | None = None


@dataclass
class Described:
    """One row of ``Registry.describe``: an entry, or the one-line reason it could not be loaded."""

    name: str
    source: Source
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def load_object(target: str) -> Any:
    """``"package.module:Attr"`` -> the object (``Attr`` may be dotted)."""
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


class Registry:
    """Named classes with a config dataclass, built from ``name`` or ``name:key=value,...`` specs."""

    def __init__(self, kind: str, group: str, builtins: dict[str, str]):
        self.kind = kind
        self.group = group
        self.builtins = builtins
        self._registered: dict[str, Entry] = {}  # run-time registrations (``register``)
        self._loaded: dict[str, Entry] = {}
        self._failed: dict[str, str] = {}
        self._plugins: dict[str, Source] | None = None
        self._shadowed: list[str] = []  # entry points refused because the name is taken

    # ---- where names come from -------------------------------------------------------------
    def _entry_points(self) -> dict[str, Source]:
        if self._plugins is None:
            self._plugins = {}
            try:
                eps = metadata.entry_points(group=self.group)
            except Exception:  # noqa: BLE001 - a broken installation must not stop the harness
                eps = []
            for ep in sorted(eps, key=lambda e: e.name):
                package = getattr(getattr(ep, "dist", None), "name", "") or ""
                if ep.name in self.builtins or ep.name in self._plugins:
                    self._shadowed.append(f"{ep.name} ({package}: {ep.value}): the name is already taken")
                    continue
                self._plugins[ep.name] = Source("entry point", ep.value, package)
        return self._plugins

    def source(self, name: str) -> Source | None:
        if name in self._registered:
            return self._registered[name].source
        if name in self.builtins:
            return Source("built-in", self.builtins[name])
        return self._entry_points().get(name)

    def names(self) -> list[str]:
        """Every name, without importing anything."""
        return sorted({*self.builtins, *self._entry_points(), *self._registered})

    # ---- loading ---------------------------------------------------------------------------
    def entry(self, name: str) -> Entry:
        if name in self._registered:
            return self._registered[name]
        if name in self._loaded:
            return self._loaded[name]
        source = self.source(name)
        if source is None:
            raise MethodSpecError(f"unknown {self.kind} {name!r}; accepted: {', '.join(self.names())}")
        if name in self._failed:
            raise MethodSpecError(self._failed[name])
        try:
            cls = load_object(source.target)
            entry = self._entry_of(name, cls, source)
        except MethodSpecError as e:
            self._failed[name] = str(e)
            raise
        except Exception as e:  # noqa: BLE001 - a broken plugin is one line, not a traceback
            where = f" of package {source.package}" if source.package else ""
            self._failed[name] = f"{self.kind} {name!r} ({source.origin}{where}: {source.target}) failed to load: " + (
                _one_line(e)
            )
            raise MethodSpecError(self._failed[name]) from None
        self._loaded[name] = entry
        return entry

    def _entry_of(self, name: str, cls: Any, source: Source) -> Entry:
        if not isinstance(cls, type) or not dataclasses.is_dataclass(getattr(cls, "config_class", None)):
            raise MethodSpecError(
                f"{self.kind} {name!r}: {source.target} is not a {self.kind} class with a config_class dataclass"
            )
        if not cls.__dict__.get("name"):
            cls.name = name  # a plugin class that does not set its own name takes the entry point's
        variants: dict[str, Variant] = getattr(cls, "variants", {}) or {}
        if name == cls.name:
            defaults, description = {}, cls.description or _first_line(cls.__doc__)
        elif name in variants:
            defaults, description = dict(variants[name].options), variants[name].description
        else:
            raise MethodSpecError(
                f"{self.kind} {name!r}: {source.target} serves {', '.join([cls.name, *variants])}, not {name!r}"
            )
        unknown = set(defaults) - {f.name for f in dataclasses.fields(cls.config_class)}
        if unknown:
            raise MethodSpecError(f"{self.kind} {name!r} sets unknown options {sorted(unknown)}")
        return Entry(cls, defaults, description, source)

    def register(self, name: str, description: str = "", **defaults: Any):
        """Class decorator registering ``cls`` under ``name`` at run time (a notebook, a test)."""

        def deco(cls):
            if not cls.__dict__.get("name"):
                cls.name = name
            self.variant(name, cls, description or cls.description or _first_line(cls.__doc__), **defaults)
            return cls

        return deco

    def variant(self, name: str, cls: type, description: str = "", **defaults: Any) -> None:
        taken = self._registered.get(name)
        if (taken and taken.cls is not cls) or (not taken and self.source(name) is not None):
            raise ValueError(f"{self.kind} name {name!r} is already registered")
        unknown = set(defaults) - {f.name for f in dataclasses.fields(cls.config_class)}
        if unknown:
            raise ValueError(f"{self.kind} {name!r} sets unknown options {sorted(unknown)}")
        target = f"{cls.__module__}:{cls.__qualname__}"
        self._registered[name] = Entry(cls, defaults, description, Source("registered", target))

    def unregister(self, name: str) -> None:
        self._registered.pop(name, None)

    def refresh(self) -> None:
        """Forget what was read of the installed entry points (after a ``pip install`` in this process)."""
        self._plugins = None
        self._shadowed.clear()
        self._loaded.clear()
        self._failed.clear()

    # ---- specs -----------------------------------------------------------------------------
    def positional(self, name: str) -> str | None:
        """The option that bare items of a spec fill (``longbench:trec,samsum``), if the entry has one."""
        if self.source(name) is None:
            return None
        try:
            entry = self.entry(name)
        except MethodSpecError:
            return None
        return getattr(entry.cls.config_class, "positional", None)

    def config(self, spec: str, **overrides: Any) -> tuple[str, Entry, Any, dict[str, str]]:
        """Parse ``spec`` into (name, entry, validated config, explicit options)."""
        name = spec.strip().partition(":")[0].strip()
        entry = self.entry(name)
        name, opts = parse_spec(spec, getattr(entry.cls.config_class, "positional", None))
        aliases = getattr(entry.cls.config_class, "aliases", {})
        clash = [k for k in opts if k in aliases and aliases[k] in opts]
        if clash:  # moqae:lambda=0.5,lam=0.3
            k = clash[0]
            raise MethodSpecError(f"{name}: option {aliases[k]!r} given twice (as {k} and as {aliases[k]})")
        raw_opts, opts = opts, {aliases.get(k, k): v for k, v in opts.items()}
        fields = {f.name: f for f in dataclasses.fields(entry.cls.config_class)}
        unknown = sorted(set(opts) - set(fields))
        if unknown:
            accepted = ", ".join(fields) or "none"
            raise MethodSpecError(f"{name}: unknown option(s) {', '.join(unknown)}; accepted: {accepted}")
        values: dict[str, Any] = dict(entry.defaults)
        values.update({k: v for k, v in overrides.items() if k in fields and v is not None})
        values.update(opts)
        from harness.options import check_options  # pydantic: only once a spec is built

        spelled = {aliases.get(k, k): k for k in raw_opts}
        config = check_options(entry.cls.config_class, values, name, spelled)  # types and ranges, one line
        config.validate()  # the rules between options
        return name, entry, config, opts

    def check_names(self, values: list[str] | None, bare_items: bool = False) -> None:
        """Refuse an unknown name in comma-separated specs without importing anything (so a typo in
        ``--methods`` fails in a fraction of a second). ``bare_items``: entries may take bare items
        (``longbench:trec,samsum``), so a bare part after a ``name:...`` spec that is not a registered
        name is left to the full parse (``config``) rather than refused here."""
        names = set(self.names())
        for value in values or []:
            open_spec = False  # the spec being read has a ':' (its options may continue)
            for part in value.split(","):
                part = part.strip()
                if not part or ("=" in part and ":" not in part.partition("=")[0] and open_spec):
                    continue  # an option of the open spec (its value may hold a ':': ckpt=C:/r.pt)
                name = part.partition(":")[0].strip()
                if ":" not in part and open_spec and bare_items and name not in names:
                    continue
                if name not in names:
                    raise MethodSpecError(f"unknown {self.kind} {name!r}; accepted: {', '.join(sorted(names))}")
                open_spec = ":" in part

    def describe(self) -> list[Described]:
        """Every entry with its source, description and default options, or why it failed to load."""
        out = []
        for name in self.names():
            source = self.source(name)
            try:
                entry = self.entry(name)
            except MethodSpecError as e:
                out.append(Described(name, source, error=str(e)))
                continue
            opts = dataclasses.asdict(entry.cls.config_class(**entry.defaults))
            out.append(Described(name, source, entry.description, opts))
        return out

    def problems(self) -> list[str]:
        """Entry points refused (their name is taken), one line each."""
        self._entry_points()
        return list(self._shadowed)

    def classes(self, names: list[str] | None = None) -> dict[str, type]:
        """name -> class of the given (default: every) entries that load; failures are left out."""
        out = {}
        for name in self.names() if names is None else names:
            try:
                out[name] = self.entry(name).cls
            except MethodSpecError:
                continue
        return out


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""


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
            if key.strip() in opts:  # int:bits=2,bits=8 would silently take the last
                raise MethodSpecError(
                    f"{name}: option {key.strip()!r} given twice ({key.strip()}={opts[key.strip()]}, {item.strip()})"
                )
            opts[key.strip()] = value.strip()
    if bare:
        opts[positional] = ",".join([opts[positional], *bare] if positional in opts else bare)  # as written
    return name.strip(), opts


def _builtin_registries() -> tuple[Registry, Registry]:
    from harness.builtins import BUILTIN_METHODS, BUILTIN_TASKS, METHOD_GROUP, TASK_GROUP

    return Registry("method", METHOD_GROUP, BUILTIN_METHODS), Registry("task", TASK_GROUP, BUILTIN_TASKS)


#: every method and task: the built-ins plus installed entry points (``harness.interface.METHODS`` and
#: ``harness.evaluation.TASKS`` are these objects); defined here so that the CLI can check names
#: before torch is imported
METHODS, TASKS = _builtin_registries()
