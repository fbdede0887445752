"""Profiling: times are measured per method on one model, router parameters and time are reported."""

from __future__ import annotations

import json

import pytest
import torch

from harness.cli import main
from harness.interface import build_method
from harness.models import tiny_random_model
from harness.profiling import (
    PeakMemory,
    add_ratios,
    is_out_of_memory,
    profile_interleaved,
    profile_method,
    profile_table,
)


@pytest.fixture(scope="module")
def model():
    return tiny_random_model("llama", num_hidden_layers=6)


def test_profile_fp16_and_moqae(model):
    (fp16,) = profile_method(model, build_method("fp16"), contexts=[96], new_tokens=3, repeats=1)
    (moqae,) = profile_method(model, build_method("moqae:ckpt=random"), contexts=[96], new_tokens=3, repeats=1)
    assert fp16["status"] == "done" and fp16["prefill_s"] > 0 and fp16["decode_step_s"] > 0
    assert fp16["decode_tokens_per_s"] == pytest.approx(1 / fp16["decode_step_s"])
    assert fp16["method_parameters"] == 0 and "own_prefill_s" not in fp16
    assert fp16["dtype"] == "float32" and fp16["device"] == "cpu" and fp16["attention"] == "sdpa"
    cfg = model.config
    d, e = cfg.hidden_size, 3
    n_routers = len(range(0, cfg.num_hidden_layers, 3))  # routing sharing: one router per group of 3
    assert moqae["method_parameters"] == n_routers * (2 * d * e + e * e)  # W1, W2: D x E; W3: E x E
    assert 0 < moqae["own_prefill_s"] < moqae["prefill_s"]
    assert 0 < moqae["own_decode_step_s"] < moqae["decode_step_s"]
    n = cfg.num_hidden_layers * cfg.num_key_value_heads * (96 + 3) * (cfg.hidden_size // cfg.num_attention_heads)
    assert fp16["kv_bytes"] == 2 * 2 * n  # K and V, fp16, after prefill + 3 decode steps
    assert fp16["kv_read_bytes_per_step"] == fp16["kv_bytes"]  # fp16 reads everything it holds
    for r in (fp16, moqae):
        r["model"] = "tiny"
    add_ratios([fp16, moqae])
    assert fp16["kv_bytes_ratio"] == 1.0 and moqae["kv_bytes_ratio"] == moqae["kv_bytes"] / fp16["kv_bytes"]
    table = profile_table([fp16, moqae])
    assert "| fp16 | 96 | 1 |" in table and "| moqae:ckpt=random |" in table and "1.000" in table


def test_settings_batches_and_contexts(model):
    rows = profile_method(model, build_method("int4"), contexts=[32, 64], batches=[1, 2], new_tokens=2, repeats=1)
    assert [(r["context"], r["batch"]) for r in rows] == [(32, 1), (32, 2), (64, 1), (64, 2)]
    by = {(r["context"], r["batch"]): r["kv_bytes"] for r in rows}
    assert by[(32, 2)] == 2 * by[(32, 1)] and by[(64, 1)] > by[(32, 1)]  # bytes held scale with B and T


def test_out_of_memory_setting_is_a_record(model, monkeypatch):
    import harness.profiling as prof

    real = prof.profile_setting

    def fake(model, attached, context, *a, **k):
        if context > 40:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB")
        return real(model, attached, context, *a, **k)

    monkeypatch.setattr(prof, "profile_setting", fake)
    rows = profile_method(model, build_method("fp16"), contexts=[32, 64], new_tokens=1, repeats=1)
    assert [r["status"] for r in rows] == ["done", "oom"] and "allocate" in rows[1]["reason"]
    assert is_out_of_memory(MemoryError()) and not is_out_of_memory(RuntimeError("shape mismatch"))
    for r in rows:
        r["model"] = "tiny"
    assert "**oom**" in profile_table(rows)


def test_interleaved_rounds_take_turns(model, monkeypatch):
    """Round r of every method runs before round r + 1 of any; rows match the back-to-back ones in all
    but the times; a calibrating method (QoQ folds its smoothing into the weights) re-attaches per round
    and leaves the weights as they were; an OOM method gives its record and the others go on."""
    import harness.profiling as prof

    weights = {k: v.clone() for k, v in model.state_dict().items()}
    order, real = [], prof._one_round

    def spy(model, attached, ids, new_tokens):
        order.append((attached.method.label, ids.shape[-1]))
        if attached.method.label == "int2" and ids.shape[-1] > 40:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB")
        return real(model, attached, ids, new_tokens)

    monkeypatch.setattr(prof, "_one_round", spy)
    jobs = [(build_method(m), None) for m in ("fp16", "qoq", "int2")]
    rows = profile_interleaved(model, jobs, contexts=[32, 48], new_tokens=2, repeats=2)
    assert order[:9] == [(m, 32) for m in ("fp16", "qoq", "int2")] * 3
    assert order[9:] == [(m, 48) for m in ("fp16", "qoq", "int2")] + [(m, 48) for m in ("fp16", "qoq")] * 2
    assert [(r["method"], r["context"], r["status"]) for r in rows] == [
        ("fp16", 32, "done"), ("fp16", 48, "done"), ("qoq", 32, "done"), ("qoq", 48, "done"),
        ("int2", 32, "done"), ("int2", 48, "oom"),
    ]  # fmt: skip
    assert rows[2]["calibration_s"] > 0 and all(r["interleaved"] for r in rows)
    assert all(r["kv_reserved_bytes"] >= 0 for r in rows if r["status"] == "done")
    monkeypatch.setattr(prof, "_one_round", real)
    for spec, interleaved in (("fp16", rows[0]), ("qoq", rows[2]), ("int2", rows[4])):
        (alone,) = profile_method(model, build_method(spec), contexts=[32], new_tokens=2, repeats=2)
        assert all(alone[k] == interleaved[k] for k in ("kv_bytes", "kv_read_bytes_per_step", "nominal_bits"))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_peak_memory_sees_an_allocation():
    import torch

    with PeakMemory(torch.device("cpu")) as peak:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    assert peak.peak_bytes is not None and peak.peak_bytes >= 48 * 2**20


def test_router_timing_only_while_profiled(model):
    import torch

    from harness.integration import AttachedMethod, forward

    method = build_method("moqae:ckpt=random")
    with AttachedMethod(model, method) as am, torch.no_grad():
        forward(model, torch.zeros(1, 64, dtype=torch.long), am.new_cache())
    assert method.route_seconds == 0.0 and not method.time_routes


def test_profile_cli_writes_rows(tmp_path, capsys):
    out = tmp_path / "prof.json"
    argv = ["profile", "--methods", "int4", "--model", "tiny-llama", "--context", "32,64", "--new-tokens", "2"]
    assert main([*argv, "--repeats", "1", "--out", str(out), "--no-progress"]) == 0
    rows = json.loads(out.read_text())["rows"]
    # fp16 and transformers' DynamicCache first (the default references), measured in this process
    assert [(r["method"], r["context"]) for r in rows] == [
        ("fp16", 32), ("fp16", 64), ("dynamic", 32), ("dynamic", 64), ("int4", 32), ("int4", 64)
    ]  # fmt: skip
    assert all(r["interleaved"] for r in rows)  # the default: the methods' rounds in turn
    assert "the methods' rounds in turn" in out.with_suffix(".md").read_text().splitlines()[0]
    int4, dynamic = rows[4], rows[2]
    assert int4["kv_bytes"] < rows[0]["kv_bytes"] and 0 < int4["kv_bytes_ratio"] < 0.5
    assert dynamic["kv_bytes_ratio"] == 2.0  # fp32 against fp16, counted from the tensors held
    assert int4["decode_step_s_vs_dynamic"] == int4["decode_step_s"] / dynamic["decode_step_s"]
    assert dynamic["decode_step_s_vs_dynamic"] == 1.0 and "kv_bytes_vs_dynamic" in int4
    head = out.with_suffix(".md").read_text().splitlines()[2]
    assert "| decode ms/step | × fp16 | × dynamic |" in head and "| KV MiB | × fp16 | read MiB/step |" in head
    assert out.with_suffix(".md").exists() and out.with_suffix(".png").exists() and out.with_suffix(".svg").exists()
    argv = ["profile", "--methods", "int2", "--model", "tiny-llama", "--context", "16", "--new-tokens", "1"]
    threads = torch.get_num_threads()
    try:
        rc = main([*argv, "--repeats", "1", "--out", str(tmp_path / "t"), "--reference", "fp16", "--threads", "1",
                   "--sequential", "--no-progress"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    rows = json.loads((tmp_path / "t" / "profile.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["fp16", "int2"] and {r["torch_threads"] for r in rows} == {1}
    assert not any("interleaved" in r for r in rows)
    assert main(["profile", "--methods", "fp16", "--model", "tiny-llama", "--context", "0"]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert main(["profile", "--methods", "fp16", "--model", "tiny-llama", "--batch", "x"]) == 2


def test_plot_profile_writes_png_and_svg(tmp_path):
    """The CLI's profile plot is the report's plotter (harness.reports.plots.plot_against_context)."""
    from harness.profiling import plot_profile

    rows = [{"method": m, "model": "tiny", "device": "cpu", "dtype": "float32", "context": c, "batch": 1,
             "status": "done", "kv_bytes": k * c, "decode_step_s": 0.01 * k} for m, k in (("fp16", 4), ("int4", 1))
            for c in (64, 128)]  # fmt: skip
    paths = plot_profile(rows, tmp_path / "profile.png")
    assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.exists() for p in paths)
    assert paths[0].read_bytes()[:4] == b"\x89PNG"
    assert plot_profile([{**rows[0], "status": "oom"}], tmp_path / "none.png") == []


def test_profile_cli_several_thread_counts(tmp_path):
    """``--threads 1,2``: both counts in one process, rounds in turn, a row per count stating it,
    ratios within a count, a ``threads`` column; the process's count is restored afterwards."""
    import harness.profiling as prof

    seen, real = [], prof._one_round

    def spy(model, attached, ids, new_tokens):
        seen.append((attached.method.label, torch.get_num_threads()))
        return real(model, attached, ids, new_tokens)

    threads = torch.get_num_threads()
    argv = ["profile", "--methods", "int4", "--model", "tiny-llama", "--context", "16", "--new-tokens", "1"]
    try:
        prof._one_round = spy
        rc = main([*argv, "--repeats", "1", "--out", str(tmp_path), "--reference", "fp16", "--threads", "1,2",
                   "--no-progress"])  # fmt: skip
    finally:
        prof._one_round = real
    assert rc == 0 and torch.get_num_threads() == threads
    assert seen == [("fp16", 1), ("int4", 1), ("fp16", 2), ("int4", 2)] * 2  # warm-up round, timed round
    rows = json.loads((tmp_path / "profile.json").read_text())["rows"]
    assert [(r["method"], r["torch_threads"]) for r in rows] == [("fp16", 1), ("fp16", 2), ("int4", 1), ("int4", 2)]
    fp16 = {r["torch_threads"]: r for r in rows if r["method"] == "fp16"}
    for r in rows:
        assert r["decode_step_s_ratio"] == r["decode_step_s"] / fp16[r["torch_threads"]]["decode_step_s"]
    lines = (tmp_path / "profile.md").read_text().splitlines()
    assert "| method | context | batch | threads | prefill ms |" in lines[2]
    assert any(line.startswith("| int4 | 16 | 1 | 2 |") for line in lines)
    single = profile_table([{**r, "torch_threads": 1} for r in rows if r["torch_threads"] == 1], reference="fp16")
    assert "threads" not in single.splitlines()[0]  # one count: today's table
    assert main([*argv, "--threads", "0,2"]) == 2
    # `python -m harness report` keeps both counts: one latency table per count, ratios within it
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "README.md").read_text()
    for n in (1, 2):
        assert f"Profile, latency: tiny-llama, cpu, float32, {n} torch thread(s)" in text
