"""lm-eval through the harness cache: same scores as a plain model for fp16, padding never reaches
the cache, local data through lm-eval's own task definitions (the mirror's shipped overrides render
lm-eval's standard prompts; any task from files in the hub's layout, offline, through the CLI), and
the lm-eval model registration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.data import MissingDataError
from harness.evaluation import TaskContext, build_task
from harness.integration import AttachedMethod, forward
from harness.interface import MethodSpecError, build_method
from tasks.lmeval import make_harness_lm, register_with_lm_eval, result_metrics, sample_row

lm_eval = pytest.importorskip("lm_eval")

SPEC = "lmeval:piqa,copa,hellaswag,limit=4"


def _evaluate(stories, data_dir, method: str) -> dict:
    model, tok = stories
    with AttachedMethod(model, build_method(method)) as am:
        return build_task(SPEC).evaluate(TaskContext(model, tok, am, data_dir, progress=False))


@pytest.fixture(scope="module")
def fp16_result(stories, data_dir):
    return _evaluate(stories, data_dir, "fp16")


def _lls(result: dict) -> list[float]:
    return [ll for s in sorted(result["samples"], key=lambda s: (s["task"], s["doc_id"])) for ll in s["loglikelihoods"]]


def _local_tasks(names: list[str], data_dir: Path) -> dict:
    from tasks.lmeval_local import local_task_manager

    with local_task_manager(names, data_dir) as (manager, _):
        return manager.load(names)["tasks"]


def _first_prompt(task) -> tuple[str, list[str], int]:
    doc = next(iter(task.eval_docs))
    return task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)


def test_spec_and_mirror_prompts(data_dir, real_data):
    """The shipped overrides map the mirror's rows onto lm-eval's own prompts (checked by hand)."""
    task = build_task("lmeval:piqa,copa,limit=3")
    assert task.config.names == ["piqa", "copa"] and task.config.limit == 3
    tasks = _local_tasks(["piqa", "copa", "boolq", "arc_easy", "hellaswag"], data_dir)
    text, choices, gold = _first_prompt(tasks["piqa"])
    assert text == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert gold == 0 and len(choices) == 2
    text, choices, _ = _first_prompt(tasks["copa"])  # lm-eval: premise minus its period + " therefore"
    assert text == "The man turned on the faucet therefore"
    assert choices == [" the toilet filled with water.", " water flowed from the spout."]
    text, choices, _ = _first_prompt(tasks["boolq"])
    assert not text.startswith("Passage: ")
    assert text.endswith("Question: does ethanol take more energy make that produces?\nAnswer:")
    assert choices == ["no", "yes"]
    text, _, _ = _first_prompt(tasks["arc_easy"])
    assert text.startswith("Question: Which statement") and text.endswith("?\nAnswer:")
    assert [m["metric"] for m in tasks["copa"].config.metric_list] == ["acc"]  # lm-eval's own metrics
    assert [m["metric"] for m in tasks["piqa"].config.metric_list] == ["acc", "acc_norm"]
    assert len(list(tasks["piqa"].eval_docs)) == 1838 and len(list(tasks["hellaswag"].eval_docs)) == 1000


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_hub_layout_runs_lm_eval_preprocessing(tmp_path):
    """A task's files in the hub's own schema need no code: HellaSwag's rows go through lm-eval's own
    process_docs (" [title]" -> ". ", [brackets] dropped, ctx_b capitalised), by hand."""
    row = {"activity_label": "Home", "ctx_a": "A man [title] cleans.", "ctx_b": "he then", "label": "1",
           "endings": [" wipes  the table [step]", "leaves.", "x", "y"], "ctx": "", "split": "val"}  # fmt: skip
    _write_jsonl(tmp_path / "lm-eval" / "hellaswag" / "validation.jsonl", [row])
    text, choices, gold = _first_prompt(_local_tasks(["hellaswag"], tmp_path)["hellaswag"])
    assert text == "Home: A man. cleans. He then"
    assert choices[:2] == ["wipes the table ", "leaves."] and gold == 1


def test_local_data_errors(tmp_path):
    from tasks.lmeval_local import write_local_tasks

    with pytest.raises(MethodSpecError, match="not an lm-eval task"):
        write_local_tasks(["no_such_task_xyz"], tmp_path, tmp_path / "out")
    for name, kind in (("mmlu", "a group"), ("ai2_arc", "a tag")):
        with pytest.raises(MethodSpecError, match=f"is {kind} in lm-eval"):
            write_local_tasks([name], tmp_path, tmp_path / "out")
    with pytest.raises(MissingDataError, match=r"lambada_openai/\{test\}\.jsonl"):
        write_local_tasks(["lambada_openai"], tmp_path, tmp_path / "out")
    _write_jsonl(tmp_path / "lm-eval" / "piqa" / "train.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}])
    with pytest.raises(MissingDataError, match="no file for the split lm-eval evaluates"):
        write_local_tasks(["piqa"], tmp_path, tmp_path / "out")
    with pytest.raises(MissingDataError, match="copa.jsonl not found"):
        write_local_tasks(["copa"], tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written when one task is missing


def test_result_and_sample_rows():
    res = {"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.25, "perplexity,none": 12.0,
           "exact_match,strict-match": 1.0, "acc_norm_stderr,none": "N/A"}  # fmt: skip
    assert result_metrics("t", res) == {"t/acc": 0.5, "t/acc_stderr": 0.25, "t/perplexity": 12.0,
                                        "t/exact_match[strict-match]": 1.0}  # fmt: skip
    mc = {"doc_id": 3, "target": 1, "metrics": ["acc", "acc_norm"], "acc": 1.0, "acc_norm": 0.0,
          "resps": [[(-1.5, False)], [(-0.5, True)]]}  # fmt: skip
    assert sample_row("t", mc) == {"task": "t", "doc_id": 3, "target": 1, "acc": 1.0, "acc_norm": 0.0,
                                   "loglikelihoods": [-1.5, -0.5]}  # fmt: skip
    gen = {"doc_id": 0, "target": "4", "metrics": ["exact_match"], "exact_match": 0.0, "resps": [["  5"]]}
    assert sample_row("t", gen)["responses"] == ["  5"]


def test_fp16_matches_a_plain_model(stories, data_dir, fp16_result):
    """lm-eval's own HFLM on the model without any cache gives the same choices and loglikelihoods."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    model, tok = stories
    plain = HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu")
    from tasks.lmeval_local import local_task_manager

    names = build_task(SPEC).config.names
    with local_task_manager(names, data_dir) as (manager, _):
        out = simple_evaluate(model=plain, tasks=names, task_manager=manager, limit=4, log_samples=True,
                              verbosity="ERROR")  # fmt: skip
    ref = [
        float(r[0][0])
        for name in sorted(out["samples"])
        for row in sorted(out["samples"][name], key=lambda row: row["doc_id"])
        for r in row["resps"]
    ]
    assert _lls(fp16_result) == pytest.approx(ref, rel=2e-3, abs=2e-2)
    for name in ("piqa", "copa", "hellaswag"):
        assert fp16_result["metrics"][f"{name}/acc"] == pytest.approx(out["results"][name]["acc,none"])
    assert fp16_result["documents"] == {"piqa": 4, "copa": 4, "hellaswag": 4}
    assert fp16_result["kv"]["nominal_bits"] == 16


