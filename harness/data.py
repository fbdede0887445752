"""Evaluation and calibration data: a local mirror (``--data-dir`` / ``$MOQAE_DATA_DIR``) or the hub.

Mirror layout (as ``../shared/data``):
    wikitext-2-raw/wiki.test.raw   WikiText-2-raw test split, the original release file
    wikitext-2/valid.txt           WikiText-2 v1 validation split: the offline calibration split
    longbench/<dataset>.jsonl      LongBench v1 test rows in LongBench's own schema (``longbench_rows``)

Without a mirror the same data comes from the Hugging Face hub dataset ``wikitext/wikitext-2-raw-v1``.
Never calibrate on the test split: calibration text comes from ``valid.txt`` (mirror) or the hub's
``train`` split.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from harness.errors import MissingDataError

DATA_DIR_ENV = "MOQAE_DATA_DIR"
WIKITEXT_HUB = ("wikitext", "wikitext-2-raw-v1")
WIKITEXT_TEST = "wikitext-2-raw/wiki.test.raw"
WIKITEXT_CALIBRATION = "wikitext-2/valid.txt"


class DataFileError(MissingDataError):
    """A local data file is there but unusable (not JSON lines, empty, a row without a field the task
    reads): one line naming the file, the line and what is wrong."""


def jsonl_rows(path: Path, what: str) -> dict[int, dict[str, Any]]:
    """The rows of the JSON-lines file ``path`` by line number (from 1; blank lines skipped).
    ``DataFileError`` (``what`` names the dataset) for a line that is not a JSON object or no rows."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rows: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            cut = "; the last line, cut short?" if n == len(lines) else ""
            raise DataFileError(f"{what}: {path} line {n}: not JSON ({e.msg}, column {e.colno}){cut}") from None
        if not isinstance(row, dict):
            raise DataFileError(f"{what}: {path} line {n}: a JSON {type(row).__name__}, not an object (one row a line)")
        rows[n] = row
    if not rows:
        raise DataFileError(f"{what}: {path} holds no rows (an empty file)")
    return rows


def require_fields(path: Path, rows: dict[int, dict[str, Any]], fields: Iterable[str], what: str) -> None:
    """``DataFileError`` naming the first line of ``path`` whose row lacks one of ``fields`` (``what`` needs them)."""
    fields = list(fields)
    for n, row in rows.items():
        missing = [f for f in fields if f not in row]
        if missing:
            raise DataFileError(
                f"{what}: {path} line {n}: no field {', '.join(map(repr, missing))} ({what} needs "
                f"{', '.join(fields)}; the row has {', '.join(row) or 'none'})"
            )


def resolve_data_dir(arg: str | Path | None) -> Path | None:
    """The mirror to read: the argument, else ``$MOQAE_DATA_DIR``, else None (use the hub)."""
    value = arg if arg not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    return Path(value).expanduser() if value is not None else None


def _missing(what: str, data_dir: Path | None, rel: str) -> MissingDataError:
    hub = "/".join(WIKITEXT_HUB)
    where = f"not found at {data_dir / rel}" if data_dir else "no local mirror given, hub unreachable"
    return MissingDataError(
        f"{what}: {where}; provide it with --data-dir DIR (or ${DATA_DIR_ENV}=DIR) holding {rel}, "
        f"or with network access to the Hugging Face hub dataset {hub}"
    )


def _hub_rows(split: str, what: str, rel: str) -> list[str]:
    """The rows of a split of the hub's ``wikitext-2-raw-v1`` (blank lines "", others end in "\\n")."""
    try:
        import datasets

        return list(datasets.load_dataset(*WIKITEXT_HUB, split=split)["text"])
    except Exception as e:  # offline, not found, ...: one clear message
        raise _missing(what, None, rel) from e


