"""What the generated long-context tasks (``niah``, ``ruler``) and LongBench share: prompt lengths
given or derived from the model's context, and the per-sample checkpoint a crashed run resumes from."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.registry import MethodSpecError


def parse_lengths(spec: str, owner: str) -> list[int]:
    """``"1024,2048"`` / ``"2048/1024"`` (``,``, ``/`` and ``;`` separate) -> ``[1024, 2048]``
    (ascending, distinct); ``""`` -> ``[]`` (derived from the model: :func:`default_lengths`)."""
    out = []
    for item in str(spec).replace(";", ",").replace("/", ",").split(","):
        if not item.strip():
            continue
        try:
            value = int(item)
        except ValueError:
            raise MethodSpecError(f"{owner}: length {item.strip()!r} is not an integer; e.g. lengths=1024") from None
        if value < 1:
            raise MethodSpecError(f"{owner}: length {value} must be >= 1")
        out.append(value)
    return sorted(set(out))


def default_lengths(context: int | None, owner: str) -> list[int]:
    """1024, 2048, 4096, ... up to ``context``, the context itself last; under 1024 the context alone."""
    if not context:
        raise ValueError(f"{owner}: the model config has no max_position_embeddings; give lengths=...")
    out, n = [], 1024
    while n <= context:
        out.append(n)
        n *= 2
    if not out or out[-1] != context:
        out.append(context)
    return out


def read_checkpoint(path: Path | None, key: Callable[[dict[str, Any]], Any]) -> dict[Any, dict[str, Any]]:
    """Samples an interrupted run finished (``append_checkpoint``), by ``key(sample)``; a torn or
    foreign line is ignored."""
    if path is None or not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            s = json.loads(line)
            out[key(s)] = s
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return out


def append_checkpoint(path: Path | None, sample: dict[str, Any]) -> None:
    """One finished sample appended and synced to disk (``read_checkpoint`` reads them back)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(sample, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
