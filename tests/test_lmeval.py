"""lm-eval through the harness cache: same scores as a plain model for fp16, padding never reaches
the cache, mirror prompts equal lm-eval's standard ones, and the lm-eval model registration."""

from __future__ import annotations

import json

import pytest
import torch

from harness.evaluation import TaskContext, build_task
from harness.integration import AttachedMethod, forward
from harness.interface import MethodSpecError, build_method
from tasks.lmeval import MIRROR_TASKS, hellaswag_doc, make_harness_lm, mirror_docs, register_with_lm_eval

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


def test_spec_and_mirror_prompts(data_dir):
    task = build_task("lmeval:piqa,copa,limit=3")
    assert task.config.names == ["piqa", "copa"] and task.config.limit == 3
    with pytest.raises(MethodSpecError, match="no mirror definition"):
        build_task("lmeval:mmlu").task_specs(data_dir)
    piqa = mirror_docs("piqa", data_dir)[0]
    assert piqa["query"] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa["gold"] == 0 and len(piqa["choices"]) == 2
    copa = mirror_docs("copa", data_dir)[0]  # lm-eval: premise minus its period + " therefore"
    assert copa["query"] == "The man turned on the faucet therefore"
    assert copa["choices"] == [" the toilet filled with water.", " water flowed from the spout."]
    boolq = mirror_docs("boolq", data_dir)[0]
    assert not boolq["query"].startswith("Passage: ")
    assert boolq["query"].endswith("Question: does ethanol take more energy make that produces?\nAnswer:")
    assert boolq["choices"] == ["no", "yes"]
    arc = mirror_docs("arc_easy", data_dir)[0]
    assert arc["query"].startswith("Question: Which statement") and arc["query"].endswith("?\nAnswer:")
    assert set(MIRROR_TASKS) >= {"piqa", "arc_easy", "arc_challenge", "boolq", "copa", "openbookqa", "hellaswag"}


def test_hellaswag_preprocessing_by_hand():
    row = {"activity_label": "Home", "ctx_a": "A man [title] cleans.", "ctx_b": "he then", "label": "1",
           "endings": [" wipes  the table [step]", "leaves."]}  # fmt: skip
    doc = hellaswag_doc(row)
    assert doc["query"] == "Home: A man. cleans. He then"
    assert doc["choices"] == ["wipes the table ", "leaves."] and doc["gold"] == 1


def test_fp16_matches_a_plain_model(stories, data_dir, fp16_result):
    """lm-eval's own HFLM on the model without any cache gives the same choices and loglikelihoods."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    model, tok = stories
    plain = HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu")
    specs = build_task(SPEC).task_specs(data_dir)
    out = simple_evaluate(model=plain, tasks=specs, limit=4, log_samples=True, verbosity="ERROR")
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

    from tasks.lmeval import mirror_task_config

    register_with_lm_eval()
    register_with_lm_eval()  # idempotent
    assert get_model("moqae-harness") is not None
    out = simple_evaluate(
        model="moqae-harness",
        model_args=f"model={stories_dir},method=int:bits=4;group=8",
        tasks=[mirror_task_config("copa", data_dir)],
        limit=2,
        verbosity="ERROR",
    )
    assert 0.0 <= out["results"]["copa"]["acc,none"] <= 1.0
    json.dumps(out["results"])
