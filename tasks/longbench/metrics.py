"""LongBench v1 metrics, written after the definitions of THUDM/LongBench ``LongBench/metrics.py`` and
the ``scorer`` of ``LongBench/eval.py`` (MIT).

Every metric maps (prediction, one gold answer, the dataset's class list) to [0, 1]; ``score`` takes,
per sample, the best over its gold answers and returns 100 x the mean over samples.

Libraries, chosen to give the official numbers:

* ROUGE-L: the ``rouge`` package (1.0.x), which the official code calls. Its ROUGE-L is the
  summary-level union LCS (sentences split at ".", words at single spaces, no lower-casing, each
  distinct word counted once); ``rouge-score``'s ``rougeL`` tokenizes and lower-cases differently
  and gives other numbers. Any error (an empty or all-"." prediction, the package's recursion limit
  on very long sentences) scores 0, as the official ``try/except`` does.
* jieba for Chinese word segmentation (``cut_all=False``), as official.
* code similarity: the official code calls ``fuzzywuzzy.fuzz.ratio``; LongBench's requirements
  install fuzzywuzzy without python-Levenshtein, so that ratio is difflib's ``SequenceMatcher``
  ratio, rounded to an integer percent. It is reimplemented here on the standard library.
  ``rapidfuzz.fuzz.ratio`` (= fuzzywuzzy with python-Levenshtein) is an LCS/Indel ratio that
  differs on typical code lines by up to ~19 points (47 of 105 pairs of the mirror's lcc /
  repobench-p lines differed), so it is not used.
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from difflib import SequenceMatcher

from tasks.longbench.prompts import DATASET2METRIC, FIRST_LINE_ONLY

# ASCII punctuation plus the Chinese / full-width punctuation the official Chinese normalisation drops.
_ZH_PUNCTUATION = frozenset(
    string.punctuation
    + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》"
    + "「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_EN_PUNCTUATION = frozenset(string.punctuation)


def _jieba_cut(text: str) -> list[str]:
    import jieba

    jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict ..." chatter on every run
    return list(jieba.cut(text, cut_all=False))


# --------------------------------------------------------------------------------------------
# Normalisation and token F1
# --------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop ASCII punctuation, then the articles a/an/the, then
    collapse whitespace to single spaces (the official ``normalize_answer``)."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lower-case, drop ASCII and Chinese punctuation, remove all whitespace (``normalize_zh_answer``)."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCTUATION).split())


def token_f1(prediction: Sequence[str], gold: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists (0 without overlap)."""
    same = sum((Counter(prediction) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(gold)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------------------------
# The metrics (prediction, one gold answer, the dataset's classes) -> [0, 1]
# --------------------------------------------------------------------------------------------


def qa_f1(prediction: str, gold: str, all_classes: Sequence[str] | None = None) -> float:
    """Token F1 of the SQuAD-normalised texts split at whitespace."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(gold).split())


def qa_f1_zh(prediction: str, gold: str, all_classes: Sequence[str] | None = None) -> float:
    """Token F1 over jieba words, each normalised (``normalize_zh_answer``); words that become empty are dropped."""

    def words(text: str) -> list[str]:
        return [w for w in (normalize_zh_answer(t) for t in _jieba_cut(text)) if w]

    return token_f1(words(prediction), words(gold))


def rouge(prediction: str, gold: str, all_classes: Sequence[str] | None = None) -> float:
    """ROUGE-L F of the ``rouge`` package (``Rouge().get_scores(..., avg=True)["rouge-l"]["f"]``); 0 on error."""
    from rouge import Rouge

    try:
        return float(Rouge(metrics=["rouge-l"]).get_scores([prediction], [gold], avg=True)["rouge-l"]["f"])
    except Exception:  # the official code scores any failure 0 (empty hypothesis, RecursionError, ...)
        return 0.0


def rouge_zh(prediction: str, gold: str, all_classes: Sequence[str] | None = None) -> float:
    """``rouge`` of the texts cut into jieba words joined by single spaces."""
    return rouge(" ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(gold)))


def classification(prediction: str, gold: str, all_classes: Sequence[str] | None = None) -> float:
    """1 / (number of classes found in the prediction) if the gold class is among them, else 0.

    The classes found are those of ``all_classes`` that occur as substrings of the prediction. Found
    classes that are proper substrings of the gold class are then dropped, with the official loop's
    exact behaviour: it removes entries from the list it is iterating over, so the entry that moves
    into a removed entry's place is not examined (and stays).
    """
    found = [c for c in all_classes or () if c in prediction]
    i = 0
    while i < len(found):  # index-based, as Python's list iterator walks the list being mutated
        term = found[i]
        if term in gold and term != gold:
            found.remove(term)
        i += 1
    return 1.0 / len(found) if gold in found else 0.0


def _number_share(prediction: str, target: str) -> float:
    """Share of the digit runs in the prediction that equal ``target`` (0 if it has none)."""
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, gold: str, all_classes: Sequence[str] | None = None) -> float:
    """passage_retrieval_en: the gold "Paragraph N" gives N; share of the prediction's numbers equal to N."""
    return _number_share(prediction, re.findall(r"Paragraph (\d+)", gold)[0])


def retrieval_zh(prediction: str, gold: str, all_classes: Sequence[str] | None = None) -> float:
    """passage_retrieval_zh: as ``retrieval`` with the gold written "段落N"."""
    return _number_share(prediction, re.findall(r"段落(\d+)", gold)[0])


def count(prediction: str, gold: str, all_classes: Sequence[str] | None = None) -> float:
    """passage_count: share of the prediction's numbers equal to the gold count."""
    return _number_share(prediction, str(gold))


def fuzz_ratio(a: str | None, b: str | None) -> int:
    """``fuzzywuzzy.fuzz.ratio`` as LongBench's requirements install it (difflib backend): 0 if either
    is None, 100 if equal, 0 if either is empty, else round(100 x ``SequenceMatcher(None, a, b).ratio()``)."""
    if a is None or b is None:
        return 0
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * SequenceMatcher(None, a, b).ratio()))


