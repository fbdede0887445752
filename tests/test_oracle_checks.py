"""``moqae.oracle_checks``: the estimate check and the cross-fitted oracle (``python -m moqae
oracle-check`` / ``oracle-crossfit``), on stories260K (or its stand-in)."""

from __future__ import annotations

import json

import pytest
import torch

from harness.integration import AttachedMethod
from harness.interface import build_method
from moqae.__main__ import main
from moqae.oracle import allocation_bits, groups, window_nll
from moqae.oracle_checks import cross_fit, folds, shuffled


def test_folds_split_the_predicted_tokens_in_two():
    a, b = folds(5, "parity")
    assert a.tolist() == [True, False, True, False, True] and (a ^ b).all()
    a, b = folds(5, "halves")
    assert a.tolist() == [True, True, False, False, False] and (a ^ b).all()
    with pytest.raises(ValueError, match="accepted: parity, halves"):
        folds(5, "thirds")


def test_cross_fit_scores_each_fold_under_the_other_folds_search(stories_dir):
    from harness.models import load_model

    model, _ = load_model(str(stories_dir), device="cpu", dtype="fp32")
    method = build_method("moqae-oracle:budget=7,estimate=measured")
    ids = torch.randint(3, 500, (1, 128), generator=torch.Generator().manual_seed(0))
    with AttachedMethod(model, method) as am:
        out = cross_fit(am, ids, trials=6)
        weight = list(groups(method, method.n_layers).values())
        base = method._uniform(1, 4)
        with torch.no_grad():
            whole = window_nll(am, ids, base)
    assert out["tokens"] == [64, 63]
    # the folds partition the window: their NLLs add up to the window's (uniform: 7 bits at 128 tokens)
    assert sum(out["uniform"]["nll_folds"]) == pytest.approx(whole, rel=1e-5)
    assert out["uniform"]["bits"] == pytest.approx(allocation_bits(base, method.expert_bits, weight)) == 7.0
    assert out["fp16"]["bits"] == 16.0
    # a search never ends worse than the uniform start on the tokens it searched
    assert sum(out["in_sample"]["nll_folds"]) <= whole + 1e-6
    for sel, uni in zip(out["cross_fit"]["selection_nll_folds"], out["uniform"]["nll_folds"], strict=True):
        assert sel <= uni + 1e-6
    assert out["in_sample"]["bits"] <= 7.0 + 1e-9 and out["cross_fit"]["bits"] <= 7.0 + 1e-9
    assert out["shuffled"]["bits"] == pytest.approx(out["cross_fit"]["bits"])  # the control holds the same bits


def test_shuffled_moves_routed_chunks_only_and_keeps_the_experts():
    alloc = {0: torch.tensor([[0, 1, 1, 2, 0, 1]]), 3: torch.tensor([[0, 2, 2, 1, 1, 1]])}
    mixed = shuffled(alloc, frozen=1, seed=0)
    for k, row in alloc.items():
        assert mixed[k][0, 0] == row[0, 0] and sorted(mixed[k][0].tolist()) == sorted(row[0].tolist())
    assert any(not torch.equal(mixed[k], alloc[k]) for k in alloc) and alloc[0].tolist() == [[0, 1, 1, 2, 0, 1]]


def test_oracle_crossfit_command_writes_and_resumes(tmp_path, stories_dir, data_dir, capsys):
    out = tmp_path / "cf.json"
    argv = ["oracle-crossfit", "--model", str(stories_dir), "--method", "moqae-oracle:budget=7", "--seqlen",
            "128", "--windows", "1", "--verify", "2", "--data-dir", str(data_dir), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    first = json.loads(out.read_text())
    assert first["command"].startswith("python -m moqae oracle-crossfit") and len(first["windows"]) == 1
    assert "scored on held-out tokens [estimate, not a bound]" in capsys.readouterr().out
    page = out.with_suffix(".md").read_text()
    assert (
        first["command"] in page and "[oracle: upper bound] |" in page and "| uniform INT4 in MoQAE's layout |" in page
    )
    first["windows"][0]["marker"] = "kept"  # a finished window is read back, not recomputed
    out.write_text(json.dumps(first))
    argv[argv.index("--windows") + 1] = "2"
    assert main(argv) == 0
    again = json.loads(out.read_text())
    assert len(again["windows"]) == 2 and again["windows"][0]["marker"] == "kept" and "summary" in again
    argv[argv.index("--verify") + 1] = "3"  # another setting: nothing is reused
    assert main(argv) == 0
    assert all("marker" not in w for w in json.loads(out.read_text())["windows"])


def test_oracle_commands_refuse_bad_input_in_one_line(capsys):
    assert main(["oracle-crossfit", "--windows", "0"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(["oracle-crossfit", "--method", "int4"]) == 2  # refused before any model loads
    assert "is not a moqae-oracle spec" in capsys.readouterr().err


def test_oracle_check_command_measures_the_moves(tmp_path, stories_dir, data_dir, capsys):
    out = tmp_path / "check.json"
    assert main(["oracle-check", "--model", str(stories_dir), "--method", "moqae-oracle", "--seqlen", "128",
                 "--slots", "5", "--data-dir", str(data_dir), "--out", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 5 and 0.0 <= result["sign_agreement"] <= 1.0
    assert all(r["chunk"] >= 1 for r in result["rows"])  # the frozen first chunk is never moved
    assert "sign agreement" in capsys.readouterr().out
