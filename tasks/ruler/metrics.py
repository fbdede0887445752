"""RULER's scoring (NVIDIA/RULER ``scripts/eval/synthetic/constants.py`` and ``scripts/eval/evaluate.py`` at
commit c3f5e3b4f87f97e048793bb510a3a6b19a46bf3a; Copyright (c) 2024 NVIDIA CORPORATION, Apache License 2.0).

* ``postprocess_pred``: strip, every character ``\\x00``-``\\x1f`` becomes a newline, strip again.
* ``string_match_all`` (niah*, vt, cwe, fwe): per sample, the share of the references found in the
  prediction (case-insensitive substring); ``string_match_part`` (qa): 1 if any reference is found.
  A task's score is the mean over its samples × 100. RULER rounds it to 2 decimals; here the unrounded
  value is kept (:func:`string_match_all` / :func:`string_match_part` round as RULER does).
"""

from __future__ import annotations

import re

from tasks.ruler.generate import CONFIGS

_NON_PRINTABLE = re.compile(r"[\x00-\x1f]")


def postprocess_pred(predict_str: str) -> str:
    predict_str = predict_str.strip()
    return _NON_PRINTABLE.sub("\n", predict_str).strip()


def match_all(pred: str, refs: list[str]) -> float:
    """One sample of ``string_match_all``: the fraction of references in the prediction."""
    return sum(1.0 if r.lower() in pred.lower() else 0.0 for r in refs) / len(refs)


def match_part(pred: str, refs: list[str]) -> float:
    """One sample of ``string_match_part``: 1 when any reference is in the prediction."""
    return max(1.0 if r.lower() in pred.lower() else 0.0 for r in refs)


def string_match_all(preds: list[str], refs: list[list[str]]) -> float:
    """RULER's task score (0-100, rounded to 2 decimals as RULER rounds it)."""
    return round(sum(match_all(p, r) for p, r in zip(preds, refs, strict=True)) / len(preds) * 100, 2)


def string_match_part(preds: list[str], refs: list[list[str]]) -> float:
    return round(sum(match_part(p, r) for p, r in zip(preds, refs, strict=True)) / len(preds) * 100, 2)


def metric_name(task: str) -> str:
    return "string_match_part" if CONFIGS[task]["task"] == "qa" else "string_match_all"


def sample_score(task: str, output: str, refs: list[str]) -> float:
    """The sample's score × 100 under its task's metric (after RULER's ``postprocess_pred``)."""
    pred = postprocess_pred(output)
    return 100 * (match_part(pred, refs) if metric_name(task) == "string_match_part" else match_all(pred, refs))
