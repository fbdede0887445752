"""RULER (tasks.ruler): generators against hand-checked cases, RULER's scorers, the task end to end through
``harness.cli.main`` on stories260K (or its stand-in), and bad input refused in one line before any model loads.

stories260K's tokenizer has 512 pieces: RULER's noise sentence is 50 tokens in it, so the smallest niah prompt
(5 noise sentences, 128 tokens to generate) needs ~620 tokens, more than the model's 512 context, and vt's
few-shot example (RULER's fixed 500-token budget) never fits. The end-to-end test therefore runs a copy of
the model whose config declares a 1024-token context, at length 1024, on niah_single_1 and fwe.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from harness.cli import main
from harness.evaluation import TaskContext, build_task
from harness.integration import AttachedMethod
from harness.interface import MethodSpecError, build_method
from tasks.ruler.generate import NEEDLE, NOISE, TEMPLATES, Generator, Haystack, Tokens, split_prefix
from tasks.ruler.metrics import postprocess_pred, sample_score, string_match_all, string_match_part
from tasks.ruler.task import default_lengths, expand_tasks, parse_lengths


@pytest.fixture(scope="module")
def tok(stories_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(stories_dir))


@pytest.fixture(scope="module")
def long_stories(stories_dir, tmp_path_factory) -> Path:
    """stories260K with a config that declares 1024 positions (RoPE runs past 512; quality is irrelevant)."""
    folder = tmp_path_factory.mktemp("ruler") / "stories1k"
    shutil.copytree(stories_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["max_position_embeddings"] = 1024
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


# ---------------------------------------------------------------------------------------------- scorers


def test_scorers_match_rulers_definitions():
    # string_match_all: the share of references found, case-insensitive substring
    assert string_match_all(["The numbers are 123 and 456."], [["123", "456"]]) == 100.0
    assert string_match_all(["only 123"], [["123", "456", "789", "000"]]) == 25.0
    assert string_match_all(["ABC-def", "x"], [["abc-DEF"], ["y"]]) == 50.0
    # string_match_part: any reference
    assert string_match_part(["Paris, France"], [["London", "paris"]]) == 100.0
    assert string_match_part(["Rome", "Oslo"], [["London", "Paris"], ["oslo"]]) == 50.0
    assert string_match_all(["a"], [["a", "b", "c"]]) == 33.33  # RULER rounds to 2 decimals
    # postprocess: strip, control characters -> newline, strip
    assert postprocess_pred("  \x01abc\tdef\x02 ") == "abc\ndef"
    assert sample_score("niah_multivalue", " 1, 2\x00 and 3", ["1", "2", "3", "4"]) == 75.0
    assert sample_score("qa_1", "it is paris", ["Paris", "Lyon"]) == 100.0


# ---------------------------------------------------------------------------------------------- options


def test_options_parse():
    assert expand_tasks("niah_single_1,vt") == ["niah_single_1", "vt"]
    assert len(expand_tasks("all")) == 13 and len(expand_tasks("offline")) == 11
    assert "qa_1" not in expand_tasks("offline")
    assert parse_lengths("4096/1024,4096") == [1024, 4096] and parse_lengths("") == []
    assert default_lengths(8192) == [1024, 2048, 4096, 8192] and default_lengths(512) == [512]
    task = build_task("ruler:niah_single_1,vt,lengths=256/512,samples=1")
    assert task.config.tasks == "niah_single_1,vt" and task.tokens_needed() == 512
    assert build_task("ruler").tokens_needed() is None
    for bad in ("ruler:nope", "ruler:lengths=abc", "ruler:samples=0", "ruler:haystack=/no/such/file"):
        with pytest.raises(MethodSpecError):
            build_task(bad)


# ---------------------------------------------------------------------------------------------- generators


def test_templates_are_rulers():
    assert TEMPLATES["niah"]["template"].startswith(
        "Some special magic {type_needle_v} are hidden within the following"
    )
    assert TEMPLATES["variable_tracking"]["answer_prefix"].endswith(
        "{num_v} variables are assigned the value {query}, they are: "
    )
    assert TEMPLATES["qa"]["answer_prefix"] == " Answer:"


def test_niah_single_needle_budget_determinism(tok):
    tokens = Tokens(tok, chat=False)
    a = Generator("niah_single_1", 1024, 42, tokens).samples(2)
    b = Generator("niah_single_1", 1024, 42, tokens).samples(1)
    c = Generator("niah_single_1", 1024, 7, tokens).samples(1)
    assert a[0] == b[0]  # deterministic, and the first n samples do not depend on how many are asked
    assert a[0].input != c[0].input  # another seed, other samples
    for s in a:
        assert s.input.startswith("A special magic number is hidden within the following text.")  # singular form
        assert s.answer_prefix.startswith(" The special magic number for ") and s.answer_prefix.endswith(" is")
        assert s.input.count("One of the special magic numbers for ") == 1
        [value] = s.outputs
        assert len(value) == 7 and value.isdigit() and f"is: {value}." in s.input
        key = s.answer_prefix.split(" for ")[1].split(" mentioned")[0]
        assert NEEDLE.format(type_needle_v="numbers", key=key, value=value) in s.input
        # noise layout: the needle is a line of its own among haystack_size noise sentences
        context = s.input.split("\n", 1)[1].rsplit("\n", 1)[0].split("\n")
        assert len(context) == s.haystack_size + 1 and context.count(NOISE) == s.haystack_size
        # the budget: the ids fed plus 128 to generate fit the length, as the sample records
        fed = len(tokens.ids("niah_single_1", s.input + s.answer_prefix))
        assert s.length_tokens == fed + 128 <= 1024
    # RULER's search takes the largest haystack that fits; its sample loop then steps down by its increment
    # (5 noise sentences below 4k tokens) while a sample's own keys do not fit: within one step of full
    fed = len(tokens.ids("niah_single_1", a[0].input + a[0].answer_prefix))
    assert fed + 6 * len(tok(NOISE, add_special_tokens=False).input_ids) + 128 > 1024


def test_niah_multi_needles(tok):
    tokens = Tokens(tok, chat=False)
    [mv] = Generator("niah_multivalue", 1024, 42, tokens).samples(1)
    assert len(mv.outputs) == 4 and all(mv.input.count(f"is: {v}.") == 1 for v in mv.outputs)
    assert mv.input.startswith("Some special magic numbers are hidden")  # plural forms kept
    [mq] = Generator("niah_multiquery", 1024, 42, tokens).samples(1)
    assert mq.input.count("One of the special magic numbers for ") == 4 and len(mq.outputs) == 4
    assert ", and " in mq.answer_prefix
    [mk] = Generator("niah_multikey_3", 1024, 42, tokens).samples(1)
    lines = mk.input.split("\n")[1:-1]  # needle haystack: every line a needle with uuid keys and values
    assert len(lines) == mk.haystack_size + 1 and all(
        line.startswith("One of the special magic uuids for ") for line in lines
    )
    assert len(mk.outputs[0]) == 36 and mk.input.count(mk.outputs[0]) == 1


def test_essay_haystack_from_file(tok, tmp_path):
    text = " ".join(f"Sentence number {i} tells a story about a cat." for i in range(1000))
    path = tmp_path / "essay.txt"
    path.write_text(text)
    tokens = Tokens(tok, chat=False)
    [s] = Generator("niah_multikey_1", 4096, 42, tokens, Haystack.load(str(path))).samples(1)  # essay: 500-word steps
    assert s.extra["haystack_type"] == "essay"
    needles = [p for p in s.input.split(". ") if p.startswith("One of the special magic")]
    assert len(needles) == 4  # num_needle_k 4 (one queried)
    context = s.input.split("\n")[1]
    for needle in needles:
        context = context.replace(needle + ". ", "").replace(" " + needle + ".", "")
    assert context == " ".join(text.split(" ")[: s.haystack_size])  # the file's words, in order
    # the noise default stands in for the essay
    [n] = Generator("niah_multikey_1", 1024, 42, tokens).samples(1)
    assert n.extra["haystack_type"] == "noise" and NOISE in n.input


def test_chat_wrapping_within_budget(tok):
    chat_tok = type(tok).from_pretrained(tok.name_or_path)
    chat_tok.chat_template = "{% for m in messages %}<|user|>\n{{ m['content'] }}<|end|>\n{% endfor %}<|assistant|>\n"
    tokens = Tokens(chat_tok, chat=True)
    [s] = Generator("fwe", 1024, 42, tokens).samples(1)
    prompt, special = tokens.render("fwe", s.input + s.answer_prefix)
    assert special and prompt.startswith("<|user|>\nRead the following coded text")
    assert prompt.endswith("<|end|>\n<|assistant|>" + s.answer_prefix)  # jinja drops the last newline
    assert s.length_tokens == len(tokens.ids("fwe", s.input + s.answer_prefix)) + 50 <= 1024
    [plain] = Generator("fwe", 1024, 42, Tokens(tok, chat=False)).samples(1)
    assert split_prefix("fwe", plain.input + plain.answer_prefix) == (plain.input, plain.answer_prefix)
    assert len(plain.outputs) == 3 and all(f" {w} " in plain.input for w in plain.outputs)


def test_too_short_is_one_clear_error(tok):
    with pytest.raises(ValueError, match="length 512 is too short"):
        Generator("niah_single_1", 512, 42, Tokens(tok)).samples(1)


# ---------------------------------------------------------------------------------------------- end to end


def test_cli_run_two_methods_same_prompts(long_stories, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "run",
            "--methods",
            "fp16,int4",
            "--tasks",
            "ruler:niah_single_1,fwe,lengths=1024,samples=1",
            "--model",
            str(long_stories),
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0, capsys.readouterr().err
    records = [json.loads(p.read_text()) for p in sorted(out.rglob("*.json"))]
    records = [r for r in records if r.get("task", "").startswith("ruler")]
    assert len(records) == 2 and all(r["status"] == "done" for r in records)
    for r in records:
        m = r["metrics"]
        assert {"niah_single_1@1024", "fwe@1024", "avg@1024", "average"} <= set(m)
        assert m["avg@1024"] == pytest.approx((m["niah_single_1@1024"] + m["fwe@1024"]) / 2)
        assert r["ruler"]["samples"] == 1 and r["ruler"]["seed"] == 42 and r["ruler"]["haystack"] == "noise"
        side = [json.loads(line) for line in (out / r["samples_file"]).read_text().splitlines()]
        for s in (p for p in out.rglob(r["samples_file"])):
            side = [json.loads(line) for line in s.read_text().splitlines()]
        assert [s["task"] for s in side] == ["niah_single_1", "fwe"] and all("output" in s for s in side)
    assert records[0]["ruler"]["prompts_sha1"] == records[1]["ruler"]["prompts_sha1"]

    # the report's RULER section: the average per length beside the nominal bits, and each task per length
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "README.md").read_text()
    assert "## RULER" in md and "average per length" in md and "RULER at 1024 tokens" in md
    assert "![RULER average against nominal KV bits" in md
    assert (tmp_path / "report" / "ruler_vs_bits.png").stat().st_size > 0
    fp16 = next(r for r in records if r["method"] == "fp16")["metrics"]
    assert f"| fp16 | 16.00 | {fp16['avg@1024']:.2f} | {fp16['average']:.2f} |" in md


def test_shards_merge_to_one_pass(long_stories):
    from harness.models import load_model

    model, tok = load_model(str(long_stories), device="cpu", dtype="fp32")
    task = build_task("ruler:fwe,lengths=1024,samples=2")
    assert task.shard_units() == 2
    with AttachedMethod(model, build_method("fp16")) as am:
        ctx = TaskContext(model, tok, am, None, progress=False)
        whole = task.evaluate(ctx)
        parts = task.merge_shards([task.evaluate_shard(ctx, i, 2) for i in range(2)])
    assert parts["metrics"] == whole["metrics"] and parts["ruler"]["prompts_sha1"] == whole["ruler"]["prompts_sha1"]
    assert [s["output"] for s in parts["samples"]] == [s["output"] for s in whole["samples"]]
    assert torch.isfinite(torch.tensor(whole["metrics"]["average"]))


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("ruler:niah_sngle_1", "unknown task or group 'niah_sngle_1'"),
        ("ruler:niah_single_1,lengths=1024", "1024"),  # beyond stories' 512 context
        ("ruler:niah_single_1,haystack=/no/such/essay.txt", "haystack file /no/such/essay.txt not found"),
        ("ruler:niah_single_1,haystack=EMPTY", "is empty"),
        ("ruler:qa_1,lengths=512", "ruler/squad.json"),
        ("ruler:all,lengths=512", "qa_1, qa_2 need"),
    ],
)
def test_bad_input_one_line_exit_2(spec, fragment, stories_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MOQAE_DATA_DIR", raising=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    spec = spec.replace("EMPTY", str(empty))
    code = main(
        [
            "run",
            "--methods",
            "fp16",
            "--tasks",
            spec,
            "--model",
            str(stories_dir),
            "--out",
            str(tmp_path / "o"),
            "--data-dir",
            str(tmp_path / "data"),
        ]
    )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- QA data

SQUAD = {  # SQuAD v2.0 dev's layout: two articles, one unanswerable question
    "version": "v2.0",
    "data": [
        {
            "title": "A",
            "paragraphs": [
                {
                    "context": "Tom has a red ball.",
                    "qas": [
                        {"question": "What colour is the ball?", "id": "1", "is_impossible": False,
                         "answers": [{"text": "red", "answer_start": 10}, {"text": "red", "answer_start": 10}]},
                        {"question": "What is Tom's dog?", "id": "2", "is_impossible": True, "answers": [],
                         "plausible_answers": [{"text": "ball", "answer_start": 14}]},
                    ],
                },
                {"context": "Anna likes cake.", "qas": [{"question": "What does Anna like?", "id": "3",
                                                         "is_impossible": False,
                                                         "answers": [{"text": "cake", "answer_start": 11}]}]},
            ],
        },
        {"title": "B", "paragraphs": [{"context": "Ben sails a boat.", "qas": [
            {"question": "What does Ben sail?", "id": "4", "is_impossible": False,
             "answers": [{"text": "a boat", "answer_start": 10}, {"text": "boat", "answer_start": 12}]}]}]},
    ],
}  # fmt: skip
HOTPOT = [  # hotpot_dev_distractor_v1.json's layout
    {"_id": "a", "question": "Q1?", "answer": "yes", "type": "comparison", "level": "hard",
     "supporting_facts": [["T1", 0]], "context": [["T1", ["s1 ", "s2"]], ["T2", ["x"]]]},
    {"_id": "b", "question": "Q2?", "answer": "no", "type": "bridge", "level": "easy",
     "supporting_facts": [["T3", 1]], "context": [["T2", ["x"]], ["T3", ["y ", "z"]]]},
]  # fmt: skip


def squad_hub_rows(data: dict) -> list[dict]:
    """``rajpurkar/squad_v2`` validation rows, as its conversion writes them from the release file."""
    return [
        {"id": q["id"], "title": d["title"], "context": p["context"], "question": q["question"],
         "answers": {"text": [a["text"] for a in q["answers"]],
                     "answer_start": [a["answer_start"] for a in q["answers"]]}}
        for d in data["data"] for p in d["paragraphs"] for q in p["qas"]
    ]  # fmt: skip


def hotpot_hub_rows(data: list[dict]) -> list[dict]:
    """``hotpotqa/hotpot_qa`` distractor validation rows."""
    return [
        {"id": d["_id"], "question": d["question"], "answer": d["answer"], "type": d["type"], "level": d["level"],
         "supporting_facts": {"title": [t for t, _ in d["supporting_facts"]],
                              "sent_id": [i for _, i in d["supporting_facts"]]},
         "context": {"title": [t for t, _ in d["context"]], "sentences": [s for _, s in d["context"]]}}
        for d in data
    ]  # fmt: skip


def test_qa_readers_hand_cases_and_both_schemas_agree():
    from tasks.ruler.qa import read_hotpotqa, read_hotpotqa_hub, read_squad, read_squad_hub

    docs = ["Anna likes cake.", "Ben sails a boat.", "Tom has a red ball."]  # sorted
    want = [
        {"query": "What colour is the ball?", "outputs": ["red", "red"], "context": [2], "more_context": [0]},
        {"query": "What does Anna like?", "outputs": ["cake"], "context": [0], "more_context": [2]},
        {"query": "What does Ben sail?", "outputs": ["a boat", "boat"], "context": [1], "more_context": []},
    ]
    assert read_squad(SQUAD) == (want, docs)  # the unanswerable question is left out
    assert read_squad_hub(squad_hub_rows(SQUAD)) == (want, docs)
    docs = ["T1\ns1 s2", "T2\nx", "T3\ny z"]
    want = [
        {"query": "Q1?", "outputs": ["yes"], "context": [0, 1]},
        {"query": "Q2?", "outputs": ["no"], "context": [1, 2]},
    ]
    assert read_hotpotqa(HOTPOT) == (want, docs)
    assert read_hotpotqa_hub(hotpot_hub_rows(HOTPOT)) == (want, docs)


def test_qa_tasks_run_from_the_original_file_and_from_hub_rows(long_stories, tmp_path, capsys):
    data = tmp_path / "data" / "ruler"
    data.mkdir(parents=True)
    (data / "squad.json").write_text(json.dumps(SQUAD))  # qa_1: RULER's copy of the release file
    rows = hotpot_hub_rows(HOTPOT)
    (data / "hotpot_qa.distractor.validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = ["run", "--methods", "fp16", "--tasks", "ruler:qa_1,qa_2,lengths=1024,samples=2", "--model",
            str(long_stories), "--out", str(out), "--device", "cpu", "--data-dir", str(tmp_path / "data")]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    (rec,) = [json.loads(p.read_text()) for p in out.rglob("*.json") if "ruler" in p.name]
    assert rec["status"] == "done" and {"qa_1@1024", "qa_2@1024", "avg@1024"} <= set(rec["metrics"])
    assert rec["ruler"]["qa_data"] == {
        "qa_1": "squad.json (SQuAD v2.0 dev (dev-v2.0.json))",
        "qa_2": "hotpot_qa.distractor.validation.jsonl (hub rows)",
    }
    side = [json.loads(line) for line in next(out.rglob(rec["samples_file"])).read_text().splitlines()]
    assert [(s["task"], s["outputs"]) for s in side] == [
        ("qa_1", ["red", "red"]), ("qa_1", ["cake"]), ("qa_2", ["yes"]), ("qa_2", ["no"])]  # fmt: skip
    assert all(s["metric"] == "string_match_part" and s["length_tokens"] <= 1024 for s in side)


def test_qa_absent_or_unreadable_is_one_line(stories_dir, tmp_path, capsys, monkeypatch):
    import tasks.ruler.qa as qa

    def offline(task):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(qa, "_hub_rows", offline)
    monkeypatch.delenv("MOQAE_DATA_DIR", raising=False)
    argv = ["run", "--methods", "fp16", "--tasks", "ruler:all,lengths=512", "--model", str(stories_dir), "--out",
            str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(err) == 1 and "qa_1, qa_2 need" in err[0] and "rajpurkar/squad_v2" in err[0], err
    assert "hotpotqa/hotpot_qa/distractor" in err[0] and "hub unreachable" in err[0]
    bad = tmp_path / "data" / "ruler"
    bad.mkdir(parents=True)
    (bad / "squad.json").write_text(json.dumps({"data": [{"title": "A"}]}))
    assert main([*argv[:4], "ruler:qa_1,lengths=512", *argv[5:], "--data-dir", str(tmp_path / "data")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(err) == 1 and "squad.json is not SQuAD v2.0 dev" in err[0] and "KeyError" in err[0], err
    assert not (tmp_path / "o").exists()
