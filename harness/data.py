"""Evaluation and calibration data: a local mirror (``--data-dir`` / ``$MOQAE_DATA_DIR``) or the hub.

Mirror layout (as ``../shared/data``):
    wikitext-2-raw/wiki.test.raw   WikiText-2-raw test split, original release file
    wikitext-2/valid.txt           WikiText-2 v1 validation split: the offline calibration split

Never calibrate on the test split: calibration text comes from ``valid.txt`` (mirror) or the hub's
``train`` split.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

DATA_DIR_ENV = "MOQAE_DATA_DIR"
WIKITEXT_HUB = ("wikitext", "wikitext-2-raw-v1")
WIKITEXT_TEST = "wikitext-2-raw/wiki.test.raw"
WIKITEXT_CALIBRATION = "wikitext-2/valid.txt"


class MissingDataError(RuntimeError):
    """A dataset is neither in the local mirror nor reachable on the hub (one-line message)."""


def resolve_data_dir(arg: str | Path | None) -> Path | None:
    """The mirror to read: the argument, else ``$MOQAE_DATA_DIR``, else None (use the hub)."""
    value = arg if arg not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    return Path(value).expanduser() if value is not None else None


def _missing(what: str, data_dir: Path | None, rel: str, hub: str) -> MissingDataError:
    where = f"not found at {data_dir / rel}" if data_dir else "no local mirror given and the hub is unreachable"
    return MissingDataError(
        f"{what}: {where}; provide it with --data-dir DIR (or ${DATA_DIR_ENV}) holding {rel}, "
        f"or with network access to the Hugging Face hub dataset {hub}"
    )


def _hub_rows(split: str, data_dir: Path | None, rel: str) -> list[str]:
    hub = "/".join(WIKITEXT_HUB)
    try:
        import datasets

        return list(datasets.load_dataset(*WIKITEXT_HUB, split=split)["text"])
    except Exception as e:  # offline, not found, ...: one clear message
        raise _missing(f"WikiText-2 {split} split", data_dir, rel, hub) from e


def raw_file_rows(path: Path) -> list[str]:
    """The hub's rows from an original release file: blank lines (" ") become "", others keep "\\n"."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        rows.append("" if line.strip() == "" else line if line.endswith("\n") else line + "\n")
    return rows


def _wikitext_text(data_dir: str | Path | None, rel: str, hub_split: str, what: str) -> str:
    """Rows from the mirror file ``rel`` (or the hub split), joined with "\\n\\n"."""
    d = resolve_data_dir(data_dir)
    if d is None:
        return "\n\n".join(_hub_rows(hub_split, None, rel))
    path = d / rel
    if not path.exists():
        raise _missing(what, d, rel, "/".join(WIKITEXT_HUB))
    return "\n\n".join(raw_file_rows(path))


def wikitext2_test_text(data_dir: str | Path | None) -> str:
    """The papers' evaluation text: the raw test split's rows joined with "\\n\\n"."""
    return _wikitext_text(data_dir, WIKITEXT_TEST, "test", "WikiText-2 test split")


def wikitext2_calibration_text(data_dir: str | Path | None) -> str:
    """Calibration text, never the test split: mirror ``wikitext-2/valid.txt``, else the hub's train split."""
    return _wikitext_text(data_dir, WIKITEXT_CALIBRATION, "train", "WikiText-2 calibration split")


def token_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping windows of exactly ``seqlen`` tokens of a 1-D id tensor (tail dropped)."""
    if seqlen < 2:
        raise ValueError(f"seqlen={seqlen} must be >= 2")
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return [ids[i * seqlen : (i + 1) * seqlen] for i in range(n)]


def calibration_windows(
    tokenizer, data_dir: str | Path | None, seqlen: int, n: int, seed: int = 0
) -> list[torch.Tensor]:
    """``n`` windows [1, seqlen] at random offsets (fixed seed) of the tokenized calibration text."""
    ids = tokenizer(wikitext2_calibration_text(data_dir), return_tensors="pt").input_ids[0]
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration text has {ids.numel()} tokens, not more than seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g).tolist()
    return [ids[s : s + seqlen].view(1, -1) for s in starts]
