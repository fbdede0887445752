"""LongBench v1: metrics against hand-computed values from the official definitions (THUDM/LongBench
``metrics.py`` / ``eval.py``), the official prompts and middle truncation, dataset groups, the spec, and
an end-to-end run on stories260K with the mirror."""

from __future__ import annotations

import json

import pytest

from harness.cli import build_parser, split_specs
from harness.data import MissingDataError, longbench_rows
from harness.evaluation import TASKS, TaskContext, build_task
from harness.integration import AttachedMethod
from harness.interface import MethodSpecError, build_method
from tasks.longbench import metrics as M
from tasks.longbench.prompts import DATASET2MAXLEN, DATASET2METRIC, DATASET2PROMPT, DATASETS, GROUPS
from tasks.longbench.task import expand_datasets, fill_template, middle_ids, truncate_middle

KIVI8 = ["triviaqa", "qasper", "trec", "samsum", "lcc", "repobench-p", "qmsum", "multi_news"]

# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def test_qa_f1_squad_normalisation():
    # "the" and punctuation go: [eiffel, tower, in, paris] vs [eiffel, tower]: P 2/4, R 1 -> F1 2/3
    assert M.qa_f1("The Eiffel Tower, in Paris!", "Eiffel tower") == pytest.approx(2 / 3)
    # multiset overlap: cat x1, dog x1 of 3 tokens each -> P = R = 2/3
    assert M.qa_f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)
    assert M.qa_f1("An apple.", "apple") == 1.0
    assert M.qa_f1("banana", "apple") == 0.0
    assert M.qa_f1("", "apple") == 0.0


def test_qa_f1_zh_jieba_and_chinese_punctuation():
    # jieba: 北京 / ， / 上海 / 。 -> punctuation tokens become empty and are dropped: P 1/2, R 1
    assert M.qa_f1_zh("北京，上海。", "北京") == pytest.approx(2 / 3)
    assert M.qa_f1_zh("“北京”", "北京") == 1.0  # full-width quotes removed
    assert M.qa_f1_zh("上海", "北京") == 0.0


def test_rouge_l_of_the_rouge_package():
    # LCS a c d: P 3/4, R 3/5 -> F 2PR/(P+R) = 2/3
    assert M.rouge("a b c d", "a c d e f") == pytest.approx(2 / 3, abs=1e-6)
    # summary level: sentences split at "."; the union LCS over both hypothesis sentences covers all 4 words
    assert M.rouge("x y. a b", "a b x y") == pytest.approx(1.0, abs=1e-6)
    # words are counted once (sets): {the, cat} vs {the, cat} -> 1 (rouge-score's rougeL would give 0.8)
    assert M.rouge("the the cat", "the cat") == pytest.approx(1.0, abs=1e-6)
    assert M.rouge("", "a b") == 0.0  # the package raises on an empty hypothesis: scored 0
    assert M.rouge("...", "a b") == 0.0


def test_rouge_zh_joins_jieba_words():
    # 我 爱 北京 vs 我 爱 上海: LCS 2 of 3 words each -> 2/3
    assert M.rouge_zh("我爱北京", "我爱上海") == pytest.approx(2 / 3, abs=1e-6)


def test_classification():
    classes = ["Individual", "City", "Country"]
    assert M.classification("Individual or City", "City", classes) == 0.5  # two classes found
    assert M.classification("City", "City", classes) == 1.0
    assert M.classification("Country", "City", classes) == 0.0
    # "location" is a proper substring of the gold "Other location": dropped -> one class left
    assert M.classification("Other location", "Other location", ["location", "Other location", "City"]) == 1.0
    # the official loop removes from the list it iterates: after dropping "a1", "a12" moves into its
    # place and is skipped, so it stays: ["a12", "a123"] -> 1/2
    assert M.classification("a123", "a123", ["a1", "a12", "a123"]) == 0.5


def test_retrieval_en_and_zh():
    assert M.retrieval("Paragraph 12", "Paragraph 12") == 1.0
    assert M.retrieval("Paragraph 3 or Paragraph 12", "Paragraph 12") == 0.5
    assert M.retrieval("Paragraph 123", "Paragraph 12") == 0.0
    assert M.retrieval("I do not know", "Paragraph 12") == 0.0
    assert M.retrieval_zh("答案是：段落5", "段落5") == 1.0
    assert M.retrieval_zh("段落5和段落15", "段落5") == 0.5


def test_count():
    assert M.count("There are 7 unique paragraphs out of 10", "7") == 0.5
    assert M.count("7", "7") == 1.0
    assert M.count("seven", "7") == 0.0


def test_code_sim_skips_comment_lines():
    # first line without #, // or `: "    x = foo(1)"; difflib blocks "    x = foo(" (12) + ")" (1):
    # ratio 2*13/28 = 0.9286 -> fuzzywuzzy rounds to 93 %
    assert M.code_sim("# comment\n    x = foo(1)\n", "    x = foo(2)") == 0.93
    assert M.code_sim("```python\n// note\nreturn 1", "return 1") == 1.0
    assert M.code_sim("# only\n// comments", "return 1") == 0.0
    assert M.fuzz_ratio("abc", "") == 0 and M.fuzz_ratio("", "") == 100


