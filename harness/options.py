"""Typed options: the one place where a value from the command line or a TOML file becomes an option.

Every option of a method's or a task's config dataclass, and every key of a reproduce profile,
declares its type and, where it has one, its range, with the aliases below::

    bits: OneOf(2, 4, 8) = 4              # one of the values
    group: PositiveInt = 32               # an integer >= 1
    ratio: Fraction = 0.25                # a number in [0, 1]
    fill: OneOf("mid", "zero") = "mid"    # one of the strings
    limit: PositiveInt | None = None      # "none" on the command line
    ckpt: Text = ""                       # any string (a path)
    experts: Parsed(parse_experts, "bit-widths like 16/4/2") = "16/4/2"

or with pydantic's own ``Annotated[float, Field(gt=0)]``. :func:`check_options` validates raw values
against the dataclass with pydantic in lax mode (``"128"`` -> 128 for an int, ``"true"`` -> True for a
bool; ``"abc"`` for an int and 2.5 for an int are refused) and condenses pydantic's errors into one line
naming the option, the value, the expected type and the accepted range (``MethodSpecError``). It runs
before any ``validate()``, which keeps only the rules that relate options to each other; methods and
tasks from plugins get the same checking from their annotations. :func:`untyped_options` lists the
options whose declaration lacks a range or a kind (the registry's property test refuses them).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Union

import annotated_types as at
from pydantic import AfterValidator, BeforeValidator, Field, StringConstraints, TypeAdapter, ValidationError

from harness.registry import MethodSpecError

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


@dataclass(frozen=True)
class Choices:
    """Marker of :func:`OneOf`: the accepted values."""

    values: tuple[Any, ...]


@dataclass(frozen=True)
class FreeText:
    """Marker: any string is accepted here (a path, a name checked later against data)."""

    what: str = "a string"


@dataclass(frozen=True)
class ParsedText:
    """Marker of :func:`Parsed`: a string that a parser reads (its errors are its own one line)."""

    what: str


Text = Annotated[str, FreeText()]
#: a non-empty string, surrounding blanks removed (a model, a method spec)
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1), FreeText("a non-empty string")]


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str | int | float) and not isinstance(value, bool) else value


def Listed(item: Any) -> Any:  # noqa: N802 - used as a type
    """A non-empty list of ``item`` (a TOML array); one value alone is read as a list of one."""
    return Annotated[list[item], BeforeValidator(_as_list), Field(min_length=1)]


def OneOf(*values: Any) -> Any:  # noqa: N802 - used as a type
    """One of ``values`` (all of one type: ints from the command line are parsed first)."""
    kind = type(values[0])

    def check(value: Any) -> Any:
        if value not in values:
            raise ValueError("not one of the accepted values")
        return value

    return Annotated[kind, AfterValidator(check), Choices(tuple(values))]


def Parsed(parser: Callable[[str], Any], what: str) -> Any:  # noqa: N802 - used as a type
    """A string that ``parser`` accepts (it raises ``MethodSpecError`` / ``ValueError``, one line)."""

    def check(value: str) -> str:
        parser(value)
        return value

    return Annotated[str, AfterValidator(check), ParsedText(what)]


# --------------------------------------------------------------------------------------------
# What a declaration says
# --------------------------------------------------------------------------------------------


@dataclass
class OptionType:
    """An option's declaration, read off its annotation: kind, range, choices, None allowed."""

    kind: str  # bool | int | float | str | "" (anything else: not an option type)
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo < x rather than lo <= x
    hi_open: bool = False
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    text: str = ""  # FreeText / ParsedText: what the string is
    parsed: bool = False
    item: OptionType | None = None  # kind "list": its items' declaration (a scalar is read as a list of one)

    def describe(self) -> str:
        """``an integer >= 1``, ``a number in [0, 1]``, ``one of 2, 4, 8``, ``true or false`` ..."""
        if self.kind == "list" and self.item is not None:
            text = f"a {'non-empty ' if self.lo else ''}list of items each {self.item.describe()}"
        elif self.choices is not None:
            text = "one of " + ", ".join(str(c) for c in self.choices)
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind in ("int", "float"):
            noun = "an integer" if self.kind == "int" else "a number"
            lo, hi = _num(self.lo), _num(self.hi)
            if self.lo is not None and self.hi is not None:
                text = f"{noun} in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
            elif self.lo is not None:
                text = f"{noun} {'>' if self.lo_open else '>='} {lo}"
            elif self.hi is not None:
                text = f"{noun} {'<' if self.hi_open else '<='} {hi}"
            else:
                text = noun
        else:
            text = self.text or "a string"
        return text + (", or none" if self.nullable else "")

    def problem(self) -> str:
        """Why this declaration does not type an option ("" when it does)."""
        if self.kind == "list":
            return f"items: {self.item.problem()}" if self.item is not None and self.item.problem() else ""
        if self.kind not in ("bool", "int", "float", "str"):
            return "not a bool, int, float, str or a list of them"
        if self.kind in ("int", "float") and self.choices is None and self.lo is None and self.hi is None:
            return f"{self.kind} without a range (Annotated[{self.kind}, Field(ge=...)], PositiveInt, OneOf(...))"
        if self.kind == "str" and self.choices is None and not self.text:
            return "str without choices, a parser or Text (OneOf(...), Parsed(...), Text)"
        return ""