def raw_file_rows(path: Path) -> list[str]:
    """The hub's rows from an original release file: blank lines (" ") become "", others keep "\\n".

    This is what the hub's ``wikitext`` loading script does with each line of the file.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rows.append(line if line.strip() else "")
    return rows


def _wikitext_text(data_dir: str | Path | None, rel: str, hub_split: str, what: str) -> str:
    """Rows from the mirror file ``rel`` (or the hub split), joined with "\\n\\n"."""
    d = resolve_data_dir(data_dir)
    if d is None:
        return "\n\n".join(_hub_rows(hub_split, what, rel))
    path = d / rel
    if not path.is_file():
        raise _missing(what, d, rel)
    return "\n\n".join(raw_file_rows(path))


def wikitext2_test_text(data_dir: str | Path | None) -> str:
    """The papers' evaluation text: the rows of WikiText-2-raw ``test`` joined with "\\n\\n".

    From the mirror (``wikitext-2-raw/wiki.test.raw``) or the hub; both routes give the same text.
    """
    return _wikitext_text(data_dir, WIKITEXT_TEST, "test", "WikiText-2 test split")


def wikitext2_calibration_text(data_dir: str | Path | None) -> str:
    """Calibration text, never the test split: the mirror's ``wikitext-2/valid.txt`` (WikiText-2 v1
    validation), else the hub's ``wikitext-2-raw-v1`` ``train`` split; rows joined with "\\n\\n"."""
    return _wikitext_text(data_dir, WIKITEXT_CALIBRATION, "train", "WikiText-2 calibration split")


def token_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping windows of exactly ``seqlen`` tokens of a 1-D id tensor, at most ``max_windows``.

    The incomplete tail is dropped, as GPTQ/KIVI-style perplexity scripts do.
    """
    if ids.dim() != 1:
        raise ValueError(f"token ids must be 1-D, got shape {tuple(ids.shape)}")
    if seqlen < 2:
        raise ValueError(f"seqlen={seqlen} must be >= 2")
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return [ids[i * seqlen : (i + 1) * seqlen] for i in range(n)]


def calibration_windows(
    tokenizer: Any, data_dir: str | Path | None, seqlen: int, n: int, seed: int = 0
) -> list[torch.Tensor]:
    """``n`` long tensors [1, seqlen] at random start offsets (``torch.Generator`` seeded with ``seed``)
    of the tokenized calibration text (:func:`wikitext2_calibration_text`, never the test split)."""
    if tokenizer is None:
        raise ValueError("calibration needs a tokenizer (random-weight shape models have none)")
    ids = tokenizer(wikitext2_calibration_text(data_dir), return_tensors="pt").input_ids[0].long()
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration text has {ids.numel()} tokens, not more than seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g).tolist()
    return [ids[s : s + seqlen].view(1, -1) for s in starts]


#: Hub datasets holding LongBench v1, tried in order: THUDM's own (a loading script, which
#: ``datasets`` >= 4 no longer runs), then the Parquet copy that lm-evaluation-harness uses.
LONGBENCH_HUB = ("THUDM/LongBench", "Xnhyacinth/LongBench")


def longbench_rows(dataset: str, data_dir: str | Path | None, fields: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The ``test`` rows of one LongBench v1 dataset (``_id, dataset, language, input, context, answers,
    all_classes, length``): from ``<mirror>/longbench/<dataset>.jsonl`` when a mirror is given (argument
    or ``$MOQAE_DATA_DIR``), else ``datasets.load_dataset(<hub>, dataset, split="test")``. A mirror file
    must be JSON lines, not empty, each row with ``fields`` (else ``DataFileError``)."""
    rel = f"longbench/{dataset}.jsonl"
    d = resolve_data_dir(data_dir)
    if d is not None:
        path = d / rel
        if not path.is_file():
            raise _longbench_missing(dataset, f"not found at {path}", rel)
        rows = jsonl_rows(path, f"LongBench {dataset}")
        require_fields(path, rows, fields, f"LongBench {dataset}")
        return list(rows.values())
    error: Exception | None = None
    for repo in LONGBENCH_HUB:
        try:
            import datasets

            return [dict(row) for row in datasets.load_dataset(repo, dataset, split="test")]
        except Exception as e:  # offline, script-based on datasets >= 4, not found, ...: try the next
            error = e
    raise _longbench_missing(dataset, "no local mirror given, hub unreachable", rel) from error


def _longbench_missing(dataset: str, where: str, rel: str) -> MissingDataError:
    hubs = " or ".join(LONGBENCH_HUB)
    return MissingDataError(
        f"LongBench {dataset}: {where}; provide it with --data-dir DIR (or ${DATA_DIR_ENV}=DIR) holding {rel}, "
        f"or with network access to the Hugging Face hub dataset {hubs} (config {dataset!r}, split test)"
    )
