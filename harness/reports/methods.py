"""How a report names, orders and draws a method's rows: asked of the method's class.

A record names its method by registry name (``key.method``) and config (``key.method_config``);
the class (``harness.interface.METHODS.entry(name).cls``) tells the rest: ``report``
(``ReportStyle``: family, marker, colour, rank), ``report_label``, ``report_sort_key`` and
``ablation_options``. A name this checkout cannot load (a plugin not installed, a class that
fails to import) gets ``ReportStyle()`` (family "other") and its plain label: a report never
fails for want of a method. Profile rows carry only the label (``int4``, ``mine:bits=3``,
``int4 [dequantize]``): the part before ``:`` (and before a space) is the registry name.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from harness.interface import KVCacheMethod, ReportStyle
from harness.reports.records import plural

DEFAULT_STYLE = ReportStyle()


def registry_name(label: str) -> str:
    """``mine:bits=3`` -> ``mine``; ``int4 [dequantize]`` -> ``int4``."""
    return label.partition(":")[0].strip().split(" ")[0]


def method_class(name: str) -> type[KVCacheMethod] | None:
    """The class serving registry name ``name``, or None where it cannot be loaded."""
    from harness.interface import METHODS

    try:
        return METHODS.entry(name).cls
    except Exception:  # noqa: BLE001 - unknown, not installed or broken: drawn as "other"
        return None


def _class_of(rec_or_label: dict[str, Any] | str) -> type[KVCacheMethod] | None:
    if isinstance(rec_or_label, dict):
        return method_class(rec_or_label["key"]["method"])
    return method_class(registry_name(rec_or_label))


def method_style(rec_or_label: dict[str, Any] | str) -> ReportStyle:
    """The ``ReportStyle`` of a record's method, or of a label's registry name."""
    cls = _class_of(rec_or_label)
    style = getattr(cls, "report", None)
    return style if isinstance(style, ReportStyle) else DEFAULT_STYLE


def family(rec_or_label: dict[str, Any] | str) -> str:
    return method_style(rec_or_label).family


def _config(rec: dict[str, Any]) -> dict[str, Any]:
    return rec["key"].get("method_config") or {}


def display_name(rec: dict[str, Any]) -> str:
    """The method as a table row names it: the class's ``report_label`` of the spec (the plain
    spec for a method not installed), calibration noted where it differs from the default."""
    label = rec["method"]
    cls = _class_of(rec)
    if cls is not None:
        try:
            label = cls.report_label(rec["method"], _config(rec))
        except Exception:  # noqa: BLE001 - a plugin's broken hook: its plain label
            label = rec["method"]
    if rec["key"].get("calibration_windows"):
        label += f" (calib. {plural(rec['key']['calibration_windows'], 'window')})"
    if rec.get("oracle"):
        label += " [oracle: upper bound]"  # it saw the evaluation windows
    return label


def ablation_options(rec: dict[str, Any]) -> dict[str, Any]:
    """The options that make the record an ablation variant (its class's ``ablation_options``):
    non-empty means its row leaves the main tables for the method's own section."""
    cls = _class_of(rec)
    if cls is None:
        return {}
    try:
        return dict(cls.ablation_options(_config(rec)) or {})
    except Exception:  # noqa: BLE001
        return {}


def method_sort_key(rec: dict[str, Any]) -> tuple:
    """Row order: the class's rank, then its registry name (methods of one rank by name), then the
    class's own ``report_sort_key`` (default: more bits first), then the row's name."""
    name = rec["key"]["method"]
    cls = _class_of(rec)
    try:
        own = tuple((cls or KVCacheMethod).report_sort_key(_config(rec)))
    except Exception:  # noqa: BLE001
        own = ()
    return (method_style(rec).rank, name, own, display_name(rec))


def label_sort_key(label: str, order: dict[str, int]) -> tuple:
    """Order of profile rows, which carry only the method label: rank, then first appearance."""
    return (method_style(label).rank, order.get(label, 0))


def families_in_order(records: Iterable[dict[str, Any]]) -> list[str]:
    """The families of the records' methods in row order (by rank)."""
    return list(dict.fromkeys(family(r) for r in sorted(records, key=method_sort_key)))


def family_styles(labels: Iterable[dict[str, Any] | str]) -> dict[str, ReportStyle]:
    """family -> the style of its first method, families in rank order."""
    styles: dict[str, ReportStyle] = {}
    for x in labels:
        s = method_style(x)
        styles.setdefault(s.family, s)
    return dict(sorted(styles.items(), key=lambda kv: kv[1].rank))
