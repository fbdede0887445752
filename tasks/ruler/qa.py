"""RULER's QA data (qa_1: SQuAD v2.0 dev, qa_2: HotpotQA distractor dev): questions and documents.

RULER reads the original release files its ``scripts/data/synthetic/json/download_qa_dataset.sh``
downloads, in ``scripts/data/synthetic/qa.py`` (``read_squad``, ``read_hotpotqa``; NVIDIA/RULER at
``c3f5e3b4f87f97e048793bb510a3a6b19a46bf3a``, Apache-2.0). The same data is also read in the Hugging Face
hub's schema (``rajpurkar/squad_v2`` ``validation``, ``hotpotqa/hotpot_qa`` ``distractor`` ``validation``),
with identical questions, answers and documents, from, in order:

1. ``<data>/ruler/squad.json`` / ``<data>/ruler/hotpotqa.json``: the original files (``dev-v2.0.json``,
   ``hotpot_dev_distractor_v1.json``), as RULER names its copies;
2. ``<data>/ruler/squad_v2.validation.jsonl`` / ``<data>/ruler/hotpot_qa.distractor.validation.jsonl``:
   the hub's rows as JSON lines (``Dataset.to_json``);
3. without a data folder (no ``--data-dir``, no ``$MOQAE_DATA_DIR``): the hub itself
   (``datasets.load_dataset``).

What each route returns is ``(questions, documents)``: ``documents`` every distinct paragraph, sorted;
each question ``{"query", "outputs", "context": [document indices], "more_context": [...]}``
(``more_context``: SQuAD's other paragraphs of the same article, which RULER adds as distractors first).

* SQuAD: unanswerable questions (``is_impossible``; in the hub schema, no answer text) are left out;
  the answers are every annotator's text, duplicates kept, as RULER keeps them. In the hub schema an
  article is the run of rows with one ``title`` (titles are unique per article in SQuAD v2.0 dev), its
  paragraphs in order of first appearance, as in the original file.
* HotpotQA: a document is ``title + "\\n" + "".join(sentences)``; the hub's ``context`` holds the same
  pairs as two lists (``title``, ``sentences``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from harness.data import DATA_DIR_ENV, MissingDataError

Questions = tuple[list[dict[str, Any]], list[str]]


@dataclass(frozen=True)
class QASource:
    original: str  # file name under <data>/ruler/ (RULER's copy of the release file)
    release: str  # what the original file is
    hub: tuple[str, str | None, str]  # (repo, config, split) on the Hugging Face hub
    hub_file: str  # the hub's rows as JSON lines under <data>/ruler/


SOURCES = {
    "qa_1": QASource(
        "squad.json", "SQuAD v2.0 dev (dev-v2.0.json)", ("rajpurkar/squad_v2", None, "validation"),
        "squad_v2.validation.jsonl",
    ),
    "qa_2": QASource(
        "hotpotqa.json", "HotpotQA distractor dev (hotpot_dev_distractor_v1.json)",
        ("hotpotqa/hotpot_qa", "distractor", "validation"), "hotpot_qa.distractor.validation.jsonl",
    ),
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# The two schemas
# --------------------------------------------------------------------------------------------


Article = tuple[list[str], list[tuple[str, str, list[str]]]]  # (paragraphs, [(paragraph, question, answers)])


def _squad(articles: list[Article]) -> Questions:
    """Articles in file order: their paragraphs, and (paragraph, question, answers) per question (no
    answers: unanswerable, left out)."""
    docs = sorted({p for paragraphs, _ in articles for p in paragraphs})
    index = {c: i for i, c in enumerate(docs)}
    out = []
    for paragraphs, questions in articles:
        more = [index[p] for p in paragraphs]
        for p, question, answers in questions:
            if answers:
                i = index[p]
                out.append(
                    {"query": question, "outputs": answers, "context": [i], "more_context": [j for j in more if j != i]}
                )
    return out, docs


def read_squad(data: dict[str, Any]) -> Questions:
    """RULER's ``read_squad`` on the original ``dev-v2.0.json``."""
    articles = [
        (
            [p["context"] for p in d["paragraphs"]],
            [
                (p["context"], q["question"], [] if q["is_impossible"] else [a["text"] for a in q["answers"]])
                for p in d["paragraphs"]
                for q in p["qas"]
            ],
        )
        for d in data["data"]
    ]
    return _squad(articles)


def read_squad_hub(rows: list[dict[str, Any]]) -> Questions:
    """The same from the hub's ``rajpurkar/squad_v2`` rows (``title, context, question, answers``): an
    article's paragraphs are its rows' distinct contexts in order of first appearance."""
    articles: dict[str, Article] = {}
    for r in rows:
        paragraphs, questions = articles.setdefault(r["title"], ([], []))
        if r["context"] not in paragraphs:
            paragraphs.append(r["context"])
        questions.append((r["context"], r["question"], list(r["answers"]["text"])))
    return _squad(list(articles.values()))