def _num(x: float | None) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def option_type(annotation: Any) -> OptionType:
    """The :class:`OptionType` of a resolved annotation (``typing.get_type_hints(include_extras=True)``)."""
    meta: list[Any] = []
    nullable = False
    tp = annotation
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp, *more = typing.get_args(tp)
            meta.extend(more)
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            nullable = nullable or len(args) < len(typing.get_args(tp))
            if len(args) != 1:
                return OptionType("", nullable=nullable)
            tp = args[0]
        else:
            break
    if typing.get_origin(tp) is list and len(typing.get_args(tp)) == 1:
        out = OptionType("list", nullable=nullable, item=option_type(typing.get_args(tp)[0]))
        for m in meta:  # the list's length bound (Field(min_length=1)) stands in for its range
            for c in getattr(m, "metadata", None) or [m]:
                if isinstance(c, at.MinLen):
                    out.lo = c.min_length
        return out
    kind = tp.__name__ if tp in (bool, int, float, str) else ""
    out = OptionType(kind, nullable=nullable)
    for m in meta:
        for c in getattr(m, "metadata", None) or [m]:  # a pydantic FieldInfo carries annotated_types objects
            if isinstance(c, at.Ge):
                out.lo = c.ge
            elif isinstance(c, at.Gt):
                out.lo, out.lo_open = c.gt, True
            elif isinstance(c, at.Le):
                out.hi = c.le
            elif isinstance(c, at.Lt):
                out.hi, out.hi_open = c.lt, True
            elif isinstance(c, Choices):
                out.choices = c.values
            elif isinstance(c, FreeText | ParsedText):
                out.text, out.parsed = c.what, isinstance(c, ParsedText)
    return out


@cache
def option_types(cls: type) -> dict[str, OptionType]:
    """Field name -> :class:`OptionType` of a config dataclass (its ``init`` fields)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: option_type(hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def untyped_options(cls: type) -> list[str]:
    """``"name: why"`` for every option of ``cls`` whose declaration does not type it."""
    try:
        declared = option_types(cls)
    except Exception as e:  # noqa: BLE001 - an annotation that does not resolve is itself the problem
        return [f"(annotations): {type(e).__name__}: {e}"]
    return [f"{name}: {t.problem()}" for name, t in declared.items() if t.problem()]


# --------------------------------------------------------------------------------------------
# Checking values
# --------------------------------------------------------------------------------------------


@cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def check_options(cls: type, values: dict[str, Any], owner: str, spelled: dict[str, str] | None = None) -> Any:
    """``cls(**values)`` with every value coerced to its declared type and checked against its range,
    or ``MethodSpecError`` in one line: ``kivi: option group='abc' is not an integer >= 1``.
    ``spelled`` maps field names to the names the user wrote (aliases: ``lam`` -> ``lambda``)."""
    declared = option_types(cls)
    raw = {
        k: None if isinstance(v, str) and v.strip().lower() in ("none", "") and declared[k].nullable else v
        for k, v in values.items()
    }
    try:
        return _adapter(cls).validate_python(raw)
    except ValidationError as e:
        raise MethodSpecError(_one_line(e, declared, values, owner, spelled or {})) from None


def check_config(config: Any, owner: str, spelled: dict[str, str] | None = None) -> Any:
    """An already built config checked the same way (a config made in Python, from flags, not a spec)."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    return check_options(type(config), fields, owner, spelled)


def _one_line(e: ValidationError, declared: dict[str, OptionType], values: dict, owner: str, spelled: dict) -> str:
    err = e.errors(include_url=False)[0]
    name = str(err["loc"][0]) if err.get("loc") else ""
    if name not in declared:  # not about one option (cannot happen for a dataclass of typed fields)
        return f"{owner}: {' '.join(str(err.get('msg', e)).split())}"
    value = values.get(name, err.get("input"))
    plain = isinstance(value, str) and value.strip() == value and value and " " not in value  # as typed in a spec
    shown = f"{spelled.get(name, name)}={value if plain else repr(value)}"
    t = declared[name]
    cause = err.get("ctx", {}).get("error")
    if t.parsed and isinstance(cause, Exception):  # the parser's own one line says what is wrong
        said = " ".join(str(cause).split()).removeprefix(f"{owner}: ")
        return f"{owner}: option {shown}: {said}"
    return f"{owner}: option {shown} is not {t.describe()}"