def first_code_line(prediction: str) -> str:
    """The first line (after leading newlines) containing none of "`", "#", "//"; "" if there is none."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def code_sim(prediction: str, gold: str, all_classes: Sequence[str] | None = None) -> float:
    """lcc / repobench-p: ``fuzz_ratio`` of the first code line of the prediction and the gold line, / 100."""
    return fuzz_ratio(first_code_line(prediction), gold) / 100


Metric = Callable[..., float]

METRICS: dict[str, Metric] = {
    "qa_f1": qa_f1,
    "qa_f1_zh": qa_f1_zh,
    "rouge": rouge,
    "rouge_zh": rouge_zh,
    "classification": classification,
    "retrieval": retrieval,
    "retrieval_zh": retrieval_zh,
    "count": count,
    "code_sim": code_sim,
}


# --------------------------------------------------------------------------------------------
# Scoring (eval.py's ``scorer``)
# --------------------------------------------------------------------------------------------


def postprocess(dataset: str, prediction: str) -> str:
    """trec, triviaqa, samsum, lsht keep the first line of the prediction (after leading newlines)."""
    return prediction.lstrip("\n").split("\n")[0] if dataset in FIRST_LINE_ONLY else prediction


def sample_score(
    dataset: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None = None
) -> float:
    """One sample in [0, 1]: the best, over the gold answers, of the dataset's metric (0 without answers)."""
    metric = METRICS[DATASET2METRIC[dataset]]
    prediction = postprocess(dataset, prediction)
    return max([0.0, *(metric(prediction, gold, all_classes) for gold in answers)])


def score(
    dataset: str,
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    all_classes: Sequence[str] | None = None,
) -> float:
    """100 x the mean of ``sample_score`` over the samples (eval.py's ``scorer``, without its rounding
    to 2 decimals). ``all_classes`` is the dataset's class list (the same for every sample)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answer lists")
    if not predictions:
        raise ValueError(f"{dataset}: no predictions to score")
    total = sum(sample_score(dataset, p, a, all_classes) for p, a in zip(predictions, answers, strict=True))
    return 100 * total / len(predictions)