def test_score_first_line_and_best_answer():
    # triviaqa keeps the first line; sample 1 matches its first answer, sample 2 none -> 50
    preds = ["\nParis\nQuestion: more", "London"]
    assert M.score("triviaqa", preds, [["paris", "Paris, France"], ["Berlin"]]) == pytest.approx(50.0)
    # trec: first line "City" only; the second line's "Country" does not count
    assert M.score("trec", ["City\nCountry"], [["City"]], ["City", "Country"]) == 100.0
    assert M.sample_score("lcc", "x = 1", []) == 0.0


# --------------------------------------------------------------------------------------------
# Protocol data, groups, spec
# --------------------------------------------------------------------------------------------


def test_tables_cover_the_21_datasets():
    assert len(DATASETS) == 21 and set(DATASET2PROMPT) == set(DATASET2MAXLEN) == set(DATASET2METRIC) == set(DATASETS)
    assert (DATASET2MAXLEN["trec"], DATASET2MAXLEN["samsum"], DATASET2MAXLEN["gov_report"]) == (64, 128, 512)
    assert (DATASET2MAXLEN["hotpotqa"], DATASET2MAXLEN["lcc"], DATASET2MAXLEN["qasper"]) == (32, 64, 128)
    assert DATASET2METRIC["lsht"] == "classification" and DATASET2METRIC["dureader"] == "rouge_zh"


def test_groups():
    assert expand_datasets("kivi8") == KIVI8
    assert expand_datasets("all") == list(DATASETS) and len(GROUPS["e"]) == 13
    assert expand_datasets("trec, samsum,trec") == ["trec", "samsum"]
    assert expand_datasets("lsht,kivi8")[:2] == ["lsht", "triviaqa"]
    with pytest.raises(MethodSpecError, match="accepted: all, e, kivi8, narrativeqa"):
        expand_datasets("trec,nope")
    with pytest.raises(MethodSpecError, match="nope"):
        build_task("longbench:nope")


def test_spec_and_overrides():
    task = build_task("longbench:trec,samsum,limit=2")
    assert task.config.tasks == "trec,samsum" and task.config.limit == 2 and task.config.max_length == 0
    assert build_task("longbench").config.tasks == "kivi8"
    task = build_task("longbench:qasper", limit=3, max_length=1000, seqlen=64, max_windows=2)
    assert (task.config.limit, task.config.max_length) == (3, 1000)
    with pytest.raises(MethodSpecError):
        build_task("longbench:trec,limit=0")
    assert split_specs(["longbench:trec,samsum,wikitext2"], TASKS) == ["longbench:trec,samsum", "wikitext2"]
    args = build_parser().parse_args(["run", "--methods", "fp16", "--limit", "2", "--max-length", "300"])
    assert (args.limit, args.max_length) == (2, 300)


def test_prompts_from_mirror_samples(data_dir, real_data):
    trec = longbench_rows("trec", data_dir)[0]
    expected = (
        "Please determine the type of the question below. Here are some examples of questions.\n\n"
        + trec["context"]
        + "\n"
        + trec["input"]
    )
    assert fill_template("trec", trec) == expected
    qasper = longbench_rows("qasper", data_dir)[0]
    instruction = (
        "Answer the question as concisely as you can, using a single phrase or sentence if possible. If the "
        'question cannot be answered based on the information in the article, write "unanswerable". If the '
        'question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.'
    )
    expected = (
        f"You are given a scientific article and a question. {instruction}\n\nArticle: {qasper['context']}\n\n"
        f" {instruction.replace('Answer the question', 'Answer the question based on the above article', 1)}"
        f"\n\nQuestion: {qasper['input']}\n\nAnswer:"
    )
    assert fill_template("qasper", qasper) == expected


def test_mirror_rows_and_missing_data(data_dir, tmp_path):
    rows = longbench_rows("samsum", data_dir)
    assert rows and set(rows[0]) >= {"_id", "input", "context", "answers", "all_classes", "length"}
    with pytest.raises(MissingDataError, match="longbench/trec.jsonl.*THUDM/LongBench"):
        longbench_rows("trec", tmp_path)
    (tmp_path / "longbench").mkdir()
    (tmp_path / "longbench" / "samsum.jsonl").write_text((data_dir / "longbench" / "samsum.jsonl").read_text())
    from harness.evaluation import build_task

    with pytest.raises(MissingDataError, match="longbench/trec.jsonl"):  # one missing: its own message
        build_task("longbench:trec,samsum").check_data(tmp_path)
    with pytest.raises(MissingDataError) as e:  # several: every one named, in one line
        build_task("longbench:trec,samsum,qasper").check_data(tmp_path)
    assert str(e.value).startswith("LongBench: 2 of 3 datasets missing (trec, qasper); each not found at ")
    assert "longbench/<dataset>.jsonl" in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------
