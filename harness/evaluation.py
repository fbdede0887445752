"""Tasks: data plus a scorer, registered by name (lm-evaluation-harness style).

A task gets a ``TaskContext`` (model, tokenizer, the attached KV-cache method, data location) and
returns its metrics together with the KV memory the method's cache really held.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from harness import registry as _registry
from harness.integration import AttachedMethod
from harness.interface import MethodConfig
from harness.registry import Variant

if TYPE_CHECKING:
    from harness.reports.scorecard import ScorecardColumn


@dataclass
class TaskContext:
    model: torch.nn.Module
    tokenizer: Any
    attached: AttachedMethod
    data_dir: Path | None
    progress: bool = True
    #: where a task that works sample by sample (LongBench) appends each finished sample, and
    #: reads them back on a re-run after a crash (the runner removes it once the record is written)
    checkpoint: Path | None = None


class Task(ABC):
    """An evaluation: ``evaluate`` returns {"metrics": {...}, "kv": MemoryReport.as_dict(), ...}."""

    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    #: registry name (the record's ``key.task``) and one line for ``python -m harness list``
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    variants: ClassVar[dict[str, Variant]] = {}
    #: report sections for this task's records, as ``"module:object"`` names of ``harness.reports.Section``
    report_sections: ClassVar[tuple[str, ...]] = ()
    #: the column this task's records give the report's scorecard (None: none)
    scorecard: ClassVar[ScorecardColumn | None] = None
    #: a model with random weights (``*-shape`` aliases) is refused: its quality numbers mean nothing
    refuses_random_weights: ClassVar[bool] = False
    #: its evaluation calls ``method.see_window`` for oracle methods (``KVCacheMethod.oracle``)
    supports_oracles: ClassVar[bool] = False
    #: its work splits into parts (``evaluate_shard``) that ``merge_shards`` joins into the record one
    #: ``evaluate`` gives, metrics identical (the Ray executor's ``--shard-samples``)
    shardable: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None, name: str | None = None):
        from harness.options import check_config

        self.config = check_config(config if config is not None else self.config_class(), self.name or "task")
        self.label = name or self.name

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def tokens_needed(self) -> int | None:
        """The longest sequence (in tokens) one forward of this task feeds the model, when its options
        fix it (``seqlen``, a positive ``max_length``); the runner refuses a task that needs more than
        the model's context. None: the task fits itself to the model."""
        for option in ("seqlen", "max_length"):
            value = getattr(self.config, option, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def check_data(self, data_dir: Path | None) -> None:
        """Raise ``MissingDataError`` (one line) when the task's data cannot be read, before any model
        is loaded (the runner and ``reproduce`` call it first). Default: nothing to check."""
        return None

    @abstractmethod
    def evaluate(self, ctx: TaskContext) -> dict[str, Any]: ...

    def evaluate_shard(self, ctx: TaskContext, index: int, count: int) -> dict[str, Any]:
        """Part ``index`` of ``count`` of the evaluation (JSON-able; only where ``shardable``)."""
        raise NotImplementedError(f"{self.name} does not split into shards")

    def merge_shards(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """What ``evaluate`` returns, from every part of ``evaluate_shard`` in order."""
        raise NotImplementedError(f"{self.name} does not split into shards")

    def shard_units(self) -> int | None:
        """At most how many units (windows, samples) ``evaluate_shard`` splits, when the options bound
        it: the executor never makes more shards than units. None: unknown before the data are read."""
        return None


TASKS = _registry.TASKS
register_task = TASKS.register


def build_task(spec: str, **overrides: Any) -> Task:
    """Build a task from ``name`` or ``name:key=value``; ``overrides`` (CLI flags) fill known options."""
    name, entry, config, opts = TASKS.config(spec, **overrides)
    label = name if not opts else f"{name}:" + ",".join(f"{k}={v}" for k, v in opts.items())
    return entry.cls(config, name=label)
