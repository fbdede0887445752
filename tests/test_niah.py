"""The ``niah`` task (passkey needle in a haystack) and its report section.

Prompts are built with stories260K's tokenizer (512-token context, no chat template; the stand-in where
the mirror is absent): one needle, at the asked depth, within the asked length, deterministic and
independent of the cache method. One CLI run (fp16, int4) gives records whose report draws the heat
maps; bad input is one line, exit 2, before the model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli import main
from harness.evaluation import TaskContext, build_task
from harness.integration import AttachedMethod
from harness.interface import build_method
from harness.registry import MethodSpecError
from tasks.common import default_lengths
from tasks.niah import (
    INSTRUCTION,
    NOISE,
    QUESTION,
    depth_values,
    exact_score,
    make_key,
    parse_lengths,
    partial_score,
    sentences,
)

SPEC = "niah:depths=2,lengths=256,repeats=1"


# --------------------------------------------------------------------------------------------
# Options, scorer, pieces
# --------------------------------------------------------------------------------------------


def test_scorer_on_hand_cases():
    assert exact_score("12345", "12345") == 1.0
    assert exact_score("12345", " 12345. Remember it.") == 1.0  # longctx_bench: the key in the answer
    assert exact_score("12345", "The pass key is 12345") == 1.0
    assert exact_score("12345", "1234") == 0.0
    assert exact_score("12345", "1 2 3 4 5") == 0.0
    assert exact_score("12345", "") == 0.0
    assert partial_score("12345", "12345") == 1.0
    assert partial_score("12345", "12395") == pytest.approx(0.6)  # "123": the longest unbroken run
    assert partial_score("12345", "x2345y") == pytest.approx(0.8)
    assert partial_score("12345", "67890") == 0.0
    assert partial_score("12345", "") == 0.0


def test_options_lengths_and_depths():
    assert parse_lengths("") == [] and parse_lengths("2048, 1024,2048") == [1024, 2048]
    assert build_task("niah:lengths=512,256").config.lengths == "256,512"  # bare 256 continues the list
    assert build_task("niah:1024,512,depths=3").config.lengths == "512,1024"
    bad_specs = {"niah:lengths=abc": "not an integer", "niah:lengths=0": ">= 1", "niah:depths=0": ">= 1",
                 "niah:digits=0": ">= 1", "niah:repeats=0": ">= 1", "niah:chat=maybe": "true or false"}  # fmt: skip
    for bad, said in bad_specs.items():
        with pytest.raises(MethodSpecError, match=said):
            build_task(bad)
    assert depth_values(1) == [50.0] and depth_values(2) == [0.0, 100.0] and depth_values(5)[2] == 50.0
    assert default_lengths(512, "niah") == [512] and default_lengths(4096, "niah") == [1024, 2048, 4096]
    assert default_lengths(6000, "niah") == [1024, 2048, 4096, 6000]
    assert build_task("niah:lengths=256,1024").tokens_needed() == 1024 and build_task("niah").tokens_needed() is None
    assert build_task("niah:lengths=256,repeats=3,depths=4").shard_units() == 12


def test_keys_and_sentences():
    assert make_key(0, 256, 0.0, 0, 5) == make_key(0, 256, 0.0, 0, 5)
    assert len(make_key(0, 256, 0.0, 0, 7)) == 7 and make_key(0, 256, 0.0, 0, 7).isdigit()
    assert len({make_key(s, 256, 0.0, r, 5) for s in range(3) for r in range(3)}) == 9
    assert sentences(NOISE) == ["The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
                                "There and back again. "]  # fmt: skip
    assert sentences('He said "Stop!" Then\nwe left. Ok') == ['He said "Stop!" ', "Then\nwe left. ", "Ok "]
    assert all(len(u.split()) <= 64 for u in sentences("word " * 200))


# --------------------------------------------------------------------------------------------
# Prompts in the target tokenizer
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(stories):
    return stories[1]


def test_one_needle_at_the_asked_depth_within_the_length(tok):
    task = build_task("niah:depths=5,lengths=300,repeats=2")
    prompts = task.prompts(tok, [300, 480], context=512)
    assert len(prompts) == 2 * 5 * 2
    one_sentence = len(tok(NOISE, add_special_tokens=False).input_ids)  # five sentences
    for p in prompts:
        budget = min(p.length, 512 - task.max_new_tokens())
        assert len(p.ids) <= budget and len(p.ids) > budget - one_sentence  # filled to the sentence
        assert p.ids == tok(p.text).input_ids and p.text.startswith(INSTRUCTION) and p.text.endswith(QUESTION)
        needle = f"The pass key is {p.key}. Remember it. {p.key} is the pass key."
        assert p.text.count(needle) == 1 and p.text.count(p.key) == 2 and p.text.count("pass key") == 4
        # the needle's place in tokens: depth 0 right after the instruction, 100 right before the question
        before = len(tok(p.text[: p.text.index(needle)]).input_ids)
        lo, hi = len(tok(INSTRUCTION).input_ids), len(p.ids) - len(tok(needle + QUESTION).input_ids)
        share = (before - lo) / (hi - lo)
        assert share == pytest.approx(p.depth / 100, abs=0.08), (p.depth, share)
        if p.depth == 0:
            assert p.needle_after == 0 and before <= lo + 2
        if p.depth == 100:
            assert p.needle_after == p.sentences and before >= hi - 2
        boundary = p.text[: p.text.index(needle)].rstrip()
        assert boundary.endswith(".") or boundary == INSTRUCTION.rstrip()  # at a sentence boundary


def test_prompts_are_deterministic_and_seeded(tok):
    a = build_task("niah:depths=3,lengths=256,repeats=2").prompts(tok, [256], 512)
    b = build_task("niah:depths=3,lengths=256,repeats=2").prompts(tok, [256], 512)
    c = build_task("niah:depths=3,lengths=256,repeats=2,seed=1").prompts(tok, [256], 512)
    assert [p.sha1 for p in a] == [p.sha1 for p in b]
    assert [p.key for p in a] != [p.key for p in c]
    assert len({p.key for p in a}) == len(a)  # a different key per prompt


def test_haystack_file_is_the_background(tok, tmp_path):
    text = tmp_path / "essay.txt"
    text.write_text("Apples grow on trees in the orchard. Pears ripen in late summer!\n\nPlums are purple? Yes.\n")
    p = build_task(f"niah:depths=1,lengths=300,repeats=1,haystack={text}").prompts(tok, [300], 512)[0]
    assert "Apples grow on trees" in p.text and "grass is green" not in p.text
    assert "Pears ripen in late summer!\n\nPlums" in p.text  # the file's own blanks kept
    assert len(p.ids) <= 300


# --------------------------------------------------------------------------------------------
# A run through the CLI, shards, the report
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def records(stories_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("niah") / "runs"
    argv = ["run", "--methods", "fp16,int4", "--tasks", SPEC, "--model", str(stories_dir), "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return out


def _records(out: Path) -> dict[str, dict]:
    recs = [json.loads(p.read_text()) for p in sorted(out.glob("*__niah__*.json"))]
    return {r["method"]: r for r in recs}


def test_cli_run_gives_records(records):
    recs = _records(records)
    assert set(recs) == {"fp16", "int4"}
    for r in recs.values():
        assert r["status"] == "done" and r["key"]["task"] == "niah"
        assert set(r["metrics"]) == {"exact", "partial", "exact@256", "partial@256"}
        assert all(0.0 <= v <= 100.0 for v in r["metrics"].values())
        assert [(c["length"], c["depth"], c["repeats"]) for c in r["grid"]] == [(256, 0.0, 1), (256, 100.0, 1)]
        assert r["lengths"] == [256] and r["depths"] == [0.0, 100.0] and r["n_samples"] == 2
        assert r["chat_template"] is False and r["max_new_tokens"] == 5 + 16
        samples = [json.loads(line) for line in (records / r["samples_file"]).read_text().splitlines()]
        assert [(s["depth"], s["input_tokens"] <= 256) for s in samples] == [(0.0, True), (100.0, True)]
        for s in samples:
            assert s["exact"] == 100.0 * exact_score(s["key"], s["output"])
            assert s["partial"] == pytest.approx(100.0 * partial_score(s["key"], s["output"]))
    # the same prompts for both methods; the cache's bits differ
    assert recs["fp16"]["prompts_sha1"] == recs["int4"]["prompts_sha1"]
    assert recs["fp16"]["kv"]["nominal_bits"] == 16.0 and recs["int4"]["kv"]["nominal_bits"] == 4.0


def test_shards_merge_to_the_record(records, stories):
    model, tok = stories
    task = build_task(SPEC)
    with AttachedMethod(model, build_method("fp16")) as am:
        ctx = TaskContext(model, tok, am, None, progress=False)
        parts = [task.evaluate_shard(ctx, i, 2) for i in range(2)]
    merged = task.merge_shards(parts)
    rec = _records(records)["fp16"]
    assert [len(p["samples"]) for p in parts] == [1, 1]
    assert merged["metrics"] == rec["metrics"] and merged["grid"] == rec["grid"]
    assert merged["prompts_sha1"] == rec["prompts_sha1"]


def test_report_draws_the_heat_maps(records, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(records), "--out", str(out)]) == 0
    capsys.readouterr()
    assert (out / "niah_heatmap.png").stat().st_size > 0 and (out / "niah_heatmap.svg").stat().st_size > 0
    readme = (out / "README.md").read_text()
    assert "## Needle in a haystack" in readme and "niah_heatmap.png" in readme
    table = readme[readme.index("| method | family | exact") :].split("\n\n")[0].splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == ["fp16", "int4"]  # the methods' own order
    assert "worst cell" in table[0] and "at 256 tokens" in table[2]
    csv = (out / "niah.csv").read_text()
    assert csv.count("\n") == 1 + 2 * (2 + 2 * 2)  # header; per method: 2 means, 2 cells x 2 metrics
    svg = (out / "niah_heatmap.svg").read_text()
    assert "fp16" in svg and "int4" in svg and "exact match (%)" in svg


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before the model loads
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, said",
    [
        ("niah:depths=0", "option depths=0 is not an integer >= 1"),
        ("niah:lengths=1024", "1024 tokens per sequence, longer than the context"),
        ("niah:lengths=256,2048", "2048 tokens per sequence"),
        ("niah:lengths=abc", "length 'abc' is not an integer"),
        ("niah:haystack={tmp}/missing.txt", "haystack file"),
        ("niah:haystack={tmp}/empty.txt", "is empty"),
        ("niah:haystack={tmp}/blank.txt", "is empty"),
    ],
)
def test_bad_input_is_one_line_exit_2(spec, said, stories_dir, tmp_path, capsys, monkeypatch):
    import harness.runner

    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\n ")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(harness.runner, "load_model", no_load)
    argv = ["run", "--methods", "fp16", "--tasks", spec.format(tmp=tmp_path), "--model", str(stories_dir),
            "--out", str(tmp_path / "o"), "--no-progress"]  # fmt: skip
    code = main(argv)
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and said in lines[0], err
    assert not (tmp_path / "o").exists()


def test_chat_template_wraps_the_prompt_within_the_length(tok, monkeypatch):
    template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
    monkeypatch.setattr(tok, "chat_template", template, raising=False)
    chat = build_task("niah:depths=2,lengths=300,repeats=1").prompts(tok, [300], 512)
    plain = build_task("niah:depths=2,lengths=300,repeats=1,chat=false").prompts(tok, [300], 512)
    for c, p in zip(chat, plain, strict=True):
        assert c.text.startswith("<|user|>" + INSTRUCTION) and c.text.endswith(QUESTION + "<|assistant|>")
        assert c.ids == tok(c.text, add_special_tokens=False).input_ids and len(c.ids) <= 300
        assert c.key == p.key and p.text.startswith(INSTRUCTION) and c.sentences <= p.sentences