# Middle truncation
# --------------------------------------------------------------------------------------------


def test_middle_truncation_keeps_both_halves(stories, real_stories):
    _, tok = stories
    text = " ".join(f"Tim saw {i} red balls and a big dog in the park." for i in range(40))
    ids = tok(text).input_ids
    head, tail = middle_ids(ids, 11)
    assert head == ids[:5] and tail == ids[-5:]

    def halves(k: int) -> str:
        return tok.decode(ids[:k], skip_special_tokens=True) + tok.decode(ids[-k:], skip_special_tokens=True)

    # official: first 48 + last 48 ids decoded and joined; here it re-tokenizes to 96 tokens
    assert truncate_middle(tok, text, 96) == (halves(48), True) and len(tok(halves(48)).input_ids) == 96
    # at 100 the joint re-tokenizes one token longer ("balls" + "dog"): the halves shrink to 49
    assert len(tok(halves(50)).input_ids) == 101
    assert truncate_middle(tok, text, 100) == (halves(49), True) and len(tok(halves(49)).input_ids) <= 100
    assert truncate_middle(tok, "Once upon a time", 100) == ("Once upon a time", False)


def test_truncation_fits_when_retokenizing_grows(stories, real_stories):
    """Cutting a byte-level Chinese text mid-character decodes to U+FFFD, which re-tokenizes longer:
    the halves shrink until the budget holds."""
    _, tok = stories
    text = "阅读以下文字并用中文简短回答" * 50
    out, truncated = truncate_middle(tok, text, 101)
    assert truncated and 50 < len(tok(out).input_ids) <= 101


# --------------------------------------------------------------------------------------------
# End to end on stories260K
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def e2e(stories, data_dir):
    model, tok = stories
    task = build_task("longbench:trec,samsum", limit=1, max_length=400)
    out = {}
    for spec in ("fp16", "int2"):
        with AttachedMethod(model, build_method(spec)) as am:
            out[spec] = task.evaluate(TaskContext(model, tok, am, data_dir, progress=False))
    return out


@pytest.mark.parametrize("spec", ["fp16", "int2"])
def test_end_to_end(e2e, spec, data_dir):
    result = e2e[spec]
    metrics = result["metrics"]
    assert set(metrics) == {"trec", "samsum", "average"}
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    assert metrics["average"] == pytest.approx((metrics["trec"] + metrics["samsum"]) / 2)
    samples = result["samples"]
    assert [s["dataset"] for s in samples] == ["trec", "samsum"]
    for s in samples:
        keys = {"dataset", "index", "_id", "input_tokens", "truncated", "output", "answers", "score", "seconds"}
        assert set(s) == keys
        assert 0 < s["input_tokens"] <= 400 and s["truncated"]  # both mirror samples are far longer
        assert s["_id"] == longbench_rows(s["dataset"], data_dir)[0]["_id"]
        classes = longbench_rows(s["dataset"], data_dir)[0]["all_classes"]
        assert metrics[s["dataset"]] == pytest.approx(M.score(s["dataset"], [s["output"]], [s["answers"]], classes))
        json.dumps(s)  # goes to the runner's side file
    kv = result["kv"]
    per_token = 2 * 5 * 4 * 8  # K and V x 5 layers x 4 KV heads x head_dim 8
    assert kv["elements"] % per_token == 0 and kv["elements"] // per_token >= samples[-1]["input_tokens"]
    assert kv["nominal_bits"] == (16.0 if spec == "fp16" else 2.0)


def test_resumes_from_the_samples_a_crashed_run_finished(stories, data_dir, tmp_path, monkeypatch):
    """Each finished sample is checkpointed; a re-run generates only the missing ones."""
    import tasks.longbench.task as lb

    model, tok = stories
    task = build_task("longbench:trec,samsum", limit=1, max_length=300)
    checkpoint = tmp_path / "cell.partial.jsonl"
    calls = []
    real = lb.generate

    def crash_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second sample
        return real(*a, **k)

    with AttachedMethod(model, build_method("fp16")) as am:
        ctx = TaskContext(model, tok, am, data_dir, progress=False, checkpoint=checkpoint)
        monkeypatch.setattr(lb, "generate", crash_on_second)
        with pytest.raises(KeyboardInterrupt):
            task.evaluate(ctx)
        first = [json.loads(line) for line in checkpoint.read_text().splitlines()]
        assert [(s["dataset"], s["index"]) for s in first] == [("trec", 0)]
        calls.clear()
        monkeypatch.setattr(lb, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
        resumed = task.evaluate(ctx)
        monkeypatch.undo()
        fresh = task.evaluate(TaskContext(model, tok, am, data_dir, progress=False))
    assert len(calls) == 1  # only samsum was generated again
    assert resumed["metrics"] == fresh["metrics"]
    assert [s["output"] for s in resumed["samples"]] == [s["output"] for s in fresh["samples"]]
    assert "kv" not in resumed["samples"][0] and resumed["kv"] == fresh["kv"]
