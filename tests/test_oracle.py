"""``moqae-oracle``: the allocation (hand-computed knapsacks), the probe (its forward is the cache it
stands for), the budget (as MoQAE's nominal bits), and the upper-bound labels in records and reports."""

from __future__ import annotations

import json
import math

import pytest
import torch

from harness.integration import AttachedMethod
from harness.interface import MethodSpecError, build_method
from moqae.oracle import allocate, lower_hull, measured_deltas, probe_gradients, window_nll


def test_lower_hull_drops_dominated_and_concave_points():
    # (bits, ΔNLL, expert): 4 bits costs 1.0, 8 bits 0.9 (barely better: above the 4 -> 16 chord), 16 bits 0
    pts = [(16, 0.0, 0), (4, 1.0, 1), (2, 5.0, 2), (8, 0.9, 3), (12, 2.0, 4)]
    assert [p[2] for p in lower_hull(pts)] == [2, 1, 0]  # 12 bits is dominated, 8 bits is not convex


def test_allocate_takes_the_best_upgrades_per_bit_within_the_budget():
    bits = (16, 4, 2)
    # two groups (1 and 2 layers), three chunks; chunk 0 frozen at FP16
    delta = torch.tensor(
        [
            [[0.0, 0.0, 0.0], [-1.0, 0.0, 0.5], [-0.2, 0.0, 3.0]],  # group 0: chunk 1 gains 1.0 from FP16
            [[0.0, 0.0, 0.0], [-0.1, 0.0, 0.1], [-0.1, 0.0, 4.0]],  # group 1 (2 layers): INT2 cheap at chunk 1
        ]
    )
    fixed = {(0, 0): 0, (1, 0): 0}
    # 9 (layer, chunk) slots, the frozen ones hold 3 x 16 = 48 bits; budget 8 -> 72 - 48 = 24 bits. Every
    # slot starts at its cheapest point, INT2: 2 + 2 + 2x2 + 2x2 = 12 bits, 12 left. Upgrades by ΔNLL
    # saved per bit: g0c2 2->4 (3.0/2), g1c2 2->4 (4.0/4), g0c1 2->4 (0.5/2), g0c1 4->16 (1.0/12),
    # g1c1 2->4 (0.1/4), g0c2 4->16 (0.2/12), ... Taken while they fit: 2, 4, 2, (12 does not), 4 -> 0 left.
    choice = allocate(delta, bits, [1, 2], 8.0, fixed)
    assert choice.tolist() == [[0, 1, 1], [0, 1, 1]]
    more = allocate(delta, bits, [1, 2], 9.5, fixed)  # 85.5 - 48 - 12 = 25.5 bits: 2, 4, 2, 12, 4 fit
    assert more.tolist() == [[0, 0, 1], [0, 1, 1]]
    with pytest.raises(MethodSpecError, match="below the cheapest allocation"):
        allocate(delta, bits, [1, 2], 5.0, fixed)


def test_oracle_options_are_checked():
    with pytest.raises(MethodSpecError, match="budget=1 must be within"):
        build_method("moqae-oracle:budget=1")
    with pytest.raises(MethodSpecError, match="base=8 is not one of the experts"):
        build_method("moqae-oracle:base=8")
    with pytest.raises(MethodSpecError, match="estimate=second is not one of first, measured"):
        build_method("moqae-oracle:estimate=second")
    assert build_method("moqae-oracle").oracle and not build_method("moqae-oracle:passes=0").oracle


@pytest.fixture(scope="module")
def window(stories):
    model, tok = stories
    ids = tok(" ".join(["Once upon a time a little girl named Lily found a red ball in the park."] * 30),
              return_tensors="pt").input_ids[:, :128]  # fmt: skip
    return model, ids