def test_int2_changes_the_loglikelihoods(stories, data_dir, fp16_result):
    int2 = _evaluate(stories, data_dir, "int2")
    assert int2["kv"]["nominal_bits"] == 2
    diffs = [abs(a - b) for a, b in zip(_lls(int2), _lls(fp16_result), strict=True)]
    assert max(diffs) > 0.5


def test_padding_never_reaches_the_cache(stories):
    """Right padding would change a per-channel-key method (KIVI groups tokens): the wrapper runs one
    request per forward, so a request scores the same alone or among longer requests."""
    from lm_eval.api.instance import Instance

    model, tok = stories
    spec = "kivi:bits=2,group=8,residual=8"
    with AttachedMethod(model, build_method(spec)) as am:
        ids = torch.tensor([tok("Once upon a time there was a cat").input_ids])
        alone = forward(model, ids, am.new_cache()).logits[0]
        padded = torch.cat([ids, torch.zeros(1, 24, dtype=torch.long)], dim=1)
        with_pads = forward(model, padded, am.new_cache()).logits[0, : ids.shape[1]]
        assert not torch.allclose(alone, with_pads)  # the hazard is real for this method

        lm = make_harness_lm(model, tok, am, batch_size=8)
        assert lm.batch_size == 1

        def req(ctx: str, cont: str, i: int) -> Instance:
            return Instance("loglikelihood", {}, (ctx, cont), i)

        short = req("Once upon a time", " there was a cat", 0)
        longer = [
            req("Once upon a time there was a little girl named Lily who loved " * 3, " the park", i) for i in (1, 2)
        ]
        (a,) = lm.loglikelihood([short])
        b = lm.loglikelihood([short, *longer])[0]
        assert a == b
        with pytest.raises(RuntimeError, match="one at a time"):
            lm._model_call(torch.zeros(2, 4, dtype=torch.long))