def _hotpot(rows: list[tuple[str, str, list[tuple[str, list[str]]]]]) -> Questions:
    """(question, answer, [(title, sentences)]) per row."""
    docs = sorted({f"{t}\n{''.join(s)}" for _, _, ctx in rows for t, s in ctx})
    index = {c: i for i, c in enumerate(docs)}
    return [
        {"query": q, "outputs": [a], "context": [index[f"{t}\n{''.join(s)}"] for t, s in ctx]} for q, a, ctx in rows
    ], docs


def read_hotpotqa(data: list[dict[str, Any]]) -> Questions:
    """RULER's ``read_hotpotqa`` on the original ``hotpot_dev_distractor_v1.json``."""
    return _hotpot([(d["question"], d["answer"], [(t, p) for t, p in d["context"]]) for d in data])


def read_hotpotqa_hub(rows: list[dict[str, Any]]) -> Questions:
    """The same from the hub's ``hotpotqa/hotpot_qa`` distractor rows (``context: {title, sentences}``)."""
    return _hotpot(
        [
            (r["question"], r["answer"], list(zip(r["context"]["title"], r["context"]["sentences"], strict=True)))
            for r in rows
        ]
    )


# --------------------------------------------------------------------------------------------
# Where the data comes from
# --------------------------------------------------------------------------------------------


def locate(task: str, data_dir: Path | None) -> tuple[str, Path | None] | None:
    """("original" | "hub rows", path) of the first file found under ``<data>/ruler/``; ("hub", None)
    without a data folder; None where the data folder has neither file."""
    if data_dir is None:
        return "hub", None
    src = SOURCES[task]
    for kind, name in (("original", src.original), ("hub rows", src.hub_file)):
        path = Path(data_dir) / "ruler" / name
        if path.is_file():
            return kind, path
    return None


def missing_message(tasks: list[str], data_dir: Path | None) -> str:
    """One line: what each QA task needs and where it may be."""
    what = "; ".join(
        f"{t}: <data>/ruler/{SOURCES[t].original} ({SOURCES[t].release}) or <data>/ruler/{SOURCES[t].hub_file} "
        f"(hub {'/'.join(x for x in SOURCES[t].hub[:2] if x)} {SOURCES[t].hub[2]} rows)"
        for t in tasks
    )
    where = f"not in {data_dir}" if data_dir is not None else "hub unreachable and no data folder given"
    return (
        f"ruler: {', '.join(tasks)} need{'s' if len(tasks) == 1 else ''} {what} ({where}); "
        f"give --data-dir (or ${DATA_DIR_ENV}), or use ruler:offline"
    )


def _hub_rows(task: str) -> list[dict[str, Any]]:
    import datasets

    repo, config, split = SOURCES[task].hub
    return [dict(r) for r in datasets.load_dataset(repo, config, split=split)]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"line {n} is not JSON ({e.msg})") from None
    return rows


@cache
def load_qa(task: str, data_dir: Path | None) -> tuple[Questions, str]:
    """(questions and documents, where they came from) for ``qa_1`` / ``qa_2``. ``MissingDataError``
    (one line) where the data is absent, unreadable or not in either schema."""
    found = locate(task, data_dir)
    if found is None:
        raise MissingDataError(missing_message([task], data_dir))
    kind, path = found
    src = SOURCES[task]
    try:
        if kind == "hub":
            try:
                rows = _hub_rows(task)
            except Exception as e:  # offline, not found, ...: one clear message
                raise MissingDataError(missing_message([task], None)) from e
            origin = f"hub {'/'.join(x for x in src.hub[:2] if x)} {src.hub[2]}"
        elif kind == "original":
            rows = json.loads(path.read_text(encoding="utf-8"))
            origin = f"{path.name} ({src.release})"
        else:
            rows = _jsonl(path)
            origin = f"{path.name} (hub rows)"
        if kind == "original":
            qa = read_squad(rows) if task == "qa_1" else read_hotpotqa(rows)
        else:
            qa = read_squad_hub(rows) if task == "qa_1" else read_hotpotqa_hub(rows)
    except MissingDataError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        schema = src.release if kind == "original" else f"hub rows of {src.hub[0]}"
        raise MissingDataError(f"ruler {task}: {path} is not {schema}: {type(e).__name__}: {e}") from None
    if not qa[0]:
        raise MissingDataError(f"ruler {task}: {path or origin} holds no answerable question")
    return qa, origin