def test_the_probe_forward_is_the_cache_it_stands_for(window):
    model, ids = window
    method = build_method("moqae-oracle:chunk=16")
    with AttachedMethod(model, method) as am:
        forced = method._uniform(1, ids.shape[1] // 16)  # INT4 everywhere, chunk 0 FP16
        forced[0][0, 3] = 2  # one INT2 slot, one FP16 slot
        forced[3][0, 5] = 0
        nll, grad = probe_gradients(am, ids, forced)
        with torch.no_grad():
            assert nll == pytest.approx(window_nll(am, ids, forced), rel=1e-5)
        assert grad.shape == (len(forced), ids.shape[1] // 16, 3) and grad.abs().sum() > 0
        # a measured move back to the uniform allocation undoes the INT2 slot's damage
        (d,) = measured_deltas(am, ids, forced, [(0, 3, 1)])
        assert d == pytest.approx(window_nll(am, ids, method._uniform(1, 8) | {3: forced[3]}) - nll, abs=1e-4)


def test_oracle_records_meet_the_budget_and_say_upper_bound(tmp_path, stories_dir, data_dir):
    from harness.reports import write_report
    from harness.runner import run

    specs = ["moqae-oracle:passes=0", "moqae-oracle:budget=6", "moqae-oracle:budget=6,estimate=measured"]
    s = run(specs, ["wikitext2:seqlen=128,max_windows=1"], str(stories_dir), tmp_path / "r", data_dir=data_dir,
            progress=False, log=lambda *_: None)  # fmt: skip
    recs = {r["method"]: r for r in (json.loads(p.read_text()) for p in s.done)}
    uniform = recs["moqae-oracle:passes=0"]
    assert "oracle" not in uniform and uniform["kv"]["nominal_bits"] == pytest.approx((16 + 3 * 4) / 4)  # RF chunk
    for spec in specs[1:]:
        r = recs[spec]
        assert r["oracle"] is True and r["kv"]["nominal_bits"] <= 6.0 + 1e-9
    assert {recs[sp]["key"]["method_config"]["estimate"] for sp in specs[1:]} == {"first", "measured"}
    write_report([tmp_path / "r"], tmp_path / "rep")
    md = (tmp_path / "rep" / "README.md").read_text()
    assert "| moqae-oracle:budget=6 [oracle: upper bound] |" in md
    assert "| moqae-oracle:passes=0 |" in md
    assert "### MoQAE routers against the oracle allocation" in md and "| uniform in MoQAE's layout | 7.00 |" in md
    assert "does the expert vary from chunk to chunk" in md
    with pytest.raises(MethodSpecError, match="is an oracle .* longbench does not run oracles"):
        run(["moqae-oracle"], ["longbench:trec"], str(stories_dir), tmp_path / "r2", data_dir=data_dir,
            progress=False, log=lambda *_: None)  # fmt: skip


def test_layer_variation_counts_routed_chunks_only():
    from moqae.report import layer_variation

    stats = [{"expert_chunks": [2, 6, 0]}, {"expert_chunks": [4, 3, 1]}, {"expert_chunks": []}]
    rec = {"key": {"method_config": {"experts": "16/4/2"}}, "windows": 2, "layer_stats": stats}
    # layer 0: the 2 frozen FP16 chunks leave 6 routed, all INT4; layer 1: 2 FP16, 3 INT4, 1 INT2 routed
    (off0, h0), (off1, h1) = layer_variation(rec)
    assert (off0, h0) == (0.0, 0.0)
    assert off1 == pytest.approx(0.5) and h1 == pytest.approx(-(2 / 6) * math.log2(2 / 6) - 0.5 * math.log2(0.5)
                                                             - (1 / 6) * math.log2(1 / 6))  # fmt: skip


def test_transfer_runs_the_previous_windows_allocation(tmp_path, stories_dir, data_dir):
    from harness.runner import run

    def cell(spec: str, windows: int) -> dict:
        s = run([spec], [f"wikitext2:seqlen=128,max_windows={windows}"], str(stories_dir), tmp_path / f"r{windows}",
                data_dir=data_dir, progress=False, log=lambda *_: None)  # fmt: skip
        return json.loads(s.done[0].read_text())

    own = cell("moqae-oracle:budget=6,estimate=measured", 1)  # window 0's own allocation
    moved = cell("moqae-oracle:budget=6,estimate=measured,transfer=true", 2)
    # window 0 runs the uniform base (7 bits), window 1 runs window 0's allocation
    assert moved["kv_windows_mean"]["nominal_bits"] == pytest.approx((7.0 + own["kv"]["nominal_bits"]) / 2)
    assert moved["kv"]["nominal_bits"] == pytest.approx(own["kv"]["nominal_bits"])


def test_verified_search_is_never_worse_than_its_starts(tmp_path, stories_dir, data_dir):
    from harness.runner import run

    specs = ["moqae-oracle:passes=0", "moqae-oracle:budget=7,estimate=measured",
             "moqae-oracle:budget=7,estimate=measured,verify=12"]  # fmt: skip
    s = run(specs, ["wikitext2:seqlen=128,max_windows=1"], str(stories_dir), tmp_path / "r", data_dir=data_dir,
            progress=False, log=lambda *_: None)  # fmt: skip
    ppl = {r["method"]: r for r in (json.loads(p.read_text()) for p in s.done)}
    best_start = min(ppl[specs[0]]["metrics"]["nll"], ppl[specs[1]]["metrics"]["nll"])
    assert ppl[specs[2]]["metrics"]["nll"] <= best_start + 1e-9
    assert ppl[specs[2]]["kv"]["nominal_bits"] <= 7.0 + 1e-9
    with pytest.raises(MethodSpecError, match="verify=-1 is not an integer >= 0"):
        build_method("moqae-oracle:verify=-1")