def test_registered_with_lm_eval(stories_dir, data_dir):
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model

    from tasks.lmeval_local import local_task_manager

    register_with_lm_eval()
    register_with_lm_eval()  # idempotent
    assert get_model("moqae-harness") is not None
    with local_task_manager(["copa"], data_dir) as (manager, _):
        out = simple_evaluate(
            model="moqae-harness",
            model_args=f"model={stories_dir},method=int:bits=4;group=8",
            tasks=["copa"],
            task_manager=manager,
            limit=2,
            verbosity="ERROR",
        )
    assert 0.0 <= out["results"]["copa"]["acc,none"] <= 1.0
    json.dumps(out["results"])


# --------------------------------------------------------------------------------------------
# A task that is not in the mirror, offline, from a file the test writes (no ../shared needed)
# --------------------------------------------------------------------------------------------

LAMBADA_ROWS = [  # EleutherAI/lambada_openai's schema: one "text" field, the last word is the target
    {"text": "Once upon a time there was a little girl named Lily . She loved to play with her ball"},
    {"text": "The cat sat on the mat and looked at the little dog . The dog looked back at the cat"},
    {"text": "Tom went to the park with his mom . They played in the sun all day and then went home"},
]


def _offline_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def lambada_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lambada-data")
    _write_jsonl(root / "lm-eval" / "lambada_openai" / "test.jsonl", LAMBADA_ROWS)
    return root


@pytest.mark.slow
def test_run_any_task_offline_from_local_files(lambada_dir, tmp_path, stories_dir):
    """``python -m harness run --tasks lmeval:lambada_openai --data-dir D`` offline for fp16 and int2:
    lm-eval's own task (prompt: the text minus its last word; metrics perplexity and acc)."""
    out = tmp_path / "runs"
    done = subprocess.run(
        [sys.executable, "-m", "harness", "run", "--methods", "fp16,int2", "--tasks", "lmeval:lambada_openai",
         "--model", str(stories_dir), "--data-dir", str(lambada_dir), "--out", str(out), "--no-progress"],
        env=_offline_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = {}
    for path in out.glob("*__lmeval__*.json"):
        rec = json.loads(path.read_text())
        if rec.get("status") == "done":
            records[rec["method"]] = rec
    assert set(records) == {"fp16", "int2"}
    fp16, int2 = records["fp16"], records["int2"]
    assert set(fp16["metrics"]) >= {"lambada_openai/perplexity", "lambada_openai/acc",
                                    "lambada_openai/perplexity_stderr", "lambada_openai/acc_stderr"}  # fmt: skip
    assert fp16["documents"] == {"lambada_openai": 3}
    assert fp16["data_sources"]["lambada_openai"] == {"test": str(lambada_dir / "lm-eval/lambada_openai/test.jsonl")}
    assert fp16["metrics"]["lambada_openai/perplexity"] > 1.0
    assert int2["metrics"]["lambada_openai/perplexity"] != fp16["metrics"]["lambada_openai/perplexity"]
    samples = [json.loads(line) for line in (out / fp16["samples_file"]).read_text().splitlines()]
    lls = [s["loglikelihoods"][0] for s in sorted(samples, key=lambda s: s["doc_id"])]
    assert len(lls) == 3 and all(ll < 0 for ll in lls)


@pytest.mark.slow
def test_moqae_lm_eval_cli_on_cpu_with_local_data(lambada_dir, tmp_path, stories_dir):
    """``moqae-lm-eval`` defaults to this machine's device (lm-eval's own default is cuda:0) and runs
    ``--tasks`` from ``--data_dir`` offline."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "tasks.lmeval", "--model", "moqae-harness", "--model_args",
         f"model={stories_dir},method=int:bits=4;group=8", "--tasks", "lambada_openai", "--data_dir",
         str(lambada_dir), "--limit", "2", "--output_path", str(out)],
        env=_offline_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    assert "lambada_openai" in done.stdout and "perplexity" in done.stdout
    (result,) = out.rglob("results_*.json")
    assert json.loads(result.read_text())["results"]["lambada_openai"]["acc,none"] >= 0.0


def test_report_shows_every_lm_eval_metric():
    from tasks.lmeval_report import format_metric, task_metrics

    metrics = {"lambada_openai/perplexity": 12.3456, "lambada_openai/perplexity_stderr": 1.5,
               "lambada_openai/acc": 0.25, "lambada_openai/acc_stderr": 0.05,
               "gsm8k/exact_match[strict-match]": 0.5, "gsm8k/exact_match_stderr[strict-match]": 0.1}  # fmt: skip
    recs = [{"metrics": metrics}]
    assert task_metrics("lambada_openai", recs) == ["acc", "perplexity"]
    assert task_metrics("gsm8k", recs) == ["exact_match[strict-match]"]
    assert format_metric("perplexity", 12.3456, 1.5) == "12.346 ± 1.500"  # as it is, lower is better
    assert format_metric("acc", 0.25, 0.05) == "25.0 ± 5.0"  # a rate, in %
    assert format_metric("exact_match[strict-match]", 0.5, None) == "50.0"
