"""Profiling: times are measured per method on one model, router parameters and time are reported."""

from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.interface import build_method
from harness.models import tiny_random_model
from harness.profiling import overhead_table, profile_method


@pytest.fixture(scope="module")
def model():
    return tiny_random_model("llama", num_hidden_layers=6)


def test_profile_fp16_and_moqae(model):
    fp16 = profile_method(model, build_method("fp16"), prompt_len=96, decode_steps=3, repeats=1)
    moqae = profile_method(model, build_method("moqae:ckpt=random"), prompt_len=96, decode_steps=3, repeats=1)
    assert fp16["prefill_s"] > 0 and fp16["decode_step_s"] > 0 and fp16["method_parameters"] == 0
    assert "own_prefill_s" not in fp16
    cfg = model.config
    d, e = cfg.hidden_size, 3
    n_routers = len(range(0, cfg.num_hidden_layers, 3))  # routing sharing: one router per group of 3
    assert moqae["method_parameters"] == n_routers * (2 * d * e + e * e)  # W1, W2: D x E; W3: E x E
    assert 0 < moqae["own_prefill_s"] < moqae["prefill_s"]
    assert 0 < moqae["own_decode_step_s"] < moqae["decode_step_s"]
    n = cfg.num_hidden_layers * cfg.num_key_value_heads * (96 + 3) * (cfg.hidden_size // cfg.num_attention_heads)
    assert fp16["kv_bytes"] == 2 * 2 * n  # K and V, fp16, after prefill + 3 decode steps
    table = overhead_table([fp16, moqae])
    assert "| fp16 |" in table and "| moqae:ckpt=random |" in table and "1.000" in table


def test_router_timing_only_while_profiled(model):
    import torch

    from harness.integration import AttachedMethod, forward

    method = build_method("moqae:ckpt=random")
    with AttachedMethod(model, method) as am, torch.no_grad():
        forward(model, torch.zeros(1, 64, dtype=torch.long), am.new_cache())
    assert method.route_seconds == 0.0 and not method.time_routes


def test_profile_cli_writes_rows(tmp_path, capsys):
    out = tmp_path / "prof.json"
    argv = ["profile", "--methods", "fp16,int4", "--model", "tiny-llama", "--prompt", "64", "--decode", "2"]
    assert main([*argv, "--repeats", "1", "--out", str(out), "--no-progress"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["fp16", "int4"]
    assert rows[1]["kv_bytes"] < rows[0]["kv_bytes"]
    assert main(["profile", "--methods", "fp16", "--model", "tiny-llama", "--prompt", "0"]) == 2
    assert capsys.readouterr().err.startswith("error:")
